"""Masks as Esper makes them: the host's per-env dicts and its batched dicts.

Esper (tachyon-beep/esper-lite) builds its masks in
`src/esper/tamiyo/policy/action_masks.py`: `compute_action_masks` returns one dict per
env and step, each mask unbatched (`slot` `[S]`, `slot_by_op` `[N_op, S]`, the other
heads `[A_h]`, `op` `[N_op]`); `compute_batch_masks` stacks those dicts key by key into
`[B, ...]`. The dicts here are written for these tests by `host_masks`, a small model
of the host's rules over a few slot states, with exactly the host's keys and sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pytest
import torch

from conftest import FEATURE_DIM
from esper.tamiyo.policy import (
    HEAD_NAMES,
    TAMIYO_HIERARCHY,
    TAMIYO_OPS,
    ActionMasks,
    ActionResult,
    ActionSpace,
    LSTMPolicyBundle,
)
from esper.tamiyo.policy.action_space import CONDITIONED_HEADS

MaskDict = dict[str, torch.Tensor | None]

# The host's sizes: `SlotConfig.default()` has three slots; the rest are the lengths of
# the enums in esper/leyline/factored_actions.py (NUM_BLUEPRINTS = len(BlueprintAction)
# and so on). Its alpha_curve head has 5 actions (AlphaCurveAction), where
# ActionSpace's default has 3.
HOST_SIZES: dict[str, int] = {
    "slot": 3,
    "blueprint": 13,
    "style": 4,
    "tempo": 3,
    "alpha_target": 3,
    "alpha_speed": 4,
    "alpha_curve": 5,
    "op": 6,
}
HOST_KEYS = (
    "slot",
    "slot_by_op",
    "blueprint",
    "style",
    "tempo",
    "alpha_target",
    "alpha_speed",
    "alpha_curve",
    "op",
)
"""The keys of `compute_action_masks`'s dict, in the order it writes them."""
HOST_SHAPES: dict[str, tuple[int, ...]] = {key: (size,) for key, size in HOST_SIZES.items()}
HOST_SHAPES["slot_by_op"] = (HOST_SIZES["op"], HOST_SIZES["slot"])

OP = {name: index for index, name in enumerate(TAMIYO_OPS)}
CNN_BLUEPRINTS = (1, 2, 3, 4, 5, 6, 7)  # the host's CNN set less NOOP (0), always masked
SIGMOID_ADD = 2  # the style left valid when no style matters
FULL = 2  # the alpha target left valid when no target matters
MIN_PRUNE_AGE = 5
STEPS = 5


@dataclass(frozen=True)
class Seed:
    """What the host's masks read from a slot's seed."""

    stage: str
    age: int = 0
    alpha_held: bool = True  # the host's alpha_mode == HOLD

    def older(self, epochs: int) -> Seed:
        """The same seed `epochs` epochs later."""
        return Seed(self.stage, self.age + epochs, self.alpha_held)


SlotStates = tuple[Seed | None, ...]


