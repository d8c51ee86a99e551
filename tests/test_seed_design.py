"""The seed-design replica: same function as LSTMPolicyBundle, and faithful to its flaws."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types

import pytest
import torch
from torch import nn

from conftest import FEATURE_DIM, small_lstm
from esper.tamiyo.policy import HEAD_NAMES, ActionMasks, ActionSpace, LSTMPolicyBundle
from esper.tamiyo.policy.bench.seed_design import (
    MaskedCategorical,
    SeedLSTMBundle,
    mask_kwargs,
    transplant_weights,
)
from esper.tamiyo.policy.testing import random_masks


def _randomize(net: nn.Module, std: float = 0.5) -> None:
    """Spread the weights so that a wrong transplant cannot hide in near-uniform logits."""
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0.0, std)


def _pair(num_layers: int = 1) -> tuple[SeedLSTMBundle, LSTMPolicyBundle]:
    seed = SeedLSTMBundle(FEATURE_DIM, hidden_dim=16, embed_dim=12, num_layers=num_layers)
    _randomize(seed.network)
    bundle = small_lstm(num_layers=num_layers)
    transplant_weights(seed, bundle)
    return seed, bundle


def _random_hidden(num_layers: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(num_layers, batch, 16), torch.randn(num_layers, batch, 16)


def _valid_actions(masks: ActionMasks, lead: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A random valid action per row and head (any action for an unmasked head)."""
    actions: dict[str, torch.Tensor] = {}
    for name, size in zip(HEAD_NAMES, ActionSpace().sizes, strict=True):
        mask = getattr(masks, name)
        weights = torch.ones(*lead, size) if mask is None else mask.float()
        flat = torch.multinomial(weights.reshape(-1, size), 1)
        actions[name] = flat.reshape(lead)
    return actions


def _loss(
    log_prob: dict[str, torch.Tensor], entropy: dict[str, torch.Tensor], value: torch.Tensor
) -> torch.Tensor:
    """A scalar touching every output, to compare gradients."""
    total = value.sum()
    for name in HEAD_NAMES:
        total = total + log_prob[name].sum() + entropy[name].sum()
    return total


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_transplanted_weights_evaluate_sequences_identically(num_layers: int) -> None:
    """After transplant_weights both bundles score a sequence alike, gradients included."""
    seed, bundle = _pair(num_layers)
    batch, steps = 3, 5
    masks = random_masks((batch, steps), unmasked=("tempo",))
    single = torch.zeros(batch, steps, ActionSpace().op, dtype=torch.bool)
    single[..., 2] = True  # one valid op everywhere: normalized entropy 0
    masks = dataclasses.replace(masks, op=single)
    actions = _valid_actions(masks, (batch, steps))
    features = torch.randn(batch, steps, FEATURE_DIM)
    hidden = _random_hidden(num_layers, batch)

    old = seed.evaluate_actions(features, actions, hidden, **mask_kwargs(masks))
    new = bundle.evaluate_actions(features, actions, masks, hidden)

    for name in HEAD_NAMES:
        assert old.log_prob[name].shape == (batch, steps)
        _close(old.log_prob[name], new.log_prob[name])
        _close(old.entropy[name], new.entropy[name])
    assert torch.all(old.entropy["op"] == 0)
    assert torch.all(new.entropy["op"] == 0)
    assert bool((old.entropy["blueprint"].detach() > 0).all())  # not vacuously zero
    _close(old.value, new.value)
    assert new.hidden is not None
    _close(old.hidden[0], new.hidden[0])
    _close(old.hidden[1], new.hidden[1])

    torch.autograd.backward(_loss(old.log_prob, old.entropy, old.value))
    torch.autograd.backward(_loss(new.log_prob, new.entropy, new.value))
    old_net, new_net = seed.network, bundle.network
    for old_param, new_param in (
        (old_net.embed.weight, new_net.embed.weight),
        (old_net.lstm.weight_hh_l0, new_net.lstm.weight_hh_l0),
    ):
        assert old_param.grad is not None
        assert new_param.grad is not None
        torch.testing.assert_close(old_param.grad, new_param.grad, atol=1e-4, rtol=1e-4)


