"""Declaring the op-first hierarchy: `ActionHierarchy`, `ActionSpace.tamiyo()`, per-op masks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from esper.tamiyo.policy import (
    HEAD_NAMES,
    TAMIYO_HIERARCHY,
    TAMIYO_OPS,
    ActionHierarchy,
    ActionMasks,
    ActionSpace,
)


def test_tamiyos_table_names_the_ops_in_index_order_and_the_heads_each_uses() -> None:
    assert TAMIYO_OPS == ("WAIT", "GERMINATE", "SET_ALPHA_TARGET", "PRUNE", "FOSSILIZE", "ADVANCE")
    table = TAMIYO_HIERARCHY
    assert table.ops == TAMIYO_OPS
    assert table.uses(0) == ()
    assert table.uses(1) == ("slot", "blueprint", "style", "tempo", "alpha_target")
    assert table.uses(2) == ("slot", "style", "alpha_target", "alpha_speed", "alpha_curve")
    assert table.uses(3) == ("slot", "alpha_speed", "alpha_curve")
    assert table.uses(4) == ("slot",)
    assert table.uses(5) == ("slot",)
    assert all(table.canonical_of(head) == 0 for head in HEAD_NAMES)


def test_the_relevance_table_has_a_row_per_op_and_op_is_always_relevant() -> None:
    rows = TAMIYO_HIERARCHY.relevance_table()
    assert len(rows) == 6
    for op, row in enumerate(rows):
        used = {head for head, flag in zip(HEAD_NAMES, row, strict=True) if flag}
        assert used == {*TAMIYO_HIERARCHY.uses(op), "op"}


def test_tamiyo_space_keeps_the_default_sizes_and_takes_others() -> None:
    space = ActionSpace.tamiyo()
    assert space.sizes == ActionSpace().sizes
    assert space.hierarchy is TAMIYO_HIERARCHY
    assert space.is_hierarchical
    assert not ActionSpace().is_hierarchical
    assert ActionSpace.tamiyo(slot=5).slot == 5
    assert ActionSpace.tamiyo() == ActionSpace.tamiyo()
    assert ActionSpace.tamiyo() != ActionSpace()
    assert repr(ActionSpace.tamiyo()).endswith("hierarchy=TAMIYO_HIERARCHY)")


def test_from_table_orders_each_ops_heads_by_head_names_and_takes_canonical_actions() -> None:
    table = ActionHierarchy.from_table(
        {"WAIT": [], "MOVE": ["blueprint", "slot"]},
        canonical={"slot": 2},
    )
    assert table.ops == ("WAIT", "MOVE")
    assert table.uses(1) == ("slot", "blueprint")
    assert table.canonical_of("slot") == 2
    assert table.canonical_of("blueprint") == 0
    assert table.num_ops == 2
    assert "MOVE" in repr(table)


@pytest.mark.parametrize(
    ("table", "canonical", "error", "match"),
    [
        ({"WAIT": (), "X": ("op",)}, None, ValueError, "cannot be conditioned on itself"),
        ({"WAIT": (), "X": ("slott",)}, None, ValueError, "op 'X' uses unknown head 'slott'"),
        ({"WAIT": (), "X": ("slot", "slot")}, None, ValueError, "lists a head twice"),
        ({"WAIT": "slot"}, None, TypeError, "op 'WAIT' must map to an iterable"),
        ({"WAIT": 3}, None, TypeError, "op 'WAIT' must map to an iterable"),
        ({"WAIT": ()}, {"slott": 1}, ValueError, "canonical names unknown head 'slott'"),
        ({"WAIT": ()}, {"slot": -1}, ValueError, "canonical action of 'slot' is -1"),
        ({}, None, ValueError, "non-empty tuple of names"),
    ],
)
def test_an_invalid_table_is_refused_at_construction(
    table: dict[str, object], canonical: dict[str, int] | None, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ActionHierarchy.from_table(table, canonical=canonical)  # type: ignore[arg-type]


def test_from_table_refuses_a_non_mapping() -> None:
    with pytest.raises(TypeError, match="takes a mapping of op name to heads, got list"):
        ActionHierarchy.from_table([("WAIT", ())])  # type: ignore[arg-type]


def test_the_raw_constructor_checks_as_much_as_from_table() -> None:
    with pytest.raises(ValueError, match="one tuple of heads per op"):
        ActionHierarchy(ops=("A", "B"), used=((),))
    with pytest.raises(ValueError, match="repeated name"):
        ActionHierarchy(ops=("A", "A"), used=((), ()))
    with pytest.raises(TypeError, match="non-empty strs"):
        ActionHierarchy(ops=("A", 3), used=((), ()))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="8 ints in HEAD_NAMES order"):
        ActionHierarchy(ops=("A",), used=((),), canonical=(0, 0))


def test_the_space_refuses_a_table_that_does_not_fit_its_heads() -> None:
    two_ops = ActionHierarchy.from_table({"WAIT": (), "MOVE": ("slot",)}, canonical={"slot": 3})
    with pytest.raises(ValueError, match=r"names 2 ops \('WAIT', 'MOVE'\) but the op head has 6"):
        ActionSpace(hierarchy=two_ops)
    with pytest.raises(ValueError, match="canonical action of 'slot' is 3, out of range for its 3"):
        ActionSpace(op=2, hierarchy=two_ops)
    assert ActionSpace(slot=4, op=2, hierarchy=two_ops).hierarchy is two_ops
    with pytest.raises(TypeError, match="must be an ActionHierarchy or None, got dict"):
        ActionSpace(hierarchy={"WAIT": ()})  # type: ignore[arg-type]


def test_hierarchies_are_frozen_and_hashable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TAMIYO_HIERARCHY.ops = ()  # type: ignore[misc]
    assert hash(ActionSpace.tamiyo()) == hash(ActionSpace.tamiyo())


# ---------------------------------------------------------------------- per-op masks


def _slot_by_op(batch: int = 2, steps: int | None = None) -> torch.Tensor:
    lead = (batch,) if steps is None else (batch, steps)
    return torch.rand(*lead, 6, 3) > 0.3


def test_per_op_masks_are_typed_fields_and_a_misspelt_one_is_an_error() -> None:
    masks = ActionMasks(slot_by_op=_slot_by_op())
    assert masks.has_by_op
    assert not ActionMasks().has_by_op
    assert masks.by_op_tuple()[0] is masks.slot_by_op
    with pytest.raises(TypeError, match="unexpected keyword argument 'slots_by_op'"):
        ActionMasks(slots_by_op=_slot_by_op())  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'op_by_op'"):
        ActionMasks(op_by_op=torch.ones(2, 6, 6, dtype=torch.bool))  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"masks\['slot_by_op'\] must have dtype torch.bool"):
        ActionMasks(slot_by_op=torch.ones(2, 6, 3))


def test_from_mapping_takes_per_op_keys_as_optional_and_refuses_unknown_ones() -> None:
    flat: dict[str, torch.Tensor | None] = dict.fromkeys(HEAD_NAMES)
    slot_by_op = _slot_by_op()
    masks = ActionMasks.from_mapping({**flat, "slot_by_op": slot_by_op})
    assert masks.slot_by_op is slot_by_op
    assert ActionMasks.from_mapping(flat).slot_by_op is None
    with pytest.raises(ValueError, match="unknown head 'slot_by_ops'"):
        ActionMasks.from_mapping({**flat, "slot_by_ops": slot_by_op})
    with pytest.raises(ValueError, match="missing head 'slot'"):
        ActionMasks.from_mapping({"slot_by_op": slot_by_op})


def test_as_dict_lists_per_op_masks_only_when_set_and_round_trips() -> None:
    flat = ActionMasks(op=torch.ones(2, 6, dtype=torch.bool))
    assert list(flat.as_dict()) == list(HEAD_NAMES)
    conditioned = ActionMasks(slot_by_op=_slot_by_op(), style_by_op=torch.rand(2, 6, 4) > 0.5)
    assert list(conditioned.as_dict()) == [*HEAD_NAMES, "slot_by_op", "style_by_op"]
    again = ActionMasks.from_mapping(conditioned.as_dict())
    assert again.slot_by_op is conditioned.slot_by_op
    assert again.style_by_op is conditioned.style_by_op
    moved = conditioned.to("meta")
    assert moved.slot_by_op is not None
    assert moved.slot_by_op.device.type == "meta"


def test_stack_stacks_per_op_masks_along_time_and_fills_missing_steps() -> None:
    first, third = _slot_by_op(), _slot_by_op().unsqueeze(1)  # [B, N_op, S], [B, 1, N_op, S]
    stacked = ActionMasks.stack(
        [ActionMasks(slot_by_op=first), ActionMasks(), ActionMasks(slot_by_op=third)]
    )
    assert stacked.slot_by_op is not None
    assert stacked.slot_by_op.shape == (2, 3, 6, 3)
    assert torch.equal(stacked.slot_by_op[:, 0], first)
    assert stacked.slot_by_op[:, 1].all()
    assert torch.equal(stacked.slot_by_op[:, 2], third[:, 0])
    assert stacked.blueprint_by_op is None
    with pytest.raises(ValueError, match=r"slot_by_op'\] at step 0 has shape \(2, 3\)"):
        ActionMasks.stack([ActionMasks(slot_by_op=torch.ones(2, 3, dtype=torch.bool))])
    with pytest.raises(ValueError, match=r"slot_by_op'\] is \(2, 5, 3\) on cpu at step 1"):
        ActionMasks.stack(
            [
                ActionMasks(slot_by_op=first),
                ActionMasks(slot_by_op=torch.ones(2, 5, 3, dtype=torch.bool)),
            ]
        )
