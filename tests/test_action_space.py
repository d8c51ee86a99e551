"""ActionSpace: head sizes, defaults and the padded width."""

from __future__ import annotations

import dataclasses

import pytest

from esper.tamiyo.policy import HEAD_NAMES, ActionSpace


def test_head_names_are_the_eight_heads_in_order() -> None:
    assert HEAD_NAMES == (
        "slot", "blueprint", "style", "tempo", "alpha_target", "alpha_speed", "alpha_curve", "op"
    )  # fmt: skip


def test_defaults_are_tamiyos_sizes() -> None:
    assert ActionSpace().sizes == (3, 13, 4, 3, 3, 4, 3, 6)


def test_fields_follow_head_names_then_the_hierarchy() -> None:
    names = tuple(f.name for f in dataclasses.fields(ActionSpace))
    assert names == (*HEAD_NAMES, "hierarchy")


def test_is_frozen() -> None:
    space = ActionSpace()
    with pytest.raises(dataclasses.FrozenInstanceError):
        space.slot = 5  # type: ignore[misc]


@pytest.mark.parametrize(("largest", "padded"), [(1, 8), (8, 8), (9, 16), (13, 16), (17, 24)])
def test_padded_size_rounds_the_largest_head_up_to_a_multiple_of_8(
    largest: int, padded: int
) -> None:
    assert ActionSpace(blueprint=largest, slot=1, style=1).padded_size == padded


def test_slot_count_is_a_parameter() -> None:
    assert ActionSpace(slot=7).size_of("slot") == 7


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_size_is_refused_naming_the_head(bad: int) -> None:
    with pytest.raises(ValueError, match=r"ActionSpace\.tempo must be at least 1"):
        ActionSpace(tempo=bad)


@pytest.mark.parametrize("bad", [2.0, "3", True])
def test_non_int_size_is_refused_naming_the_head(bad: object) -> None:
    with pytest.raises(TypeError, match=r"ActionSpace\.op must be an int"):
        ActionSpace(op=bad)  # type: ignore[arg-type]


def test_size_of_unknown_head_lists_the_heads() -> None:
    with pytest.raises(ValueError, match=r"unknown head 'slots'.*alpha_curve"):
        ActionSpace().size_of("slots")
