"""Op-first sampling and scoring: what `get_action` and `evaluate_actions` do under a hierarchy.

The probabilities are checked against an independent computation from the logits a
fixed bundle returns: per-op masks ANDed with flat ones, canonical irrelevant heads,
log-probabilities, entropies, the exact joint entropy by enumeration, relevance and
availability.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from conftest import FEATURE_DIM, small_lstm
from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionHierarchy,
    ActionMasks,
    ActionSpace,
    NetworkOutput,
    OpConditionedOutput,
    PolicyBundle,
    PolicyInputs,
)
from esper.tamiyo.policy.testing import random_masks

OP = HEAD_NAMES.index("op")
TAMIYO = ActionSpace.tamiyo()
# A tiny hierarchical space whose joint distribution can be enumerated by hand.
TINY = ActionSpace(
    slot=3,
    blueprint=2,
    style=1,
    tempo=1,
    alpha_target=1,
    alpha_speed=1,
    alpha_curve=1,
    op=3,
    hierarchy=ActionHierarchy.from_table(
        {"WAIT": (), "MOVE": ("slot",), "BUILD": ("slot", "blueprint")}, canonical={"slot": 1}
    ),
)


class FixedNetwork(nn.Module):
    """Logits that are parameters: the same for every row, so probabilities are known."""

    def __init__(self, space: ActionSpace, by_op: bool) -> None:
        super().__init__()
        width = space.padded_size
        self.logits = nn.Parameter(torch.randn(space.num_heads, width) * 2)
        self.logits_by_op = (
            nn.Parameter(torch.randn(space.op, space.num_heads, width) * 2) if by_op else None
        )
        self.value = nn.Parameter(torch.zeros(()))

    def forward(
        self, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`[B, T, F]` -> logits, value and per-op logits (or `None`), the same for every row."""
        batch, steps = features.shape[0], features.shape[1]
        logits = self.logits.expand(batch, steps, *self.logits.shape)
        value = self.value.expand(batch, steps) + 0 * features.sum(-1)
        if self.logits_by_op is None:
            return logits, value, None
        return logits, value, self.logits_by_op.expand(batch, steps, *self.logits_by_op.shape)


class FixedBundle(PolicyBundle):
    """A stateless bundle over `FixedNetwork`, op-conditioned when `by_op`."""

    def __init__(self, space: ActionSpace = TAMIYO, by_op: bool = False) -> None:
        super().__init__(FixedNetwork(space, by_op), feature_dim=FEATURE_DIM, action_space=space)

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput | OpConditionedOutput:
        logits, value, by_op = self.network(inputs.features)
        if by_op is None:
            return NetworkOutput(logits, value, None)
        return OpConditionedOutput(logits, value, None, by_op)


def _conditional(
    bundle: FixedBundle, masks: ActionMasks, row: int, op: int, head: str
) -> torch.Tensor:
    """P(head | op) for one row, from the bundle's parameters and the masks, by hand."""
    network = bundle.network
    assert isinstance(network, FixedNetwork)
    space = bundle.action_space
    h = HEAD_NAMES.index(head)
    size = space.size_of(head)
    source = (
        network.logits if head == "op" or network.logits_by_op is None else network.logits_by_op[op]
    )
    logits = source[h, :size].detach()
    valid = torch.ones(size, dtype=torch.bool)
    flat = getattr(masks, head)
    if flat is not None:
        valid &= flat[row]
    by_op = None if head == "op" else getattr(masks, f"{head}_by_op")
    if by_op is not None:
        valid &= by_op[row, op]
    return torch.softmax(logits.masked_fill(~valid, -math.inf), dim=-1)


def _features(batch: int, steps: int | None = None) -> torch.Tensor:
    return (
        torch.randn(batch, FEATURE_DIM) if steps is None else torch.randn(batch, steps, FEATURE_DIM)
    )


# ---------------------------------------------------------------------- sampling


