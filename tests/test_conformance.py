"""The conformance kit: every registered bundle passes it, and every clause can fail.

`VIOLATIONS` is the kit's own mutation test: one small bundle per clause, each with
one plausible bug, and the clause that must catch it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from torch import nn

from broken_bundle import BrokenBundle
from conftest import (
    FEATURE_DIM,
    TinyNetwork,
    TinyStatelessBundle,
    load_guide_example,
    small_lstm,
)
from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionHierarchy,
    ActionMasks,
    ActionResult,
    ActionSpace,
    ExtraInput,
    LSTMPolicyBundle,
    NetworkOutput,
    OpConditionedOutput,
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
    "probability floors",
    "extra inputs",
    "hierarchy: shapes",
    "hierarchy: masks respected",
    "hierarchy: ignored heads canonical",
    "hierarchy: rollout and update agree",
]
HIERARCHY_CLAUSES = [clause for clause in CLAUSES if clause.startswith("hierarchy: ")]
FLOORS_CLAUSE = "probability floors"
FLOORS_NOT_RUN = (
    "the factory takes no probability_floor keyword; to check that floors reach the base, "
    "let it take probability_floor (factory(feature_dim, probability_floor={...})) and pass "
    "it on to PolicyBundle.__init__"
)


def _failed(report: ConformanceReport) -> dict[str, str]:
    return {result.clause: result.detail for result in report.failures}


def _result(report: ConformanceReport, clause: str) -> ClauseResult:
    (result,) = (result for result in report.results if result.clause == clause)
    return result


@pytest.mark.parametrize("name", list_policies())
def test_every_registered_policy_conforms(name: str) -> None:
    """A new registration is covered here with no new test code, flat and hierarchical."""
    report = check_bundle(get_policy(name))
    assert [result.clause for result in report.results] == CLAUSES
    assert report.passed
    assert all(result.ran for result in report.results)
    assert _result(report, "hierarchy: shapes").detail == "under ActionSpace.tamiyo()"


def test_the_guide_example_conforms_flat_and_hierarchical() -> None:
    module = load_guide_example()
    report = check_bundle(module.GRUPolicyBundle)
    assert report.passed
    assert report.subject == "GRUPolicyBundle"
    assert not report.not_run  # it takes action_space: the hierarchy clauses ran
    assert report.format().endswith(f"{len(CLAUSES)} clauses, all clauses pass.")


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
    assert message.startswith("BrokenBundle fails 3 of 21 conformance clauses (5 not run):")
    assert message.count("\n- ") == 5
    for clause in ("rows independent", "float64", "no per-call closures"):
        assert f"- {clause}: " in message
    assert message.splitlines()[-2:] == [
        f"- not run: {FLOORS_CLAUSE} ({FLOORS_NOT_RUN})",
        f"- not run: {', '.join(HIERARCHY_CLAUSES)} (factory(7) builds a flat bundle and "
        "the factory takes no action_space keyword; to check the bundle under Tamiyo's "
        "hierarchy too, let the factory take action_space (factory(feature_dim, "
        "action_space=space)) and pass it on to PolicyBundle.__init__)",
    ]


def test_the_report_formats_one_line_per_clause() -> None:
    text = run_checks(BrokenBundle).format().splitlines()
    assert text[0] == "Conformance of BrokenBundle:"
    assert len(text) == 2 + len(CLAUSES)
    assert text[1] == "  PASS  builds"
    assert any(line.startswith("  FAIL  float64: after to(torch.float64)") for line in text)
    assert text[-2].startswith("  SKIP  hierarchy: rollout and update agree: not run: ")
    assert f"  SKIP  {FLOORS_CLAUSE}: not run: {FLOORS_NOT_RUN}" in text
    assert text[-1] == "21 clauses, 3 failed, 5 not run."


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
        *,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        if isinstance(masks, dict):  # bug: only ActionMasks honoured
            masks = None
        return super()._normalize_inputs(features, masks, hidden, actions, extras=extras)


class _DropsMasks(TinyStatelessBundle):
    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
        *,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        return super()._normalize_inputs(
            features, None, hidden, actions, extras=extras
        )  # bug: masks dropped


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
        *,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        if isinstance(features, torch.Tensor) and features.is_floating_point():
            features = torch.nan_to_num(features)  # bug: hides bad inputs
        return super()._normalize_inputs(features, masks, hidden, actions, extras=extras)


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
        *,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        if (
            isinstance(features, torch.Tensor)
            and features.is_floating_point()
            and features.dim() == 2
            and features.shape[-1] == self.feature_dim
        ):
            self.network(features.unsqueeze(1))  # bug: runs before the checks
        return super()._normalize_inputs(features, masks, hidden, actions, extras=extras)


class _DropsHidden(TinyStatelessBundle):
    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
        *,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        return super()._normalize_inputs(
            features, masks, None, actions, extras=extras
        )  # bug: ignores it


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


# ------------------------------------------------- bugs that show only under the hierarchy
# Each works in a flat space (every flat clause passes) and breaks one hierarchy clause.


class _ForgetsTheSpace(TinyStatelessBundle):
    def __init__(self, feature_dim: int = FEATURE_DIM, action_space: ActionSpace | None = None):
        super().__init__(feature_dim)  # bug: takes action_space, never passes it on


class _LogitsByOpWithoutTheOps(TinyStatelessBundle):
    def _forward(  # type: ignore[override]  # the base's hook may return either
        self, inputs: PolicyInputs
    ) -> NetworkOutput | OpConditionedOutput:
        out = super()._forward(inputs)
        if not inputs.action_space.is_hierarchical:
            return out
        return OpConditionedOutput(*out, logits_by_op=out.logits)  # bug: no N_op dimension


class _DropsFloors(TinyStatelessBundle):
    def __init__(
        self,
        feature_dim: int = FEATURE_DIM,
        action_space: ActionSpace | None = None,
        probability_floor: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(feature_dim, action_space)  # bug: the floors never reach the base


class _WithLoad(TinyStatelessBundle):
    """Declares a floating extra input `load` `[2]`, added to every feature."""

    DECLARED: tuple[ExtraInput, ...] = (ExtraInput("load", "floating", (2,)),)

    def __init__(self, feature_dim: int = FEATURE_DIM, action_space: ActionSpace | None = None):
        space = action_space or ActionSpace()
        PolicyBundle.__init__(
            self,
            TinyNetwork(feature_dim, space),
            feature_dim=feature_dim,
            action_space=space,
            extra_inputs=self.DECLARED,
        )

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        load = inputs.extras["load"]  # [B, T, 2]
        shift = load.sum(dim=-1).view(load.shape[0], -1, 1)  # [B, T, 1]
        logits, value = self.network(inputs.features + shift)
        return NetworkOutput(logits, value, None)


class _IgnoresItsExtraInput(_WithLoad):
    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        return TinyStatelessBundle._forward(self, inputs)  # bug: declares load, never reads it


class _SqueezesExtras(_WithLoad):
    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
        *,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        inputs = super()._normalize_inputs(features, masks, hidden, actions, extras=extras)
        flat = {name: value.flatten(1) for name, value in inputs.extras.items()}
        return replace(inputs, extras=flat)  # bug: not [B, T, ...] any more


class _LosesExtras(_WithLoad):
    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
        *,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        inputs = super()._normalize_inputs(features, masks, hidden, actions, extras=extras)
        return replace(inputs, extras={})  # bug: the hook never sees them


class _DropsPerOpMasks(TinyStatelessBundle):
    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
        *,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        if isinstance(masks, ActionMasks):  # bug: rebuilt head by head, <head>_by_op lost
            masks = ActionMasks.from_mapping({head: getattr(masks, head) for head in HEAD_NAMES})
        return super()._normalize_inputs(features, masks, hidden, actions, extras=extras)


class _CanonicalizesStoredActions(TinyStatelessBundle):
    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
        *,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        table = self.action_space.hierarchy
        if actions is not None and table is not None:  # bug: hides a rollout's bad actions
            used = torch.tensor(table.relevance_table())[actions["op"]]  # [..., H]
            actions = {
                head: torch.where(used[..., h], taken, table.canonical[h])
                for h, (head, taken) in enumerate(actions.items())
            }
        return super()._normalize_inputs(features, masks, hidden, actions, extras=extras)


class _LeaksIgnoredHeads(TinyStatelessBundle):
    """Stands in for a base that lost its rule: a hook cannot make an ignored head count.

    `get_action` is final, so the sabotage goes on the instance: it gives the heads the
    sampled op ignores a log-prob of -0.5, as a base without the rule would.
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, action_space: ActionSpace | None = None):
        super().__init__(feature_dim, action_space)
        self.get_action = self._leaky_get_action  # type: ignore[method-assign]

    def _leaky_get_action(self, *args: Any, **kwargs: Any) -> ActionResult:
        result = PolicyBundle.get_action(self, *args, **kwargs)
        table = self.action_space.hierarchy
        if table is None:
            return result
        used = torch.tensor(table.relevance_table())[result.action["op"]]
        log_prob = {
            head: torch.where(used[..., h], result.log_prob[head], -0.5)
            for h, head in enumerate(HEAD_NAMES)
        }
        return dataclasses.replace(result, log_prob=log_prob)


