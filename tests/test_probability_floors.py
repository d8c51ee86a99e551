"""Per-head probability floors: the arithmetic, every public method, bad settings, records.

The floored probabilities are checked against an independent computation by hand,
`(1 - n f) p + f` over the valid actions with `f = min(floor, 0.99 / n)`, from the
logits of a bundle whose logits are parameters (the same for every row).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from conftest import FEATURE_DIM, TinyStatelessBundle, small_lstm
from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionMasks,
    ActionSpace,
    LSTMPolicyBundle,
    MLPPolicyBundle,
    NetworkOutput,
    PolicyBundle,
    PolicyInputs,
    categorical,
    load_policy,
    save_policy,
)
from esper.tamiyo.policy.floors import FloorTables
from esper.tamiyo.policy.layout import HeadLayout
from esper.tamiyo.policy.testing import random_masks

TAMIYO = ActionSpace.tamiyo()
FLOORS = {"op": 0.15, "blueprint": 0.12}
CPU = torch.device("cpu")


class PeakedNetwork(nn.Module):
    """Logits that are parameters, steep enough that unfloored actions fall far below 0.1."""

    def __init__(self, space: ActionSpace) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(space.num_heads, space.padded_size) * 6)
        self.value = nn.Parameter(torch.zeros(()))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, T, F]` -> the same logits `[B, T, H, A_max]` and value `[B, T]` for every row."""
        batch, steps = features.shape[0], features.shape[1]
        logits = self.logits.expand(batch, steps, *self.logits.shape)
        return logits, self.value.expand(batch, steps) + 0 * features.sum(-1)


class PeakedBundle(PolicyBundle):
    """A stateless bundle over `PeakedNetwork` that offers floors."""

    def __init__(
        self,
        feature_dim: int = FEATURE_DIM,
        *,
        action_space: ActionSpace = TAMIYO,
        probability_floor: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(
            PeakedNetwork(action_space),
            feature_dim=feature_dim,
            action_space=action_space,
            probability_floor=probability_floor,
        )

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        logits, value = self.network(inputs.features)
        return NetworkOutput(logits, value, None)


def _floored_by_hand(logits: torch.Tensor, valid: torch.Tensor, floor: float) -> torch.Tensor:
    """`(1 - n f) p + f` on the valid actions, 0 elsewhere, in float64: `[A]` from `[A]`."""
    p = torch.softmax(logits.double().masked_fill(~valid, -math.inf), dim=-1)
    count = int(valid.sum())
    if floor == 0.0 or count <= 1:
        return p
    f = min(floor, 0.99 / count)
    return torch.where(valid, (1 - count * f) * p + f, 0.0)


def _head_logits(bundle: PeakedBundle, head: str) -> torch.Tensor:
    network = bundle.network
    assert isinstance(network, PeakedNetwork)
    size = bundle.action_space.size_of(head)
    return network.logits[HEAD_NAMES.index(head), :size].detach()


# ---------------------------------------------------------------- the arithmetic


@given(
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.1, 3.0, 30.0, 1e3]),
    keep=st.floats(0.05, 0.95),
    floor=st.floats(0.0, 0.99),
)
def test_every_valid_action_keeps_its_floor_masked_ones_zero_rows_sum_to_one(
    seed: int, scale: float, keep: float, floor: float
) -> None:
    """For any logits and masks: p' >= min(f, 0.99 / n) on valid actions, 0 on masked ones."""
    generator = torch.Generator().manual_seed(seed)
    space = TAMIYO
    layout = HeadLayout(space, CPU)
    floors = dict.fromkeys(HEAD_NAMES[::2], floor)  # half the heads floored
    tables = FloorTables.build(floors, space, CPU)
    masks = random_masks((16,), space=space, keep=keep, generator=generator)
    valid = layout.pack_masks(masks.as_tuple(), 16, 1)  # [16, 1, H, A_max]
    logits = torch.randn(16, 1, space.num_heads, space.padded_size, generator=generator) * scale
    log_probs = categorical.mask_logits(logits, valid, layout.fill, layout.minus_inf).log_softmax(
        -1
    )
    out = (
        log_probs if tables is None else categorical.floor_log_probs(log_probs, valid, tables.heads)
    )
    probs = out.double().exp()
    assert torch.equal(probs[~valid], torch.zeros_like(probs[~valid]))
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1], dtype=torch.float64))
    count = valid.sum(-1, keepdim=True).double()
    for index, head in enumerate(HEAD_NAMES):
        f = floors.get(head, 0.0)
        effective = torch.where(
            count[..., index, :] > 1, (0.99 / count[..., index, :]).clamp(max=f), 0.0
        )
        head_probs, head_valid = probs[..., index, :], valid[..., index, :]
        assert bool(
            (
                head_probs[head_valid]
                >= (effective.expand_as(head_probs)[head_valid] * (1 - 1e-5)) - 1e-7
            ).all()
        ), head
        if f == 0.0:  # an unfloored head is left exactly as it was
            assert torch.equal(out[..., index, :], log_probs[..., index, :]), head