@given(seed=st.integers(0, 2**16), steps=st.sampled_from([None, 3]), keep=st.floats(0.1, 0.9))
def test_no_sampled_action_violates_the_masks_at_its_op(
    seed: int, steps: int | None, keep: float
) -> None:
    generator = torch.Generator().manual_seed(seed)
    lead = (16,) if steps is None else (16, steps)
    masks = random_masks(
        lead, space=TAMIYO, keep=keep, generator=generator, by_op=("slot", "style")
    )
    bundle = FixedBundle(by_op=bool(seed % 2))
    out = bundle.get_action(_features(16, steps), masks, generator=generator)
    op = out.action["op"]
    assert masks.op is not None
    assert masks.op.gather(-1, op.unsqueeze(-1)).all()
    table = TAMIYO.hierarchy
    assert table is not None
    for head in HEAD_NAMES[:OP]:
        action = out.action[head]
        used = torch.tensor([head in table.uses(n) for n in range(6)])[op]
        flat = getattr(masks, head)
        assert flat is not None
        allowed = flat.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        by_op = getattr(masks, f"{head}_by_op")
        if by_op is not None:
            at_op = by_op.gather(
                -2, op[..., None, None].expand(*op.shape, 1, by_op.shape[-1])
            ).squeeze(-2)
            allowed &= at_op.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        assert allowed[used].all(), head
        assert (action[~used] == 0).all(), f"{head} is not canonical where its op ignores it"
        assert (out.log_prob[head][~used] == 0).all()


