"""Moving bundles between devices and dtypes, and running under autocast."""

from __future__ import annotations

import pytest
import torch

from conftest import FEATURE_DIM, small_lstm
from esper.tamiyo.policy import HEAD_NAMES
from esper.tamiyo.policy.testing import random_masks


def test_to_meta_moves_the_network_and_the_base_tables() -> None:
    """The meta device stands in for a GPU: everything the base owns must move too."""
    bundle = small_lstm().to("meta")
    assert bundle.device == torch.device("meta")
    assert all(p.device.type == "meta" for p in bundle.network.parameters())
    layout = bundle._layout
    for table in (layout.fill, layout.sizes, layout.structural_valid, layout.inv_log_count):
        assert table.device.type == "meta"
    hidden = bundle.initial_hidden(2)
    assert hidden is not None
    assert hidden[0].device.type == "meta"
    with pytest.raises(ValueError, match="features is on cpu but the bundle is on meta"):
        bundle.get_value(torch.randn(2, FEATURE_DIM))


def test_to_accepts_a_dtype_positionally() -> None:
    bundle = small_lstm().to(torch.float64)
    assert bundle.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in bundle.network.parameters())
    out = bundle.get_action(torch.randn(2, FEATURE_DIM, dtype=torch.float64), None)
    assert out.value.dtype == torch.float64


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("meta", torch.int64), TypeError, r"dtype must be a floating torch\.dtype"),
        ((torch.float16, torch.float32), TypeError, "to\\(\\) got two dtypes"),
        (("not-a-device",), RuntimeError, "not-a-device"),
    ],
)
def test_a_refused_move_moves_nothing(
    args: tuple[object, ...], error: type[Exception], match: str
) -> None:
    bundle = small_lstm()
    with pytest.raises(error, match=match):
        bundle.to(*args)  # type: ignore[arg-type]
    assert bundle.device == torch.device("cpu")
    assert bundle.dtype == torch.float32
    assert all(p.device.type == "cpu" for p in bundle.network.parameters())
    assert bundle._layout.fill.device.type == "cpu"
    assert bundle.get_value(torch.randn(2, FEATURE_DIM)).shape == (2,)


def test_bfloat16_autocast_replays_the_rollout() -> None:
    """Under CPU bf16 autocast: finite scores, masked actions at probability 0, parity."""
    bundle = small_lstm()
    batch, steps = 4, 5
    x = torch.randn(batch, steps, FEATURE_DIM)
    masks = random_masks((batch, steps), keep=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        acted = bundle.get_action(x, masks)
        ev = bundle.evaluate_actions(x, acted.action, masks)
        fwd = bundle.forward(x, masks)
    loss = torch.stack([lp.sum() for lp in ev.log_prob.values()]).sum()
    torch.autograd.backward(loss)
    for name in HEAD_NAMES:
        mask = masks.as_dict()[name]
        assert mask is not None
        assert bool(mask.gather(-1, acted.action[name].unsqueeze(-1)).all())
        assert bool(torch.isfinite(ev.log_prob[name]).all())
        assert bool(torch.isfinite(ev.entropy[name]).all())
        torch.testing.assert_close(ev.log_prob[name], acted.log_prob[name], atol=1e-3, rtol=0)
        probs = torch.softmax(fwd.logits[name].float(), -1)
        assert bool((probs[~mask] == 0).all())
    assert all(p.grad is not None for p in bundle.network.parameters())


def test_bfloat16_bundle_runs_end_to_end() -> None:
    bundle = small_lstm().to(torch.bfloat16)
    x = torch.randn(3, 2, FEATURE_DIM, dtype=torch.bfloat16)
    masks = random_masks((3, 2))
    acted = bundle.get_action(x, masks, bundle.initial_hidden(3))
    ev = bundle.evaluate_actions(x, acted.action, masks, bundle.initial_hidden(3))
    for name in HEAD_NAMES:
        assert bool(torch.isfinite(ev.log_prob[name]).all())
        torch.testing.assert_close(ev.log_prob[name], acted.log_prob[name])


def test_under_autocast_float64_is_still_refused_before_the_network_runs() -> None:
    """Autocast mixes float32 and bfloat16; it never casts float64, so that stays an error."""
    bundle = small_lstm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bundle.get_action(torch.randn(2, FEATURE_DIM, dtype=torch.bfloat16), None)
        with pytest.raises(
            TypeError, match=r"under autocast the bundle takes torch\.float32, torch\.bfloat16"
        ):
            bundle.get_action(torch.randn(2, FEATURE_DIM, dtype=torch.float64), None)
