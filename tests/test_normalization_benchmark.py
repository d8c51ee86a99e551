"""The ADR 0002 benchmark script runs, reports every cell, and compares equivalent options.

Timings are never asserted: they depend on the machine. Only that the script runs,
what it reports, and that the options it compares compute the same thing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any, NamedTuple

import pytest
import torch

from conftest import BENCHMARKS, imported_script
from esper.tamiyo.policy.bench.harness import Settings, Timing

SCRIPT = BENCHMARKS / "normalization_options.py"
MODULE_NAME = "_bench_normalization_options"

OPTIONS = (
    "closure_def",
    "closure",
    "module_helper",
    "protocol_free_fn",
    "abstract_base_checked",
    "abstract_base_unchecked",
    "get_action_step",
)
FORMS = ("2d", "3d")
BATCHES = (1, 32)
MACHINE_KEYS = ("platform", "processor", "python", "torch", "threads", "device", "git_commit")
"""The bench harness's `machine_info` keys, and the commit the script adds."""
THREADS_OUTSIDE = 3
"""Torch threads set around a run, so that restoring them is seen (the run uses 1)."""


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The benchmark script, imported from its path (benchmarks/ is not a package)."""
    with imported_script(SCRIPT, MODULE_NAME) as module:
        yield module


class QuickRun(NamedTuple):
    """What one `--quick --json` run of the script returned and wrote."""

    exit_code: object
    payload: dict[str, Any]
    threads_before: int
    threads_after: int


@pytest.fixture(scope="module")
def quick_run(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """One `--quick` run shared by the tests that read its report."""
    out = tmp_path_factory.mktemp("bench") / "out.json"
    original = torch.get_num_threads()
    torch.set_num_threads(THREADS_OUTSIDE)
    try:
        before = torch.get_num_threads()
        exit_code = bench.main(["--quick", "--json", str(out)])
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(original)
    payload = json.loads(out.read_text(encoding="utf-8"))
    return QuickRun(exit_code, payload, before, after)


def test_quick_run_exits_zero_and_restores_torch_threads(quick_run: QuickRun) -> None:
    """A --quick run returns 0 and leaves torch's thread count as it found it."""
    assert quick_run.exit_code == 0
    assert quick_run.threads_before == THREADS_OUTSIDE
    assert quick_run.threads_after == quick_run.threads_before


def test_quick_run_reports_every_option_form_and_batch(quick_run: QuickRun) -> None:
    """The JSON has exactly one positive finite time per option x input form x batch."""
    cells: dict[tuple[str, str, int], float] = {}
    for record in quick_run.payload["results"]:
        key = (record["option"], record["input_form"], record["batch"])
        assert key not in cells, f"duplicate result for {key}"
        cells[key] = record["median_us"]
    expected = {(o, f, b) for o in OPTIONS for f in FORMS for b in BATCHES}
    assert set(cells) == expected
    for key, value in cells.items():
        assert isinstance(value, float), key
        assert math.isfinite(value), key
        assert value > 0, key


def test_quick_run_records_machine_and_torch_info(quick_run: QuickRun) -> None:
    """The JSON says which machine, Python, torch, thread count and commit produced it."""
    machine = quick_run.payload["machine"]
    for key in MACHINE_KEYS:
        assert key in machine, key
    assert machine["torch"] == torch.__version__
    assert machine["threads"] == 1
    assert machine["device"] == "cpu"
    assert isinstance(machine["git_commit"], str)
    assert machine["git_commit"]


def test_options_produce_the_same_features_and_masks(bench: ModuleType) -> None:
    """Every option, the abstract base's PolicyInputs included, expands inputs identically."""
    bench.check_equivalence()


def test_equivalence_check_catches_a_wrong_option(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_equivalence fails when an option drops the T axis it should add."""

    def broken(features: object, masks: dict[str, object]) -> tuple[object, dict[str, object]]:
        return features, masks

    monkeypatch.setattr(bench, "normalize_inputs", broken)
    with pytest.raises(AssertionError, match="protocol_free_fn"):
        bench.check_equivalence()


def test_quick_run_ratios_follow_the_medians(quick_run: QuickRun) -> None:
    """Each ratio is the option's median over the closure's median in the same cell."""
    results = quick_run.payload["results"]
    baseline = {
        (r["input_form"], r["batch"]): r["median_us"]
        for r in results
        if r["option"] == quick_run.payload["baseline"]
    }
    assert quick_run.payload["baseline"] == "closure"
    assert set(baseline) == {(f, b) for f in FORMS for b in BATCHES}
    for record in results:
        expected = record["median_us"] / baseline[record["input_form"], record["batch"]]
        assert math.isclose(record["ratio_vs_closure"], expected), record["option"]
        assert record["min_us"] <= record["median_us"] <= record["max_us"], record["option"]


def test_quick_run_records_its_settings(bench: ModuleType, quick_run: QuickRun) -> None:
    """The JSON says the run was quick, with the harness settings it ran with."""
    settings = quick_run.payload["settings"]
    assert settings["mode"] == "quick"
    assert settings["repeats"] == bench.QUICK.repeats
    assert settings["target_block_s"] == bench.QUICK.target_block_s
    for record in quick_run.payload["results"]:
        assert record["repeats"] == bench.QUICK.repeats
        assert record["calls_per_block"] >= 1


def test_measure_case_reports_the_harness_timings(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every option goes to the harness as a ready call; its timing becomes the record."""
    seen: list[str] = []

    def fake_time_interleaved(calls: dict[str, Any], settings: Settings) -> dict[str, Timing]:
        assert settings is bench.QUICK
        timings: dict[str, Timing] = {}
        for index, (name, call) in enumerate(calls.items(), start=1):
            call()  # takes no argument: its inputs are bound
            seen.append(name)
            timings[name] = Timing(2.0 * index, 1.0 * index, 3.0 * index, 10 * index)
        return timings

    monkeypatch.setattr(bench, "time_interleaved", fake_time_interleaved)
    checked, unchecked = bench.make_bundle(), bench.make_bundle()
    unchecked.check_values = False
    case = bench.make_case(checked, "2d", 4, torch.Generator().manual_seed(0))
    records = bench.measure_case(checked, unchecked, case, bench.QUICK)

    assert seen == list(OPTIONS)
    assert [r["option"] for r in records] == list(OPTIONS)
    closure_median = 2.0 * (OPTIONS.index("closure") + 1)
    for index, record in enumerate(records, start=1):
        assert record["label"] == bench.OPTION_LABELS[record["option"]]
        assert (record["input_form"], record["batch"]) == ("2d", 4)
        assert (record["median_us"], record["min_us"], record["max_us"]) == (
            2.0 * index,
            1.0 * index,
            3.0 * index,
        )
        assert record["calls_per_block"] == 10 * index
        assert record["ratio_vs_closure"] == pytest.approx(2.0 * index / closure_median)


def test_failed_equivalence_check_restores_torch_threads(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the options disagree the run stops before timing, thread count restored."""

    def broken(features: object, masks: dict[str, object]) -> tuple[object, dict[str, object]]:
        return features, masks

    def no_timing(*args: object) -> object:
        raise AssertionError("timed despite a failed equivalence check")

    monkeypatch.setattr(bench, "normalize_inputs", broken)
    monkeypatch.setattr(bench, "time_interleaved", no_timing)
    original = torch.get_num_threads()
    torch.set_num_threads(THREADS_OUTSIDE)
    try:
        with pytest.raises(AssertionError, match="protocol_free_fn"):
            bench.main(["--quick"])
        assert torch.get_num_threads() == THREADS_OUTSIDE
    finally:
        torch.set_num_threads(original)