def host_masks(slots: SlotStates, enabled: Sequence[bool] | None = None) -> MaskDict:
    """One env's mask dict, as the host's `compute_action_masks` makes it.

    `slots[i]` is slot `i`'s seed, or `None` for an empty slot; `enabled` says which
    slots the run may address (all by default). An op is valid when any enabled slot
    allows it, and row `n` of `slot_by_op` holds the slots op `n` may target.
    """
    count = len(slots)
    on = torch.tensor(enabled if enabled is not None else [True] * count)  # [S]
    slot_by_op = torch.zeros(len(TAMIYO_OPS), count, dtype=torch.bool)  # [N_op, S]
    slot_by_op[OP["WAIT"]] = on
    blueprint = torch.zeros(HOST_SIZES["blueprint"], dtype=torch.bool)
    blueprint[list(CNN_BLUEPRINTS)] = True
    style = torch.zeros(HOST_SIZES["style"], dtype=torch.bool)
    style[SIGMOID_ADD] = True
    alpha_target = torch.zeros(HOST_SIZES["alpha_target"], dtype=torch.bool)
    live = [(index, seed) for index, seed in enumerate(slots) if bool(on[index])]
    blocking = {"GERMINATED", "TRAINING", "PRUNED", "EMBARGOED", "RESETTING"}
    can_germinate = any(seed is None for _, seed in live) and not any(
        seed is not None and seed.stage in blocking for _, seed in live
    )
    if can_germinate:
        for index, seed in live:
            slot_by_op[OP["GERMINATE"], index] = seed is None
    for index, seed in live:
        if seed is None:
            continue
        growing = seed.stage in {"GERMINATED", "TRAINING", "BLENDING"}
        slot_by_op[OP["ADVANCE"], index] = growing
        slot_by_op[OP["FOSSILIZE"], index] = seed.stage == "HOLDING"
        prunable = growing or seed.stage == "HOLDING"
        slot_by_op[OP["PRUNE"], index] = prunable and seed.age >= MIN_PRUNE_AGE and seed.alpha_held
        retarget = seed.stage in {"BLENDING", "HOLDING"} and seed.alpha_held
        slot_by_op[OP["SET_ALPHA_TARGET"], index] = retarget
    op = slot_by_op.any(dim=-1)  # [N_op]: valid where some enabled slot allows it
    if can_germinate or bool(op[OP["SET_ALPHA_TARGET"]]):
        style[:] = True
        alpha_target[:] = True
    else:
        alpha_target[FULL] = True
    return {
        "slot": on,
        "slot_by_op": slot_by_op,
        "blueprint": blueprint,
        "style": style,
        "tempo": torch.ones(HOST_SIZES["tempo"], dtype=torch.bool),
        "alpha_target": alpha_target,
        "alpha_speed": torch.ones(HOST_SIZES["alpha_speed"], dtype=torch.bool),
        "alpha_curve": torch.ones(HOST_SIZES["alpha_curve"], dtype=torch.bool),
        "op": op,
    }


def host_batch(dicts: Sequence[Mapping[str, torch.Tensor | None]], dim: int = 0) -> MaskDict:
    """The dicts stacked key by key along `dim`, as the host's `compute_batch_masks` does.

    `dim=0` stacks envs into `[B, ...]`; `dim=1` stacks batched steps into `[B, T, ...]`.
    """
    stacked: MaskDict = {}
    for key in dicts[0]:
        masks = [d[key] for d in dicts]
        stacked[key] = torch.stack([m for m in masks if m is not None], dim=dim)
    return stacked


# Four envs: each row is an env's slots at the first step; seeds age an epoch a step,
# so PRUNE becomes valid for some during the rollout.
ENVS: tuple[SlotStates, ...] = (
    (None, Seed("TRAINING", age=3), None),
    (Seed("HOLDING", age=9), None, Seed("BLENDING", age=2)),
    (None, None, None),
    (Seed("HOLDING", age=1, alpha_held=False), None, Seed("TRAINING")),
)
ENABLED: tuple[tuple[bool, ...] | None, ...] = (None, None, None, (True, True, False))


def env_dicts(step: int) -> list[MaskDict]:
    """The host's per-env dicts at `step`."""
    return [
        host_masks(tuple(None if s is None else s.older(step) for s in slots), enabled)
        for slots, enabled in zip(ENVS, ENABLED, strict=True)
    ]


def host_bundle(op_conditioned_logits: bool = False) -> LSTMPolicyBundle:
    return LSTMPolicyBundle(
        FEATURE_DIM,
        hidden_dim=16,
        embed_dim=12,
        action_space=ActionSpace.tamiyo(**HOST_SIZES),
        op_conditioned_logits=op_conditioned_logits,
    )


@pytest.fixture
def bundle() -> LSTMPolicyBundle:
    return host_bundle()


