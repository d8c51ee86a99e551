"""ActionMasks: one field per head, strict construction from a mapping."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from esper.tamiyo.policy import HEAD_NAMES, ActionMasks


def _full() -> dict[str, torch.Tensor | None]:
    return dict.fromkeys(HEAD_NAMES, None)


def test_fields_are_exactly_the_heads_in_order_then_the_per_op_masks() -> None:
    names = tuple(f.name for f in dataclasses.fields(ActionMasks))
    assert names == HEAD_NAMES + tuple(f"{h}_by_op" for h in HEAD_NAMES if h != "op")


def test_is_frozen_and_slotted() -> None:
    masks = ActionMasks()
    assert not hasattr(masks, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        masks.op = None  # type: ignore[misc]


def test_defaults_are_none_meaning_unmasked() -> None:
    assert all(value is None for value in ActionMasks().as_dict().values())


def test_from_mapping_round_trips_through_as_dict() -> None:
    mapping = _full()
    mapping["op"] = torch.tensor([[True, False, True, True, False, True]])
    masks = ActionMasks.from_mapping(mapping)
    assert masks.op is mapping["op"]
    assert masks.as_dict() == mapping


def test_from_mapping_refuses_an_unknown_key_naming_it_and_the_valid_names() -> None:
    mapping = _full()
    mapping["blue_print"] = None
    with pytest.raises(
        ValueError, match=r"unknown head 'blue_print'; valid heads: slot, blueprint"
    ):
        ActionMasks.from_mapping(mapping)


def test_from_mapping_refuses_a_missing_head_naming_it() -> None:
    mapping = _full()
    del mapping["alpha_speed"]
    with pytest.raises(ValueError, match=r"missing head 'alpha_speed'; pass alpha_speed=None"):
        ActionMasks.from_mapping(mapping)


def test_from_mapping_refuses_a_non_mapping() -> None:
    with pytest.raises(TypeError, match="masks must be an ActionMasks, a mapping"):
        ActionMasks.from_mapping([None] * 8)  # type: ignore[arg-type]


def test_a_non_bool_mask_is_refused_at_construction_naming_the_head() -> None:
    with pytest.raises(TypeError, match=r"masks\['style'\] must have dtype torch.bool"):
        ActionMasks(style=torch.ones(2, 4))


def test_a_non_tensor_mask_is_refused_at_construction_naming_the_head() -> None:
    with pytest.raises(TypeError, match=r"masks\['tempo'\] must be a torch.bool tensor or None"):
        ActionMasks(tempo=[[True, False, True]])  # type: ignore[arg-type]


def test_stack_builds_sequence_masks_filling_unmasked_steps() -> None:
    op_a = torch.tensor([[True, False, True, True, True, True]] * 2)
    op_b = torch.tensor([[False, True, True, True, True, True]] * 2)
    steps = [ActionMasks(op=op_a), ActionMasks(), ActionMasks(op=op_b)]
    stacked = ActionMasks.stack(steps)
    assert stacked.slot is None
    assert stacked.op is not None
    assert stacked.op.shape == (2, 3, 6)
    assert torch.equal(stacked.op[:, 0], op_a)
    assert bool(stacked.op[:, 1].all())
    assert torch.equal(stacked.op[:, 2], op_b)


def test_stack_refuses_no_steps_and_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="needs at least one step"):
        ActionMasks.stack([])
    steps = [
        ActionMasks(style=torch.ones(2, 4, dtype=torch.bool)),
        ActionMasks(style=torch.ones(3, 4, dtype=torch.bool)),
    ]
    with pytest.raises(ValueError, match=r"masks\['style'\] is \(3, 4\) on cpu at step 1"):
        ActionMasks.stack(steps)


def test_stack_reads_any_iterable_once() -> None:
    """A generator must give the same result as a list (it can only be read once)."""
    op = torch.tensor([[True, False, True, True, True, True]])
    style = torch.tensor([[True, True, False, True]])
    steps = [ActionMasks(op=op, style=style), ActionMasks(op=op)]
    from_list = ActionMasks.stack(steps)
    from_generator = ActionMasks.stack(step for step in steps)
    for name in ("op", "style"):
        a, b = from_list.as_dict()[name], from_generator.as_dict()[name]
        assert a is not None
        assert b is not None
        assert torch.equal(a, b)


def test_stack_accepts_single_step_masks_with_a_time_axis_and_refuses_others() -> None:
    op = torch.ones(2, 1, 6, dtype=torch.bool)
    stacked = ActionMasks.stack([ActionMasks(op=op)] * 3)
    assert stacked.op is not None
    assert stacked.op.shape == (2, 3, 6)
    with pytest.raises(ValueError, match=r"masks\['op'\] at step 0 has shape \(2, 4, 6\)"):
        ActionMasks.stack([ActionMasks(op=torch.ones(2, 4, 6, dtype=torch.bool))])
    with pytest.raises(
        TypeError, match=r"ActionMasks\.stack takes ActionMasks, got dict at step 0"
    ):
        ActionMasks.stack([{"op": None}])  # type: ignore[list-item]