class _ReadsTheStoredOp(TinyStatelessBundle):
    """Conditions the other heads on the op the AlphaStar way, from the stored actions."""

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        out = super()._forward(inputs)
        if not inputs.action_space.is_hierarchical:
            return out
        taken = inputs.action_index  # bug: None in get_action, the stored op in the update
        op = torch.zeros_like(out.value) if taken is None else taken[..., -1].to(out.value)
        ramp = torch.arange(out.logits.shape[-1]).to(out.logits)  # [A_max]
        return NetworkOutput(out.logits + 0.5 * op[..., None, None] * ramp, out.value, None)


class _ReadsTheLastStepsMasks(TinyStatelessBundle):
    """Feeds the per-op masks to the heads, reading "the current masks" as the last step's."""

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        out = super()._forward(inputs)
        if inputs.valid_by_op is None:
            return out
        # bug: right for one step (a rollout), wrong for every step but the last of a sequence
        legal = inputs.valid_by_op[:, -1:].float().mean(dim=(2, 4))  # [B, 1, H]
        ramp = torch.arange(out.logits.shape[-1]).to(out.logits)  # [A_max]
        return NetworkOutput(out.logits + legal[..., None] * ramp, out.value, None)


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
    ("probability floors", lambda: _DropsFloors, "pass the probability_floor the factory"),
    ("extra inputs", lambda: _IgnoresItsExtraInput, "do not depend on extra input 'load'"),
    (
        "extra inputs",
        lambda: _SqueezesExtras,
        "_forward got shape (3, 2) for extra input 'load' from (3,)-shaped features; "
        "expected (3, 1, 2): pass extras on to super()._normalize_inputs",
    ),
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
    (
        "hierarchy: shapes",
        lambda: _ForgetsTheSpace,
        "factory(6, action_space=ActionSpace.tamiyo()) built a bundle whose action_space "
        "is ActionSpace(); pass the action_space the factory is given on to "
        "PolicyBundle.__init__",
    ),
    (
        "hierarchy: shapes",
        lambda: _LogitsByOpWithoutTheOps,
        "the hook's output breaks the contract: _LogitsByOpWithoutTheOps._forward returned "
        "logits_by_op of shape (3, 1, 8, 16); expected [B, T, N_op, H, A_max] = "
        "(3, 1, 6, 8, 16)",
    ),
    ("hierarchy: masks respected", lambda: _DropsPerOpMasks, "_by_op'] forbids at that op"),
    (
        "hierarchy: ignored heads canonical",
        lambda: _CanonicalizesStoredActions,
        "it must refuse any action but the canonical 0 there, as the base does: do not "
        "rewrite the actions in _normalize_inputs",
    ),
    (
        "hierarchy: ignored heads canonical",
        lambda: _LeaksIgnoredHeads,
        "get_action (sampled) gives 'slot' log-prob -0.5 in row 0 under op WAIT, which does "
        "not use 'slot': it must be 0",
    ),
    (
        "hierarchy: rollout and update agree",
        lambda: _ReadsTheStoredOp,
        "never by reading inputs.action_index or inputs.actions, which get_action does not have",
    ),
    (
        "hierarchy: rollout and update agree",
        lambda: _ReadsTheLastStepsMasks,
        "the hook must give a step the same logits alone and inside a sequence",
    ),
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
    assert _result(report, "no per-call closures") == ClauseResult("no per-call closures", True, "")


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
    closures = _result(report, "no per-call closures")
    assert closures.passed
    assert "a profiler is active" in closures.detail
    assert report.passed


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


