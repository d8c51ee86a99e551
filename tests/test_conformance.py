"""The conformance kit: every registered bundle passes it, and every clause can fail.

`VIOLATIONS` is the kit's own mutation test: one small bundle per clause, each with
one plausible bug, and the clause that must catch it.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from torch import nn

from broken_bundle import BrokenBundle
from conftest import FEATURE_DIM, TinyStatelessBundle, load_guide_example
from esper.tamiyo.policy import (
    ActionSpace,
    NetworkOutput,
    PolicyBundle,
    PolicyHeads,
    PolicyInputs,
    UniformPolicyBundle,
    get_policy,
    list_policies,
)
from esper.tamiyo.policy.base import MaskArg
from esper.tamiyo.policy.inputs import HiddenState
from esper.tamiyo.policy.testing import (
    ClauseResult,
    ConformanceReport,
    check_bundle,
    run_checks,
)

CLAUSES = [
    "builds",
    "shapes",
    "deterministic",
    "masks as mapping or dataclass",
    "masks respected",
    "reproducible under a seed",
    "rollout and update agree",
    "rows independent",
    "gradients",
    "network called as a module",
    "hidden state round trip",
    "state_dict round trip",
    "float64",
    "bad inputs refused",
    "no per-call closures",
]


def _failed(report: ConformanceReport) -> dict[str, str]:
    return {result.clause: result.detail for result in report.failures}


@pytest.mark.parametrize("name", list_policies())
def test_every_registered_policy_conforms(name: str) -> None:
    """A new registration is covered here with no new test code."""
    report = check_bundle(get_policy(name))
    assert [result.clause for result in report.results] == CLAUSES
    assert report.passed


def test_the_guide_example_conforms() -> None:
    module = load_guide_example()
    report = check_bundle(module.GRUPolicyBundle)
    assert report.passed
    assert report.subject == "GRUPolicyBundle"


def test_small_and_odd_widths_conform() -> None:
    for width in (1, 2, 13):
        check_bundle(get_policy("lstm"), feature_dim=width)


def test_the_broken_bundle_fails_exactly_its_three_clauses() -> None:
    report = run_checks(BrokenBundle)
    failed = _failed(report)
    assert set(failed) == {"rows independent", "float64", "no per-call closures"}
    assert "must not depend on the others in the batch" in failed["rows independent"]
    assert "returns torch.float32 values" in failed["float64"]
    assert "BrokenBundle._forward.<locals>.centre" in failed["no per-call closures"]


def test_check_bundle_raises_one_error_listing_every_failed_clause() -> None:
    with pytest.raises(AssertionError) as info:
        check_bundle(BrokenBundle)
    message = str(info.value)
    assert message.startswith("BrokenBundle fails 3 of 15 conformance clauses:")
    assert message.count("\n- ") == 3
    for clause in ("rows independent", "float64", "no per-call closures"):
        assert f"- {clause}: " in message


def test_the_report_formats_one_line_per_clause() -> None:
    text = run_checks(BrokenBundle).format().splitlines()
    assert text[0] == "Conformance of BrokenBundle:"
    assert len(text) == 2 + len(CLAUSES)
    assert text[1] == "  PASS  builds"
    assert any(line.startswith("  FAIL  float64: after to(torch.float64)") for line in text)
    assert text[-1] == "15 clauses, 3 failed."


def test_the_callers_random_state_is_left_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    run_checks(UniformPolicyBundle)
    assert torch.equal(torch.rand(3), expected)


def test_a_factory_that_builds_no_bundle_fails_every_clause_as_not_run() -> None:
    report = run_checks(lambda dim: nn.Linear(dim, 2))  # type: ignore[arg-type,return-value]
    assert not report.passed
    builds = report.results[0]
    assert builds == ClauseResult(
        "builds",
        False,
        "factory(7) returned Linear, not a PolicyBundle; return an instance of your "
        "PolicyBundle subclass",
    )
    assert {result.detail for result in report.results[1:]} == {
        "not run: the factory built no bundle"
    }


def test_a_factory_that_raises_is_reported() -> None:
    def factory(dim: int) -> PolicyBundle:
        raise RuntimeError("out of cheese")

    detail = run_checks(factory).results[0].detail
    assert detail.startswith("raised RuntimeError: out of cheese (test_conformance.py:")


def test_bad_arguments_to_the_kit_are_type_errors() -> None:
    with pytest.raises(TypeError, match="factory must be callable"):
        run_checks(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="feature_dim must be a positive int"):
        run_checks(UniformPolicyBundle, feature_dim=0)


# ---------------------------------------------------------------- one bug per clause


_SAME = TinyStatelessBundle()


class _IgnoresMappingMasks(TinyStatelessBundle):
    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        if isinstance(masks, dict):  # bug: only ActionMasks honoured
            masks = None
        return super()._normalize_inputs(features, masks, hidden, actions)


class _DropsMasks(TinyStatelessBundle):
    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        return super()._normalize_inputs(features, None, hidden, actions)  # bug: masks dropped


class _PrivateNoise(TinyStatelessBundle):
    def __init__(self, feature_dim: int) -> None:
        super().__init__(feature_dim)
        self.noise = torch.Generator().manual_seed(99)  # bug: not torch's global generator

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        out = super()._forward(inputs)
        if torch.is_grad_enabled():  # forward() stays deterministic; rollouts do not
            return out
        noise = torch.rand(out.logits.shape, generator=self.noise) * 10.0
        return NetworkOutput(out.logits + noise, out.value, None)


class _Dropout(TinyStatelessBundle):
    def __init__(self, feature_dim: int) -> None:
        super().__init__(feature_dim)
        torso = self.network.torso
        assert isinstance(torso, nn.Sequential)
        torso.append(nn.Dropout(0.5))  # bug: random in training mode


class _DependsOnLength(TinyStatelessBundle):
    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        out = super()._forward(inputs)
        return NetworkOutput(out.logits * inputs.seq_len, out.value, None)  # bug


class _UnusedParameter(TinyStatelessBundle):
    def __init__(self, feature_dim: int) -> None:
        super().__init__(feature_dim)
        self.network.spare = nn.Linear(2, 2)  # bug: never used


class _CallsForwardDirectly(TinyStatelessBundle):
    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        logits, value = self.network.forward(inputs.features)  # bug: skips hooks
        return NetworkOutput(logits, value, None)


class _PlainTensorWeight(TinyStatelessBundle):
    def __init__(self, feature_dim: int) -> None:
        super().__init__(feature_dim)
        self.scale = torch.rand(())  # bug: state outside the state_dict

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        out = super()._forward(inputs)
        return NetworkOutput(out.logits, out.value * self.scale, None)


class _CleansNaN(TinyStatelessBundle):
    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        if isinstance(features, torch.Tensor) and features.is_floating_point():
            features = torch.nan_to_num(features)  # bug: hides bad inputs
        return super()._normalize_inputs(features, masks, hidden, actions)


class _Comprehension(TinyStatelessBundle):
    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        logits, value = self.network(inputs.features)
        parts = [logits[..., h, :] for h in range(logits.shape[-2])]  # a loop, not a closure
        return NetworkOutput(torch.stack(parts, dim=-2), value, None)


class _WrongLogitsShape(TinyStatelessBundle):
    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        out = super()._forward(inputs)
        return NetworkOutput(out.logits[..., :8], out.value, None)  # bug: unpadded


def _forgetful_gru() -> Callable[[int], PolicyBundle]:
    module = load_guide_example()

    class ForgetfulGRU(module.GRUPolicyBundle):  # type: ignore[misc,name-defined]
        def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
            zeros = self.initial_hidden(inputs.batch_size)  # bug: forgets the state
            return super()._forward(dataclasses.replace(inputs, hidden=zeros))  # type: ignore[no-any-return]

    return ForgetfulGRU


_SHARED_TORSO = TinyStatelessBundle().network


class _SharesItsNetwork(TinyStatelessBundle):
    def __init__(self, feature_dim: int) -> None:
        super().__init__(feature_dim)
        self.network = _SHARED_TORSO  # bug: every bundle trains the same weights


class _GradInRollouts(TinyStatelessBundle):
    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        with torch.enable_grad():  # bug: builds a graph in get_action
            return super()._forward(inputs)


class _PeeksBeforeChecking(TinyStatelessBundle):
    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        if (
            isinstance(features, torch.Tensor)
            and features.is_floating_point()
            and features.dim() == 2
            and features.shape[-1] == self.feature_dim
        ):
            self.network(features.unsqueeze(1))  # bug: runs before the checks
        return super()._normalize_inputs(features, masks, hidden, actions)


class _DropsHidden(TinyStatelessBundle):
    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        return super()._normalize_inputs(features, masks, None, actions)  # bug: ignores it


class _IgnoresDtype(TinyStatelessBundle):
    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> _IgnoresDtype:
        return self  # bug: does not move


class _StatelessWithState(TinyStatelessBundle):
    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        out = super()._forward(inputs)
        return NetworkOutput(out.logits, out.value, (out.value.unsqueeze(0),))  # bug


class _LogitBiasOutsideState(TinyStatelessBundle):
    def __init__(self, feature_dim: int) -> None:
        super().__init__(feature_dim)
        self.bias = torch.rand(16)  # bug: a logit bias outside the state_dict

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        out = super()._forward(inputs)
        return NetworkOutput(out.logits + self.bias, out.value, None)


def _gru_with_grad_hidden() -> Callable[[int], PolicyBundle]:
    module = load_guide_example()

    class GradHiddenGRU(module.GRUPolicyBundle):  # type: ignore[misc,name-defined]
        def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
            out: NetworkOutput = super()._forward(inputs)
            assert out.hidden is not None
            hidden = (out.hidden[0].detach().requires_grad_(),)  # bug: a leaf needing grad
            return NetworkOutput(out.logits, out.value, hidden)

    return GradHiddenGRU


class _LambdaPerCall(TinyStatelessBundle):
    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        logits, value = self.network(inputs.features)
        heads = sorted(range(logits.shape[-2]), key=lambda h: h)  # bug: a lambda per call
        return NetworkOutput(logits[..., heads, :], value, None)


class _NestedDefInAHelper(TinyStatelessBundle):
    """Only the run-time check can see this one: the source check reads the hook alone."""

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        logits, value = self.network(inputs.features)
        return NetworkOutput(self._kept(logits), value, None)

    def _kept(self, logits: torch.Tensor) -> torch.Tensor:
        def keep(t: torch.Tensor) -> torch.Tensor:  # bug: a nested function per call
            return t

        return keep(logits)


class _Loops(TinyStatelessBundle):
    """Every kind of comprehension, in the hook and in a helper: loops, not closures."""

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        logits, value = self.network(inputs.features)
        heads = {h: logits[..., h, :] for h in range(logits.shape[-2])}  # dict
        return NetworkOutput(self._restacked([heads[h] for h in sorted(heads)]), value, None)

    def _restacked(self, parts: list[torch.Tensor]) -> torch.Tensor:
        widths = {part.shape[-1] for part in parts}  # set
        assert len(widths) == 1
        assert all(part.dim() >= 2 for part in parts)  # generator expression
        return torch.stack(parts, dim=-2)


VIOLATIONS: list[tuple[str, Callable[[], Callable[[int], Any]], str]] = [
    ("builds", lambda: lambda dim: _SAME, "returned the same bundle twice"),
    (
        "builds",
        lambda: lambda dim: TinyStatelessBundle(dim + 1),
        "built a bundle with feature_dim=",
    ),
    ("builds", lambda: _SharesItsNetwork, "share 6 parameter tensor(s)"),
    ("deterministic", lambda: _Dropout, "dropout or other randomness?"),
    ("shapes", lambda: _WrongLogitsShape, "End the network with PolicyHeads"),
    ("masks as mapping or dataclass", lambda: _IgnoresMappingMasks, "as a mapping"),
    ("masks respected", lambda: _DropsMasks, "took masked action"),
    ("reproducible under a seed", lambda: _PrivateNoise, "draw randomness from torch's"),
    ("rollout and update agree", lambda: _DependsOnLength, "PPO update"),
    ("rows independent", lambda: BrokenBundle, "row 0's"),
    ("gradients", lambda: _UnusedParameter, "'spare.weight' gets no gradient"),
    ("network called as a module", lambda: _CallsForwardDirectly, "never called"),
    ("hidden state round trip", _forgetful_gru, "ignores inputs.hidden"),
    ("state_dict round trip", lambda: _PlainTensorWeight, "gives different values"),
    ("float64", lambda: BrokenBundle, "returns torch.float32 values"),
    ("bad inputs refused", lambda: _CleansNaN, "accepted NaN in the features"),
    ("no per-call closures", lambda: _LambdaPerCall, "_LambdaPerCall._forward: Lambda"),
    (
        "no per-call closures",
        lambda: _NestedDefInAHelper,
        "_NestedDefInAHelper._kept.<locals>.keep (",
    ),
    ("gradients", lambda: _GradInRollouts, "rollouts must not build an autograd graph"),
    ("bad inputs refused", lambda: _PeeksBeforeChecking, "ran the network before refusing"),
    ("hidden state round trip", lambda: _DropsHidden, "a stateless bundle accepted a hidden"),
    ("hidden state round trip", _gru_with_grad_hidden, "get_action returned hidden[0] requiring"),
    (
        "float64",
        lambda: _IgnoresDtype,
        "after to(torch.float64) the bundle's dtype is torch.float32",
    ),
    ("shapes", lambda: _StatelessWithState, "is stateless (is_recurrent=False): return None"),
    ("state_dict round trip", lambda: _LogitBiasOutsideState, "gives different 'slot' logits"),
]


def test_every_clause_has_a_violation() -> None:
    assert {clause for clause, _, _ in VIOLATIONS} == set(CLAUSES)


def test_a_random_network_blocks_the_later_clauses_and_passes_in_eval_mode() -> None:
    report = run_checks(_Dropout, feature_dim=FEATURE_DIM)
    assert [r.passed for r in report.results[:3]] == [True, True, False]
    assert {r.detail for r in report.results[3:]} == {
        "not run: the outputs are random (see 'deterministic')"
    }

    def in_eval_mode(dim: int) -> PolicyBundle:
        bundle = _Dropout(dim)
        bundle.network.eval()
        return bundle

    assert run_checks(in_eval_mode, feature_dim=FEATURE_DIM).passed


class _WindowNetwork(nn.Module):
    """Heads over the last K embedded steps: `(features [B, T, F], window [B, K, D])`."""

    def __init__(self, feature_dim: int, window: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Linear(feature_dim, width)
        self.heads = PolicyHeads(width * window, ActionSpace())

    def forward(
        self, features: torch.Tensor, window: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for step in range(features.shape[1]):
            embedded = self.embed(features[:, step])  # [B, D]
            window = torch.cat([window[:, 1:], embedded.unsqueeze(1)], dim=1)  # [B, K, D]
            step_logits, step_value = self.heads(window.flatten(1))
            logits.append(step_logits)
            values.append(step_value)
        return torch.stack(logits, 1), torch.stack(values, 1), window


class _BatchFirstWindow(PolicyBundle):
    """A memory of the last K embedded steps, returned batch-first: a newcomer's mistake."""

    is_recurrent = True

    def __init__(self, feature_dim: int, window: int = 4, width: int = 8) -> None:
        super().__init__(
            _WindowNetwork(feature_dim, window, width),
            feature_dim=feature_dim,
            action_space=ActionSpace(),
            hidden_shapes=[(window, width)],
        )

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        assert inputs.hidden is not None
        window = inputs.hidden[0].transpose(0, 1)  # [B, K, D], read right
        logits, value, window = self.network(inputs.features, window)
        return NetworkOutput(logits, value, (window,))  # bug: [B, K, D], declared [K, B, D]


