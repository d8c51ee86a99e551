"""HeadLayout and the fused categorical arithmetic on the padded layout."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.tamiyo.policy import HEAD_NAMES, ActionMasks, ActionSpace, categorical
from esper.tamiyo.policy.layout import MASKED_LOGIT, PADDING_LOGIT, HeadLayout, split_heads
from esper.tamiyo.policy.testing import random_masks

SPACE = ActionSpace()
CPU = torch.device("cpu")


def _manual_pack(masks: ActionMasks, lead: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros(*lead, len(HEAD_NAMES), SPACE.padded_size, dtype=torch.bool)
    for head, (name, size) in enumerate(zip(HEAD_NAMES, SPACE.sizes, strict=True)):
        mask = masks.as_dict()[name]
        out[..., head, :size] = True if mask is None else mask
    return out


def test_pack_masks_puts_each_head_in_its_row_and_padding_false() -> None:
    layout = HeadLayout(SPACE, CPU)
    masks = random_masks((4, 3)).as_dict()
    masks["style"] = None
    given = ActionMasks.from_mapping(masks)
    packed = layout.pack_masks(given.as_tuple(), 4, 3)
    assert torch.equal(packed, _manual_pack(given, (4, 3)))


def test_a_single_step_packs_the_same_from_b_a_and_b_1_a_masks() -> None:
    layout = HeadLayout(SPACE, CPU)
    flat = random_masks((5,))
    sequenced = ActionMasks.from_mapping(
        {n: None if m is None else m.unsqueeze(1) for n, m in flat.as_dict().items()}
    )
    mixed = ActionMasks.from_mapping({**flat.as_dict(), "op": sequenced.op, "tempo": None})
    want = _manual_pack(flat, (5,)).unsqueeze(1)  # [5, 1, H, A_max]
    assert torch.equal(layout.pack_masks(flat.as_tuple(), 5, 1), want)
    assert torch.equal(layout.pack_masks(sequenced.as_tuple(), 5, 1), want)
    want[:, 0, HEAD_NAMES.index("tempo"), : SPACE.tempo] = True
    assert torch.equal(layout.pack_masks(mixed.as_tuple(), 5, 1), want)


def test_all_valid_is_the_structural_mask() -> None:
    layout = HeadLayout(SPACE, CPU)
    assert torch.equal(layout.all_valid(2, 3), _manual_pack(ActionMasks(), (2, 3)))


def test_fill_puts_padding_below_masked_actions() -> None:
    layout = HeadLayout(SPACE, CPU)
    for head, size in enumerate(SPACE.sizes):
        assert torch.all(layout.fill[head, :size] == MASKED_LOGIT)
        assert torch.all(layout.fill[head, size:] == PADDING_LOGIT)
    assert PADDING_LOGIT < MASKED_LOGIT
    assert torch.tensor(MASKED_LOGIT, dtype=torch.float16).isfinite()
    assert torch.tensor(PADDING_LOGIT, dtype=torch.float16).isfinite()


def test_tables_are_built_on_the_device_asked_for() -> None:
    """The meta device stands in for a GPU: every table lives where it was asked to."""
    layout = HeadLayout(SPACE, torch.device("meta"))
    for table in (layout.fill, layout.action_counts, layout.structural_valid, layout.inv_log_count):
        assert table.device.type == "meta"
    assert layout.pack_masks(ActionMasks().as_tuple(), 2, 1).device.type == "meta"


def test_inv_log_count_table() -> None:
    table = HeadLayout(SPACE, CPU).inv_log_count
    assert table[0] == 0
    assert table[1] == 0
    for n in range(2, len(table)):
        assert math.isclose(float(table[n]), 1 / math.log(n), rel_tol=1e-6)


def test_split_heads_drops_padding() -> None:
    padded = torch.randn(2, 3, len(HEAD_NAMES), SPACE.padded_size)
    parts = split_heads(padded, SPACE.sizes)
    for head, (name, size) in enumerate(zip(HEAD_NAMES, SPACE.sizes, strict=True)):
        assert torch.equal(parts[name], padded[:, :, head, :size])


def test_gumbel_noise_can_never_lift_a_masked_action() -> None:
    """Even noise drawn at the extreme ends of [0, 1) keeps masked actions out."""
    log_probs = torch.log_softmax(torch.tensor([[MASKED_LOGIT, 0.0]]), -1)
    gen = torch.Generator().manual_seed(0)
    draws = categorical.sample(log_probs.expand(200000, 2), generator=gen)
    assert bool((draws == 1).all())
    # The largest possible noise, u = 1 - 2**-24, is about 16.6: far below 1e4.
    u = torch.tensor(1 - 2**-24)
    assert float(-torch.log(-torch.log(u))) < 17


_SPECIALS = (math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0, 3.0)


@settings(max_examples=80, deadline=None)
@given(
    logits=st.lists(st.sampled_from(_SPECIALS), min_size=5, max_size=5),
    valid=st.lists(st.booleans(), min_size=5, max_size=5).filter(any),
    noisy=st.booleans(),
    dtype=st.sampled_from((torch.float32, torch.float16, torch.bfloat16)),
)
def test_choose_valid_never_takes_a_masked_action_whatever_the_logits(
    logits: list[float], valid: list[bool], noisy: bool, dtype: torch.dtype
) -> None:
    rows = torch.tensor(logits).to(dtype).expand(512, 5)
    mask = torch.tensor(valid).expand(512, 5)
    noise = categorical.gumbel_noise(rows, torch.Generator().manual_seed(1)) if noisy else None
    minus_inf = HeadLayout(SPACE, CPU).minus_inf
    chosen = categorical.choose_valid(rows, mask, noise, minus_inf)
    assert chosen.shape == (512,)
    assert torch.tensor(valid)[chosen].all(), f"masked action taken: {sorted(set(chosen.tolist()))}"


@pytest.mark.parametrize(
    ("dtype", "shift"), [(torch.float32, 0.0), (torch.float32, 1e3), (torch.bfloat16, 100.0)]
)
def test_choose_valid_samples_the_softmax_over_the_valid_actions(
    dtype: torch.dtype, shift: float
) -> None:
    """Whatever the logits' scale and dtype.

    In bfloat16 near 100, `logits - noise` in the logits' own dtype rounds into ties
    that favour the lower index by about 6 points.
    """
    logits = torch.tensor([0.5, 3.0, -1.0, 1.0]) + shift
    valid = torch.tensor([True, False, True, True])
    n = 200_000
    rows, mask = logits.to(dtype).expand(n, 4), valid.expand(n, 4)
    noise = categorical.gumbel_noise(rows, torch.Generator().manual_seed(3))
    chosen = categorical.choose_valid(rows, mask, noise, HeadLayout(SPACE, CPU).minus_inf)
    freq = torch.bincount(chosen, minlength=4).double() / n
    want = torch.where(valid, rows[0].float(), -math.inf).softmax(-1).double()
    assert freq[1] == 0
    assert torch.allclose(freq, want, atol=0.005), (freq, want)
    mode = categorical.choose_valid(rows[:1], mask[:1], None, HeadLayout(SPACE, CPU).minus_inf)
    assert mode.tolist() == [3]  # the best valid action, not the masked 3.0


def test_sample_with_a_generator_is_reproducible() -> None:
    log_probs = torch.log_softmax(torch.randn(64, 8, 16), -1)
    a = categorical.sample(log_probs, generator=torch.Generator().manual_seed(5))
    b = categorical.sample(log_probs, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_float_tables_are_float32_whatever_the_default_dtype() -> None:
    """Tables built while the default dtype is float64 must not turn float32 outputs float64."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        layout = HeadLayout(SPACE, CPU)
    finally:
        torch.set_default_dtype(before)
    for table in (layout.fill, layout.inv_log_count, layout.minus_inf):
        assert table.dtype == torch.float32