# ---------------------------------------------------------------- flat and hierarchical


def test_a_factory_without_action_space_passes_with_the_hierarchy_clauses_not_run() -> None:
    """Factories written before the hierarchy keep passing; the report says what to add."""

    def factory(dim: int) -> PolicyBundle:  # the signature has no action_space
        return TinyStatelessBundle(dim)

    report = check_bundle(factory, feature_dim=FEATURE_DIM)
    assert report.passed
    assert [r.clause for r in report.skipped] == [FLOORS_CLAUSE, *HIERARCHY_CLAUSES]
    assert not report.blocked
    assert not report.failures
    for result in report.skipped[1:]:
        assert not result.ran
        assert result.detail.startswith("not run: factory(6) builds a flat bundle and the ")
        assert "let the factory take action_space" in result.detail
    text = report.format().splitlines()
    assert text[-1] == "21 clauses, 16 pass, 5 not run."
    assert text[-5].startswith("  SKIP  hierarchy: shapes: not run: factory(6) builds a flat")


def test_a_factory_taking_action_space_is_checked_flat_then_under_tamiyo_with_its_sizes() -> None:
    seen: list[ActionSpace | None] = []

    def factory(dim: int, action_space: ActionSpace | None = None) -> PolicyBundle:
        seen.append(action_space)
        return TinyStatelessBundle(dim, action_space or ActionSpace(slot=5))

    report = check_bundle(factory, feature_dim=FEATURE_DIM)
    assert [r.clause for r in report.not_run] == [FLOORS_CLAUSE]  # no probability_floor
    assert set(seen) == {None, ActionSpace.tamiyo(slot=5)}  # flat: the factory's own space
    assert _result(report, "hierarchy: shapes").detail == "under ActionSpace.tamiyo(slot=5)"


