"""Extra per-step inputs: declared by a bundle, normalized and checked by the base."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
import torch

from conftest import FEATURE_DIM, TinyNetwork, small_lstm
from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionMasks,
    ActionSpace,
    ExtraInput,
    LSTMPolicyBundle,
    NetworkOutput,
    PolicyBundle,
    PolicyInputs,
    load_policy,
    save_policy,
)
from esper.tamiyo.policy.base import MaskArg
from esper.tamiyo.policy.extra_inputs import inside_range
from esper.tamiyo.policy.inputs import HiddenState
from esper.tamiyo.policy.testing import random_masks
from esper.tamiyo.policy.validation import HookContractError

SLOTS = ActionSpace().slot
BLUEPRINTS = ActionSpace().blueprint


class _Recording(PolicyBundle):
    """Declares a floating input `load` `[2]` and an integer one `kind` `[]` in [0, 4).

    Both shift the features the network sees, so they change its output; the hook
    records the extras it was given.
    """

    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        space = ActionSpace()
        super().__init__(
            TinyNetwork(feature_dim, space),
            feature_dim=feature_dim,
            action_space=space,
            extra_inputs=(
                ExtraInput("load", "floating", (2,)),
                ExtraInput("kind", "integer", low=0, high=4),
            ),
        )
        self.seen: list[dict[str, torch.Tensor]] = []

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        self.seen.append(dict(inputs.extras))
        load, kind = inputs.extras["load"], inputs.extras["kind"]  # [B, T, 2], [B, T]
        shift = load.sum(dim=-1, keepdim=True) + kind.unsqueeze(-1).to(load.dtype)  # [B, T, 1]
        logits, value = self.network(inputs.features + shift)
        return NetworkOutput(logits, value, None)


def _extras(lead: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {"load": torch.randn(*lead, 2), "kind": torch.randint(0, 4, lead, dtype=torch.int32)}


def _blueprints(lead: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """`[*lead, S]` blueprint indices in [-1, 13): some slots empty."""
    return torch.randint(-1, BLUEPRINTS, (*lead, SLOTS), generator=generator)


# ---------------------------------------------------------------- declarations


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"name": "2x", "kind": "integer"}, ValueError, "Python identifier"),
        ({"name": "class", "kind": "integer"}, ValueError, "Python identifier"),
        ({"name": "x", "kind": "bool"}, ValueError, "'integer' or 'floating'"),
        ({"name": "x", "kind": "integer", "shape": (0,)}, ValueError, "positive ints"),
        ({"name": "x", "kind": "integer", "shape": [3]}, TypeError, "got list"),
        ({"name": "x", "kind": "integer", "shape": (True,)}, ValueError, "positive ints"),
        ({"name": "x", "kind": "integer", "low": 3, "high": 3}, ValueError, "empty"),
        ({"name": "x", "kind": "integer", "low": 0.5}, TypeError, "must be ints"),
        ({"name": "x", "kind": "integer", "high": True}, TypeError, "must be ints"),
        (
            {"name": "x", "kind": "integer", "low": -1, "high": 13, "sentinels": (-1,)},
            ValueError,
            r"sentinels \[-1\] lie inside",
        ),
        ({"name": "x", "kind": "integer", "sentinels": [-1]}, TypeError, "tuple of ints"),
        ({"name": "x", "kind": "floating", "low": 0}, ValueError, "NaN and Inf only"),
        ({"name": "x", "kind": "integer", "shape": None}, TypeError, "shape must be a tuple"),
        ({"name": "x", "kind": "integer", "sentinels": None}, TypeError, "got NoneType"),
        ({"name": "x", "kind": "integer", "high": 2**63}, ValueError, "fit in int64"),
        ({"name": "x", "kind": "integer", "low": -(2**70)}, ValueError, "fit in int64"),
        ({"name": "x", "kind": "integer", "sentinels": (-1,)}, ValueError, "give the range"),
    ],
)
def test_a_bad_declaration_is_refused_naming_what_is_wrong(
    arguments: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ExtraInput(**arguments)


@pytest.mark.parametrize(
    ("low", "high", "sentinels", "span"),
    [
        (0, 13, (-1,), (-1, 13, ())),
        (0, 13, (-2, -1, 13, 99), (-2, 14, (99,))),
        (0, 13, (-5,), (0, 13, (-5,))),
        (None, 4, (4,), (None, 5, ())),
        (3, None, (), (3, None, ())),
    ],
)
def test_the_checked_span_takes_in_the_sentinels_next_to_the_range(
    low: int | None, high: int | None, sentinels: tuple[int, ...], span: tuple[Any, ...]
) -> None:
    spec = ExtraInput("x", "integer", low=low, high=high, sentinels=sentinels)
    assert spec.span() == span
    values = torch.arange(-8, 20)
    allowed = [
        v
        for v in range(-8, 20)
        if ((low is None or v >= low) and (high is None or v < high)) or v in sentinels
    ]
    assert values[inside_range(values, spec)].tolist() == allowed


def test_a_declaration_describes_what_callers_pass() -> None:
    spec = ExtraInput("blueprint_indices", "integer", (3,), low=0, high=13, sentinels=(-1,))
    assert spec.describe() == "[B, (T), 3] integer in [0, 13) or -1"
    assert ExtraInput("load", "floating", (2,)).describe() == "[B, (T), 2] floating"
    assert ExtraInput("n", "integer", low=0).allowed() == "[0, inf)"


@pytest.mark.parametrize(
    ("declared", "error", "match"),
    [
        ("load", TypeError, "sequence of ExtraInput"),
        ({"load": 1}, TypeError, "sequence of ExtraInput"),
        (["load"], TypeError, "hold ExtraInput"),
        ([ExtraInput("a", "integer"), ExtraInput("a", "floating")], ValueError, "'a' twice"),
    ],
)
def test_a_bundle_refuses_bad_extra_input_declarations(
    declared: object, error: type[Exception], match: str
) -> None:
    space = ActionSpace()
    with pytest.raises(error, match=match):
        PolicyBundle.__init__(
            _Recording(),
            TinyNetwork(FEATURE_DIM, space),
            feature_dim=FEATURE_DIM,
            action_space=space,
            extra_inputs=declared,  # type: ignore[arg-type]  # the wrong types on purpose
        )


# ---------------------------------------------------------------- normalization


def test_the_hook_gets_every_extra_input_as_b_t_and_integers_as_int64() -> None:
    bundle = _Recording()
    step = _extras((4,))
    bundle.get_action(torch.randn(4, FEATURE_DIM), None, extras=step)
    seen = bundle.seen[-1]
    assert seen["load"].shape == (4, 1, 2)
    assert seen["kind"].shape == (4, 1)
    assert seen["kind"].dtype == torch.int64
    torch.testing.assert_close(seen["load"][:, 0], step["load"])
    torch.testing.assert_close(seen["kind"][:, 0], step["kind"].long())

    sequence = _extras((4, 5))
    bundle.forward(torch.randn(4, 5, FEATURE_DIM), None, extras=sequence)
    assert bundle.seen[-1]["load"].shape == (4, 5, 2)
    assert bundle.seen[-1]["kind"].shape == (4, 5)
    assert bundle.seen[-1]["load"].data_ptr() == sequence["load"].data_ptr()  # a view, no copy


def test_one_step_takes_b_or_b_1_and_a_one_step_sequence_takes_both_too() -> None:
    bundle = _Recording()
    step = _extras((3,))
    with_step_axis = {name: value.unsqueeze(1) for name, value in step.items()}
    x = torch.randn(3, FEATURE_DIM)
    a = bundle.forward(x, None, extras=step)
    b = bundle.forward(x, None, extras=with_step_axis)
    c = bundle.forward(x.unsqueeze(1), None, extras=step)
    torch.testing.assert_close(a.value, b.value)
    torch.testing.assert_close(a.value, c.value[:, 0])


def test_extra_inputs_change_what_the_network_computes() -> None:
    bundle = _Recording()
    x = torch.randn(3, FEATURE_DIM)
    extras = _extras((3,))
    moved = {**extras, "load": extras["load"] + 1.0}
    assert not torch.allclose(bundle.get_value(x, extras=extras), bundle.get_value(x, extras=moved))


def test_a_bundle_without_extra_inputs_takes_none_or_an_empty_mapping() -> None:
    lstm = small_lstm()
    assert lstm.extra_inputs == ()
    x = torch.randn(2, FEATURE_DIM)
    torch.manual_seed(0)
    plain = lstm.get_action(x, None)
    torch.manual_seed(0)
    empty = lstm.get_action(x, None, extras={})
    for head in plain.action:
        assert torch.equal(plain.action[head], empty.action[head])
    assert (
        PolicyInputs(
            features=x.unsqueeze(1), hidden=None, valid=torch.ones(1), action_space=ActionSpace()
        ).extras
        == {}
    )


# ---------------------------------------------------------------- bad inputs


def _bad_calls() -> list[tuple[str, dict[str, object], type[Exception], str]]:
    good = _extras((4,))
    return [
        ("missing", {"load": good["load"]}, ValueError, r"missing extra input 'kind'"),
        ("unknown", {**good, "speed": good["load"]}, ValueError, r"unknown input 'speed'"),
        (
            "misspelt",
            {"lead": good["load"], "kind": good["kind"]},
            ValueError,
            r"unknown input 'lead'.*did you mean 'load'\?",
        ),
        ("not a tensor", {**good, "kind": [1, 2, 3, 0]}, TypeError, "'kind' must be a torch"),
        (
            "uint64 for an integer input",
            {**good, "kind": torch.tensor([2**64 - 1, 0, 0, 0], dtype=torch.uint64)},
            TypeError,
            r"'kind' has dtype torch.uint64, which int64 cannot hold",
        ),
        (
            "float for an integer input",
            {**good, "kind": good["kind"].float()},
            TypeError,
            r"'kind' must be an integer tensor",
        ),
        (
            "bool for an integer input",
            {**good, "kind": good["kind"] > 0},
            TypeError,
            r"'kind' must be an integer tensor",
        ),
        (
            "int for a floating input",
            {**good, "load": good["load"].long()},
            TypeError,
            r"'load' has dtype torch.int64",
        ),
        (
            "float64 for a float32 bundle",
            {**good, "load": good["load"].double()},
            TypeError,
            r"'load' has dtype torch.float64",
        ),
        (
            "sparse",
            {**good, "load": good["load"].to_sparse()},
            TypeError,
            "'load' must be a dense tensor",
        ),
        (
            "wrong rank",
            {**good, "load": good["load"][:, :, None, None]},
            ValueError,
            r"'load' must be \[B, 2\] or \[B, 1, 2\]",
        ),
        ("wrong batch", {**good, "load": good["load"][:3]}, ValueError, "batch 3 but the features"),
        (
            "wrong trailing shape",
            {**good, "load": torch.randn(4, 3)},
            ValueError,
            r"trailing dimensions must be \(2,\)",
        ),
        (
            "two steps for one",
            {**good, "load": torch.randn(4, 2, 2)},
            ValueError,
            "2 steps in dimension 1 but the features have T=1",
        ),
        (
            "out of range",
            {**good, "kind": torch.tensor([0, 4, 7, 1])},
            ValueError,
            r"'kind' has values outside \[0, 4\): 4, 7 \(first at batch row 1\)",
        ),
        (
            "NaN",
            {**good, "load": torch.tensor([[0.0, 1.0], [0.0, 0.0], [float("nan"), 0.0], [1, 1]])},
            ValueError,
            r"'load' has NaN or Inf at batch row 2",
        ),
    ]


@pytest.mark.parametrize(("case", "extras", "error", "match"), _bad_calls(), ids=lambda v: None)
def test_a_bad_extra_input_is_refused_by_name_and_the_bundle_keeps_working(
    case: str, extras: dict[str, object], error: type[Exception], match: str
) -> None:
    bundle = _Recording()
    x, good = torch.randn(4, FEATURE_DIM), _extras((4,))
    before = bundle.forward(x, None, extras=good).value
    for method in ("get_action", "forward", "evaluate_actions", "get_value"):
        with pytest.raises(error, match=match):
            _call(bundle, method, x, extras)
    torch.testing.assert_close(bundle.forward(x, None, extras=good).value, before)


def _call(bundle: PolicyBundle, method: str, x: torch.Tensor, extras: Any) -> object:
    if method == "get_action":
        return bundle.get_action(x, None, extras=extras)
    if method == "forward":
        return bundle.forward(x, None, extras=extras)
    if method == "get_value":
        return bundle.get_value(x, extras=extras)
    actions = {head: torch.zeros(x.shape[0], dtype=torch.long) for head in HEAD_NAMES}
    return bundle.evaluate_actions(x, actions, None, extras=extras)


def test_a_sequence_refuses_one_step_of_an_extra_input() -> None:
    bundle = _Recording()
    with pytest.raises(
        ValueError,
        match=r"'load' has shape \(4, 2\) \(\[B, 2\]\) but the features are a sequence of T=3 steps; give it as \[B, T, 2\] = \(4, 3, 2\)",
    ):
        bundle.forward(torch.randn(4, 3, FEATURE_DIM), None, extras=_extras((4,)))


def test_extras_must_be_a_mapping() -> None:
    bundle = _Recording()
    with pytest.raises(TypeError, match="extras must be a mapping of input name to tensor"):
        bundle.forward(torch.randn(2, FEATURE_DIM), None, extras=[1, 2])  # type: ignore[arg-type]


def test_extras_given_to_a_bundle_that_declares_none_are_refused() -> None:
    with pytest.raises(ValueError, match="LSTMPolicyBundle declares no extra inputs"):
        small_lstm().get_action(
            torch.randn(2, FEATURE_DIM), None, extras={"blueprint_indices": _blueprints((2,))}
        )


class _SquashesLoad(_Recording):
    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        squashed = {**inputs.extras, "load": torch.tanh(inputs.extras["load"])}
        return super()._forward(replace(inputs, extras=squashed))


def test_finite_floating_extras_whose_sum_overflows_are_accepted() -> None:
    """The value check sums them with the features; an overflowing sum alone is no error."""
    bundle = _SquashesLoad()
    huge = {"load": torch.full((2, 2), 3e38), "kind": torch.tensor([0, 1])}
    assert torch.isinf(huge["load"].sum())
    assert bundle.get_value(torch.zeros(2, FEATURE_DIM), extras=huge).shape == (2,)
    cancelling = {"load": torch.tensor([[3e38, 3e38], [-3e38, -3e38]]), "kind": huge["kind"]}
    assert bundle.get_value(torch.zeros(2, FEATURE_DIM), extras=cancelling).shape == (2,)
    huge["load"][1, 0] = float("inf")
    with pytest.raises(ValueError, match="extra input 'load' has NaN or Inf at batch row 1"):
        bundle.get_value(torch.zeros(2, FEATURE_DIM), extras=huge)


class _DropsTheCallersExtras(_Recording):
    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
        *,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        return super()._normalize_inputs(features, masks, hidden, actions)  # bug: no extras


class _OverrideFromBeforeExtras(_Recording):
    def _normalize_inputs(  # type: ignore[override]  # the signature before extras
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        return super()._normalize_inputs(features, masks, hidden, actions)


def test_an_override_that_does_not_pass_extras_on_is_named_not_the_caller() -> None:
    bundle = _DropsTheCallersExtras()
    with pytest.raises(
        HookContractError,
        match=r"_DropsTheCallersExtras._normalize_inputs did not pass the caller's extras on",
    ):
        bundle.get_action(torch.randn(2, FEATURE_DIM), None, extras=_extras((2,)))
    with pytest.raises(ValueError, match="missing extra input 'load'"):  # the caller's own
        bundle.get_action(torch.randn(2, FEATURE_DIM), None, extras={"kind": torch.zeros(2)})


class _KeywordOnlyExtras(_Recording):
    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
        scale: float = 1.0,
        *,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        return super()._normalize_inputs(features, masks, hidden, actions, extras=extras)


class _PositionalOnly(_Recording):
    def _normalize_inputs(self, *args: Any) -> PolicyInputs:  # type: ignore[override]
        return super()._normalize_inputs(*args)


class _Forwards(_Recording):
    def _normalize_inputs(self, *args: Any, **kwargs: Any) -> PolicyInputs:
        return super()._normalize_inputs(*args, **kwargs)


def test_a_bundle_declaring_extras_needs_an_override_that_takes_them() -> None:
    with pytest.raises(TypeError, match="its _normalize_inputs override takes no extras"):
        _OverrideFromBeforeExtras()
    with pytest.raises(TypeError, match="its _normalize_inputs override takes no extras"):
        _PositionalOnly()  # the base passes extras by name


@pytest.mark.parametrize("bundle_class", [_KeywordOnlyExtras, _Forwards])
def test_an_override_taking_extras_by_name_or_forwarding_everything_works(
    bundle_class: type[_Recording],
) -> None:
    bundle = bundle_class()
    extras = _extras((3,))
    bundle.get_action(torch.randn(3, FEATURE_DIM), None, extras=extras)
    torch.testing.assert_close(bundle.seen[-1]["load"][:, 0], extras["load"])


def test_without_value_checks_the_range_is_not_read() -> None:
    bundle = _Recording()
    bundle.check_values = False
    out = bundle.get_value(
        torch.randn(2, FEATURE_DIM), extras={**_extras((2,)), "kind": torch.tensor([9, 9])}
    )
    assert out.shape == (2,)


# ---------------------------------------------------------------- the LSTM's blueprints


def test_the_lstm_declares_blueprint_indices_over_its_slots() -> None:
    bundle = small_lstm(blueprint_embed_dim=4, action_space=ActionSpace.tamiyo(slot=5))
    (spec,) = bundle.extra_inputs
    assert spec == ExtraInput("blueprint_indices", "integer", (5,), low=0, high=13, sentinels=(-1,))
    with pytest.raises(ValueError, match="blueprint_embed_dim must be at least 0"):
        small_lstm(blueprint_embed_dim=-1)


def test_an_empty_slot_uses_the_learned_null_embedding() -> None:
    bundle = small_lstm(blueprint_embed_dim=4)
    embedding = bundle.network.blueprints
    assert embedding is not None
    indices = torch.tensor([[-1, 0, 12]])
    vectors = embedding(indices).view(1, 3, 4)
    table = embedding.weight
    torch.testing.assert_close(vectors[0, 0], table[0])  # -1: the null row
    torch.testing.assert_close(vectors[0, 1], table[1])
    torch.testing.assert_close(vectors[0, 2], table[13])
    x = torch.randn(1, FEATURE_DIM)
    bundle.forward(x, None, extras={"blueprint_indices": indices}).value.sum().backward()  # type: ignore[no-untyped-call]
    grad = table.grad
    assert grad is not None
    assert grad[0].abs().sum() > 0  # the null vector learns
    assert grad[2:13].abs().sum() == 0  # blueprints not installed get nothing


def test_the_blueprints_change_the_lstm_policy() -> None:
    bundle = small_lstm(blueprint_embed_dim=4)
    with torch.no_grad():
        bundle.network.blueprints.weight.normal_()  # type: ignore[union-attr]
    x = torch.randn(2, FEATURE_DIM)
    empty = bundle.forward(x, None, extras={"blueprint_indices": torch.full((2, SLOTS), -1)})
    full = bundle.forward(x, None, extras={"blueprint_indices": torch.full((2, SLOTS), 5)})
    assert not torch.allclose(empty.logits["op"], full.logits["op"])


def test_an_out_of_range_blueprint_is_refused_naming_the_values() -> None:
    bundle = small_lstm(blueprint_embed_dim=4)
    bad = torch.tensor([[0, -1, 13], [-2, 3, 4]])
    with pytest.raises(
        ValueError, match=r"outside \[0, 13\) or -1: -2, 13 \(first at batch row 0\)"
    ):
        bundle.get_action(torch.randn(2, FEATURE_DIM), None, extras={"blueprint_indices": bad})


@pytest.mark.parametrize("space", [ActionSpace(), ActionSpace.tamiyo()], ids=["flat", "tamiyo"])
def test_rollout_and_update_agree_with_blueprints_and_episode_starts(space: ActionSpace) -> None:
    bundle = small_lstm(blueprint_embed_dim=4, action_space=space)
    generator = torch.Generator().manual_seed(3)
    batch, steps = 3, 6
    features = torch.randn(batch, steps, FEATURE_DIM, generator=generator)
    blueprints = _blueprints((batch, steps), generator)
    masks = random_masks((batch, steps), space=space, generator=generator)
    starts = torch.zeros(batch, steps, dtype=torch.bool)
    starts[0, 2] = starts[2, 4] = True
    start_hidden = bundle.initial_hidden(batch)
    hidden = start_hidden
    taken: list[dict[str, torch.Tensor]] = []
    log_probs: list[dict[str, torch.Tensor]] = []
    for t in range(steps):
        step_masks = ActionMasks.from_mapping(
            {name: None if m is None else m[:, t] for name, m in masks.as_dict().items()}
        )
        result = bundle.get_action(
            features[:, t],
            step_masks,
            hidden,
            episode_start=starts[:, t],
            extras={"blueprint_indices": blueprints[:, t]},
        )
        taken.append(result.action)
        log_probs.append(result.log_prob)
        hidden = result.hidden
    actions = {h: torch.stack([a[h] for a in taken], dim=1) for h in taken[0]}
    replay = bundle.evaluate_actions(
        features,
        actions,
        masks,
        start_hidden,
        episode_start=starts,
        extras={"blueprint_indices": blueprints},
    )
    for head in actions:
        rollout = torch.stack([lp[head] for lp in log_probs], dim=1)
        torch.testing.assert_close(replay.log_prob[head], rollout, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_keeps_the_blueprint_embedding(tmp_path: Any) -> None:
    bundle = small_lstm(blueprint_embed_dim=3)
    path = save_policy(bundle, tmp_path / "bp.pt")
    loaded = load_policy(path)
    assert isinstance(loaded, LSTMPolicyBundle)
    assert loaded.config["blueprint_embed_dim"] == 3
    assert loaded.extra_inputs == bundle.extra_inputs
    x, extras = torch.randn(2, FEATURE_DIM), {"blueprint_indices": _blueprints((2,))}
    torch.testing.assert_close(
        loaded.get_value(x, extras=extras), bundle.get_value(x, extras=extras)
    )


@pytest.mark.filterwarnings(  # dynamo reads .grad while tracing under autograd (torch's)
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"
)
def test_a_compiled_update_with_extras_and_resets_matches_the_eager_one() -> None:
    eager = small_lstm(blueprint_embed_dim=2)
    compiled = small_lstm(blueprint_embed_dim=2)
    compiled.network.load_state_dict(eager.network.state_dict())
    compiled.compile(backend="eager")
    x = torch.randn(2, 5, FEATURE_DIM)
    extras = {"blueprint_indices": _blueprints((2, 5))}
    actions = {head: torch.zeros(2, 5, dtype=torch.long) for head in HEAD_NAMES}
    starts = torch.zeros(2, 5, dtype=torch.bool)
    starts[1, 3] = True
    for episode_start in (None, starts):
        want = eager.evaluate_actions(x, actions, None, episode_start=episode_start, extras=extras)
        got = compiled.evaluate_actions(
            x, actions, None, episode_start=episode_start, extras=extras
        )
        torch.testing.assert_close(got.value, want.value)
        for head in HEAD_NAMES:
            torch.testing.assert_close(got.log_prob[head], want.log_prob[head])


def test_a_compiled_bundle_takes_extra_inputs_as_the_eager_one() -> None:
    eager = small_lstm(blueprint_embed_dim=2)
    compiled = small_lstm(blueprint_embed_dim=2)
    compiled.network.load_state_dict(eager.network.state_dict())
    compiled.compile(backend="eager")
    x, extras = torch.randn(2, FEATURE_DIM), {"blueprint_indices": _blueprints((2,))}
    want = eager.get_action(x, None, deterministic=True, extras=extras)
    got = compiled.get_action(x, None, deterministic=True, extras=extras)
    for head in want.action:
        assert torch.equal(want.action[head], got.action[head])
    torch.testing.assert_close(got.value, want.value)
