"""`esper-policy bench` runs, reports every row and target, and measures honestly.

Timings are never asserted: they depend on the machine. Only that the command runs,
what it reports, that the memory tracker counts real bytes, and that the two
normalizations it compares compute the same thing.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from esper.tamiyo.policy import HEAD_NAMES, ActionSpace, LSTMPolicyBundle
from esper.tamiyo.policy.bench import memory, suite
from esper.tamiyo.policy.bench.harness import single_thread
from esper.tamiyo.policy.bench.memory import LiveStorageBytes
from esper.tamiyo.policy.bench.report import Report, write_json
from esper.tamiyo.policy.bench.seed_design import SeedLSTMBundle, mask_kwargs
from esper.tamiyo.policy.cli import main
from esper.tamiyo.policy.testing import random_masks

MACHINE_KEYS = {"platform", "processor", "cpu_count", "python", "torch", "threads", "device"}
QUICK_ROWS = {
    "normalize/2d/helper",
    "normalize/2d/normalize",
    "normalize/2d/checked",
    "normalize/3d/helper",
    "normalize/3d/normalize",
    "normalize/3d/checked",
    "get_action/B=1",
    "get_action/B=1/unchecked",
    "get_action/B=1/old_unvalidated",
    "get_action/B=1/network",
    "get_action/B=32",
    "get_action/B=32/unchecked",
    "get_action/B=32/old_unvalidated",
    "get_action/B=32/network",
    "evaluate/B=8,T=16",
    "evaluate/B=8,T=16/old_unvalidated",
    "evaluate/B=8,T=16/network",
    "hierarchy/get_action/B=1",
    "hierarchy/get_action/B=1/flat_masks",
    "hierarchy/get_action/B=32",
    "hierarchy/get_action/B=32/flat_masks",
    "hierarchy/evaluate/B=8,T=16",
    "memory/B=8,T=16",
    "floors/get_action/B=1",
    "floors/get_action/B=1/tamiyo",
    "floors/get_action/B=32",
    "floors/get_action/B=32/tamiyo",
    "blueprints/get_action/B=1",
    "blueprints/get_action/B=32",
}
TARGETS = {
    "get_action/B=1",
    "get_action/B=32",
    "evaluate/B=8,T=16",
    "evaluate/B=32,T=32",
    "memory/B=32,T=32",
    "normalize",
    "overhead_share",
    "hierarchy/get_action/B=1",
    "hierarchy/get_action/B=1/flat_masks",
    "hierarchy/get_action/B=32",
    "hierarchy/get_action/B=32/flat_masks",
    "hierarchy/evaluate/B=8,T=16",
    "floors/get_action/B=1",
    "floors/get_action/B=1/tamiyo",
    "floors/get_action/B=32",
    "floors/get_action/B=32/tamiyo",
}
THREADS_BEFORE = 2


class QuickRun(NamedTuple):
    """What one `esper-policy bench --quick --json PATH` printed, returned and wrote."""

    exit_code: int
    out: str
    payload: dict[str, Any]
    threads_after: int


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """One quick run, started with a thread count other than 1, shared by the tests."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    original = torch.get_num_threads()
    torch.set_num_threads(THREADS_BEFORE)
    try:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(["bench", "--quick", "--json", str(path)])
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(original)
    payload = json.loads(path.read_text(encoding="utf-8"))
    return QuickRun(code, buffer.getvalue(), payload, after)


def test_quick_bench_exits_zero_and_prints_every_section(quick_run: QuickRun) -> None:
    """The quick run exits 0 and prints every section but the compiled one, and the targets."""
    assert quick_run.exit_code == 0
    for key, title in suite.SECTIONS.items():
        assert (title in quick_run.out) == (key != "compile"), key
    assert "Targets" in quick_run.out
    assert "new/old" in quick_run.out


def test_quick_bench_writes_the_json_keys(quick_run: QuickRun) -> None:
    """The JSON has machine, commit, timestamp, settings, results and targets."""
    payload = quick_run.payload
    assert {"machine", "commit", "timestamp", "settings", "results", "targets"} <= set(payload)
    assert set(payload["machine"]) >= MACHINE_KEYS
    assert payload["machine"]["threads"] == 1
    assert payload["machine"]["torch"] == torch.__version__
    assert isinstance(payload["commit"], str)
    assert payload["commit"]
    assert payload["settings"]["mode"] == "quick"


def test_every_row_has_positive_finite_figures_and_their_ratio(quick_run: QuickRun) -> None:
    """Each row has positive finite old/new figures and ratio = new / old; none is missing."""
    keys: set[str] = set()
    for row in quick_run.payload["results"]:
        unit = row["unit"]
        old, new = row[f"old_{unit}"], row[f"new_{unit}"]
        for value in (old, new):
            assert isinstance(value, (int, float)), row
            assert math.isfinite(value), row
            assert value > 0, row
        assert row["ratio"] == pytest.approx(new / old), row
        assert "error" not in row, row
        keys.add(row["key"])
    assert keys == QUICK_ROWS


