"""Shapes follow the caller: a step is a sequence of one, and masks mean the same in any form."""

from __future__ import annotations

import pytest
import torch

from conftest import FEATURE_DIM
from esper.tamiyo.policy import HEAD_NAMES, ActionMasks, ActionSpace, LSTMPolicyBundle
from esper.tamiyo.policy.testing import random_masks

SIZES = dict(zip(HEAD_NAMES, ActionSpace().sizes, strict=True))


def test_step_equals_sequence_of_one(bundle: LSTMPolicyBundle) -> None:
    """[B, F] gives what [B, 1, F] gives: logits, values, log-probs, entropies, hidden."""
    batch = 5
    x = torch.randn(batch, FEATURE_DIM)
    masks2 = random_masks((batch,))
    masks3 = ActionMasks.from_mapping(
        {name: None if m is None else m.unsqueeze(1) for name, m in masks2.as_dict().items()}
    )
    hidden = bundle.initial_hidden(batch)
    step = bundle.forward(x, masks2, hidden)
    seq = bundle.forward(x.unsqueeze(1), masks3, hidden)
    for name in HEAD_NAMES:
        assert step.logits[name].shape == (batch, SIZES[name])
        torch.testing.assert_close(step.logits[name], seq.logits[name].squeeze(1))
    assert step.value.shape == (batch,)
    torch.testing.assert_close(step.value, seq.value.squeeze(1))
    assert step.hidden is not None
    assert seq.hidden is not None
    for a, b in zip(step.hidden, seq.hidden, strict=True):
        torch.testing.assert_close(a, b)

    acted = bundle.get_action(x, masks2, hidden, deterministic=True)
    actions3 = {name: a.unsqueeze(1) for name, a in acted.action.items()}
    ev_step = bundle.evaluate_actions(x, acted.action, masks2, hidden)
    ev_seq = bundle.evaluate_actions(x.unsqueeze(1), actions3, masks3, hidden)
    for name in HEAD_NAMES:
        assert ev_step.log_prob[name].shape == (batch,)
        torch.testing.assert_close(ev_step.log_prob[name], ev_seq.log_prob[name].squeeze(1))
        torch.testing.assert_close(ev_step.entropy[name], ev_seq.entropy[name].squeeze(1))


def test_sequence_outputs_keep_the_time_axis(bundle: LSTMPolicyBundle) -> None:
    batch, steps = 3, 7
    x = torch.randn(batch, steps, FEATURE_DIM)
    masks = random_masks((batch, steps))
    out = bundle.get_action(x, masks)
    ev = bundle.evaluate_actions(x, out.action, masks)
    fwd = bundle.forward(x, masks)
    for name in HEAD_NAMES:
        assert out.action[name].shape == (batch, steps)
        assert out.action[name].dtype == torch.int64
        assert out.log_prob[name].shape == (batch, steps)
        assert ev.entropy[name].shape == (batch, steps)
        assert fwd.logits[name].shape == (batch, steps, SIZES[name])
    assert out.value.shape == ev.value.shape == (batch, steps)
    assert bundle.get_value(x).shape == (batch, steps)
    assert bundle.get_value(x[:, 0]).shape == (batch,)


def test_a_sequence_equals_its_steps_one_by_one(bundle: LSTMPolicyBundle) -> None:
    """Running T steps with the hidden state threaded gives the [B, T, F] call's outputs."""
    batch, steps = 2, 5
    x = torch.randn(batch, steps, FEATURE_DIM)
    masks = random_masks((batch, steps))
    whole = bundle.forward(x, masks)
    hidden = bundle.initial_hidden(batch)
    for t in range(steps):
        step_masks = ActionMasks.from_mapping(
            {n: None if m is None else m[:, t] for n, m in masks.as_dict().items()}
        )
        out = bundle.forward(x[:, t], step_masks, hidden)
        hidden = out.hidden
        for name in HEAD_NAMES:
            torch.testing.assert_close(out.logits[name], whole.logits[name][:, t])
        torch.testing.assert_close(out.value, whole.value[:, t])
    assert hidden is not None
    assert whole.hidden is not None
    torch.testing.assert_close(hidden[0], whole.hidden[0])
    torch.testing.assert_close(hidden[1], whole.hidden[1])


@pytest.mark.parametrize("form", ["[B, A]", "[B, 1, A]"])
def test_single_step_accepts_both_mask_forms(bundle: LSTMPolicyBundle, form: str) -> None:
    batch = 4
    x = torch.randn(batch, FEATURE_DIM)
    masks2 = random_masks((batch,))
    given = (
        masks2
        if form == "[B, A]"
        else ActionMasks.from_mapping(
            {n: None if m is None else m.unsqueeze(1) for n, m in masks2.as_dict().items()}
        )
    )
    reference = bundle.forward(x, masks2)
    out = bundle.forward(x, given)
    for name in HEAD_NAMES:
        torch.testing.assert_close(out.logits[name], reference.logits[name])