def test_a_hierarchical_default_is_checked_flat_without_its_table_and_under_it() -> None:
    """The factory's own table (a canonical action of 1 here) is the one checked."""
    table = ActionHierarchy.from_table(
        {"WAIT": (), "MOVE": ("slot",), "BUILD": ("slot", "blueprint")}, canonical={"slot": 1}
    )
    own = ActionSpace(slot=3, blueprint=2, op=3, hierarchy=table)
    seen: list[ActionSpace | None] = []

    def factory(dim: int, action_space: ActionSpace | None = None) -> PolicyBundle:
        seen.append(action_space)
        return TinyStatelessBundle(dim, action_space or own)

    report = check_bundle(factory, feature_dim=FEATURE_DIM)
    assert [r.clause for r in report.not_run] == [FLOORS_CLAUSE]
    assert set(seen) == {None, replace(own, hierarchy=None)}
    assert _result(report, "hierarchy: shapes").detail == f"under {own!r}"


def test_a_hierarchical_bundle_from_a_factory_without_action_space_runs_every_clause() -> None:
    """With no way to ask for a flat space, the flat clauses run under the hierarchy too."""
    report = check_bundle(
        lambda dim: TinyStatelessBundle(dim, ActionSpace.tamiyo()), feature_dim=FEATURE_DIM
    )
    assert [r.clause for r in report.not_run] == [FLOORS_CLAUSE]
    assert report.format().endswith("21 clauses, 20 pass, 1 not run.")


def test_op_conditioned_logits_conform_flat_and_hierarchical() -> None:
    def factory(
        dim: int,
        action_space: ActionSpace = ActionSpace(),
        probability_floor: dict[str, float] | None = None,
    ) -> PolicyBundle:
        return small_lstm(
            action_space=action_space,
            op_conditioned_logits=action_space.is_hierarchical,
            probability_floor=probability_floor,
        )

    report = check_bundle(factory, feature_dim=FEATURE_DIM)
    assert not report.not_run


def test_masks_respected_says_which_mask_draw_failed_and_draws_the_same_every_run() -> None:
    details = {
        _failed(run_checks(_DropsPerOpMasks, feature_dim=FEATURE_DIM))["hierarchy: masks respected"]
        for _ in range(2)
    }
    (detail,) = details  # derandomized: the same draws and the same smallest failure
    assert detail.startswith("get_action (sampled) took ")
    assert "(masks drawn with [B" in detail
    assert "per-op masks on " in detail


