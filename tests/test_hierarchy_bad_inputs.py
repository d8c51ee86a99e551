"""Bad input under a hierarchy: per-op masks, stored actions, per-op logits, checkpoints.

Every refusal names what is wrong (the head, the op by name, the row and the step
where there is one), and the bundle keeps working after it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import FEATURE_DIM, small_lstm
from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionHierarchy,
    ActionMasks,
    ActionSpace,
    CheckpointError,
    HookContractError,
    LSTMPolicyBundle,
    NetworkOutput,
    OpConditionedOutput,
    PolicyInputs,
    load_policy,
)
from esper.tamiyo.policy.checkpoint_writer import TYPE_TAG

TAMIYO = ActionSpace.tamiyo()
B, T = 4, 3


def _bundle() -> LSTMPolicyBundle:
    return small_lstm(action_space=TAMIYO)


def _all_ops(lead: tuple[int, ...] = (B,)) -> torch.Tensor:
    return torch.ones(*lead, 6, dtype=torch.bool)


def _slot_by_op(lead: tuple[int, ...] = (B,)) -> torch.Tensor:
    return torch.ones(*lead, 6, 3, dtype=torch.bool)


def _still_works(bundle: LSTMPolicyBundle) -> None:
    masks = ActionMasks(op=_all_ops(), slot_by_op=_slot_by_op())
    out = bundle.get_action(torch.randn(B, FEATURE_DIM), masks)
    assert out.action["op"].shape == (B,)


# ---------------------------------------------------------------------- void rows


def test_a_per_op_row_with_no_valid_action_for_a_valid_op_names_head_op_row_and_step() -> None:
    bundle = _bundle()
    slot_by_op = _slot_by_op((B, T))
    slot_by_op[2, 1, 4] = False  # FOSSILIZE, row 2, step 1
    masks = ActionMasks(op=_all_ops((B, T)), slot_by_op=slot_by_op)
    with pytest.raises(ValueError, match="slot_by_op") as caught:
        bundle.get_action(torch.randn(B, T, FEATURE_DIM), masks)
    message = str(caught.value)
    assert "at op FOSSILIZE" in message
    assert "batch row 2, step 1" in message
    assert "FOSSILIZE is valid and uses 'slot'" in message
    _still_works(bundle)


def test_a_void_row_is_fine_for_an_op_that_is_masked_or_does_not_use_the_head() -> None:
    bundle = _bundle()
    op = _all_ops()
    op[:, 4] = False  # FOSSILIZE masked
    slot_by_op = _slot_by_op()
    slot_by_op[:, 4] = False  # no slot to fossilize
    slot_by_op[:, 0] = False  # WAIT uses no slot
    out = bundle.get_action(torch.randn(B, FEATURE_DIM), ActionMasks(op=op, slot_by_op=slot_by_op))
    assert not (out.action["op"] == 4).any()


def test_flat_and_per_op_masks_that_leave_nothing_together_are_refused() -> None:
    """Each allows a slot, but not the same one: no valid slot to germinate into."""
    bundle = _bundle()
    slot = torch.tensor([[True, False, False]]).expand(B, 3)
    slot_by_op = _slot_by_op()
    slot_by_op[0, 1] = torch.tensor([False, True, True])
    with pytest.raises(
        ValueError, match=r"masks\['slot'\] AND masks\['slot_by_op'\] at op GERMINATE"
    ):
        bundle.get_action(
            torch.randn(B, FEATURE_DIM), ActionMasks(slot=slot, slot_by_op=slot_by_op)
        )
    _still_works(bundle)


def test_a_void_flat_row_is_still_refused_under_a_hierarchy() -> None:
    bundle = _bundle()
    blueprint = torch.ones(B, 13, dtype=torch.bool)
    blueprint[3] = False
    with pytest.raises(
        ValueError, match=r"masks\['blueprint'\] has no valid action at batch row 3"
    ):
        bundle.get_action(torch.randn(B, FEATURE_DIM), ActionMasks(blueprint=blueprint))
    _still_works(bundle)


# ---------------------------------------------------------------------- stored actions


def _rollout(
    bundle: LSTMPolicyBundle, masks: ActionMasks
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.randn(B, T, FEATURE_DIM)
    return x, dict(bundle.get_action(x, masks).action)


def test_an_action_of_an_ignored_head_that_is_not_canonical_is_refused() -> None:
    bundle = _bundle()
    op = torch.zeros(B, T, 6, dtype=torch.bool)
    op[..., 0] = True  # WAIT only: every other head is ignored
    masks = ActionMasks(op=op)
    x, actions = _rollout(bundle, masks)
    assert all((actions[h] == 0).all() for h in HEAD_NAMES)
    actions["tempo"] = actions["tempo"].clone()
    actions["tempo"][1, 2] = 2
    with pytest.raises(ValueError, match="canonical") as caught:
        bundle.evaluate_actions(x, actions, masks)
    message = str(caught.value)
    assert "actions['tempo'] = 2 at batch row 1, step 2" in message
    assert "op WAIT does not use 'tempo'" in message
    assert "canonical 0" in message
    actions["tempo"][1, 2] = 0
    bundle.evaluate_actions(x, actions, masks)


def test_an_action_masked_at_its_op_is_refused_naming_the_op() -> None:
    bundle = _bundle()
    op = torch.zeros(B, T, 6, dtype=torch.bool)
    op[..., 4] = True  # FOSSILIZE only
    slot_by_op = _slot_by_op((B, T))
    slot_by_op[..., 4, :] = torch.tensor([False, False, True])  # only slot 2 has blended
    masks = ActionMasks(op=op, slot_by_op=slot_by_op)
    x, actions = _rollout(bundle, masks)
    assert (actions["slot"] == 2).all()
    actions["slot"] = actions["slot"].clone()
    actions["slot"][3, 0] = 1
    with pytest.raises(ValueError, match="is masked") as caught:
        bundle.evaluate_actions(x, actions, masks)
    message = str(caught.value)
    assert "actions['slot'] = 1 at batch row 3, step 0 is masked" in message
    assert "under op FOSSILIZE" in message


def test_an_op_out_of_range_is_named_before_the_per_op_masks_are_read() -> None:
    bundle = _bundle()
    masks = ActionMasks(slot_by_op=_slot_by_op((B, T)))
    x, actions = _rollout(bundle, masks)
    actions["op"] = torch.full((B, T), 6)
    with pytest.raises(
        ValueError, match=r"actions\['op'\] = 6 at batch row 0, step 0 is out of range"
    ):
        bundle.evaluate_actions(x, actions, masks)


# ---------------------------------------------------------------------- the per-op masks' form


@pytest.mark.parametrize(
    ("masks", "error", "match"),
    [
        (
            lambda: ActionMasks(slot_by_op=torch.ones(B, 5, 3, dtype=torch.bool)),
            ValueError,
            r"masks\['slot_by_op'\] has 5 ops in dimension 1 \(N_op\); the op head has 6",
        ),
        (
            lambda: ActionMasks(slot_by_op=torch.ones(B, 6, 4, dtype=torch.bool)),
            ValueError,
            r"masks\['slot_by_op'\] has 4 actions in its last dimension; head 'slot' has 3",
        ),
        (
            lambda: ActionMasks(slot_by_op=torch.ones(B + 1, 6, 3, dtype=torch.bool)),
            ValueError,
            r"masks\['slot_by_op'\] has batch 5 but the features have batch 4",
        ),
        (
            lambda: ActionMasks(slot_by_op=torch.ones(B, 6, dtype=torch.bool)),
            ValueError,
            r"masks\['slot_by_op'\] must be \[B, N_op, A\] or \[B, 1, N_op, A\], got rank 2",
        ),
        (
            lambda: ActionMasks(slot_by_op=torch.ones(B, 2, 6, 3, dtype=torch.bool)),
            ValueError,
            r"masks\['slot_by_op'\] has 2 steps in dimension 1 but the features have T=1",
        ),
        (
            lambda: ActionMasks(slot_by_op=torch.ones(B, 6, 3, dtype=torch.bool, device="meta")),
            ValueError,
            r"masks\['slot_by_op'\] is on meta",
        ),
        (
            lambda: {**dict.fromkeys(HEAD_NAMES), "slot_by_opp": None},
            ValueError,
            r"masks has unknown head 'slot_by_opp'",
        ),
    ],
    ids=["ops", "actions", "batch", "rank", "steps", "device", "key"],
)
def test_a_malformed_per_op_mask_is_refused_naming_it_and_the_dimension(
    masks: Callable[[], object], error: type[Exception], match: str
) -> None:
    bundle = _bundle()
    with pytest.raises(error, match=match):
        bundle.get_action(torch.randn(B, FEATURE_DIM), masks())  # type: ignore[arg-type]
    _still_works(bundle)


def test_a_per_op_mask_changed_to_a_wrong_dtype_after_construction_is_refused() -> None:
    masks = ActionMasks(slot_by_op=_slot_by_op())
    object.__setattr__(masks, "slot_by_op", torch.ones(B, 6, 3))
    bundle = _bundle()
    with pytest.raises(TypeError, match=r"masks\['slot_by_op'\] must have dtype torch.bool"):
        bundle.get_action(torch.randn(B, FEATURE_DIM), masks)
    _still_works(bundle)


def test_a_sequence_takes_per_op_masks_as_b_t_n_a_only() -> None:
    bundle = _bundle()
    with pytest.raises(
        ValueError, match=r"\(\[B, N_op, A\]\) but the features are a sequence of T=3"
    ):
        bundle.get_action(torch.randn(B, T, FEATURE_DIM), ActionMasks(slot_by_op=_slot_by_op()))
    out = bundle.get_action(
        torch.randn(B, T, FEATURE_DIM), ActionMasks(slot_by_op=_slot_by_op((B, T)))
    )
    assert out.action["slot"].shape == (B, T)


def test_a_flat_space_refuses_per_op_masks_and_says_how_to_get_a_hierarchy() -> None:
    bundle = small_lstm()
    with pytest.raises(
        ValueError, match=r"per-op mask, but the action space is flat.*ActionSpace.tamiyo\(\)"
    ):
        bundle.get_action(torch.randn(B, FEATURE_DIM), ActionMasks(slot_by_op=_slot_by_op()))
    bundle.get_action(torch.randn(B, FEATURE_DIM), None)


# ---------------------------------------------------------------------- per-op logits


class _ByOpHook(LSTMPolicyBundle):
    """Returns per-op logits of a shape set by `shape`, or per-op logits from a flat space."""

    shape: tuple[int, ...] | None = None

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput | OpConditionedOutput:
        out = super()._forward(inputs)
        shape = self.shape or (inputs.batch_size, inputs.seq_len, 6, 8, 16)
        return OpConditionedOutput(out.logits, out.value, out.hidden, torch.zeros(shape))


def test_per_op_logits_of_the_wrong_shape_break_the_hook_contract() -> None:
    bundle = _ByOpHook(FEATURE_DIM, hidden_dim=16, embed_dim=8, action_space=TAMIYO)
    bundle.shape = (B, 1, 5, 8, 16)
    with pytest.raises(
        HookContractError, match=r"logits_by_op of shape \(4, 1, 5, 8, 16\); expected"
    ):
        bundle.get_action(torch.randn(B, FEATURE_DIM), None)
    bundle.shape = None
    bundle.get_action(torch.randn(B, FEATURE_DIM), None)


def test_per_op_logits_from_a_flat_space_break_the_hook_contract() -> None:
    bundle = _ByOpHook(FEATURE_DIM, hidden_dim=16, embed_dim=8)
    with pytest.raises(
        HookContractError, match="returned logits_by_op, but the action space is flat"
    ):
        bundle.get_action(torch.randn(B, FEATURE_DIM), None)


def test_nan_per_op_logits_are_named_with_head_and_op() -> None:
    bundle = small_lstm(action_space=TAMIYO, op_conditioned_logits=True)
    with torch.no_grad():
        bundle.network.op_logits.offset.bias[3 * 8 * 16 + 0 * 16 + 1] = float("nan")  # type: ignore[union-attr]
    with pytest.raises(
        FloatingPointError, match=r"op-conditioned logits of head 'slot' for op PRUNE are NaN"
    ):
        bundle.get_action(torch.randn(B, FEATURE_DIM), None)


def test_the_op_row_of_per_op_logits_is_not_read_so_nan_there_is_harmless() -> None:
    bundle = small_lstm(action_space=TAMIYO, op_conditioned_logits=True)
    with torch.no_grad():
        op_row = HEAD_NAMES.index("op")
        bundle.network.op_logits.offset.bias[op_row * 16 : op_row * 16 + 6] = float("nan")  # type: ignore[union-attr]
    out = bundle.get_action(torch.randn(B, FEATURE_DIM), None)
    assert all(torch.isfinite(out.log_prob[h]).all() for h in HEAD_NAMES)


def test_op_conditioned_logits_need_a_hierarchical_space_and_a_bool() -> None:
    with pytest.raises(
        ValueError, match="op_conditioned_logits=True needs a hierarchical action space"
    ):
        LSTMPolicyBundle(FEATURE_DIM, op_conditioned_logits=True)
    with pytest.raises(TypeError, match="op_conditioned_logits"):
        LSTMPolicyBundle(FEATURE_DIM, action_space=TAMIYO, op_conditioned_logits=1)  # type: ignore[arg-type]


def test_joint_entropy_takes_a_bool() -> None:
    bundle = _bundle()
    x, actions = _rollout(bundle, ActionMasks())
    with pytest.raises(TypeError, match="joint_entropy"):
        bundle.evaluate_actions(x, actions, None, joint_entropy="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- checkpoints


def test_a_checkpoint_round_trips_the_table_and_the_op_conditioned_option(tmp_path: Path) -> None:
    space = ActionSpace(
        slot=4,
        op=3,
        hierarchy=ActionHierarchy.from_table(
            {"IDLE": (), "PLANT": ("slot", "blueprint"), "CUT": ("slot",)}, canonical={"slot": 2}
        ),
    )
    bundle = small_lstm(action_space=space, op_conditioned_logits=True)
    loaded = load_policy(bundle.save(tmp_path / "policy.pt"))
    assert isinstance(loaded, LSTMPolicyBundle)
    assert loaded.action_space == space
    assert loaded.action_space.hierarchy is not None
    assert loaded.action_space.hierarchy.ops == ("IDLE", "PLANT", "CUT")
    assert loaded.action_space.hierarchy.canonical_of("slot") == 2
    assert loaded.op_conditioned_logits
    x = torch.randn(B, FEATURE_DIM)
    first = bundle.get_action(x, None, generator=torch.Generator().manual_seed(0))
    again = loaded.get_action(x, None, generator=torch.Generator().manual_seed(0))
    for head in HEAD_NAMES:
        assert torch.equal(first.action[head], again.action[head])
        assert torch.equal(first.log_prob[head], again.log_prob[head])


def test_a_flat_checkpoint_stores_no_table_as_files_written_before_the_hierarchy(
    tmp_path: Path,
) -> None:
    """A flat space is encoded exactly as before issue 13, so old files and new agree."""
    path = small_lstm().save(tmp_path / "flat.pt")
    stored = torch.load(path, weights_only=True)
    encoded = stored["config"]["action_space"]
    assert encoded == {
        TYPE_TAG: "ActionSpace",
        "sizes": dict(zip(HEAD_NAMES, ActionSpace().sizes, strict=True)),
    }
    assert load_policy(path).action_space == ActionSpace()


def test_a_checkpoint_with_a_malformed_table_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = _bundle().save(tmp_path / "policy.pt")
    stored = torch.load(path, weights_only=True)
    stored["config"]["action_space"]["hierarchy"]["used"][1] = ["slot", "op"]
    torch.save(stored, path)
    with pytest.raises(CheckpointError) as caught:
        load_policy(path)
    assert str(path) in str(caught.value)


# ---------------------------------------------------------------------- review findings


def test_with_checks_off_infinite_op_logits_never_pick_a_masked_op() -> None:
    """The op stage masks as every head does: -inf or +inf logits keep the op mask."""
    for value in (float("-inf"), float("inf")):
        bundle = small_lstm(action_space=TAMIYO)
        bundle.check_values = False
        with torch.no_grad():
            bias = bundle.network.heads.out_bias  # [H + 1, 1, A_max]
            bias[HEAD_NAMES.index("op")] = value
        op = torch.zeros(B, 6, dtype=torch.bool)
        op[:, 3] = True  # PRUNE only
        out = bundle.get_action(torch.randn(B, FEATURE_DIM), ActionMasks(op=op))
        assert (out.action["op"] == 3).all(), value


class _NarrowsSlots(LSTMPolicyBundle):
    """A `_normalize_inputs` that forbids slot 2 in `valid`, as the guide allows."""

    def _normalize_inputs(
        self,
        features: torch.Tensor,
        masks: object,
        hidden: object,
        actions: object = None,
        *,
        extras: object = None,
    ) -> PolicyInputs:
        inputs = super()._normalize_inputs(features, masks, hidden, actions, extras=extras)  # type: ignore[arg-type]
        valid = inputs.valid.clone()
        valid[..., HEAD_NAMES.index("slot"), 2] = False
        return dataclasses.replace(inputs, valid=valid)


def test_a_normalize_inputs_that_narrows_valid_holds_under_per_op_masks_too() -> None:
    bundle = _NarrowsSlots(FEATURE_DIM, hidden_dim=16, embed_dim=8, action_space=TAMIYO)
    op = torch.zeros(500, 6, dtype=torch.bool)
    op[:, 4] = True  # FOSSILIZE
    for masks in (ActionMasks(op=op), ActionMasks(op=op, slot_by_op=_slot_by_op((500,)))):
        out = bundle.get_action(torch.randn(500, FEATURE_DIM), masks)
        assert not (out.action["slot"] == 2).any()


class _SwitchesOutputKind(LSTMPolicyBundle):
    """Per-op logits for stretches longer than one step, plain logits otherwise."""

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput | OpConditionedOutput:
        out = super()._forward(inputs)
        if inputs.seq_len == 1:
            return NetworkOutput(out.logits, out.value, out.hidden)
        by_op = out.logits.unsqueeze(2).expand(-1, -1, 6, -1, -1) + 0.5
        return OpConditionedOutput(out.logits, out.value, out.hidden, by_op)


@pytest.mark.parametrize("reset_at", [1, 3])
def test_a_hook_may_switch_output_kinds_between_stretches(reset_at: int) -> None:
    bundle = _SwitchesOutputKind(FEATURE_DIM, hidden_dim=16, embed_dim=8, action_space=TAMIYO)
    x = torch.randn(B, 4, FEATURE_DIM)
    starts = torch.zeros(B, 4, dtype=torch.bool)
    starts[0, reset_at] = True
    actions = bundle.get_action(x, None, episode_start=starts).action
    scored = bundle.evaluate_actions(x, actions, None, episode_start=starts)
    assert all(torch.isfinite(scored.log_prob[h]).all() for h in HEAD_NAMES)


def test_flat_relevance_and_availability_are_the_callers_to_change() -> None:
    bundle = small_lstm()
    x = torch.randn(1, FEATURE_DIM)
    actions = bundle.get_action(x, None).action
    first = bundle.evaluate_actions(x, actions, None)
    first.relevance["slot"] &= False
    assert first.availability["slot"].all()
    later = bundle.evaluate_actions(x, actions, None)
    assert later.relevance["slot"].all()
    assert later.availability["slot"].all()


class _ByOpAsInts(LSTMPolicyBundle):
    def _forward(self, inputs: PolicyInputs) -> NetworkOutput | OpConditionedOutput:
        out = super()._forward(inputs)
        shape = (inputs.batch_size, inputs.seq_len, 6, 8, 16)
        return OpConditionedOutput(
            out.logits, out.value, out.hidden, torch.zeros(shape, dtype=torch.long)
        )


def test_per_op_logits_in_another_dtype_break_the_hook_contract() -> None:
    bundle = _ByOpAsInts(FEATURE_DIM, hidden_dim=16, embed_dim=8, action_space=TAMIYO)
    with pytest.raises(
        HookContractError,
        match=r"logits_by_op in torch.int64 on cpu, but its logits in torch.float32",
    ):
        bundle.get_action(torch.randn(B, FEATURE_DIM), None)


def test_the_raw_constructor_normalizes_the_table_and_op_has_no_canonical_action() -> None:
    raw = ActionHierarchy(ops=("A", "B"), used=((), ["style", "slot"]))  # type: ignore[arg-type]
    assert raw.uses(1) == ("slot", "style")
    assert raw == ActionHierarchy.from_table({"A": (), "B": ("slot", "style")})
    assert hash(ActionSpace(op=2, hierarchy=raw))
    with pytest.raises(ValueError, match="'op' has no canonical action"):
        ActionHierarchy.from_table({"A": ()}, canonical={"op": 1})
