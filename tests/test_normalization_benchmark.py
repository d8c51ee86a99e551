"""The ADR 0002 benchmark script runs, reports every cell, and compares equivalent options.

Timings are never asserted: they depend on the machine. Only that the script runs,
what it reports, and that the options it compares compute the same thing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "normalization_options.py"
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
MACHINE_KEYS = ("platform", "processor", "python", "torch", "torch_threads", "git_commit")


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The benchmark script, imported from its path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(MODULE_NAME, SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(MODULE_NAME, None)


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
    before = torch.get_num_threads()
    exit_code = bench.main(["--quick", "--json", str(out)])
    after = torch.get_num_threads()
    payload = json.loads(out.read_text(encoding="utf-8"))
    return QuickRun(exit_code, payload, before, after)


def test_quick_run_exits_zero_and_restores_torch_threads(quick_run: QuickRun) -> None:
    """A --quick run returns 0 and leaves torch's thread count as it found it."""
    assert quick_run.exit_code == 0
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
    assert machine["torch_threads"] == 1
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