def test_a_batch_first_hidden_state_is_named_once_and_blocks_the_rest() -> None:
    report = run_checks(_BatchFirstWindow, feature_dim=FEATURE_DIM)
    first, shapes, *rest = report.results
    assert first.passed
    assert not shapes.passed
    assert shapes.clause == "shapes"
    for part in (
        "_BatchFirstWindow._forward returned hidden[0] of shape (3, 4, 8)",
        "hidden_shapes[0] = (4, 8) declares [d0, B, ...] = (4, 3, 8)",
        "the batch goes in dimension 1",
        "batch-first: return it as .transpose(0, 1)",
    ):
        assert part in shapes.detail
    assert {r.detail for r in rest} == {
        "not run: the hook's output breaks the contract (see 'shapes')"
    }
    assert not any(r.ran for r in rest)
    assert len(rest) == len(CLAUSES) - 2
    assert report.format().endswith(f"{len(CLAUSES)} clauses, 1 failed, {len(rest)} not run.")
    assert "  SKIP  deterministic: not run:" in report.format()
    with pytest.raises(AssertionError) as info:
        check_bundle(_BatchFirstWindow, feature_dim=FEATURE_DIM)
    first_line, *lines = str(info.value).splitlines()
    assert (
        first_line
        == f"_BatchFirstWindow fails 1 of {len(CLAUSES)} conformance clauses ({len(rest)} not run):"
    )
    assert lines[0].startswith("- shapes: the hook's output breaks the contract")
    assert lines[1].startswith("- not run: deterministic, masks as mapping or dataclass")