def test_a_head_with_one_valid_action_keeps_log_prob_exactly_zero() -> None:
    layout = HeadLayout(TAMIYO, CPU)
    tables = FloorTables.build(dict.fromkeys(HEAD_NAMES, 0.5), TAMIYO, CPU)
    assert tables is not None
    valid = layout.all_valid(4, 1).clone()
    valid[..., 1:] = False  # one valid action per head: the first
    logits = torch.randn(4, 1, TAMIYO.num_heads, TAMIYO.padded_size) * 5
    log_probs = categorical.mask_logits(logits, valid, layout.fill, layout.minus_inf).log_softmax(
        -1
    )
    floored = categorical.floor_log_probs(log_probs, valid, tables.heads)
    assert torch.equal(floored[..., 0], torch.zeros(4, 1, TAMIYO.num_heads))


def test_the_floor_is_a_mix_with_uniform_computed_by_hand() -> None:
    bundle = PeakedBundle(probability_floor=FLOORS)
    op_valid = torch.tensor([True, True, False, True, False, True])
    masks = ActionMasks(op=op_valid.unsqueeze(0))
    logits = bundle.forward(torch.zeros(1, FEATURE_DIM), masks).logits
    for head, floor in (*FLOORS.items(), ("slot", 0.0)):
        size = TAMIYO.size_of(head)
        valid = op_valid if head == "op" else torch.ones(size, dtype=torch.bool)
        expected = _floored_by_hand(_head_logits(bundle, head), valid, floor)
        got = torch.softmax(logits[head][0].double(), dim=-1)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_gradients_flow_through_the_floored_distribution_to_every_valid_logit() -> None:
    """D log p'(a) / d logit_j = (1 - n f) p_j (1[j = a] - p_a) / p'_a: never 0 for valid j."""
    layout = HeadLayout(TAMIYO, CPU)
    tables = FloorTables.build({"blueprint": 0.12}, TAMIYO, CPU)
    assert tables is not None
    logits = (
        torch.randn(1, 1, TAMIYO.num_heads, TAMIYO.padded_size, dtype=torch.float64) * 4
    ).requires_grad_()
    valid = layout.all_valid(1, 1)
    log_probs = categorical.mask_logits(logits, valid, layout.fill, layout.minus_inf).log_softmax(
        -1
    )
    floored = categorical.floor_log_probs(log_probs, valid, tables.heads)
    blueprint = HEAD_NAMES.index("blueprint")
    torch.autograd.backward(floored[0, 0, blueprint, 0])
    assert logits.grad is not None
    grad = logits.grad[0, 0, blueprint, : TAMIYO.blueprint]
    assert bool((grad != 0).all())
    p = torch.softmax(logits.detach()[0, 0, blueprint, : TAMIYO.blueprint], dim=-1)
    n = TAMIYO.blueprint
    f = min(0.12, 0.99 / n)  # 13 actions: the floor is capped at 0.99 / 13
    scale = 1 - n * f
    expected = scale * p[0] * ((torch.arange(n) == 0).double() - p) / (scale * p[0] + f)
    torch.testing.assert_close(grad, expected)
    assert torch.equal(
        logits.grad[0, 0, blueprint, TAMIYO.blueprint :], torch.zeros(16 - n, dtype=torch.float64)
    )


def test_floors_pass_gradcheck_in_float64() -> None:
    """On the valid actions: a masked one's log-prob (probability 0) follows the detached shift."""
    layout = HeadLayout(TAMIYO, CPU)
    tables = FloorTables.build(FLOORS, TAMIYO, CPU)
    assert tables is not None
    valid = layout.all_valid(2, 1)

    def floored(logits: torch.Tensor) -> torch.Tensor:
        masked = categorical.mask_logits(logits, valid, layout.fill, layout.minus_inf)
        return categorical.floor_log_probs(masked.log_softmax(-1), valid, tables.heads)[valid]

    logits = torch.randn(2, 1, TAMIYO.num_heads, TAMIYO.padded_size, dtype=torch.float64)
    assert torch.autograd.gradcheck(floored, (logits.requires_grad_(),))


# ---------------------------------------------------------------- the public methods