def taken_ops(action: Mapping[str, torch.Tensor], masks: ActionMasks) -> set[str]:
    """Assert one step's actions (`[B]`) are valid under its masks; the ops taken.

    The op must be valid; a head the op uses must be valid under its flat mask and,
    where given, its per-op mask at that op (for `slot`: `slot_by_op[op]`); a head the
    op ignores must take its canonical action.
    """
    ops: set[str] = set()
    assert masks.op is not None
    for row in range(masks.op.shape[0]):
        op = int(action["op"][row])
        assert bool(masks.op[row, op]), f"row {row}: op {TAMIYO_OPS[op]} is masked"
        ops.add(TAMIYO_OPS[op])
        for head in CONDITIONED_HEADS:
            chosen = int(action[head][row])
            if head not in TAMIYO_HIERARCHY.uses(op):
                assert chosen == TAMIYO_HIERARCHY.canonical_of(head)
                continue
            flat, by_op = getattr(masks, head), getattr(masks, f"{head}_by_op")
            assert flat is None or bool(flat[row, chosen]), f"row {row}: {head} {chosen}"
            assert by_op is None or bool(by_op[row, op, chosen]), (
                f"row {row}: {head} {chosen} is not valid for op {TAMIYO_OPS[op]}"
            )
    return ops


def assert_update_matches(
    bundle: LSTMPolicyBundle,
    features: torch.Tensor,
    outs: Sequence[ActionResult],
    masks: ActionMasks | MaskDict,
) -> None:
    """The PPO update scores the rollout's actions with the rollout's log-probs."""
    actions = {head: torch.stack([o.action[head] for o in outs], 1) for head in HEAD_NAMES}
    start = bundle.initial_hidden(features.shape[0])
    update = bundle.evaluate_actions(features, actions, masks, start)
    for head in HEAD_NAMES:
        rollout = torch.stack([o.log_prob[head] for o in outs], 1)  # [B, T]
        torch.testing.assert_close(update.log_prob[head], rollout)
    assert update.log_prob["op"].requires_grad


def given(mask: torch.Tensor | None) -> torch.Tensor:
    """`mask`, which the test knows is set."""
    assert mask is not None
    return mask


def features_for(batch: int) -> torch.Tensor:
    return torch.randn(batch, STEPS, FEATURE_DIM)  # [B, T, F]


def still_works(bundle: LSTMPolicyBundle) -> None:
    """A good call right after a refused one: the bundle is unharmed."""
    masks = ActionMasks.from_envs(env_dicts(0))
    out = bundle.get_action(torch.randn(len(ENVS), FEATURE_DIM), masks)
    taken_ops(out.action, masks)


# ---------------------------------------------------------------- the host's forms


def test_the_host_sizes_are_tamiyo_s_space_with_five_alpha_curves() -> None:
    space = ActionSpace.tamiyo(**HOST_SIZES)
    assert space.sizes == (3, 13, 4, 3, 3, 4, 5, 6)
    # The host's LifecycleOp order: WAIT, GERMINATE, SET_ALPHA_TARGET, PRUNE, FOSSILIZE, ADVANCE.
    assert TAMIYO_OPS == ("WAIT", "GERMINATE", "SET_ALPHA_TARGET", "PRUNE", "FOSSILIZE", "ADVANCE")
    assert space.op == len(TAMIYO_OPS)
    different = {h: s for h, s in HOST_SIZES.items() if getattr(ActionSpace(), h) != s}
    assert different == {"alpha_curve": 5}


def test_the_helper_makes_the_host_s_keys_and_shapes() -> None:
    for masks in env_dicts(0):
        assert tuple(masks) == HOST_KEYS
        for key, mask in masks.items():
            assert mask is not None
            assert mask.dtype == torch.bool
            assert mask.shape == HOST_SHAPES[key], key
            if key == "slot_by_op":  # a valid op's row offers a slot; a masked op's is empty
                assert torch.equal(mask.any(dim=-1), given(masks["op"]))