def test_every_target_is_reported_with_a_boolean(quick_run: QuickRun) -> None:
    """The targets list has every target, each with a boolean `met`."""
    targets = quick_run.payload["targets"]
    assert {target["key"] for target in targets} == TARGETS
    assert len(targets) == len(TARGETS)
    for target in targets:
        assert isinstance(target["met"], bool), target
    assert "measured" in quick_run.out


def test_full_run_targets_are_unmet_and_unmeasured_in_a_quick_run(quick_run: QuickRun) -> None:
    """The (32, 32) targets need the full run: a quick run says so, and never claims them."""
    targets = {target["key"]: target for target in quick_run.payload["targets"]}
    for key in ("evaluate/B=32,T=32", "memory/B=32,T=32"):
        assert targets[key]["value"] is None, key
        assert targets[key]["met"] is False, key
        assert targets[key]["detail"] == "not measured", key


def test_speed_targets_show_the_network_alone_beside_the_ratio(quick_run: QuickRun) -> None:
    """Each measured speed target's detail gives the floor from its `/network` row."""
    rows = {row["key"]: row for row in quick_run.payload["results"]}
    targets = {target["key"]: target for target in quick_run.payload["targets"]}
    for key in ("get_action/B=1", "get_action/B=32", "evaluate/B=8,T=16"):
        floor = rows[f"{key}/network"]["ratio"]
        assert f"the new network alone {floor:.3f}" in targets[key]["detail"], key


def test_the_network_rows_run_the_network_that_get_action_runs() -> None:
    """`network_step` gives the logits and value `get_action` samples from, for the same inputs."""
    torch.manual_seed(0)
    bundles = suite.build_bundles(16, torch.device("cpu"))
    case = suite.make_case(bundles.new, (3,), 16, torch.Generator().manual_seed(1))
    logits, value, _, _ = suite.network_step(bundles.new, case.features.unsqueeze(1), case)
    step = bundles.new.get_action(case.features, case.masks, case.hidden)
    assert torch.equal(value[:, 0], step.value)
    assert logits.shape == (
        3,
        1,
        bundles.new.action_space.num_heads,
        bundles.new.action_space.padded_size,
    )


def test_the_floored_bundle_has_the_weights_and_the_floors() -> None:
    """Section 7 compares the same network with and without floors: only the floors differ."""
    torch.manual_seed(0)
    bundles = suite.build_bundles(16, torch.device("cpu"))
    for plain in (bundles.new, suite.hierarchical_bundle(bundles.new)):
        floored = suite.floored_bundle(plain)
        assert floored.probability_floor == suite.BENCH_FLOORS
        assert floored.action_space == plain.action_space
        theirs = floored.state_dict()
        for name, value in plain.state_dict().items():  # weights, and the heads' sizes
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, theirs[name]), name
            else:
                assert value == theirs[name], name
        x = torch.randn(3, 16)
        hidden = plain.initial_hidden(3)
        assert torch.equal(plain.get_value(x, hidden), floored.get_value(x, hidden))


def test_the_network_training_step_reaches_every_weight() -> None:
    """`network_training_step` leaves a gradient on every parameter the PPO step trains."""
    torch.manual_seed(0)
    bundles = suite.build_bundles(16, torch.device("cpu"))
    case = suite.make_case(
        bundles.new, (2, 4), 16, torch.Generator().manual_seed(1), with_actions=True
    )
    suite.network_training_step(bundles.new, case)
    for name, param in bundles.new.network.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_the_bench_restores_the_thread_count(quick_run: QuickRun) -> None:
    """The bench measures with one thread and leaves the count as it found it."""
    assert quick_run.payload["machine"]["threads"] == 1
    assert quick_run.threads_after == THREADS_BEFORE


def _fail_with_one_thread(seen: list[int]) -> None:
    with single_thread():
        seen.append(torch.get_num_threads())
        raise RuntimeError("inside")


def test_single_thread_restores_the_count_even_on_error() -> None:
    """single_thread sets one thread inside and restores the count after an exception."""
    original = torch.get_num_threads()
    torch.set_num_threads(THREADS_BEFORE)
    seen: list[int] = []
    try:
        with pytest.raises(RuntimeError, match="inside"):
            _fail_with_one_thread(seen)
        assert torch.get_num_threads() == THREADS_BEFORE
    finally:
        torch.set_num_threads(original)
    assert seen == [1]


def test_memory_tracker_counts_a_known_allocation_and_its_release() -> None:
    """A tensor of N bytes made inside the mode raises the peak by N; freeing it gives it back."""
    size = 3 * 1024 * 1024
    tracker = LiveStorageBytes()
    with tracker:
        block = torch.empty(size, dtype=torch.uint8)
        assert tracker.live == size
        del block
    assert tracker.peak >= size
    assert tracker.live == 0


def test_memory_tracker_ignores_views_of_older_tensors() -> None:
    """Views and in-place results of tensors made before the mode allocate nothing."""
    older = torch.zeros(1024)
    tracker = LiveStorageBytes()
    with tracker:
        view = older.view(32, 32).t()
        view.add_(1.0)
    assert tracker.peak == 0
    assert tracker.live == 0