@pytest.mark.parametrize(
    ("space", "op_conditioned"),
    [(ActionSpace(), False), (TAMIYO, False), (TAMIYO, True)],
    ids=["flat", "tamiyo", "tamiyo_logits_by_op"],
)
def test_rollout_and_update_agree_under_floors_with_an_episode_starting_inside(
    space: ActionSpace, op_conditioned: bool
) -> None:
    """Step by step, with per-op masks and an episode that starts at step 2 for some rows."""
    bundle = small_lstm(
        action_space=space, op_conditioned_logits=op_conditioned, probability_floor=FLOORS
    )
    by_op = ("slot", "blueprint") if space.hierarchy else ()
    masks = random_masks((32, 5), space=space, by_op=by_op)
    x = torch.randn(32, 5, FEATURE_DIM)
    starts = torch.zeros(32, 5, dtype=torch.bool)
    starts[::3, 2] = True
    hidden = bundle.initial_hidden(32)
    hidden_t = hidden
    log_probs: dict[str, list[torch.Tensor]] = {head: [] for head in HEAD_NAMES}
    actions: dict[str, list[torch.Tensor]] = {head: [] for head in HEAD_NAMES}
    for t in range(5):
        step = bundle.get_action(
            x[:, t], _step_masks(masks, t), hidden_t, episode_start=starts[:, t]
        )
        hidden_t = step.hidden
        for head in HEAD_NAMES:
            log_probs[head].append(step.log_prob[head])
            actions[head].append(step.action[head])
    stacked = {head: torch.stack(actions[head], 1) for head in HEAD_NAMES}
    scored = bundle.evaluate_actions(x, stacked, masks, hidden, episode_start=starts)
    for head in HEAD_NAMES:
        torch.testing.assert_close(
            scored.log_prob[head].detach(), torch.stack(log_probs[head], 1), atol=1e-5, rtol=1e-5
        )


def _step_masks(masks: ActionMasks, t: int) -> ActionMasks:
    return ActionMasks.from_mapping(
        {name: None if mask is None else mask[:, t] for name, mask in masks.as_dict().items()}
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_ops_follow_the_floored_distribution_in_the_first_stage(dtype: torch.dtype) -> None:
    """Under the hierarchy the op's own stage samples p', not p, in bfloat16 too.

    Drawn at 2% under peaked logits: bfloat16 Gumbel noise drew such actions at 1.8%.
    """
    torch.manual_seed(0)
    bundle = PeakedBundle(probability_floor={"op": 0.02})
    bundle.network.to(dtype)
    batch = 200_000
    out = bundle.get_action(torch.zeros(batch, FEATURE_DIM, dtype=dtype), masks=None)
    expected = _floored_by_hand(_head_logits(bundle, "op"), torch.ones(6, dtype=torch.bool), 0.02)
    assert float(expected.min()) >= 0.02 - 1e-9
    assert int((expected < 0.025).sum()) >= 3  # most ops are held up by the floor alone
    for op in range(6):
        seen = (out.action["op"] == op).double().mean().item()
        p = float(expected[op])
        assert seen == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / batch) + 1e-5), op
    tolerance = 1e-5 if dtype == torch.float32 else 4e-3  # bfloat16 rounds the shift
    torch.testing.assert_close(
        out.log_prob["op"].double(),
        expected.log()[out.action["op"]],
        atol=tolerance,
        rtol=tolerance,
    )


@pytest.mark.parametrize("space", [ActionSpace(), TAMIYO], ids=["flat", "tamiyo"])
def test_the_mode_is_unchanged_by_floors(space: ActionSpace) -> None:
    torch.manual_seed(0)
    plain = PeakedBundle(action_space=space)
    floored = PeakedBundle(action_space=space, probability_floor=dict.fromkeys(HEAD_NAMES, 0.1))
    floored.network.load_state_dict(plain.network.state_dict())
    by_op = ("slot", "blueprint") if space.hierarchy else ()
    masks = random_masks((64,), space=space, by_op=by_op)
    x = torch.zeros(64, FEATURE_DIM)
    a = plain.get_action(x, masks, deterministic=True).action
    b = floored.get_action(x, masks, deterministic=True).action
    for head in HEAD_NAMES:
        assert torch.equal(a[head], b[head]), head