def test_masks_respected_draws_from_torch_without_hypothesis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    find_spec = importlib.util.find_spec

    def without_hypothesis(name: str, package: str | None = None) -> Any:
        return None if name == "hypothesis" else find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", without_hypothesis)
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # an import would now fail
    passing = _result(
        check_bundle(TinyStatelessBundle, feature_dim=FEATURE_DIM), "hierarchy: masks respected"
    )
    assert passing.detail == (
        "Hypothesis is not installed: 25 mask draws from a seeded torch generator instead"
    )
    failed = _failed(run_checks(_DropsPerOpMasks, feature_dim=FEATURE_DIM))
    assert set(failed) == {"hierarchy: masks respected"}
    assert "_by_op'] forbids at that op (masks drawn with " in failed["hierarchy: masks respected"]


def test_each_hierarchy_bug_fails_its_clause_alone() -> None:
    """The flat clauses pass each one: only the hierarchy shows the bug."""
    for factory, clauses in (
        (_DropsPerOpMasks, {"hierarchy: masks respected"}),
        (_CanonicalizesStoredActions, {"hierarchy: ignored heads canonical"}),
        (_ReadsTheStoredOp, {"hierarchy: rollout and update agree"}),
        (_ReadsTheLastStepsMasks, {"hierarchy: rollout and update agree"}),
        (_LogitsByOpWithoutTheOps, set(HIERARCHY_CLAUSES)),  # the gate, then 3 not run
    ):
        assert set(_failed(run_checks(factory, feature_dim=FEATURE_DIM))) == clauses, factory


def test_an_lstm_with_blueprints_conforms_and_its_extra_inputs_are_checked() -> None:
    report = check_bundle(
        partial(LSTMPolicyBundle, hidden_dim=16, embed_dim=8, blueprint_embed_dim=2),
        feature_dim=FEATURE_DIM,
    )
    assert _result(report, "extra inputs").detail == "blueprint_indices"
    plain = check_bundle(partial(LSTMPolicyBundle, hidden_dim=16, embed_dim=8))
    assert _result(plain, "extra inputs").detail == "the bundle declares no extra inputs"
    refused = int(_result(report, "bad inputs refused").detail.split()[0])
    assert refused == int(_result(plain, "bad inputs refused").detail.split()[0]) + 5


def test_a_bundle_with_a_floating_extra_input_conforms() -> None:
    report = check_bundle(_WithLoad, feature_dim=FEATURE_DIM)
    assert _result(report, "extra inputs").detail == "load"


def test_an_override_that_loses_an_extra_input_is_named_once() -> None:
    report = run_checks(_LosesExtras, feature_dim=FEATURE_DIM)
    (failed,) = report.failed
    assert failed.clause == "shapes"
    assert {result.clause for result in report.blocked} == set(CLAUSES[2:])
    assert failed.detail.endswith(
        "_LosesExtras._normalize_inputs returned inputs without the extra input 'load' it "
        "declares: take extras, pass them on to super()._normalize_inputs and keep what it "
        "returns in inputs.extras"
    )


class _OneKindOfSlot(_WithLoad):
    """Declares an integer input with one allowed value, besides `load`."""

    DECLARED = (
        ExtraInput("load", "floating", (2,)),
        ExtraInput("kind", "integer", low=0, high=4, sentinels=(-1, 4)),
        ExtraInput("version", "integer", low=5, high=6),
    )

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        kind = inputs.extras["kind"].unsqueeze(-1).to(inputs.features.dtype)  # [B, T, 1]
        load = inputs.extras["load"].sum(dim=-1, keepdim=True)  # [B, T, 1]
        logits, value = self.network(inputs.features + load + kind)
        return NetworkOutput(logits, value, None)


def test_every_kind_of_integer_declaration_gets_valid_and_out_of_range_inputs() -> None:
    """Sentinels on both sides of the range, and a range of one value (nothing to vary)."""
    report = check_bundle(_OneKindOfSlot, feature_dim=FEATURE_DIM)
    assert _result(report, "extra inputs").detail == "load, kind, version"
    plain = check_bundle(TinyStatelessBundle, feature_dim=FEATURE_DIM)
    refused = int(_result(report, "bad inputs refused").detail.split()[0])
    base = int(_result(plain, "bad inputs refused").detail.split()[0])
    assert refused == base + 4 + 1 + 2  # 4 for the first input, NaN in load, kind and version