def test_the_same_window_returned_in_the_declared_layout_conforms() -> None:
    """The fix the message names is the whole fix: transposed back, every clause passes."""

    class Fixed(_BatchFirstWindow):
        def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
            out = super()._forward(inputs)
            assert out.hidden is not None
            return NetworkOutput(out.logits, out.value, (out.hidden[0].transpose(0, 1),))

    assert run_checks(Fixed, feature_dim=FEATURE_DIM).passed


@pytest.mark.parametrize(
    ("clause", "make_factory", "says"),
    VIOLATIONS,
    ids=[f"{row[0]}: {row[2]}" for row in VIOLATIONS],
)
def test_each_clause_catches_its_bug(
    clause: str, make_factory: Callable[[], Callable[[int], Any]], says: str
) -> None:
    failed = _failed(run_checks(make_factory(), feature_dim=FEATURE_DIM))
    assert clause in failed, f"{clause} passed; failures were {failed}"
    assert says in failed[clause]


@pytest.mark.parametrize("factory", [_Comprehension, _Loops], ids=["list", "dict-set-genexpr"])
def test_comprehensions_and_generator_expressions_pass(factory: Callable[[int], Any]) -> None:
    """The rule means closures: comprehensions are loops, checked at run time and in source."""
    report = check_bundle(factory, feature_dim=FEATURE_DIM)
    assert report.results[-1] == ClauseResult("no per-call closures", True, "")


