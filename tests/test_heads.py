"""PolicyHeads: the fused module computes exactly what nine separate heads would."""

from __future__ import annotations

import torch
from torch import nn

from esper.tamiyo.policy import HEAD_NAMES, ActionSpace, PolicyHeads


def _separate_heads(heads: PolicyHeads, sizes: tuple[int, ...]) -> list[nn.Sequential]:
    """Unfuse: rebuild each head as its own Linear -> ReLU -> Linear with the same weights."""
    k = heads.head_hidden_dim
    out: list[nn.Sequential] = []
    for block, size in enumerate((*sizes, 1)):
        first = nn.Linear(heads.hidden.in_features, k)
        second = nn.Linear(k, size)
        with torch.no_grad():
            first.weight.copy_(heads.hidden.weight[block * k : (block + 1) * k])
            first.bias.copy_(heads.hidden.bias[block * k : (block + 1) * k])
            second.weight.copy_(heads.out_weight[block, :, :size].T)
            second.bias.copy_(heads.out_bias[block, 0, :size])
        out.append(nn.Sequential(first, nn.ReLU(), second))
    return out


def test_fused_heads_equal_separate_heads_for_any_leading_shape() -> None:
    space = ActionSpace(slot=4)
    heads = PolicyHeads(10, space, hidden_dim=6)
    with torch.no_grad():  # non-trivial biases too
        heads.hidden.bias.normal_()
        heads.out_bias.normal_()
    separate = _separate_heads(heads, space.sizes)
    for lead in [(3,), (2, 5), (1, 1, 4)]:
        x = torch.randn(*lead, 10)
        logits, value = heads(x)
        assert logits.shape == (*lead, len(HEAD_NAMES), space.padded_size)
        assert value.shape == lead
        for head, size in enumerate(space.sizes):
            torch.testing.assert_close(logits[..., head, :size], separate[head](x))
        torch.testing.assert_close(value, separate[-1](x).squeeze(-1))


def test_default_hidden_width_is_half_the_input() -> None:
    assert PolicyHeads(128, ActionSpace()).head_hidden_dim == 64


def test_gradients_of_fused_heads_equal_those_of_separate_heads() -> None:
    space = ActionSpace()
    heads = PolicyHeads(8, space, hidden_dim=4)
    separate = _separate_heads(heads, space.sizes)
    x = torch.randn(5, 8)
    logits, value = heads(x)
    target = torch.randn_like(logits)
    loss = value.sum()
    ref_loss = separate[-1](x).sum()
    for head, size in enumerate(space.sizes):
        loss = loss + (logits[..., head, :size] * target[..., head, :size]).sum()
        ref_loss = ref_loss + (separate[head](x) * target[..., head, :size]).sum()
    torch.autograd.backward(loss)
    torch.autograd.backward(ref_loss)
    assert heads.out_weight.grad is not None
    assert heads.hidden.weight.grad is not None
    k = heads.head_hidden_dim
    for block, size in enumerate((*space.sizes, 1)):
        first, _, second = separate[block]
        assert isinstance(first, nn.Linear)
        assert isinstance(second, nn.Linear)
        assert second.weight.grad is not None
        assert first.weight.grad is not None
        torch.testing.assert_close(heads.out_weight.grad[block, :, :size], second.weight.grad.T)
        torch.testing.assert_close(
            heads.hidden.weight.grad[block * k : (block + 1) * k], first.weight.grad
        )
