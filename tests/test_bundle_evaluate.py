"""evaluate_actions: the PPO side, with autograd, agreeing with the rollout side."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import FEATURE_DIM, one_hot_masks, small_lstm
from esper.tamiyo.policy import HEAD_NAMES, ActionMasks, LSTMPolicyBundle
from esper.tamiyo.policy.testing import random_masks


def test_get_action_builds_no_graph(bundle: LSTMPolicyBundle) -> None:
    out = bundle.get_action(torch.randn(3, FEATURE_DIM), None)
    assert out.value.grad_fn is None
    assert not out.value.requires_grad
    assert out.hidden is not None
    assert all(not h.requires_grad for h in out.hidden)
    assert all(not lp.requires_grad for lp in out.log_prob.values())
    assert not bundle.get_value(torch.randn(3, FEATURE_DIM)).requires_grad


@pytest.mark.parametrize("lead", [(5,), (3, 6)])
def test_evaluate_log_probs_equal_get_action_log_probs(
    bundle: LSTMPolicyBundle, lead: tuple[int, ...]
) -> None:
    x = torch.randn(*lead, FEATURE_DIM)
    masks = random_masks(lead)
    hidden = bundle.initial_hidden(lead[0])
    acted = bundle.get_action(x, masks, hidden)
    ev = bundle.evaluate_actions(x, acted.action, masks, hidden)
    for name in HEAD_NAMES:
        torch.testing.assert_close(ev.log_prob[name], acted.log_prob[name])
    torch.testing.assert_close(ev.value, acted.value)


def test_hidden_from_get_action_works_under_autograd(bundle: LSTMPolicyBundle) -> None:
    """A rollout's stored hidden state replays the next steps exactly, with gradients."""
    batch = 4
    first = bundle.get_action(torch.randn(batch, FEATURE_DIM), None)
    x = torch.randn(batch, 3, FEATURE_DIM)
    masks = random_masks((batch, 3))
    acted = bundle.get_action(x, masks, first.hidden)
    ev = bundle.evaluate_actions(x, acted.action, masks, first.hidden)
    loss = sum(lp.sum() for lp in ev.log_prob.values())
    assert isinstance(loss, torch.Tensor)
    torch.autograd.backward(loss)
    for name in HEAD_NAMES:
        torch.testing.assert_close(ev.log_prob[name], acted.log_prob[name])


def test_gradients_reach_every_parameter(bundle: LSTMPolicyBundle) -> None:
    batch, steps = 4, 5
    x = torch.randn(batch, steps, FEATURE_DIM)
    masks = random_masks((batch, steps))
    acted = bundle.get_action(x, masks)
    ev = bundle.evaluate_actions(x, acted.action, masks, bundle.initial_hidden(batch))
    loss = ev.value.pow(2).mean()
    for name in HEAD_NAMES:
        loss = loss - ev.log_prob[name].mean() - 0.01 * ev.entropy[name].mean()
    torch.autograd.backward(loss)
    for name, param in bundle.network.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert bool(param.grad.abs().sum() > 0), f"{name} got an all-zero gradient"


def test_gradient_flows_into_the_initial_hidden_state(bundle: LSTMPolicyBundle) -> None:
    hidden = bundle.initial_hidden(2)
    assert hidden is not None
    h0 = hidden[0].clone().requires_grad_(True)
    ev = bundle.evaluate_actions(
        torch.randn(2, 3, FEATURE_DIM),
        {name: torch.zeros(2, 3, dtype=torch.long) for name in HEAD_NAMES},
        None,
        (h0, hidden[1]),
    )
    torch.autograd.backward(ev.value.sum())
    assert h0.grad is not None
    assert bool(h0.grad.abs().sum() > 0)


def test_entropy_is_normalized_to_one_for_a_uniform_policy() -> None:
    """With zeroed output layers every head is uniform over its valid actions: entropy 1."""
    bundle = small_lstm()
    with torch.no_grad():
        bundle.network.heads.out_weight.zero_()
        bundle.network.heads.out_bias.zero_()
    batch = 8
    masks = random_masks((batch,), keep=0.5)
    actions = bundle.get_action(torch.randn(batch, FEATURE_DIM), masks).action
    ev = bundle.evaluate_actions(torch.randn(batch, FEATURE_DIM), actions, masks)
    for name in HEAD_NAMES:
        mask = masks.as_dict()[name]
        assert mask is not None
        count = mask.sum(-1)
        expected = torch.where(count > 1, 1.0, 0.0)
        torch.testing.assert_close(ev.entropy[name], expected)
        torch.testing.assert_close(ev.log_prob[name], -torch.log(count.float()))


