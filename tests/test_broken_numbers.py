"""Masks hold whatever numbers the network produces; broken numbers are named at the source.

A NaN or Inf in the hidden state, in the weights, or made inside the network by
features large enough to overflow, must never let a masked action be taken (with the
value checks on or off, eager or compiled); with the checks on it is refused where it
comes from: the hidden state before the network, the network's output right after it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FEATURE_DIM, TinyStatelessBundle, small_lstm
from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionMasks,
    ActionSpace,
    NetworkOutput,
    PolicyInputs,
    create_policy,
)
from esper.tamiyo.policy.testing import random_masks

# Dynamo reads `.grad` of non-leaf tensors while tracing; torch's own business.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"
)

SPACE = ActionSpace()
_SPECIALS = (math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0, 3.0)


class _Scripted(TinyStatelessBundle):
    """Returns the logits it is told to, whatever its features: a network gone wrong."""

    def __init__(self, space: ActionSpace = SPACE) -> None:
        super().__init__(action_space=space)
        self.logits = torch.zeros(1, 1, SPACE.num_heads, SPACE.padded_size)

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        out = super()._forward(inputs)
        logits = self.logits.expand(inputs.batch_size, inputs.seq_len, -1, -1) + 0 * out.logits
        return NetworkOutput(logits, out.value, None)


def _only_op(row_valid: list[bool], batch: int) -> ActionMasks:
    return ActionMasks(op=torch.tensor([row_valid] * batch))


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_reported_nan_hidden_state_never_takes_the_masked_op() -> None:
    """The issue's reproduction: op 5 is the only valid op; a NaN row must take it too."""
    bundle = create_policy("lstm", feature_dim=32)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 5] = True
    hidden = bundle.initial_hidden(4)
    assert hidden is not None
    hidden[0][0, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"hidden\[0\] contains NaN or Inf at batch row 2"):
        bundle.get_action(torch.randn(4, 32), ActionMasks(op=mask), hidden)
    bundle.check_values = False
    for deterministic in (False, True):
        out = bundle.get_action(
            torch.randn(4, 32), ActionMasks(op=mask), hidden, deterministic=deterministic
        )
        assert out.action["op"].tolist() == [5, 5, 5, 5]
        later = bundle.get_action(torch.randn(4, 32), ActionMasks(op=mask), out.hidden)
        assert later.action["op"].tolist() == [5, 5, 5, 5]  # the NaN stayed in row 2's state


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.sampled_from(_SPECIALS), min_size=6, max_size=6),
    valid=st.lists(st.booleans(), min_size=6, max_size=6).filter(any),
    deterministic=st.booleans(),
    hierarchical=st.booleans(),
)
def test_whatever_the_logits_a_masked_action_is_never_taken(
    logits: list[float], valid: list[bool], deterministic: bool, hierarchical: bool
) -> None:
    """Under a hierarchy the op is chosen by its own first stage: it keeps the mask too."""
    bundle = _Scripted(ActionSpace.tamiyo() if hierarchical else SPACE)
    bundle.check_values = False
    op = HEAD_NAMES.index("op")
    bundle.logits[0, 0, op, :6] = torch.tensor(logits)
    out = bundle.get_action(
        torch.zeros(64, FEATURE_DIM), _only_op(valid, 64), deterministic=deterministic
    )
    taken = out.action["op"]
    assert all(valid[int(a)] for a in taken), f"masked op taken: {sorted(set(taken.tolist()))}"
    assert bool(torch.isfinite(out.log_prob["op"]).all())


@pytest.mark.parametrize("space", [SPACE, ActionSpace.tamiyo()], ids=["flat", "hierarchical"])
def test_a_compiled_bundle_keeps_the_masks_too(space: ActionSpace) -> None:
    bundle = _Scripted(space).compile(backend="eager")
    bundle.check_values = False
    op = HEAD_NAMES.index("op")
    bundle.logits[0, 0, op, :6] = torch.tensor([math.nan, 1.0, math.inf, -math.inf, math.nan, 0.0])
    for valid in (
        [False, True, False, False, False, False],
        [False, False, False, True, True, False],
    ):
        taken = bundle.get_action(torch.zeros(32, FEATURE_DIM), _only_op(valid, 32)).action["op"]
        assert all(valid[int(a)] for a in taken)


