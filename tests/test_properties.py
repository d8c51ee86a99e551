"""Property-based checks over batch sizes, sequence lengths and random masks."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FEATURE_DIM, small_lstm
from esper.tamiyo.policy import HEAD_NAMES, ActionMasks, ActionSpace, LSTMPolicyBundle, categorical
from esper.tamiyo.policy.testing import random_masks


def _opinionated() -> LSTMPolicyBundle:
    """A bundle whose policies are far from uniform, logits spanning several units.

    A sampler that ignored the logits would fail the chi-square test against it.
    """
    bundle = small_lstm()
    with torch.no_grad():
        bundle.network.heads.out_weight.mul_(300.0)
    return bundle


# Read-only in these tests, built once. Seeded: torch seeds its global generator at
# random in each process, and the chi-square test must meet the same policy every run.
with torch.random.fork_rng():
    torch.manual_seed(0)
    BUNDLE = small_lstm()
    OPINIONATED = _opinionated()


def _pooled_cells(observed: torch.Tensor, expected: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Merge the two least likely cells until every cell expects at least 5 draws.

    Pearson's chi-square holds only when every cell expects about 5 draws or more; a
    cell expecting 0.01 that is hit once alone would add 98.
    """
    cells = sorted(zip(expected.tolist(), observed.tolist(), strict=True))
    while len(cells) > 1 and cells[0][0] < 5:
        (e0, o0), (e1, o1) = cells[0], cells[1]
        cells = sorted([(e0 + e1, o0 + o1), *cells[2:]])
    return torch.tensor([o for _, o in cells]), torch.tensor([e for e, _ in cells])


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


def test_sampling_with_a_generator_equals_sampling_with_the_seeded_global_one() -> None:
    """The two sampling paths (rand_like, and rand with generator=) draw the same noise."""
    log_probs = torch.randn(64, 8, 16).log_softmax(-1)
    torch.manual_seed(11)
    from_global = categorical.sample(log_probs)
    from_generator = categorical.sample(log_probs, generator=torch.Generator().manual_seed(11))
    assert torch.equal(from_global, from_generator)


def _chi_square_bound(dof: int, z: float = 4.75) -> float:
    """Upper chi-square quantile (Wilson-Hilferty); z = 4.75 is about 1 - 1e-6."""
    term = 2.0 / (9.0 * dof)
    return dof * (1.0 - term + z * math.sqrt(term)) ** 3


@settings(max_examples=8)
@given(batches())
def test_sampled_frequencies_follow_the_masked_softmax(
    case: tuple[torch.Tensor, ActionMasks, int],
) -> None:
    """Chi-square of 4000 samples of one row against its masked softmax, every head."""
    features, masks, seed = case
    draws = 4000
    row = features[:1, :1].expand(draws, 1, FEATURE_DIM)  # one input, sampled 4000 times
    row_masks = ActionMasks.from_mapping(
        {
            n: None if m is None else m[:1, :1].expand(draws, 1, -1)
            for n, m in masks.as_dict().items()
        }
    )
    with torch.no_grad():
        logits = OPINIONATED.forward(
            row[:1],
            ActionMasks.from_mapping(
                {n: None if m is None else m[:1] for n, m in row_masks.as_dict().items()}
            ),
        ).logits
    taken = OPINIONATED.get_action(row, row_masks, generator=torch.Generator().manual_seed(seed))
    for name in HEAD_NAMES:
        p = logits[name][0, 0].softmax(-1).double()  # [A_h]
        counts = torch.bincount(taken.action[name][:, 0], minlength=p.numel()).double()
        support = p > 0
        assert counts[~support].sum() == 0  # no masked action, ever
        observed, expected = _pooled_cells(counts[support], draws * p[support])
        if observed.numel() < 2:
            continue
        chi2 = float(((observed - expected) ** 2 / expected).sum())
        assert chi2 < _chi_square_bound(observed.numel() - 1), (name, chi2)
