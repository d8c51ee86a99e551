"""get_action: masked actions are never taken; a forced choice is taken with log-prob 0."""

from __future__ import annotations

import pytest
import torch

from conftest import FEATURE_DIM, TinyStatelessBundle, one_hot_masks, small_lstm
from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionMasks,
    LSTMPolicyBundle,
    NetworkOutput,
    PolicyHeads,
    PolicyInputs,
)
from esper.tamiyo.policy.testing import random_masks

CHOICE = {
    "slot": 2, "blueprint": 11, "style": 0, "tempo": 1,
    "alpha_target": 2, "alpha_speed": 3, "alpha_curve": 0, "op": 4,
}  # fmt: skip


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("lead", [(1,), (64,), (4, 9)])
def test_the_only_valid_action_is_always_taken_with_log_prob_zero(
    bundle: LSTMPolicyBundle, lead: tuple[int, ...], deterministic: bool
) -> None:
    x = torch.randn(*lead, FEATURE_DIM)
    out = bundle.get_action(x, one_hot_masks(lead, CHOICE), deterministic=deterministic)
    for name in HEAD_NAMES:
        assert torch.all(out.action[name] == CHOICE[name]), name
        assert torch.all(out.log_prob[name] == 0.0), name


@pytest.mark.parametrize("batch", [1, 7, 2048])
def test_a_masked_action_is_never_sampled(bundle: LSTMPolicyBundle, batch: int) -> None:
    gen = torch.Generator().manual_seed(batch)
    hidden = bundle.initial_hidden(batch)
    for _ in range(5 if batch > 1 else 200):
        masks = random_masks((batch,), keep=0.3, generator=gen)
        out = bundle.get_action(torch.randn(batch, FEATURE_DIM), masks, hidden)
        hidden = out.hidden
        for name in HEAD_NAMES:
            mask = masks.as_dict()[name]
            assert mask is not None
            taken = mask.gather(1, out.action[name].unsqueeze(1))
            assert bool(taken.all()), f"a masked {name} action was sampled"


@pytest.mark.parametrize("seeded", [False, True])
def test_a_uniform_draw_of_zero_does_not_hand_the_only_valid_action_to_a_masked_one(
    bundle: LSTMPolicyBundle, monkeypatch: pytest.MonkeyPatch, seeded: bool
) -> None:
    """`torch.rand` returns exactly 0 once in 2**24 draws: Gumbel noise must stay finite.

    Found by the PPO demo, whose rollouts draw millions: the sole valid action got
    `-inf` noise and a masked action (log-prob -1e4) was sampled.
    """
    monkeypatch.setattr(torch, "rand_like", torch.zeros_like)
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.zeros(shape, dtype=kw["dtype"]))
    lead = (16,)
    generator = torch.Generator().manual_seed(0) if seeded else None
    out = bundle.get_action(
        torch.randn(*lead, FEATURE_DIM), one_hot_masks(lead, CHOICE), generator=generator
    )
    for name in HEAD_NAMES:
        assert torch.all(out.action[name] == CHOICE[name]), name
        assert torch.all(out.log_prob[name] == 0.0), name


def test_masked_actions_are_never_sampled_even_against_huge_logits(
    bundle: LSTMPolicyBundle,
) -> None:
    """Masking beats any logit the network can produce, however confident."""
    with torch.no_grad():
        bundle.network.heads.out_bias.fill_(0)
        bundle.network.heads.out_bias[:, :, 0] = 5000.0
    batch = 512
    blueprint = torch.ones(batch, 13, dtype=torch.bool)
    blueprint[:, 0] = False
    out = bundle.get_action(torch.randn(batch, FEATURE_DIM), ActionMasks(blueprint=blueprint))
    assert bool((out.action["blueprint"] != 0).all())
    assert bool((out.action["op"] == 0).all())  # unmasked: the huge logit wins


def test_deterministic_takes_the_most_likely_valid_action(bundle: LSTMPolicyBundle) -> None:
    batch = 16
    x = torch.randn(batch, FEATURE_DIM)
    masks = random_masks((batch,))
    fwd = bundle.forward(x, masks)
    out = bundle.get_action(x, masks, deterministic=True)
    for name in HEAD_NAMES:
        assert torch.equal(out.action[name], fwd.logits[name].argmax(-1))


def test_log_probs_are_those_of_the_masked_softmax(bundle: LSTMPolicyBundle) -> None:
    batch = 32
    x = torch.randn(batch, FEATURE_DIM)
    masks = random_masks((batch,))
    torch.manual_seed(3)
    out = bundle.get_action(x, masks)
    fwd = bundle.forward(x, masks)
    for name in HEAD_NAMES:
        expected = torch.log_softmax(fwd.logits[name], -1).gather(1, out.action[name].unsqueeze(1))
        torch.testing.assert_close(out.log_prob[name], expected.squeeze(1))
        assert bool((out.log_prob[name] <= 0).all())


def test_same_seed_same_actions(bundle: LSTMPolicyBundle) -> None:
    x = torch.randn(8, 3, FEATURE_DIM)
    masks = random_masks((8, 3))
    torch.manual_seed(11)
    first = bundle.get_action(x, masks)
    torch.manual_seed(11)
    second = bundle.get_action(x, masks)
    for name in HEAD_NAMES:
        assert torch.equal(first.action[name], second.action[name])


def test_sampling_follows_the_masked_softmax() -> None:
    """Empirical frequencies match the policy's probabilities (fixed seed, loose bound)."""
    bundle = small_lstm()
    with torch.no_grad():  # make the policy far from uniform
        bundle.network.heads.out_bias.normal_(0, 1.0)
    batch = 20000
    x = torch.randn(1, FEATURE_DIM).expand(batch, FEATURE_DIM)
    mask = torch.tensor([True, True, False, True, True, False]).expand(batch, 6)
    masks = ActionMasks(op=mask)
    out = bundle.get_action(x, masks)
    probs = torch.softmax(bundle.forward(x[:1], ActionMasks(op=mask[:1])).logits["op"][0], -1)
    counts = torch.bincount(out.action["op"], minlength=6).float() / batch
    assert counts[2] == 0
    assert counts[5] == 0
    torch.testing.assert_close(counts, probs.detach(), atol=0.015, rtol=0)


@pytest.mark.parametrize("shift", [-2e4, -1e6, 1e6])
def test_masked_actions_are_never_sampled_from_a_network_with_drifted_logits(shift: float) -> None:
    """Valid logits far from 0 still beat the -1e4 fill: each head is shifted first."""

    class Drifted(TinyStatelessBundle):
        def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
            logits, value, _ = super()._forward(inputs)
            return NetworkOutput(logits + shift, value, None)

    bundle = Drifted()
    batch = 1000
    op = torch.ones(batch, 6, dtype=torch.bool)
    op[:, 0] = False
    out = bundle.get_action(torch.randn(batch, FEATURE_DIM), ActionMasks(op=op))
    assert bool((out.action["op"] != 0).all())
    assert bool((out.action["blueprint"] < 13).all())
    ev = bundle.evaluate_actions(torch.randn(batch, FEATURE_DIM), out.action, ActionMasks(op=op))
    assert bool(torch.isfinite(ev.log_prob["op"]).all())
    # The policy still learns: drifted logits keep their gradient.
    torch.autograd.backward(ev.log_prob["op"].sum() + ev.entropy["blueprint"].sum())
    heads = bundle.network.heads
    assert isinstance(heads, PolicyHeads)
    grad = heads.out_bias.grad
    assert grad is not None
    assert bool(grad.abs().sum() > 0)