def test_mixed_mask_ranks_in_one_call(bundle: LSTMPolicyBundle) -> None:
    """Some heads [B, A], others [B, 1, A], one None: packed the same as all [B, A]."""
    batch = 3
    x = torch.randn(batch, FEATURE_DIM)
    masks2 = random_masks((batch,)).as_dict()
    mixed = dict(masks2)
    for name in ("slot", "tempo", "op"):
        tensor = masks2[name]
        assert tensor is not None
        mixed[name] = tensor.unsqueeze(1)
    mixed["style"] = None
    reference = dict(masks2)
    reference["style"] = None
    out = bundle.forward(x, mixed)
    expected = bundle.forward(x, reference)
    for name in HEAD_NAMES:
        torch.testing.assert_close(out.logits[name], expected.logits[name])


def test_sequence_of_length_one_accepts_two_d_masks(bundle: LSTMPolicyBundle) -> None:
    batch = 3
    x = torch.randn(batch, 1, FEATURE_DIM)
    masks2 = random_masks((batch,))
    out = bundle.forward(x, masks2)
    assert out.logits["op"].shape == (batch, 1, 6)


def test_mapping_gives_exactly_what_the_equal_action_masks_give(
    bundle: LSTMPolicyBundle,
) -> None:
    batch = 6
    x = torch.randn(batch, FEATURE_DIM)
    masks = random_masks((batch,))
    as_mapping = masks.as_dict()
    hidden = bundle.initial_hidden(batch)
    a = bundle.forward(x, masks, hidden)
    b = bundle.forward(x, as_mapping, hidden)
    unmasked = bundle.forward(x, None, hidden)
    for name in HEAD_NAMES:
        assert torch.equal(a.logits[name], b.logits[name])
    # The masks really mask: invalid entries are filled, valid ones keep their
    # differences (each row is shifted so its best valid logit is 0).
    for name in HEAD_NAMES:
        mask = masks.as_dict()[name]
        assert mask is not None
        assert torch.all(a.logits[name][~mask] == -1e4)
        raw = unmasked.logits[name]
        top = raw.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
        torch.testing.assert_close(a.logits[name][mask], (raw - top)[mask])
        assert torch.all(a.logits[name].amax(-1) == 0)
    torch.manual_seed(7)
    act_a = bundle.get_action(x, masks, hidden)
    torch.manual_seed(7)
    act_b = bundle.get_action(x, as_mapping, hidden)
    for name in HEAD_NAMES:
        assert torch.equal(act_a.action[name], act_b.action[name])
        assert torch.equal(act_a.log_prob[name], act_b.log_prob[name])


def test_masks_none_and_all_none_masks_are_the_same(bundle: LSTMPolicyBundle) -> None:
    x = torch.randn(2, FEATURE_DIM)
    a = bundle.forward(x, None)
    b = bundle.forward(x, ActionMasks())
    for name in HEAD_NAMES:
        assert torch.equal(a.logits[name], b.logits[name])


@pytest.mark.parametrize("lead", [(3,), (3, 1), (3, 4)])
def test_masks_with_every_head_none_equal_no_masks(
    bundle: LSTMPolicyBundle, lead: tuple[int, ...]
) -> None:
    """ActionMasks() and an all-None mapping mean "no masking", for steps and sequences."""
    x = torch.randn(*lead, FEATURE_DIM)
    reference = bundle.forward(x, None)
    actions = bundle.get_action(x, None).action
    ev_reference = bundle.evaluate_actions(x, actions, None)
    for masks in (ActionMasks(), dict.fromkeys(HEAD_NAMES)):
        out = bundle.forward(x, masks)
        ev = bundle.evaluate_actions(x, actions, masks)
        assert bundle.get_action(x, masks).value.shape == lead
        for name in HEAD_NAMES:
            assert torch.equal(out.logits[name], reference.logits[name])
            assert torch.equal(ev.log_prob[name], ev_reference.log_prob[name])


@pytest.mark.parametrize("lead", [(2,), (2, 5)])
def test_some_heads_unmasked_in_sequences(bundle: LSTMPolicyBundle, lead: tuple[int, ...]) -> None:
    x = torch.randn(*lead, FEATURE_DIM)
    masks = random_masks(lead, unmasked=("style", "op"))
    out = bundle.forward(x, masks)
    unmasked = bundle.forward(x, None)
    assert torch.equal(out.logits["op"], unmasked.logits["op"])
    assert torch.equal(out.logits["style"], unmasked.logits["style"])
    slot = masks.slot
    assert slot is not None
    assert torch.all(out.logits["slot"][~slot] == -1e4)