def test_entropy_is_zero_with_one_valid_action_and_in_unit_interval(
    bundle: LSTMPolicyBundle,
) -> None:
    choice = dict.fromkeys(HEAD_NAMES, 0)
    ev = bundle.evaluate_actions(
        torch.randn(3, FEATURE_DIM),
        {name: torch.zeros(3, dtype=torch.long) for name in HEAD_NAMES},
        one_hot_masks((3,), choice),
    )
    for name in HEAD_NAMES:
        assert torch.all(ev.entropy[name] == 0)
        assert torch.all(ev.log_prob[name] == 0)
    x = torch.randn(50, FEATURE_DIM)
    masks = random_masks((50,))
    ev = bundle.evaluate_actions(x, bundle.get_action(x, masks).action, masks)
    for name in HEAD_NAMES:
        assert bool(((ev.entropy[name] >= 0) & (ev.entropy[name] <= 1 + 1e-6)).all())


def test_entropy_matches_the_definition(bundle: LSTMPolicyBundle) -> None:
    x = torch.randn(6, FEATURE_DIM)
    masks = random_masks((6,))
    fwd = bundle.forward(x, masks)
    ev = bundle.evaluate_actions(x, bundle.get_action(x, masks).action, masks)
    for name in HEAD_NAMES:
        mask = masks.as_dict()[name]
        assert mask is not None
        p = torch.softmax(fwd.logits[name], -1)
        raw = -(p * torch.log_softmax(fwd.logits[name], -1)).sum(-1)
        count = mask.sum(-1).float()
        expected = torch.where(count > 1, raw / torch.log(count.clamp(min=2)), 0.0)
        torch.testing.assert_close(ev.entropy[name], expected)


def test_masked_entries_contribute_no_gradient(bundle: LSTMPolicyBundle) -> None:
    """Padding columns of the fused output layer receive exactly zero gradient."""
    x = torch.randn(4, 2, FEATURE_DIM)
    masks = random_masks((4, 2))
    ev = bundle.evaluate_actions(x, bundle.get_action(x, masks).action, masks)
    torch.autograd.backward(torch.stack([e.sum() for e in ev.entropy.values()]).sum())
    grad = bundle.network.heads.out_weight.grad
    assert isinstance(grad, torch.Tensor)
    for head, size in enumerate((3, 13, 4, 3, 3, 4, 3, 6)):
        assert torch.all(grad[head, :, size:] == 0)
    assert math.isfinite(float(grad.abs().sum()))


def test_value_of_get_value_equals_forward_value(bundle: LSTMPolicyBundle) -> None:
    x = torch.randn(3, 4, FEATURE_DIM)
    hidden = bundle.initial_hidden(3)
    torch.testing.assert_close(bundle.get_value(x, hidden), bundle.forward(x, None, hidden).value)


def test_masks_as_action_masks_in_evaluate(bundle: LSTMPolicyBundle) -> None:
    x = torch.randn(2, FEATURE_DIM)
    ev = bundle.evaluate_actions(
        x,
        {name: torch.zeros(2, dtype=torch.long) for name in HEAD_NAMES},
        ActionMasks(op=torch.tensor([[True, False, False, False, False, False]] * 2)),
    )
    assert torch.all(ev.log_prob["op"] == 0)


def test_other_integer_action_dtypes_are_converted(bundle: LSTMPolicyBundle) -> None:
    x = torch.randn(4, FEATURE_DIM)
    masks = random_masks((4,))
    acted = bundle.get_action(x, masks)
    as_int32 = {name: a.to(torch.int32) for name, a in acted.action.items()}
    ev = bundle.evaluate_actions(x, as_int32, masks)
    for name in HEAD_NAMES:
        torch.testing.assert_close(ev.log_prob[name], acted.log_prob[name])
