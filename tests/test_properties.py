"""Property-based checks over batch sizes, sequence lengths and random masks."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import FEATURE_DIM, small_lstm
from esper.tamiyo.policy import HEAD_NAMES, ActionMasks, ActionSpace
from esper.tamiyo.policy.testing import random_masks

BUNDLE = small_lstm()  # read-only in these tests: built once, not per example


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, ActionMasks, int]:
    """Features `[B, T, F]`, masks `[B, T, A]` with a valid action in every row, a seed."""
    batch = draw(st.integers(1, 9))
    steps = draw(st.integers(1, 6))
    keep = draw(st.floats(0.05, 1.0))
    seed = draw(st.integers(0, 2**31 - 1))
    unmasked = tuple(draw(st.sets(st.sampled_from(HEAD_NAMES), max_size=len(HEAD_NAMES))))
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, steps, FEATURE_DIM, generator=gen)
    masks = random_masks((batch, steps), keep=keep, generator=gen, unmasked=unmasked)
    return features, masks, seed


@given(batches())
def test_sampled_actions_are_valid_and_scores_are_in_range(
    case: tuple[torch.Tensor, ActionMasks, int],
) -> None:
    features, masks, seed = case
    torch.manual_seed(seed)
    out = BUNDLE.get_action(features, masks)
    ev = BUNDLE.evaluate_actions(features, out.action, masks)
    for name, size in zip(HEAD_NAMES, ActionSpace().sizes, strict=True):
        given = masks.as_dict()[name]
        mask = torch.ones(*features.shape[:2], size, dtype=torch.bool) if given is None else given
        assert bool(mask.gather(-1, out.action[name].unsqueeze(-1)).all())
        assert bool((out.log_prob[name] <= 0).all())
        torch.testing.assert_close(ev.log_prob[name], out.log_prob[name])
        entropy = ev.entropy[name]
        assert bool(((entropy >= 0) & (entropy <= 1 + 1e-5)).all())
        single = mask.sum(-1) == 1
        assert bool((entropy[single] == 0).all())
        assert bool((out.log_prob[name][single] == 0).all())


@given(batches())
def test_stepping_through_a_sequence_equals_the_sequence_call(
    case: tuple[torch.Tensor, ActionMasks, int],
) -> None:
    features, masks, _ = case
    whole = BUNDLE.forward(features, masks)
    hidden = BUNDLE.initial_hidden(features.shape[0])
    for t in range(features.shape[1]):
        step_masks = ActionMasks.from_mapping(
            {n: None if m is None else m[:, t] for n, m in masks.as_dict().items()}
        )
        out = BUNDLE.forward(features[:, t], step_masks, hidden)
        hidden = out.hidden
        torch.testing.assert_close(out.value, whole.value[:, t])
        for name in HEAD_NAMES:
            torch.testing.assert_close(out.logits[name], whole.logits[name][:, t])