def test_transplanted_weights_act_identically_step_by_step() -> None:
    """Deterministic single steps [B, F]: same actions, log-probs, values and hidden state."""
    seed, bundle = _pair()
    batch = 4
    old_hidden: tuple[torch.Tensor, ...] = _random_hidden(1, batch)
    new_hidden: tuple[torch.Tensor, ...] | None = old_hidden
    for _ in range(4):
        masks = random_masks((batch,), unmasked=("style",))
        features = torch.randn(batch, FEATURE_DIM)
        old = seed.get_action(features, old_hidden, **mask_kwargs(masks), deterministic=True)
        new = bundle.get_action(features, masks, new_hidden, deterministic=True)
        for name in HEAD_NAMES:
            assert old.action[name].shape == (batch,)
            assert torch.equal(old.action[name], new.action[name]), name
            _close(old.log_prob[name], new.log_prob[name])
        _close(old.value, new.value)
        assert new.hidden is not None
        _close(old.hidden[0], new.hidden[0])
        _close(old.hidden[1], new.hidden[1])
        old_hidden, new_hidden = old.hidden, new.hidden


def test_transplant_fills_the_fused_layout_and_refuses_other_sizes() -> None:
    """Head blocks land where PolicyHeads reads them, padding stays zero; sizes must match."""
    seed, bundle = _pair()
    heads = bundle.network.heads
    width = heads.head_hidden_dim
    for block, (name, size) in enumerate(zip(HEAD_NAMES, ActionSpace().sizes, strict=True)):
        head = seed.network.heads[name]
        assert isinstance(head, nn.Sequential)
        first, out = head[0], head[2]
        assert isinstance(first, nn.Linear)
        assert isinstance(out, nn.Linear)
        assert torch.equal(heads.hidden.weight[block * width : (block + 1) * width], first.weight)
        assert torch.equal(heads.out_weight[block, :, :size], out.weight.T)
        assert torch.equal(heads.out_bias[block, 0, :size], out.bias)
        assert torch.all(heads.out_weight[block, :, size:] == 0)
        assert torch.all(heads.out_bias[block, 0, size:] == 0)
    value_out = seed.network.value_head[2]
    assert isinstance(value_out, nn.Linear)
    assert torch.equal(heads.out_weight[len(HEAD_NAMES), :, 0], value_out.weight[0])
    with pytest.raises(ValueError, match="transplant_weights"):
        transplant_weights(seed, small_lstm(hidden_dim=32))


def test_masked_categorical_refuses_void_rows_and_non_finite_logits() -> None:
    """MaskedCategorical validates as the seed design did: no void row, finite logits."""
    logits = torch.randn(2, 4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"MaskedCategorical: a mask row has no valid action"):
        MaskedCategorical(logits, mask)
    for bad in (float("nan"), float("inf")):
        broken = logits.clone()
        broken[0, 1] = bad
        with pytest.raises(ValueError, match=r"MaskedCategorical: logits contain non-finite"):
            MaskedCategorical(broken, torch.ones(2, 4, dtype=torch.bool))
    seed = SeedLSTMBundle(FEATURE_DIM, hidden_dim=16, embed_dim=12)
    op = torch.ones(2, ActionSpace().op, dtype=torch.bool)
    op[0] = False
    with pytest.raises(ValueError, match="no valid action"):
        seed.get_action(torch.randn(2, FEATURE_DIM), op_mask=op)


def test_forward_defines_the_expand_mask_closure_on_every_call() -> None:
    """Faithfulness: SeedLSTMBundle.forward holds the finding's nested expand_mask closure."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(SeedLSTMBundle.forward)))
    method = tree.body[0]
    assert isinstance(method, ast.FunctionDef)
    nested: list[str] = []
    for node in ast.walk(method):
        if node is not method and isinstance(node, ast.FunctionDef):
            nested.append(node.name)
    assert nested == ["expand_mask"]
    # Compiled as a code object that MAKE_FUNCTION turns into a closure over
    # need_expand each time forward runs.
    code = SeedLSTMBundle.forward.__code__
    inner: list[types.CodeType] = []
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            inner.append(const)
    assert [c.co_name for c in inner] == ["expand_mask"]
    assert inner[0].co_freevars == ("need_expand",)
    assert "need_expand" in code.co_cellvars


def test_masked_actions_are_never_sampled() -> None:
    """Thousands of sampled steps: every action the replica takes is valid under its mask."""
    seed = SeedLSTMBundle(FEATURE_DIM, hidden_dim=16, embed_dim=12)
    _randomize(seed.network, std=1.0)
    batch = 4096
    masks = random_masks((batch,), keep=0.3)
    out = seed.get_action(torch.randn(batch, FEATURE_DIM), None, **mask_kwargs(masks))
    for name in HEAD_NAMES:
        mask = getattr(masks, name)
        action = out.action[name]
        assert action.shape == (batch,)
        taken = mask.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        assert bool(taken.all()), name
        assert torch.all(out.log_prob[name] > -50), name
        seen = torch.bincount(action, minlength=mask.shape[-1])
        assert bool((seen > 0).all()), name  # every action valid somewhere gets sampled