def test_sampled_frequencies_match_the_op_first_probabilities() -> None:
    """Each (op, slot) pair is drawn with pi(op) * pi(slot | op), per-op masks applied."""
    torch.manual_seed(0)
    bundle = FixedBundle(by_op=True)
    batch = 40_000
    slot_by_op = torch.tensor(
        [[1, 1, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.bool
    ).expand(batch, 6, 3)
    masks = ActionMasks(slot_by_op=slot_by_op)
    out = bundle.get_action(_features(batch), masks)
    op, slot = out.action["op"], out.action["slot"]
    p_op = _conditional(bundle, masks, 0, 0, "op")
    for n in range(6):
        for s in range(3):
            expected = float(p_op[n]) * (
                (1.0 if s == 0 else 0.0)
                if n == 0
                else float(_conditional(bundle, masks, 0, n, "slot")[s])
            )
            seen = ((op == n) & (slot == s)).float().mean().item()
            assert seen == pytest.approx(
                expected, abs=4 * math.sqrt(expected * (1 - expected) / batch) + 1e-4
            )


def test_log_probs_are_the_op_first_conditionals_and_zero_for_ignored_heads() -> None:
    bundle = FixedBundle(by_op=True)
    masks = random_masks((64,), space=TAMIYO, by_op=("slot", "blueprint", "alpha_speed"))
    out = bundle.get_action(_features(64), masks)
    table = TAMIYO.hierarchy
    assert table is not None
    for row in range(64):
        op = int(out.action["op"][row])
        for head in HEAD_NAMES:
            got = float(out.log_prob[head][row])
            if head != "op" and head not in table.uses(op):
                assert got == 0.0
                continue
            probs = _conditional(bundle, masks, row, op, head)
            assert got == pytest.approx(
                math.log(float(probs[int(out.action[head][row])])), abs=1e-5
            )


def test_deterministic_takes_the_ops_mode_then_each_heads_mode_at_that_op() -> None:
    bundle = FixedBundle(by_op=True)
    masks = random_masks((32,), space=TAMIYO, by_op=("slot", "style"))
    out = bundle.get_action(_features(32), masks, deterministic=True)
    table = TAMIYO.hierarchy
    assert table is not None
    for row in range(32):
        op = int(_conditional(bundle, masks, row, 0, "op").argmax())
        assert int(out.action["op"][row]) == op
        for head in table.uses(op):
            assert int(out.action[head][row]) == int(
                _conditional(bundle, masks, row, op, head).argmax()
            )


def test_op_conditioned_logits_let_one_state_prefer_different_slots_per_op() -> None:
    """Per-head logits cannot say "germinate slot 0, fossilize slot 2"; per-op ones can."""
    bundle = FixedBundle(by_op=True)
    network = bundle.network
    assert isinstance(network, FixedNetwork)
    assert network.logits_by_op is not None
    slot = HEAD_NAMES.index("slot")
    with torch.no_grad():
        network.logits_by_op[:, slot, :3] = 0.0
        network.logits_by_op[1, slot, 0] = 20.0  # GERMINATE -> slot 0
        network.logits_by_op[4, slot, 2] = 20.0  # FOSSILIZE -> slot 2
        network.logits[slot, :3] = torch.tensor([0.0, 50.0, 0.0])  # ignored: per-op logits win
    op_only = ActionMasks(
        op=torch.tensor([[False, True, False, False, True, False]]).expand(2000, 6)
    )
    out = bundle.get_action(_features(2000), op_only)
    op, chosen = out.action["op"], out.action["slot"]
    assert (chosen[op == 1] == 0).all()
    assert (chosen[op == 4] == 2).all()
    assert (op == 1).any()
    assert (op == 4).any()


def test_with_value_checks_off_no_masked_action_is_sampled_even_from_nan_logits() -> None:
    bundle = FixedBundle(by_op=True)
    bundle.check_values = False
    network = bundle.network
    assert isinstance(network, FixedNetwork)
    with torch.no_grad():
        network.logits[:, ::2] = math.nan
        assert network.logits_by_op is not None
        network.logits_by_op[:, :, 1::2] = math.inf
    masks = random_masks((256,), space=TAMIYO, keep=0.3, by_op=("slot", "alpha_target"))
    out = bundle.get_action(_features(256), masks)
    op = out.action["op"]
    assert masks.op is not None
    assert masks.op.gather(-1, op.unsqueeze(-1)).all()
    slot = out.action["slot"]
    assert masks.slot is not None
    assert masks.slot_by_op is not None
    used = op != 0
    assert masks.slot.gather(-1, slot.unsqueeze(-1)).squeeze(-1)[used].all()
    assert masks.slot_by_op[torch.arange(256), op, slot][used].all()


def test_a_flat_space_samples_heads_independently_as_before() -> None:
    """Without a hierarchy, no head is ever set to a canonical action or given log-prob 0."""
    bundle = FixedBundle(space=ActionSpace())
    out = bundle.get_action(_features(4000), None)
    waits = out.action["op"] == 0
    assert waits.any()
    assert (out.action["blueprint"][waits] != 0).any()
    assert (out.log_prob["blueprint"][waits] < 0).all()


def test_the_hierarchical_rollout_is_reproducible_under_a_generator() -> None:
    bundle = small_lstm(action_space=TAMIYO, op_conditioned_logits=True)
    masks = random_masks((8,), space=TAMIYO, by_op=("slot",))
    x = _features(8)
    first = bundle.get_action(x, masks, generator=torch.Generator().manual_seed(3))
    again = bundle.get_action(x, masks, generator=torch.Generator().manual_seed(3))
    for head in HEAD_NAMES:
        assert torch.equal(first.action[head], again.action[head])
        assert torch.equal(first.log_prob[head], again.log_prob[head])


# ---------------------------------------------------------------------- the update


@pytest.mark.parametrize("by_op", [False, True])
@pytest.mark.parametrize("per_op_masks", [(), ("slot", "blueprint", "alpha_curve")])
def test_rollout_and_update_agree_step_by_step_and_over_a_sequence(
    by_op: bool, per_op_masks: tuple[str, ...]
) -> None:
    bundle = small_lstm(action_space=TAMIYO, op_conditioned_logits=by_op)
    batch, steps = 5, 6
    x = _features(batch, steps)
    starts = torch.zeros(batch, steps, dtype=torch.bool)
    starts[1, 3] = True  # an episode starts inside the sequence
    step_masks = [random_masks((batch,), space=TAMIYO, by_op=per_op_masks) for _ in range(steps)]
    hidden = bundle.initial_hidden(batch)
    start = hidden
    taken: list[dict[str, torch.Tensor]] = []
    rollout: list[dict[str, torch.Tensor]] = []
    for t in range(steps):
        out = bundle.get_action(x[:, t], step_masks[t], hidden, episode_start=starts[:, t])
        taken.append(out.action)
        rollout.append(out.log_prob)
        hidden = out.hidden
    actions = {h: torch.stack([a[h] for a in taken], dim=1) for h in HEAD_NAMES}
    scored = bundle.evaluate_actions(
        x, actions, ActionMasks.stack(step_masks), start, episode_start=starts
    )
    for head in HEAD_NAMES:
        stored = torch.stack([lp[head] for lp in rollout], dim=1)
        torch.testing.assert_close(scored.log_prob[head], stored, atol=1e-5, rtol=0)


def test_ignored_heads_get_no_gradient_and_used_ones_do() -> None:
    bundle = FixedBundle(by_op=True)
    masks = ActionMasks(op=torch.tensor([[True, False, False, False, False, False]]).expand(8, 6))
    x = _features(8)
    actions = {h: torch.zeros(8, dtype=torch.long) for h in HEAD_NAMES}  # WAIT, all canonical
    scored = bundle.evaluate_actions(x, actions, masks)
    total = sum(scored.log_prob[h].sum() + scored.entropy[h].sum() for h in HEAD_NAMES if h != "op")
    assert isinstance(total, torch.Tensor)
    assert total.requires_grad
    torch.autograd.backward(total)
    network = bundle.network
    assert isinstance(network, FixedNetwork)
    assert network.logits_by_op is not None
    assert network.logits_by_op.grad is not None
    assert torch.count_nonzero(network.logits_by_op.grad) == 0
    assert all(
        float(scored.log_prob[h].detach().abs().sum()) == 0.0 for h in HEAD_NAMES if h != "op"
    )
    assert all(
        float(scored.entropy[h].detach().abs().sum()) == 0.0 for h in HEAD_NAMES if h != "op"
    )
    # The op itself mattered: its log-prob moves the op's logits.
    assert masks.op is not None
    free = {
        **actions,
        "op": torch.ones(8, dtype=torch.long),
        "slot": torch.ones(8, dtype=torch.long),
    }
    scored = bundle.evaluate_actions(x, free, None)
    torch.autograd.backward(scored.log_prob["op"].sum() + scored.log_prob["slot"].sum())
    assert network.logits.grad is not None
    assert network.logits.grad[OP].abs().sum() > 0
    assert network.logits_by_op.grad[1, HEAD_NAMES.index("slot")].abs().sum() > 0


def test_relevance_is_the_taken_ops_row_and_availability_the_valid_ops_union() -> None:
    bundle = FixedBundle()
    masks = random_masks((64, 2), space=TAMIYO, keep=0.4)
    out = bundle.get_action(_features(64, 2), masks)
    scored = bundle.evaluate_actions(_features(64, 2), out.action, masks)
    table = TAMIYO.hierarchy
    assert table is not None
    assert masks.op is not None
    for head in HEAD_NAMES:
        relevance = scored.relevance[head]
        availability = scored.availability[head]
        assert relevance.dtype == torch.bool
        assert relevance.shape == (64, 2)
        for row, step in itertools.product(range(64), range(2)):
            op = int(out.action["op"][row, step])
            valid_ops = [n for n in range(6) if masks.op[row, step, n]]
            assert bool(relevance[row, step]) == (head == "op" or head in table.uses(op))
            uses = head == "op" or any(head in table.uses(n) for n in valid_ops)
            assert bool(availability[row, step]) == uses


def test_a_flat_space_reports_every_head_relevant_and_available() -> None:
    bundle = FixedBundle(space=ActionSpace())
    out = bundle.get_action(_features(4), None)
    scored = bundle.evaluate_actions(_features(4), out.action, None)
    for head in HEAD_NAMES:
        assert scored.relevance[head].shape == (4,)
        assert scored.relevance[head].all()
        assert scored.availability[head].all()
    assert scored.joint_entropy is None


# ---------------------------------------------------------------------- entropy


def test_entropy_is_the_normalized_conditional_entropy_at_the_taken_op() -> None:
    bundle = FixedBundle(by_op=True)
    masks = random_masks((32,), space=TAMIYO, by_op=("slot", "style"))
    out = bundle.get_action(_features(32), masks)
    scored = bundle.evaluate_actions(_features(32), out.action, masks)
    table = TAMIYO.hierarchy
    assert table is not None
    for row in range(32):
        op = int(out.action["op"][row])
        for head in HEAD_NAMES:
            got = float(scored.entropy[head][row].detach())
            if head != "op" and head not in table.uses(op):
                assert got == 0.0
                continue
            probs = _conditional(bundle, masks, row, op, head)
            valid = int((probs > 0).sum())
            nats = float(-(probs[probs > 0] * probs[probs > 0].log()).sum())
            expected = 0.0 if valid <= 1 else nats / math.log(valid)
            assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("by_op", [False, True])
def test_the_joint_entropy_is_the_entropy_of_the_enumerated_joint_distribution(by_op: bool) -> None:
    bundle = FixedBundle(space=TINY, by_op=by_op)
    masks = ActionMasks(
        op=torch.tensor([[True, True, True], [True, False, True]]),
        slot=torch.tensor([[True, True, False], [True, True, True]]),
        slot_by_op=torch.tensor(
            [[[False, False, False], [True, True, True], [False, True, True]]] * 2
        ),
        blueprint_by_op=torch.tensor([[[True, True]] * 3, [[True, False]] * 3]),
    )
    out = bundle.get_action(_features(2), masks)
    scored = bundle.evaluate_actions(_features(2), out.action, masks, joint_entropy=True)
    assert scored.joint_entropy is not None
    table = TINY.hierarchy
    assert table is not None
    for row in range(2):
        outcomes: dict[tuple[int, int, int], float] = {}
        p_op = _conditional(bundle, masks, row, 0, "op")
        for op in range(3):
            p_slot = _conditional(bundle, masks, row, op, "slot")
            p_blueprint = _conditional(bundle, masks, row, op, "blueprint")
            slots = range(3) if "slot" in table.uses(op) else [1]
            blueprints = range(2) if "blueprint" in table.uses(op) else [0]
            for s, b in itertools.product(slots, blueprints):
                p = float(p_op[op])
                p *= float(p_slot[s]) if "slot" in table.uses(op) else 1.0
                p *= float(p_blueprint[b]) if "blueprint" in table.uses(op) else 1.0
                outcomes[(op, s, b)] = outcomes.get((op, s, b), 0.0) + p
        assert sum(outcomes.values()) == pytest.approx(1.0, abs=1e-6)
        expected = -sum(p * math.log(p) for p in outcomes.values() if p > 0)
        assert float(scored.joint_entropy[row].detach()) == pytest.approx(expected, abs=1e-5)


def test_the_joint_entropy_of_a_flat_space_is_the_sum_of_the_heads_entropies() -> None:
    bundle = FixedBundle(space=ActionSpace())
    masks = random_masks((8,))
    out = bundle.get_action(_features(8), masks)
    scored = bundle.evaluate_actions(_features(8), out.action, masks, joint_entropy=True)
    assert scored.joint_entropy is not None
    for row in range(8):
        expected = 0.0
        for head in HEAD_NAMES:
            probs = _conditional(bundle, masks, row, 0, head)
            expected -= float((probs[probs > 0] * probs[probs > 0].log()).sum())
        assert float(scored.joint_entropy[row].detach()) == pytest.approx(expected, abs=1e-5)


def test_the_joint_entropy_carries_a_gradient() -> None:
    bundle = FixedBundle(by_op=True)
    masks = random_masks((4,), space=TAMIYO, by_op=("slot",))
    out = bundle.get_action(_features(4), masks)
    scored = bundle.evaluate_actions(_features(4), out.action, masks, joint_entropy=True)
    assert scored.joint_entropy is not None
    torch.autograd.backward(scored.joint_entropy.sum())
    network = bundle.network
    assert isinstance(network, FixedNetwork)
    assert network.logits.grad is not None
    assert network.logits.grad.abs().sum() > 0