def test_from_envs_stacks_the_envs_along_a_new_batch_dimension() -> None:
    envs = env_dicts(0)
    masks = ActionMasks.from_envs(envs)
    batched = host_batch(envs)
    assert masks.as_dict().keys() == set(HEAD_NAMES) | {"slot_by_op"}
    for key, mask in masks.as_dict().items():
        assert mask is not None
        assert mask.shape == (len(envs), *HOST_SHAPES[key])
        assert torch.equal(mask, given(batched[key])), key
        for row, env in enumerate(envs):
            assert torch.equal(mask[row], given(env[key])), (key, row)
    assert masks.slot_by_op is not None
    assert masks.slot_by_op[2, OP["GERMINATE"]].tolist() == [True, True, True]
    assert masks.slot_by_op[0, OP["GERMINATE"]].tolist() == [False, False, False]


def test_from_envs_accepts_a_single_env() -> None:
    masks = ActionMasks.from_envs(env_dicts(0)[1:2])
    assert masks.slot_by_op is not None
    assert masks.slot_by_op.shape == (1, 6, 3)


@pytest.mark.parametrize("op_conditioned_logits", [False, True])
def test_a_rollout_and_an_update_on_the_host_s_per_env_dicts(op_conditioned_logits: bool) -> None:
    bundle = host_bundle(op_conditioned_logits)
    features = features_for(len(ENVS))
    hidden = bundle.initial_hidden(len(ENVS))
    outs: list[ActionResult] = []
    steps: list[ActionMasks] = []
    ops: set[str] = set()
    for t in range(STEPS):
        masks = ActionMasks.from_envs(env_dicts(t))
        out = bundle.get_action(features[:, t], masks, hidden)
        ops |= taken_ops(out.action, masks)
        outs.append(out)
        steps.append(masks)
        hidden = out.hidden
    # Not vacuous: the slot-targeting ops were sampled, so slot_by_op was obeyed.
    assert {"GERMINATE", "FOSSILIZE"} <= ops
    sequence = ActionMasks.stack(steps)
    assert sequence.slot_by_op is not None
    assert sequence.slot_by_op.shape == (len(ENVS), STEPS, 6, 3)
    assert_update_matches(bundle, features, outs, sequence)


def test_a_rollout_and_an_update_on_the_host_s_batched_dicts(bundle: LSTMPolicyBundle) -> None:
    """`compute_batch_masks`'s dict goes to the bundle as it is, with no conversion."""
    features = features_for(len(ENVS))
    hidden = bundle.initial_hidden(len(ENVS))
    outs: list[ActionResult] = []
    steps: list[MaskDict] = []
    ops: set[str] = set()
    for t in range(STEPS):
        batched = host_batch(env_dicts(t))  # each [B, ...]
        out = bundle.get_action(features[:, t], batched, hidden)
        ops |= taken_ops(out.action, ActionMasks.from_mapping(batched))
        outs.append(out)
        steps.append(batched)
        hidden = out.hidden
    assert {"GERMINATE", "FOSSILIZE"} <= ops
    assert_update_matches(bundle, features, outs, host_batch(steps, dim=1))  # [B, T, ...]
    by_stack = ActionMasks.stack(ActionMasks.from_mapping(step) for step in steps)
    assert_update_matches(bundle, features, outs, by_stack)


def test_per_env_and_batched_dicts_sample_the_same_actions(bundle: LSTMPolicyBundle) -> None:
    envs = env_dicts(2)
    x = torch.randn(len(envs), FEATURE_DIM)
    from_envs = bundle.get_action(
        x, ActionMasks.from_envs(envs), generator=torch.Generator().manual_seed(7)
    )
    batched = bundle.get_action(x, host_batch(envs), generator=torch.Generator().manual_seed(7))
    for head in HEAD_NAMES:
        assert torch.equal(from_envs.action[head], batched.action[head])
        torch.testing.assert_close(from_envs.log_prob[head], batched.log_prob[head])