def test_memory_tracker_keeps_storage_saved_for_backward_live() -> None:
    """An output autograd saves stays counted after the caller drops it, until backward."""
    weight = torch.randn(256, requires_grad=True)
    tracker = LiveStorageBytes()
    with tracker:
        hidden = weight.sigmoid()  # sigmoid saves its output for the backward pass
        loss = hidden.sum()
        del hidden
        assert tracker.live >= 256 * 4
        torch.autograd.backward(loss)
        del loss
    assert tracker.live == weight.nelement() * 4  # only the new gradient remains
    assert weight.grad is not None


def test_memory_module_examples_run() -> None:
    """The docstring example of the memory module runs and prints what it claims."""
    assert doctest.testmod(memory).failed == 0


@pytest.mark.parametrize(
    "lead", [(1,), (4,), (1, 1), (4, 1)], ids=["2d-B1", "2d-B4", "3d-B1", "3d-B4"]
)
def test_closure_and_module_helper_normalize_alike(lead: tuple[int, ...]) -> None:
    """The closure baseline and the module-level helper give the same [B, 1, ...] tensors."""
    batch = lead[0]
    features = torch.randn(*lead, 5)
    masks = mask_kwargs(random_masks(lead, unmasked=("style", "op")))
    closure_features, closure_masks = suite.normalize_closure(features, **masks)
    helper_features, helper_masks = suite.normalize_module_helper(features, **masks)
    assert closure_features.shape == (batch, 1, 5)
    assert torch.equal(closure_features, helper_features)
    sizes = ActionSpace().sizes
    for name, size, got, expected in zip(
        HEAD_NAMES, sizes, helper_masks, closure_masks, strict=True
    ):
        if name in ("style", "op"):
            assert got is None
            assert expected is None
            continue
        assert expected is not None
        assert got is not None
        assert expected.shape == (batch, 1, size)
        assert torch.equal(got, expected)


def test_the_baseline_keeps_its_per_call_closure() -> None:
    """normalize_closure still defines expand_mask inside itself: it is the finding measured."""
    nested = [
        const.co_name
        for const in suite.normalize_closure.__code__.co_consts
        if hasattr(const, "co_name")
    ]
    assert nested == ["expand_mask"]


def test_a_failing_compile_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """When PolicyBundle.compile raises, the bench gets the error message, not an exception."""

    def broken_compile(self: LSTMPolicyBundle, **kwargs: object) -> LSTMPolicyBundle:
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(LSTMPolicyBundle, "compile", broken_compile, raising=False)
    result = suite.compile_new_bundle(
        SeedLSTMBundle(4, hidden_dim=8, embed_dim=8), torch.device("cpu"), {}
    )
    assert result == "RuntimeError: no C++ compiler | second line"


def test_json_path_folder_is_created(tmp_path: Path) -> None:
    """write_json creates the folder of the path it is given."""
    report = Report({}, "unknown", "now", {}, {})
    path = tmp_path / "deeper" / "bench.json"
    write_json(report, path)
    assert json.loads(path.read_text(encoding="utf-8"))["commit"] == "unknown"


@pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"
)
def test_the_compiled_section_times_old_eager_and_compiled_side_by_side() -> None:
    """With compile on (the eager backend here: no C++ toolchain needed), section 9 fills."""
    options = suite.BenchOptions(quick=True, repeats=2, compile=True)
    options.compile_kwargs["backend"] = "eager"
    report = suite.run_suite(options)
    compiled = {row.key: row for row in report.rows if row.section == "compile"}
    assert set(compiled) == {
        "compile/get_action/B=1",
        "compile/get_action/B=1/eager",
        "compile/get_action/B=32",
        "compile/get_action/B=32/eager",
        "compile/evaluate/B=8,T=16",
        "compile/evaluate/B=8,T=16/eager",
        "compile/floors/get_action/B=1",
        "compile/floors/get_action/B=1/tamiyo",
        "compile/floors/get_action/B=32",
        "compile/floors/get_action/B=32/tamiyo",
    }
    for row in compiled.values():
        assert row.error is None, row.error
        assert row.ratio is not None
        assert row.ratio > 0


def test_the_unvalidated_baseline_restores_torch_distributions_validation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The baseline without validation turns it off for its call only."""
    old = SeedLSTMBundle(4, hidden_dim=8, embed_dim=8)
    case = suite.make_case(suite.matching_bundle(old), (2,), 4, torch.Generator().manual_seed(0))
    seen: list[bool] = []
    real = torch.distributions.Categorical.__init__

    def spy(self: torch.distributions.Categorical, *args: Any, **kwargs: Any) -> None:
        seen.append(torch.distributions.Distribution._validate_args)
        real(self, *args, **kwargs)

    monkeypatch.setattr(torch.distributions.Categorical, "__init__", spy)
    before = torch.distributions.Distribution._validate_args
    suite.old_get_action_unvalidated(old, case)
    assert seen
    assert not any(seen)
    assert torch.distributions.Distribution._validate_args == before
    seen.clear()
    suite.old_get_action(old, case)
    assert all(seen)