def test_the_closure_message_says_what_to_do() -> None:
    detail = _failed(run_checks(_LambdaPerCall, feature_dim=FEATURE_DIM))["no per-call closures"]
    assert detail.startswith("a nested function or lambda is created on every call: ")
    assert "_LambdaPerCall._forward.<locals>.<lambda> (" in detail  # the run-time check too
    assert detail.endswith(
        "Define it once, at module level (or as a method), and pass what it captured as arguments"
    )
    assert "B10" not in detail


def test_an_active_profiler_is_left_in_place() -> None:
    """The run-time closure check needs sys.setprofile: it steps aside for a profiler."""
    seen: list[str] = []

    def profiler(frame: FrameType, event: str, arg: object) -> None:
        seen.append(event)

    sys.setprofile(profiler)
    try:
        report = run_checks(UniformPolicyBundle)
        still = sys.getprofile()
    finally:
        sys.setprofile(None)
    assert still is profiler
    assert seen
    last = report.results[-1]
    assert last.clause == "no per-call closures"
    assert last.passed
    assert "a profiler is active" in last.detail


def test_closures_in_third_party_helpers_are_not_blamed_on_the_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "vendor_helpers.py").write_text(
        "import torch\n\n\n"
        "def doubled(x: torch.Tensor) -> torch.Tensor:\n"
        "    def twice(t: torch.Tensor) -> torch.Tensor:\n"
        "        return t * 2\n\n"
        "    return twice(x)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    helpers = importlib.import_module("vendor_helpers")

    class UsesAHelper(TinyStatelessBundle):
        def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
            out = super()._forward(inputs)
            return NetworkOutput(helpers.doubled(out.logits), out.value, None)

    assert run_checks(UsesAHelper, feature_dim=FEATURE_DIM).passed