def test_a_head_none_in_every_env_stays_none() -> None:
    envs = [{**env, "blueprint": None, "slot_by_op": None} for env in env_dicts(0)]
    masks = ActionMasks.from_envs(envs)
    assert masks.blueprint is None
    assert masks.slot_by_op is None
    assert masks.style is not None


def test_a_head_none_in_some_envs_gets_all_true_rows_there(bundle: LSTMPolicyBundle) -> None:
    envs = env_dicts(0)
    envs[1] = {**envs[1], "style": None, "slot_by_op": None}
    masks = ActionMasks.from_envs(envs)
    assert masks.style is not None
    assert masks.slot_by_op is not None
    assert bool(masks.style[1].all())
    assert bool(masks.slot_by_op[1].all())
    assert torch.equal(masks.style[0], given(envs[0]["style"]))
    out = bundle.get_action(torch.randn(len(envs), FEATURE_DIM), masks)
    taken_ops(out.action, masks)


# ---------------------------------------------------------------- from_envs refuses


def _missing_head(envs: list[MaskDict]) -> object:
    del envs[1]["alpha_speed"]
    return envs


def _drop_slot_by_op_at_2(envs: list[MaskDict]) -> object:
    del envs[2]["slot_by_op"]
    return envs


def _slot_by_op_only_at_1(envs: list[MaskDict]) -> object:
    for index in (0, 2, 3):
        del envs[index]["slot_by_op"]
    return envs


def _set(index: int, key: str, value: object) -> Callable[[list[MaskDict]], object]:
    """A change to the good envs: env `index`'s `key` set to `value`."""

    def change(envs: list[MaskDict]) -> object:
        envs[index][key] = value  # type: ignore[assignment]  # bad values on purpose
        return envs

    return change


def _rename(index: int, key: str, new: str) -> Callable[[list[MaskDict]], object]:
    def change(envs: list[MaskDict]) -> object:
        envs[index][new] = envs[index].pop(key)
        return envs

    return change


def _replace_env(index: int, value: object) -> Callable[[list[MaskDict]], object]:
    def change(envs: list[MaskDict]) -> object:
        changed: list[object] = list(envs)
        changed[index] = value
        return changed

    return change