def test_entropy_is_the_floored_distributions_normalized_entropy() -> None:
    bundle = PeakedBundle(action_space=ActionSpace(), probability_floor={"blueprint": 0.12})
    actions = {head: torch.zeros(1, dtype=torch.long) for head in HEAD_NAMES}
    out = bundle.evaluate_actions(torch.zeros(1, FEATURE_DIM), actions, None)
    size = ActionSpace().blueprint
    p = _floored_by_hand(
        _head_logits(bundle, "blueprint"), torch.ones(size, dtype=torch.bool), 0.12
    )
    expected = -(p * p.log()).sum() / math.log(size)
    assert float(out.entropy["blueprint"].detach()) == pytest.approx(float(expected), abs=1e-5)


def test_ignored_heads_stay_canonical_with_zero_log_prob_and_entropy_under_floors() -> None:
    bundle = PeakedBundle(probability_floor=dict.fromkeys(HEAD_NAMES, 0.1))
    x = torch.zeros(256, FEATURE_DIM)
    step = bundle.get_action(x, masks=None)
    scored = bundle.evaluate_actions(x, step.action, None)
    table = TAMIYO.hierarchy
    assert table is not None
    for row in range(256):
        op = int(step.action["op"][row])
        for head in HEAD_NAMES:
            if head != "op" and head not in table.uses(op):
                assert float(step.log_prob[head][row]) == 0.0
                assert float(scored.log_prob[head][row].detach()) == 0.0
                assert float(scored.entropy[head][row].detach()) == 0.0


def _entropy(p: torch.Tensor) -> float:
    return float(-(p * p.clamp(min=1e-300).log()).sum())


@pytest.mark.parametrize("space", [ActionSpace(), TAMIYO], ids=["flat", "tamiyo"])
def test_the_joint_entropy_uses_the_floored_distribution(space: ActionSpace) -> None:
    """Flat: the sum of the floored heads' entropies. Tamiyo's: H(op) + E_op[used heads'].

    By hand from the logits: without masks a used head has all its actions valid and an
    ignored one only its canonical action (entropy 0).
    """
    floors = {"op": 0.15, "blueprint": 0.12, "slot": 0.1}
    bundle = PeakedBundle(action_space=space, probability_floor=floors)
    actions = {head: torch.zeros(1, dtype=torch.long) for head in HEAD_NAMES}
    out = bundle.evaluate_actions(torch.zeros(1, FEATURE_DIM), actions, None, joint_entropy=True)
    assert out.joint_entropy is not None
    entropy = {
        head: _entropy(
            _floored_by_hand(
                _head_logits(bundle, head),
                torch.ones(space.size_of(head), dtype=torch.bool),
                floors.get(head, 0.0),
            )
        )
        for head in HEAD_NAMES
    }
    table = space.hierarchy
    if table is None:
        expected = sum(entropy.values())
    else:
        op = _floored_by_hand(_head_logits(bundle, "op"), torch.ones(6, dtype=torch.bool), 0.15)
        expected = entropy["op"] + sum(
            float(op[n]) * sum(entropy[head] for head in table.uses(n)) for n in range(6)
        )
    assert float(out.joint_entropy.detach()) == pytest.approx(expected, abs=1e-4)


