"""The demo-study scripts of ADRs 0009 and 0010 run, and report what their tables say."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from conftest import BENCHMARKS, imported_script
from esper.tamiyo.policy.demo import IterationStats, UpdateStats


@pytest.fixture(scope="module")
def blueprints() -> Iterator[ModuleType]:
    """`demo_blueprints`, with the `demo_floors` it imports by name."""
    with (
        imported_script(BENCHMARKS / "demo_floors.py", "demo_floors"),
        imported_script(BENCHMARKS / "demo_blueprints.py", "_demo_blueprints") as module,
    ):
        yield module


def _stats(success: float) -> IterationStats:
    update = UpdateStats(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, head_entropy={}, relevance_rate={})
    return IterationStats(1, 1, 1, 0.0, success, 0, 0, update)


def test_collapses_are_the_stretches_under_80_percent_after_first_reaching_90(
    blueprints: ModuleType,
) -> None:
    floors = blueprints.collapses.__module__
    assert floors == "demo_floors"
    rates = [0.5, 0.95, 0.7, 0.6, 0.9, math.nan, 0.79, 0.85, 0.2]
    assert blueprints.collapses([_stats(r) for r in rates]) == [0.6, 0.79, 0.2]
    assert blueprints.collapses([_stats(r) for r in (0.5, 0.7)]) == []


def test_a_run_with_and_without_the_embedding_reports_its_figures(
    blueprints: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = {f"dim {dim}": [blueprints.run(0, 1024, dim)] for dim in (0, 2)}
    for (figures,) in runs.values():
        assert 0.0 <= figures["eval_success"] <= 1.0
        assert figures["success_curve"][-1][0] == 1024
        assert figures["first_90"] is None or figures["first_90"] <= 1024
    assert runs["dim 2"][0]["blueprint_embed_dim"] == 2
    header = "| label | seed | a | b | c | d | e | f | g | h |"
    path = tmp_path / "out.json"
    blueprints.print_means_and_save(header, runs, blueprints.row, path, {"steps": 1024})
    written = json.loads(path.read_text())
    assert written["steps"] == 1024
    assert set(written["runs"]) == {"dim 0", "dim 2"}
    printed = capsys.readouterr().out
    assert printed.count("| mean |") == 2