REFUSALS: list[tuple[str, Callable[[list[MaskDict]], object], type[Exception], str]] = [
    ("empty", lambda envs: [], ValueError, r"ActionMasks\.from_envs needs at least one env"),
    (
        "a single mapping",
        lambda envs: envs[0],
        TypeError,
        r"from_envs takes a sequence of mappings, one per env, got dict; pass a mapping "
        r"already batched",
    ),
    (
        "the batched dict",
        host_batch,
        TypeError,
        r"got dict; .*compute_batch_masks.* to the bundle or to ActionMasks\.from_mapping",
    ),
    ("not iterable", lambda envs: 3, TypeError, r"takes a sequence of mappings.*got int"),
    (
        "an env that is a list",
        _replace_env(1, [True, False]),
        TypeError,
        r"from_envs: env 1 must be a mapping of head name to mask, got list",
    ),
    (
        "an env that is ActionMasks",
        _replace_env(0, ActionMasks()),
        TypeError,
        r"env 0 must be a mapping of head name to mask, got ActionMasks",
    ),
    (
        "an unknown key",
        _rename(3, "tempo", "tempi"),
        ValueError,
        r"masks at env 3 has unknown head 'tempi'; valid heads: slot, blueprint, .*, op, "
        r"slot_by_op, ",
    ),
    (
        "a missing head",
        _missing_head,
        ValueError,
        r"masks at env 1 is missing head 'alpha_speed'; pass alpha_speed=None explicitly",
    ),
    (
        "an int mask",
        _set(2, "op", torch.ones(6, dtype=torch.int64)),
        TypeError,
        r"masks\['op'\] at env 2 must have dtype torch\.bool \(True = valid action\), got "
        r"torch\.int64",
    ),
    (
        "a list mask",
        _set(1, "slot", [True, True, False]),
        TypeError,
        r"masks\['slot'\] at env 1 must be a torch\.bool tensor or None, got list",
    ),
    (
        "a sparse mask",
        _set(0, "style", torch.ones(4, dtype=torch.bool).to_sparse()),
        TypeError,
        r"masks\['style'\] at env 0 must be a dense tensor",
    ),
    (
        "a batch dimension already",
        _set(0, "slot", torch.ones(1, 3, dtype=torch.bool)),
        ValueError,
        r"masks\['slot'\] at env 0 has shape \(1, 3\); ActionMasks\.from_envs takes one "
        r"env's masks, \[A\], without a batch dimension",
    ),
    (
        "a per-op mask with a batch dimension",
        _set(2, "slot_by_op", torch.ones(1, 6, 3, dtype=torch.bool)),
        ValueError,
        r"masks\['slot_by_op'\] at env 2 has shape \(1, 6, 3\); .* one env's masks, "
        r"\[N_op, A\]",
    ),
    (
        "a scalar mask",
        _set(3, "op", torch.tensor(True)),
        ValueError,
        r"masks\['op'\] at env 3 has shape \(\); .* \[A\]",
    ),
    (
        "a per-op mask without its op dimension",
        _set(1, "slot_by_op", torch.ones(3, dtype=torch.bool)),
        ValueError,
        r"masks\['slot_by_op'\] at env 1 has shape \(3,\); .* \[N_op, A\]",
    ),
    (
        "shapes that differ between envs",
        _set(2, "slot", torch.ones(4, dtype=torch.bool)),
        ValueError,
        r"masks\['slot'\] is \(4,\) on cpu at env 2 but \(3,\) on cpu at env 0",
    ),
    (
        "per-op shapes that differ between envs",
        _set(1, "slot_by_op", torch.ones(5, 3, dtype=torch.bool)),
        ValueError,
        r"masks\['slot_by_op'\] is \(5, 3\) on cpu at env 1 but \(6, 3\) on cpu at env 0",
    ),
    (
        "devices that differ between envs",
        _set(3, "alpha_curve", torch.ones(5, dtype=torch.bool, device="meta")),
        ValueError,
        r"masks\['alpha_curve'\] is \(5,\) on meta at env 3 but \(5,\) on cpu at env 0",
    ),
    (
        "a per-op mask missing from one env",
        _drop_slot_by_op_at_2,
        ValueError,
        r"masks\['slot_by_op'\] is given at env 0 but not at env 2: give it for every env "
        r"\(None where every action is valid\) or for none",
    ),
    (
        "a per-op mask given in one env only",
        _slot_by_op_only_at_1,
        ValueError,
        r"masks\['slot_by_op'\] is given at env 1 but not at env 0",
    ),
]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_from_envs_refuses_naming_the_env_and_key(
    bundle: LSTMPolicyBundle,
    change: Callable[[list[MaskDict]], object],
    error: type[Exception],
    match: str,
) -> None:
    envs = change(env_dicts(0))
    with pytest.raises(error, match=match):
        ActionMasks.from_envs(envs)  # type: ignore[arg-type]  # bad arguments on purpose
    still_works(bundle)


# ---------------------------------------------------------------- batched dicts: the bundle refuses


def _bad_batch(key: str, value: torch.Tensor | None) -> MaskDict:
    return {**host_batch(env_dicts(0)), key: value}


def _without(key: str) -> MaskDict:
    batched = host_batch(env_dicts(0))
    del batched[key]
    return batched


