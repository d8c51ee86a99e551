"""state_dict round trips, and a checkpoint that does not fit is refused whole."""

from __future__ import annotations

import pytest
import torch

from conftest import FEATURE_DIM, small_lstm
from esper.tamiyo.policy import ActionSpace, LSTMPolicyBundle


def _snapshot(bundle: LSTMPolicyBundle) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bundle.network.state_dict().items() if torch.is_tensor(v)}


def _unchanged(bundle: LSTMPolicyBundle, before: dict[str, torch.Tensor]) -> bool:
    after = _snapshot(bundle)
    return all(torch.equal(after[k], v) for k, v in before.items())


def test_round_trip_through_torch_save_with_weights_only(tmp_path: object) -> None:
    source = small_lstm()
    path = f"{tmp_path}/bundle.pt"
    torch.save(source.state_dict(), path)
    target = small_lstm()
    target.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(3, 4, FEATURE_DIM)
    assert torch.equal(source.get_value(x), target.get_value(x))


def test_a_checkpoint_for_other_head_sizes_is_refused_even_when_shapes_agree() -> None:
    """3 and 5 slots both pad to 16 columns: only the recorded sizes tell them apart."""
    source = LSTMPolicyBundle(FEATURE_DIM, hidden_dim=16, embed_dim=8)
    target = LSTMPolicyBundle(
        FEATURE_DIM, hidden_dim=16, embed_dim=8, action_space=ActionSpace(slot=5)
    )
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"heads\._extra_state.*slot|\(3, 13.*\(5, 13"):
        target.load_state_dict(source.state_dict())
    assert _unchanged(target, before)


def test_a_checkpoint_of_another_width_is_refused_before_anything_changes() -> None:
    source = small_lstm(hidden_dim=32)
    target = small_lstm()
    before = _snapshot(target)
    with pytest.raises(
        ValueError, match=r"state_dict\['lstm\.weight_ih_l0'\] has shape \(128, 12\)"
    ):
        target.load_state_dict(source.state_dict())
    assert _unchanged(target, before)


def test_missing_and_unexpected_keys_are_named() -> None:
    target = small_lstm()
    state = dict(small_lstm().state_dict())
    del state["embed.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"missing keys \['embed\.weight'\], unexpected keys \['extra\.weight'\]"
    ):
        target.load_state_dict(state)
    result = target.load_state_dict(state, strict=False)
    assert result.missing_keys == ["embed.weight"]
    assert result.unexpected_keys == ["extra.weight"]


def test_state_dict_records_the_head_sizes() -> None:
    state = LSTMPolicyBundle(FEATURE_DIM, action_space=ActionSpace(slot=4)).state_dict()
    assert state["heads._extra_state"] == {"action_sizes": (4, 13, 4, 3, 3, 4, 3, 6)}


@pytest.mark.parametrize(
    ("value", "match"),
    [(None, "must be a tensor with data, got NoneType"), ("meta", "got a meta tensor")],
)
def test_a_key_without_tensor_data_is_refused_before_anything_changes(
    value: object, match: str
) -> None:
    target = small_lstm()
    state = dict(small_lstm().state_dict())
    state["lstm_norm.weight"] = torch.empty(16, device="meta") if value == "meta" else value
    before = _snapshot(target)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    assert _unchanged(target, before)