def test_floors_off_score_the_plain_masked_distribution() -> None:
    """`None`, `{}` and floors of 0.0 give the log-softmax of the masked logits."""
    masks = random_masks((16,))
    x = torch.randn(16, FEATURE_DIM)
    for floor in (None, {}, {"op": 0.0}):
        torch.manual_seed(3)
        bundle = MLPPolicyBundle(FEATURE_DIM, hidden_dim=16, probability_floor=floor)
        step = bundle.get_action(x, masks)
        logits = bundle.forward(x, masks).logits
        for head in HEAD_NAMES:
            plain = logits[head].detach().log_softmax(-1)
            taken = plain.gather(-1, step.action[head].unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(step.log_prob[head], taken, atol=1e-6, rtol=0)


def test_floors_work_compiled_and_follow_a_live_change() -> None:
    torch.manual_seed(0)
    eager = small_lstm(action_space=TAMIYO, probability_floor=FLOORS)
    compiled = small_lstm(action_space=TAMIYO, probability_floor=FLOORS)
    compiled.network.load_state_dict(eager.network.state_dict())
    compiled.compile(backend="eager")
    x = torch.randn(8, FEATURE_DIM)
    masks = random_masks((8,), space=TAMIYO)
    for floors in (FLOORS, None, {"op": 0.3}):
        eager.probability_floor = floors
        compiled.probability_floor = floors
        torch.manual_seed(1)
        a = eager.get_action(x, masks)
        torch.manual_seed(1)
        b = compiled.get_action(x, masks)
        ea = eager.evaluate_actions(x, a.action, masks, joint_entropy=True)
        eb = compiled.evaluate_actions(x, a.action, masks, joint_entropy=True)
        for head in HEAD_NAMES:
            assert torch.equal(a.action[head], b.action[head]), (floors, head)
            torch.testing.assert_close(a.log_prob[head], b.log_prob[head])
            torch.testing.assert_close(ea.log_prob[head], eb.log_prob[head])
            torch.testing.assert_close(ea.entropy[head], eb.entropy[head])
        assert ea.joint_entropy is not None
        assert eb.joint_entropy is not None
        torch.testing.assert_close(ea.joint_entropy, eb.joint_entropy)


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    ("floor", "error", "says"),
    [
        ({"op": 1.0}, ValueError, "probability_floor['op'] must lie in [0, 1), got 1.0"),
        ({"op": -0.1}, ValueError, "probability_floor['op'] must lie in [0, 1), got -0.1"),
        (
            {"tempo": float("nan")},
            ValueError,
            "probability_floor['tempo'] must lie in [0, 1), got nan",
        ),
        ({"op": float("inf")}, ValueError, "probability_floor['op'] must lie in [0, 1), got inf"),
        ({"opp": 0.1}, ValueError, "unknown head 'opp'; the heads are slot, blueprint"),
        ({1: 0.1}, ValueError, "unknown head 1"),
        ({"op": 1}, TypeError, "probability_floor['op'] must be a float in [0, 1), got int (1)"),
        ({"op": True}, TypeError, "probability_floor['op'] must be a float in [0, 1), got bool"),
        ({"op": "0.1"}, TypeError, "got str ('0.1')"),
        ([("op", 0.1)], TypeError, "must be a mapping of head name to float"),
    ],
)
def test_a_bad_floor_is_refused_at_construction_and_live_and_the_bundle_keeps_working(
    floor: object, error: type[Exception], says: str
) -> None:
    with pytest.raises(error) as built:
        LSTMPolicyBundle(FEATURE_DIM, hidden_dim=8, embed_dim=8, probability_floor=floor)  # type: ignore[arg-type]
    assert says in str(built.value)
    assert str(built.value).startswith("LSTMPolicyBundle: ")
    bundle = small_lstm(probability_floor={"blueprint": 0.12})
    with pytest.raises(error) as live:
        bundle.probability_floor = floor  # type: ignore[assignment]
    assert says in str(live.value)
    assert bundle.probability_floor == {"blueprint": 0.12}  # unchanged
    assert bundle.config["probability_floor"] == {"blueprint": 0.12}
    step = bundle.get_action(torch.randn(4, FEATURE_DIM), random_masks((4,)))
    assert step.action["op"].shape == (4,)


def test_a_live_change_takes_effect_and_is_recorded() -> None:
    bundle = PeakedBundle(action_space=ActionSpace())
    masks = ActionMasks()
    before = bundle.forward(torch.zeros(1, FEATURE_DIM), masks).logits["op"].detach().softmax(-1)
    assert float(before.min()) < 0.05  # peaked: some op is rare without a floor
    bundle.probability_floor = {"op": 0.1}
    after = bundle.forward(torch.zeros(1, FEATURE_DIM), masks).logits["op"].detach().softmax(-1)
    assert float(after.min()) >= 0.1 - 1e-6
    assert bundle.config["probability_floor"] == {"op": 0.1}
    bundle.probability_floor = None
    assert bundle.probability_floor == {}
    assert bundle.config["probability_floor"] is None
    torch.testing.assert_close(
        bundle.forward(torch.zeros(1, FEATURE_DIM), masks).logits["op"].softmax(-1), before
    )


def test_a_bundle_whose_constructor_takes_no_floors_refuses_a_live_setting() -> None:
    bundle = TinyStatelessBundle()
    with pytest.raises(TypeError, match="its constructor does not take probability_floor"):
        bundle.probability_floor = {"op": 0.1}
    assert bundle.probability_floor == {}


# ---------------------------------------------------------------- records


def test_config_and_checkpoints_record_the_floors(tmp_path: Path) -> None:
    bundle = small_lstm(action_space=TAMIYO, probability_floor=FLOORS)
    assert bundle.config["probability_floor"] == FLOORS
    twin = type(bundle)(**bundle.config)
    assert twin.probability_floor == FLOORS
    path = tmp_path / "floored.pt"
    save_policy(bundle, path)
    restored = load_policy(path)
    assert restored.probability_floor == FLOORS
    x = torch.randn(4, FEATURE_DIM)
    step = bundle.get_action(x, None, deterministic=True)
    again = restored.get_action(x, None, deterministic=True)
    for head in HEAD_NAMES:
        assert torch.equal(step.log_prob[head], again.log_prob[head])