BATCH_REFUSALS: list[tuple[str, MaskDict, str]] = [
    (
        "slot_by_op with five ops",
        _bad_batch("slot_by_op", torch.ones(len(ENVS), 5, 3, dtype=torch.bool)),
        r"masks\['slot_by_op'\] has 5 ops in dimension 1 \(N_op\); the op head has 6",
    ),
    (
        "slot_by_op with four slots",
        _bad_batch("slot_by_op", torch.ones(len(ENVS), 6, 4, dtype=torch.bool)),
        r"masks\['slot_by_op'\] has 4 actions in its last dimension; head 'slot' has 3",
    ),
    (
        "an op mask with five ops",
        _bad_batch("op", torch.ones(len(ENVS), 5, dtype=torch.bool)),
        r"masks\['op'\] has 5 actions in its last dimension; head 'op' has 6",
    ),
    ("a missing key", _without("tempo"), r"masks is missing head 'tempo'"),
    (
        "an unknown key",
        {**host_batch(env_dicts(0)), "slots": None},
        r"masks has unknown head 'slots'; valid heads: slot, blueprint",
    ),
    (
        "a batch of three for four envs",
        _bad_batch("style", torch.ones(3, 4, dtype=torch.bool)),
        r"masks\['style'\] has batch 3 but the features have batch 4",
    ),
    (
        "one env's dict passed unbatched",
        env_dicts(0)[0],
        r"masks\['slot'\] must be \[B, A\] or \[B, 1, A\], got rank 1 with shape \(3,\)",
    ),
]


@pytest.mark.parametrize(
    ("masks", "match"),
    [case[1:] for case in BATCH_REFUSALS],
    ids=[case[0] for case in BATCH_REFUSALS],
)
def test_bad_batched_dicts_get_the_bundle_s_named_errors(
    bundle: LSTMPolicyBundle, masks: MaskDict, match: str
) -> None:
    x = torch.randn(len(ENVS), FEATURE_DIM)
    good = ActionMasks.from_envs(env_dicts(0))
    before = bundle.forward(x, good)
    with pytest.raises(ValueError, match=match):
        bundle.get_action(x, masks)
    with pytest.raises(ValueError, match=match):
        bundle.forward(x, masks)
    after = bundle.forward(x, good)
    torch.testing.assert_close(after.value, before.value, rtol=0, atol=0)
    for head in HEAD_NAMES:
        torch.testing.assert_close(after.logits[head], before.logits[head], rtol=0, atol=0)
    still_works(bundle)


def test_a_batched_dict_refused_in_the_update_names_the_key(bundle: LSTMPolicyBundle) -> None:
    features = features_for(len(ENVS))
    steps = [host_batch(env_dicts(t)) for t in range(STEPS)]
    sequence = host_batch(steps, dim=1)  # [B, T, ...]
    slot_by_op = sequence["slot_by_op"]
    assert slot_by_op is not None
    sequence["slot_by_op"] = slot_by_op[:, :-1]  # T - 1 steps
    actions = {head: torch.zeros(len(ENVS), STEPS, dtype=torch.long) for head in HEAD_NAMES}
    with pytest.raises(ValueError, match=r"masks\['slot_by_op'\] has 4 steps in dimension 1"):
        bundle.evaluate_actions(features, actions, sequence)
    still_works(bundle)


def test_the_default_tamiyo_space_refuses_the_host_s_five_alpha_curves() -> None:
    """ActionSpace.tamiyo() has 3 alpha curves; Esper has 5: the mismatch is named."""
    bundle = LSTMPolicyBundle(
        FEATURE_DIM, hidden_dim=16, embed_dim=12, action_space=ActionSpace.tamiyo()
    )
    masks = ActionMasks.from_envs(env_dicts(0))
    with pytest.raises(
        ValueError,
        match=r"masks\['alpha_curve'\] has 5 actions in its last dimension; head "
        r"'alpha_curve' has 3",
    ):
        bundle.get_action(torch.randn(len(ENVS), FEATURE_DIM), masks)