def test_broken_logits_are_named_right_after_the_hook() -> None:
    bundle = _Scripted()
    bundle.logits[0, 0, HEAD_NAMES.index("tempo"), 1] = math.nan
    x = torch.zeros(3, FEATURE_DIM)
    for call in (
        lambda: bundle.get_action(x, None),
        lambda: bundle.forward(x, None),
        lambda: bundle.get_value(x),
        lambda: bundle.evaluate_actions(
            x, dict.fromkeys(HEAD_NAMES, torch.zeros(3, dtype=torch.long)), None
        ),
    ):
        with pytest.raises(
            FloatingPointError,
            match=r"_Scripted: the logits of head 'tempo' are NaN or Inf at batch row 0; "
            r"the network produced it: look at its weights",
        ):
            call()


def test_padding_columns_are_not_the_networks_business() -> None:
    """What a network puts past a head's own columns is ignored, NaN included."""
    bundle = _Scripted()
    bundle.logits[0, 0, HEAD_NAMES.index("op"), 6:] = math.nan
    out = bundle.get_action(torch.zeros(2, FEATURE_DIM), None)
    assert bool(torch.isfinite(out.log_prob["op"]).all())


def test_nan_weights_are_named_not_blamed_on_the_masks() -> None:
    """NaN weights (a diverged update, a bad load) make the PPO update fail with the cause."""
    bundle = small_lstm()
    masks = random_masks((2, 3))
    x = torch.randn(2, 3, FEATURE_DIM)
    actions = bundle.get_action(x, masks).action
    with torch.no_grad():
        bundle.network.heads.hidden.weight[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="the network produced it"):
        bundle.evaluate_actions(x, actions, masks)
    with pytest.raises(FloatingPointError, match="the network produced it"):
        bundle.get_action(x[:, 0], random_masks((2,)))


def test_features_that_overflow_inside_a_float16_network_are_named() -> None:
    """Finite features of 6e4 overflow a float16 network; the masks still hold."""
    bundle = small_lstm().to(torch.float16)
    x = torch.full((4, FEATURE_DIM), 6e4, dtype=torch.float16)
    assert bool(torch.isfinite(x).all())
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 3] = True
    with pytest.raises(FloatingPointError, match="the scale of the features"):
        bundle.get_action(x, ActionMasks(op=mask))
    bundle.check_values = False
    assert bundle.get_action(x, ActionMasks(op=mask)).action["op"].tolist() == [3, 3, 3, 3]


def test_a_network_that_makes_its_hidden_state_nan_is_named_at_the_next_step() -> None:
    """A NaN in the state the network returned is refused when it comes back, by name."""

    class Poisons(type(small_lstm())):  # type: ignore[misc]
        def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
            logits, value, hidden = super()._forward(inputs)
            assert hidden is not None
            return NetworkOutput(logits, value, (hidden[0], hidden[1] * math.nan))

    bundle = Poisons(FEATURE_DIM, hidden_dim=16, embed_dim=12)
    step = bundle.get_action(torch.randn(2, FEATURE_DIM), None)
    with pytest.raises(
        ValueError,
        match=r"hidden\[1\] contains NaN or Inf at batch row 0.*NaN only if the network produced it",
    ):
        bundle.get_action(torch.randn(2, FEATURE_DIM), None, step.hidden)


def test_a_rollout_under_inference_mode_feeds_the_update() -> None:
    """`get_action` under `torch.inference_mode` returns a state autograd can use."""
    bundle = small_lstm()
    masks = random_masks((2,))
    x = torch.randn(2, FEATURE_DIM)
    with torch.inference_mode():
        start = bundle.initial_hidden(2)
        step = bundle.get_action(x, masks, start)
        after = bundle.get_action(x, masks, step.hidden)
    assert start is not None
    assert step.hidden is not None
    assert not any(t.is_inference() for t in (*start, *step.hidden))
    replay = bundle.evaluate_actions(x.clone(), step.action, masks, step.hidden)
    torch.testing.assert_close(replay.value, after.value)
    torch.autograd.backward(torch.stack(list(replay.log_prob.values())).sum())
