"""Timing harness of `esper-policy bench`: interleaved repeats, medians, machine facts.

A measurement times several callables side by side in one process: each is warmed up
and calibrated so that one block of calls lasts about a target time, then every repeat
times one block of each, the starting callable rotating from repeat to repeat, so that
drift in the machine's speed hits them all alike. The figure kept is the median over
repeats of the time per call.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Settings",
    "Timing",
    "git_commit",
    "machine_info",
    "no_sync",
    "single_thread",
    "time_interleaved",
]

Call = Callable[[], object]
"""One call of the code under measurement, its arguments already bound."""


@dataclass(frozen=True, slots=True)
class Settings:
    """How long to measure.

    Attributes:
        mode: `full` or `quick`.
        repeats: Timed blocks per callable; the median is over these.
        target_block_s: Calibrated duration of one block of calls.
        warmup_calls: Calls run before calibrating (compilation happens here).
        max_calls: Most calls in one block.
    """

    mode: str
    repeats: int
    target_block_s: float
    warmup_calls: int
    max_calls: int = 100_000


@dataclass(frozen=True, slots=True)
class Timing:
    """Microseconds per call of one callable over the repeats.

    Attributes:
        median_us: Median over repeats: the figure reported.
        min_us: Fastest repeat.
        max_us: Slowest repeat.
        calls_per_repeat: Calls in each timed block.
    """

    median_us: float
    min_us: float
    max_us: float
    calls_per_repeat: int


def no_sync() -> None:
    """The device sync of a CPU run: nothing to wait for."""


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with one torch thread; restore the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _time_block(call: Call, calls: int, sync: Callable[[], None]) -> float:
    """Seconds that `calls` calls take, device work included, garbage collector off."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        sync()
        return time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()


def _calibrate(call: Call, settings: Settings, sync: Callable[[], None]) -> int:
    """Warm `call` up; return how many calls take about one target block."""
    for _ in range(settings.warmup_calls):
        call()
    calls = 1
    while True:
        elapsed = _time_block(call, calls, sync)
        if elapsed >= settings.target_block_s / 4 or calls >= settings.max_calls:
            break
        calls = min(calls * 4, settings.max_calls)
    per_call = max(elapsed / calls, 1e-9)
    return max(1, min(settings.max_calls, math.ceil(settings.target_block_s / per_call)))


def time_interleaved(
    calls: Mapping[str, Call], settings: Settings, sync: Callable[[], None] = no_sync
) -> dict[str, Timing]:
    """Time several callables side by side, interleaved within every repeat.

    Args:
        calls: Name to a callable taking no argument.
        settings: Warm-up, block duration and repeats.
        sync: Waits for the device (`torch.cuda.synchronize` on a GPU); called
            before and after every timed block.

    Returns:
        Name to its timing, in the order of `calls`.
    """
    names = list(calls)
    counts: dict[str, int] = {}
    samples: dict[str, list[float]] = {}
    for name in names:
        counts[name] = _calibrate(calls[name], settings, sync)
        samples[name] = []
    for repeat in range(settings.repeats):
        first = repeat % len(names)  # rotate, so that no callable always follows another
        for name in names[first:] + names[:first]:
            seconds = _time_block(calls[name], counts[name], sync)
            samples[name].append(seconds / counts[name] * 1e6)
    timings: dict[str, Timing] = {}
    for name in names:
        runs = samples[name]
        timings[name] = Timing(statistics.median(runs), min(runs), max(runs), counts[name])
    return timings


def git_commit() -> str:
    """Short commit of the checkout holding this package (`+dirty` with local changes).

    `unknown` outside a git checkout.
    """
    here = Path(__file__).resolve().parent
    try:
        head = _git(here, "rev-parse", "--short", "HEAD")
        changes = _git(here, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return f"{head}+dirty" if changes else head


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=folder, capture_output=True, text=True, check=True, timeout=10
    )
    return done.stdout.strip()


def _cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What produces the numbers: platform, processor, Python, torch, threads, device."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": name,
    }
