"""SeedLifecycleTask: seeded episodes, a cue shown once, masks that are exactly Tamiyo's rules."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping

import pytest
import torch

from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionHierarchy,
    ActionMasks,
    ActionSpace,
    ExtraInput,
    UniformPolicyBundle,
)
from esper.tamiyo.policy.demo import Op, SeedLifecycleTask, Stage, TaskConfig
from esper.tamiyo.policy.demo.task import BLEND_STEPS, CURVE_FACTORS, SLOT_WEIGHTS, SPEED_FACTORS

CONFIG = TaskConfig()
FLAT = TaskConfig(action_space=ActionSpace())
CUE = slice(0, CONFIG.num_cues)  # the cue's columns of the features
S = CONFIG.num_slots

# Tamiyo's table, written out here apart from the library's TAMIYO_HIERARCHY.
USES: dict[Op, tuple[str, ...]] = {
    Op.WAIT: (),
    Op.GERMINATE: ("slot", "blueprint", "style", "tempo", "alpha_target"),
    Op.SET_ALPHA_TARGET: ("slot", "style", "alpha_target", "alpha_speed", "alpha_curve"),
    Op.PRUNE: ("slot", "alpha_speed", "alpha_curve"),
    Op.FOSSILIZE: ("slot",),
    Op.ADVANCE: ("slot",),
}

Policy = Callable[[SeedLifecycleTask, ActionMasks], dict[str, torch.Tensor]]


def rule(task: SeedLifecycleTask, slot: int, op: Op) -> torch.Tensor:
    """`[N]` whether the task's rules, as the issue states them, allow `op` on `slot`."""
    stage, timer = task.stage[:, slot], task.timer[:, slot]
    is_open = task.t >= task.open_step
    blended = (stage == Stage.BLENDING) | (stage == Stage.HOLDING)
    return {
        Op.WAIT: torch.ones_like(is_open),
        Op.GERMINATE: (stage == Stage.EMPTY) & is_open,  # no germinating an occupied slot
        Op.ADVANCE: (stage == Stage.TRAINING) & (timer == 0),  # trained seeds only
        Op.SET_ALPHA_TARGET: blended,  # retarget a seed that is blending or has blended
        Op.FOSSILIZE: stage == Stage.HOLDING,  # only once blended
        Op.PRUNE: blended | (stage == Stage.TRAINING),  # any live seed
    }[op]


def head_mask(masks: ActionMasks, head: str, op: torch.Tensor) -> torch.Tensor:
    """`[N, A]`: the head's valid actions when op `op` `[N]` is chosen."""
    size = CONFIG.action_space.size_of(head)
    mask = torch.ones(len(op), size, dtype=torch.bool)
    flat = getattr(masks, head)
    if flat is not None:
        mask &= flat
    by_op = None if head == "op" else getattr(masks, f"{head}_by_op")
    if by_op is not None:
        mask &= by_op[torch.arange(len(op)), op.clamp(0, len(Op) - 1)]  # [N, A]
    return mask


def choose(
    masks: ActionMasks,
    config: TaskConfig = CONFIG,
    *,
    force: bool = False,
    **wanted: int | torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Each head's `wanted` action where the masks allow it (always if `force`).

    Elsewhere the head's first valid action, given the op chosen; under a hierarchical
    space a head the op does not use takes its canonical action, 0, as a bundle does.
    """
    assert masks.op is not None
    n = masks.op.shape[0]
    action: dict[str, torch.Tensor] = {}
    for head in ("op", *HEAD_NAMES[:-1]):
        op = action.get("op", torch.zeros(n, dtype=torch.long))
        mask = head_mask(masks, head, op)  # [N, A]
        choice = mask.float().argmax(dim=1)  # [N]
        if head in wanted:
            want = torch.as_tensor(wanted[head]).expand_as(choice)
            allowed = mask.gather(1, want.clamp(0, mask.shape[1] - 1).unsqueeze(1)).squeeze(1)
            choice = torch.where(allowed | force, want, choice)
        if config.hierarchical and head != "op":
            used = torch.tensor([head in USES[o] for o in Op])[op.clamp(0, len(Op) - 1)]
            choice = torch.where(used | (force & (head in wanted)), choice, 0)
        action[head] = choice
    return {head: action[head] for head in HEAD_NAMES}


def oracle(
    task: SeedLifecycleTask, masks: ActionMasks, blueprint: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Fossilize, else advance, else germinate `blueprint`, with the best settings.

    It picks its slot from the rules (`legal_slots`), so it never tries an illegal
    combination under union masks either.
    """
    assert masks.op is not None
    op = torch.full_like(blueprint, Op.WAIT)
    for candidate in (Op.GERMINATE, Op.ADVANCE, Op.FOSSILIZE):  # the last allowed wins
        op = torch.where(masks.op[:, candidate], candidate, op)
    slot = task.legal_slots()[torch.arange(len(op)), op].float().argmax(dim=1)
    return choose(
        masks, task.config, op=op, slot=slot, blueprint=blueprint, style=1, tempo=0,
        alpha_target=2,
    )  # fmt: skip


def play(
    task: SeedLifecycleTask, policy: Policy, steps: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run `policy(task, masks)`; returns (features, reward, done) of each step."""
    features, masks = task.reset()
    trace = []
    for _ in range(steps):
        outcome = task.step(policy(task, masks))
        trace.append((features, outcome.reward, outcome.done))
        features, masks = outcome.features, outcome.masks
    return trace


def total_return(trace: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    return torch.stack([reward for _, reward, _ in trace], dim=1).sum(dim=1)


def test_the_cue_is_shown_at_step_zero_only_and_names_the_right_blueprint() -> None:
    task = SeedLifecycleTask(64, seed=3)
    features, masks = task.reset()
    cue = features[:, CUE]  # [N, K]
    assert torch.equal(cue.sum(1), torch.ones(64))
    assert torch.equal(cue.argmax(1) + 1, task.right_blueprint())
    for _ in range(CONFIG.episode_steps - 1):
        outcome = task.step(choose(masks))
        masks = outcome.masks
        assert not outcome.done.any()
        assert torch.all(outcome.features[:, CUE] == 0)
    last = task.step(choose(masks))
    assert last.done.all()
    assert torch.equal(last.features[:, CUE].sum(1), torch.ones(64))  # a new episode's cue


def test_the_same_seed_gives_the_same_episodes_and_another_seed_others() -> None:
    def episodes(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        task = SeedLifecycleTask(256, seed=seed)
        first = task.right_blueprint().clone()
        play(task, lambda t, m: choose(m), CONFIG.episode_steps)
        return first, task.right_blueprint()

    assert all(torch.equal(a, b) for a, b in zip(episodes(5), episodes(5), strict=True))
    assert not torch.equal(episodes(5)[0], episodes(6)[0])


def test_cues_and_delays_cover_their_ranges() -> None:
    task = SeedLifecycleTask(4000, seed=0)
    counts = torch.bincount(task.cue, minlength=CONFIG.num_cues).float()
    # Each cue about 1000 times: a 6-sigma band.
    assert torch.all((counts - 1000).abs() < 6 * math.sqrt(1000 * 0.75)), counts
    low, high = CONFIG.cue_delay
    assert set(task.open_step.tolist()) == set(range(low, high + 1))


def test_the_default_space_is_tamiyos_and_its_masks_are_per_op() -> None:
    assert CONFIG.action_space == ActionSpace.tamiyo()
    assert CONFIG.hierarchical
    assert not FLAT.hierarchical
    _, masks = SeedLifecycleTask(4, seed=0).reset()
    assert masks.slot_by_op is not None
    assert masks.slot_by_op.shape == (4, len(Op), S)
    assert masks.slot is None  # the per-op mask says it all
    _, flat = SeedLifecycleTask(4, FLAT, seed=0).reset()
    assert not flat.has_by_op
    assert all(getattr(flat, head) is not None for head in HEAD_NAMES)


@pytest.mark.parametrize("config", [CONFIG, FLAT], ids=["hierarchical", "flat"])
def test_until_germination_opens_only_wait_is_offered(config: TaskConfig) -> None:
    """Nothing the policy does can write the cue into the state before it must recall it.

    Under a hierarchical space the bundle then gives every other head its canonical
    action; under a flat one each head's union mask leaves it one action.
    """
    task = SeedLifecycleTask(128, config, seed=1)
    _, masks = task.reset()
    for _ in range(CONFIG.cue_delay[1]):
        assert masks.op is not None
        closed = task.t < task.open_step  # [N]
        assert closed.any()
        only_wait = torch.zeros(len(Op), dtype=torch.bool)
        only_wait[Op.WAIT] = True
        assert torch.equal(masks.op[closed], only_wait.expand(int(closed.sum()), -1))
        if config.hierarchical:
            assert masks.slot_by_op is not None
            assert not masks.slot_by_op[closed].any()
        else:
            for head in HEAD_NAMES:
                mask = getattr(masks, head)[closed]
                assert torch.equal(mask.sum(1), torch.ones(int(closed.sum()), dtype=torch.long))
                assert torch.all(mask[:, 0]), head
        opened = ~closed
        assert torch.all(masks.op[opened, Op.GERMINATE])
        blueprint = head_mask(masks, "blueprint", torch.full_like(task.t, Op.GERMINATE))
        assert torch.equal(blueprint[opened].sum(1), torch.full_like(task.t[opened], 4))
        masks = task.step(choose(masks, config)).masks


@pytest.mark.parametrize("seed", [0, 1])
def test_each_op_and_slot_pair_is_accepted_exactly_when_the_masks_offer_it(seed: int) -> None:
    """The masks per op are Tamiyo's rules, both ways.

    From states reached by a uniform policy, every (op, slot) pair is tried in a copy
    of the task: the task accepts exactly the pairs the masks offer (its own rules
    refuse none of them), and the masks offer exactly the pairs the rule table written
    here allows, so every legal pair is offered at every step.
    """
    task = SeedLifecycleTask(256, seed=seed)
    policy = UniformPolicyBundle(action_space=CONFIG.action_space)
    generator = torch.Generator().manual_seed(seed)
    features, masks = task.reset()
    stages_seen: set[int] = set()
    for _ in range(2 * CONFIG.episode_steps):
        assert masks.op is not None
        assert masks.slot_by_op is not None
        stages_seen.update(task.stage.flatten().tolist())
        for op in Op:
            for slot in range(S):
                trial = copy.deepcopy(task)
                outcome = trial.step(choose(masks, force=True, op=op, slot=slot))
                offered = masks.op[:, op] & (masks.slot_by_op[:, op, slot] | (op == Op.WAIT))
                refused = outcome.episodes.invalid_actions - task.invalid_actions  # [N]
                assert torch.equal(refused, (~offered).long()), (slot, op.name)
                assert torch.equal(offered, rule(task, slot, op)), (slot, op.name)
                assert not outcome.episodes.illegal_combinations.any()
        step = policy.get_action(features, masks, generator=generator)
        outcome = task.step(step.action)
        assert not outcome.episodes.invalid_actions.any()
        features, masks = outcome.features, outcome.masks
    assert stages_seen == {int(stage) for stage in Stage}


def test_seeds_in_different_stages_are_acted_on_from_the_same_state() -> None:
    """No focus groups: every op legal on some slot is offered, on its own slots.

    From states a uniform policy reaches, wherever two ops are offered on different
    slots (say fossilize slot 0 or germinate slot 2), each is taken in a copy of the
    task and does what the table says to its own slot.
    """
    task = SeedLifecycleTask(64, seed=0)
    policy = UniformPolicyBundle(action_space=CONFIG.action_space)
    generator = torch.Generator().manual_seed(0)
    features, masks = task.reset()
    outcomes = {Op.GERMINATE: Stage.TRAINING, Op.ADVANCE: Stage.BLENDING,
                Op.FOSSILIZE: Stage.FOSSILIZED, Op.PRUNE: Stage.PRUNING,
                Op.SET_ALPHA_TARGET: Stage.BLENDING}  # fmt: skip
    rows = torch.arange(64)
    pairs_seen: set[tuple[str, str]] = set()
    for step in range(2 * CONFIG.episode_steps):
        assert masks.op is not None
        assert masks.slot_by_op is not None
        legal = masks.slot_by_op.float()  # [N, |Op|, S]
        first, last = legal.argmax(dim=2), S - 1 - legal.flip(2).argmax(dim=2)  # [N, |Op|]
        ends = (step + 1) % CONFIG.episode_steps == 0  # the state is reset after this step
        for a in outcomes:
            for b in outcomes:
                both = masks.op[:, a] & masks.op[:, b] & (first[:, a] != last[:, b])
                if a == b or ends or not both.any():
                    continue
                pairs_seen.add((a.name, b.name))
                for op, slot in ((a, first[:, a]), (b, last[:, b])):
                    trial = copy.deepcopy(task)
                    result = trial.step(choose(masks, op=op, slot=slot))
                    assert not result.episodes.invalid_actions[both].any()
                    stage = trial.stage[rows, slot]
                    assert bool((stage == outcomes[op])[both].all()), (op.name, a.name, b.name)
        outcome = task.step(policy.get_action(features, masks, generator=generator).action)
        features, masks = outcome.features, outcome.masks
    assert {("FOSSILIZE", "GERMINATE"), ("ADVANCE", "FOSSILIZE"), ("PRUNE", "ADVANCE"),
            ("SET_ALPHA_TARGET", "GERMINATE"), ("FOSSILIZE", "PRUNE")} <= pairs_seen  # fmt: skip


def test_a_flat_space_gets_union_masks_and_an_illegal_combination_is_taken_as_wait() -> None:
    """Option (c) of ADR 0008: the heads sampled independently, under union masks.

    The slot mask is the union over offered ops of their legal slots, and a head has a
    choice only when some offered op uses it. Each (op, slot) pair within the masks is
    accepted (never an invalid action); a pair the rules refuse is taken as `WAIT` and
    counted as an illegal combination.
    """
    task = SeedLifecycleTask(128, FLAT, seed=0)
    policy = UniformPolicyBundle(action_space=FLAT.action_space)
    generator = torch.Generator().manual_seed(0)
    features, masks = task.reset()
    illegal_seen = 0
    for _ in range(2 * CONFIG.episode_steps):
        assert masks.op is not None
        assert masks.slot is not None
        legal = torch.stack([torch.stack([rule(task, s, op) for s in range(S)], 1) for op in Op], 1)
        union = (legal & masks.op.unsqueeze(2))[:, 1:].any(dim=1)  # [N, S]: WAIT takes no slot
        nothing = ~union.any(dim=1, keepdim=True)  # no op but WAIT: slot 0 only
        assert torch.equal(masks.slot, union | (nothing & (torch.arange(S) == 0)))
        for head in HEAD_NAMES[1:-1]:
            used_by_offered = masks.op[:, [op for op in Op if head in USES[op]]].any(dim=1)
            choices = getattr(masks, head).sum(dim=1)
            assert bool((choices[~used_by_offered] == 1).all()), head
            assert bool((choices[used_by_offered] > 1).all()), head
        waited = copy.deepcopy(task)
        waited.step(choose(masks, FLAT))
        for op in Op:
            for slot in range(S):
                trial = copy.deepcopy(task)
                action = choose(masks, FLAT, op=op, slot=slot)  # within the union masks
                outcome = trial.step(action)
                illegal = ~legal[torch.arange(len(action["op"])), action["op"], action["slot"]]
                assert not (outcome.episodes.invalid_actions - task.invalid_actions).any()
                added = outcome.episodes.illegal_combinations - task.illegal_combinations
                assert torch.equal(added, illegal.long()), (op.name, slot)
                assert torch.equal(trial.stage[illegal], waited.stage[illegal])
                illegal_seen += int(illegal.sum())
        step = policy.get_action(features, masks, generator=generator)
        outcome = task.step(step.action)
        features, masks = outcome.features, outcome.masks
    assert illegal_seen > 1000


def test_every_head_an_op_uses_changes_what_it_does_and_no_other_head_does() -> None:
    """Each head's choice matters for each op that uses it; the others change nothing.

    From states a uniform policy reaches, each offered op is taken with two different
    actions of one head, and both copies of the task then play on (advance whenever
    possible, else wait) to the end of the episode: the features and rewards on the
    way differ for a head the op uses, somewhere, and never for one it does not.
    """
    task = SeedLifecycleTask(32, seed=2)
    policy = UniformPolicyBundle(action_space=CONFIG.action_space)
    generator = torch.Generator().manual_seed(2)
    features, masks = task.reset()

    def future(trial: SeedLifecycleTask, action: dict[str, torch.Tensor]) -> torch.Tensor:
        outcome = trial.step(action)
        seen = [outcome.features, outcome.reward.unsqueeze(1)]
        while not outcome.done.all():
            outcome = trial.step(choose(outcome.masks, op=Op.ADVANCE))
            seen += [outcome.features, outcome.reward.unsqueeze(1)]
        assert not outcome.episodes.invalid_actions.any()
        return torch.cat(seen, dim=1)  # [N, ...]

    matters = {(op, head): False for op in Op for head in USES[op]}
    for t in range(CONFIG.episode_steps - 1):
        assert masks.op is not None
        for op in (o for o in Op if masks.op[:, o].any()):
            rows = masks.op[:, op]
            base = choose(masks, op=op)
            expected = future(copy.deepcopy(task), base)
            for head in HEAD_NAMES[:-1]:
                used = head in USES[op]
                if (used and matters[op, head]) or (not used and t % 3):
                    continue  # shown already; the heads an op ignores, every third step
                allowed = head_mask(masks, head, base["op"])[rows]  # [n, A]
                if used:
                    second = (allowed.cumsum(dim=1) == 2) & allowed  # the second valid action
                    other = second.float().argmax(dim=1)
                    has_two = second.any(dim=1)
                else:
                    other = torch.full(
                        (int(rows.sum()),), task.config.action_space.size_of(head) - 1
                    )
                    has_two = torch.ones_like(other, dtype=torch.bool)
                changed = {h: a.clone() for h, a in base.items()}
                changed[head][rows] = torch.where(has_two, other, base[head][rows])
                seen = future(copy.deepcopy(task), changed)
                differs = (seen != expected).any(dim=1)[rows] & has_two
                if used:
                    matters[op, head] = bool(differs.any())
                else:
                    assert not differs.any(), (op.name, head)
        step = policy.get_action(features, masks, generator=generator)
        outcome = task.step(step.action)
        features, masks = outcome.features, outcome.masks
    assert [pair for pair, seen in matters.items() if not seen] == []


def test_a_masks_bug_shows_up_as_invalid_actions_instead_of_bending_the_rules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`step` checks the rules on the slot asked, apart from the masks.

    Masks that wrongly offer FOSSILIZE on every slot: a policy that takes the offer is
    refused (counted invalid, taken as WAIT), and no empty slot is fossilized.
    """
    legal_slots = SeedLifecycleTask.legal_slots

    def fossilize_anywhere(self: SeedLifecycleTask) -> torch.Tensor:
        legal = legal_slots(self).clone()
        legal[:, Op.FOSSILIZE] = True
        return legal

    monkeypatch.setattr(SeedLifecycleTask, "legal_slots", fossilize_anywhere)
    task = SeedLifecycleTask(16, seed=0)
    _, masks = task.reset()
    assert masks.op is not None
    assert masks.op[:, Op.FOSSILIZE].all()
    outcome = task.step(choose(masks, op=Op.FOSSILIZE, slot=1))
    assert outcome.episodes.invalid_actions.tolist() == [1] * 16
    assert not (task.stage == Stage.FOSSILIZED).any()


@pytest.mark.parametrize(
    "forced",
    [
        {"op": Op.GERMINATE},  # germination is not open yet
        {"op": Op.FOSSILIZE},  # nothing to fossilize
        {"style": 99},  # out of range, even for a head WAIT does not use
        {"slot": -1},
        {"op": len(Op)},
    ],
)
@pytest.mark.parametrize("config", [CONFIG, FLAT], ids=["hierarchical", "flat"])
def test_a_refused_action_is_counted_and_taken_as_wait(
    forced: dict[str, int], config: TaskConfig
) -> None:
    task = SeedLifecycleTask(8, config, seed=0)
    _, masks = task.reset()
    waited, refused = copy.deepcopy(task), copy.deepcopy(task)
    expected = waited.step(choose(masks, config))
    action = choose(masks, config)
    for head, value in forced.items():
        action[head][:3] = value  # rows 0-2 refused, the others valid
    result = refused.step(action)
    assert result.episodes.invalid_actions.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert result.episodes.illegal_combinations.tolist() == [0] * 8
    assert torch.equal(result.features, expected.features)
    assert torch.equal(refused.stage, waited.stage)


@pytest.mark.parametrize("config", [CONFIG, FLAT], ids=["hierarchical", "flat"])
def test_an_oracle_that_reads_the_cue_earns_the_best_return_every_episode(
    config: TaskConfig,
) -> None:
    task = SeedLifecycleTask(512, config, seed=2)
    trace = play(task, lambda t, m: oracle(t, m, t.right_blueprint()), CONFIG.episode_steps)
    assert CONFIG.best_return == pytest.approx(3.0)
    torch.testing.assert_close(total_return(trace), torch.full((512,), CONFIG.best_return))
    assert trace[-1][2].all()
    assert int(task.illegal_combinations.sum()) == 0


def test_a_policy_that_guesses_the_blueprint_succeeds_at_chance_and_earns_less() -> None:
    n = 4000
    task = SeedLifecycleTask(n, seed=4)
    _, masks = task.reset()
    for _ in range(CONFIG.episode_steps):
        outcome = task.step(oracle(task, masks, torch.ones(n, dtype=torch.long)))
        masks = outcome.masks
    successes = outcome.episodes.success.float()
    returns = outcome.episodes.episode_return
    assert abs(float(successes.mean()) - CONFIG.chance) < 6 * math.sqrt(0.25 * 0.75 / n)
    # A right guess earns the best return; a wrong one a quarter of it.
    best = CONFIG.best_return
    expected = torch.where(successes.bool(), best, best * 0.25)
    torch.testing.assert_close(returns, expected)


@pytest.mark.parametrize("quality", [-1.0, 0.0, 0.5])
def test_the_wrong_blueprint_quality_sets_what_a_guess_earns(quality: float) -> None:
    n = 2000
    task = SeedLifecycleTask(n, TaskConfig(wrong_blueprint_quality=quality), seed=4)
    _, masks = task.reset()
    for _ in range(CONFIG.episode_steps):
        outcome = task.step(oracle(task, masks, torch.ones(n, dtype=torch.long)))
        masks = outcome.masks
    right = outcome.episodes.success
    expected = torch.where(right, CONFIG.best_return, CONFIG.best_return * quality)
    torch.testing.assert_close(outcome.episodes.episode_return, expected)


@pytest.mark.parametrize(("speed", "curve"), [(0, 0), (3, 2), (1, 1)])
def test_a_pruned_seed_gives_back_what_it_added_and_a_harsh_prune_costs_more(
    speed: int, curve: int
) -> None:
    """The gentlest prune (4 steps, linear) is free; a harsher one shocks the host.

    The shock is `(1 - speed factor * curve factor)` times what the seed added when
    the prune began; the slot is empty once the prune's steps have passed.
    """
    task = SeedLifecycleTask(1, seed=0)
    _, masks = task.reset()
    total = torch.zeros(1)
    pruned_at: int | None = None
    added, emptied = 0.0, False
    assert masks.op is not None
    for t in range(CONFIG.episode_steps):
        if pruned_at is None and bool(masks.op[0, Op.PRUNE]) and float(task.alpha.sum()) > 0:
            slot = int(task.alpha[0].argmax())
            quality = task.fit * task.style * task.tempo * task.schedule  # [1, S]
            added = SLOT_WEIGHTS[slot] * float(quality[0, slot] * task.alpha[0, slot])
            action = choose(masks, op=Op.PRUNE, slot=slot, alpha_speed=speed, alpha_curve=curve)
            pruned_at = t
        elif pruned_at is not None:
            action = choose(masks)  # wait out the episode
            assert task.stage[0, slot] == (
                Stage.EMPTY if t - pruned_at >= BLEND_STEPS[speed] else Stage.PRUNING
            )
            emptied |= t - pruned_at == BLEND_STEPS[speed]
        else:
            action = oracle(task, masks, task.right_blueprint())
        outcome = task.step(action)
        total += outcome.reward
        masks = outcome.masks
        assert masks.op is not None
    assert pruned_at is not None
    assert added > 0
    assert emptied
    shock = (1 - SPEED_FACTORS[speed] * CURVE_FACTORS[curve]) * added
    torch.testing.assert_close(total, torch.tensor([-shock]))


def test_unfossilized_seeds_are_discarded_at_the_end() -> None:
    """A policy that blends but never fossilizes ends every episode at 0."""
    task = SeedLifecycleTask(64, seed=0)

    def no_fossil(t: SeedLifecycleTask, masks: ActionMasks) -> dict[str, torch.Tensor]:
        action = oracle(t, masks, t.right_blueprint())
        action["op"] = torch.where(action["op"] == Op.FOSSILIZE, Op.WAIT, action["op"])
        action["slot"] = torch.where(action["op"] == Op.WAIT, 0, action["slot"])
        return action

    trace = play(task, no_fossil, CONFIG.episode_steps)
    rewards = torch.stack([reward for _, reward, _ in trace], dim=1)
    assert rewards[:, :-1].sum() > 0  # blending seeds helped along the way
    torch.testing.assert_close(rewards.sum(1), torch.zeros(64))


@pytest.mark.parametrize(
    ("action_change", "message"),
    [
        ({"op": None}, "action has no 'op' head"),
        ({"slot": torch.zeros(3, dtype=torch.long)}, r"action\['slot'\] must be \[4\], got \[3\]"),
        ({"tempo": torch.zeros(4, 1, dtype=torch.long)}, r"action\['tempo'\] must be \[4\]"),
        ({"style": torch.zeros(4)}, r"action\['style'\] must hold integers, got torch.float32"),
    ],
)
def test_step_refuses_a_malformed_action_and_keeps_working(
    action_change: Mapping[str, torch.Tensor | None], message: str
) -> None:
    task = SeedLifecycleTask(4, seed=0)
    _, masks = task.reset()
    good = choose(masks)
    bad: dict[str, torch.Tensor] = {}
    for head, value in {**good, **action_change}.items():
        if value is not None:
            bad[head] = value
    before = copy.deepcopy(task)
    with pytest.raises(ValueError, match=message):
        task.step(bad)
    assert torch.equal(task.t, before.t)
    assert torch.equal(task.step(good).features, before.step(good).features)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_cues": 1}, r"num_cues must be in \[2, 12\]"),
        ({"num_cues": 13}, r"num_cues must be in \[2, 12\]"),
        ({"cue_delay": (0, 3)}, "cue_delay must be 1 <= low <= high"),
        ({"cue_delay": (4, 3)}, "cue_delay must be 1 <= low <= high"),
        ({"episode_steps": 12}, "episode_steps=12 leaves no time"),
        ({"action_space": ActionSpace(op=5)}, "the task uses 6 op actions, the action space has 5"),
        ({"action_space": ActionSpace.tamiyo(slot=4)}, "the task has 1 to 3 slots"),
        ({"action_space": ActionSpace(alpha_curve=5)}, "the task uses 3 alpha_curve actions"),
        (
            {"wrong_blueprint_quality": 1.0},
            r"wrong_blueprint_quality must be in \[-1, 1\), got 1.0",
        ),
        ({"wrong_blueprint_quality": -2}, r"wrong_blueprint_quality must be in \[-1, 1\), got -2"),
    ],
)
def test_task_config_refuses_shapes_the_task_cannot_have(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        TaskConfig(**kwargs)  # type: ignore[arg-type]


def test_task_config_refuses_a_hierarchy_other_than_tamiyos() -> None:

    table = dict.fromkeys(("WAIT", "A", "B", "C", "D", "E"), ("slot",))
    space = ActionSpace(hierarchy=ActionHierarchy.from_table(table))
    with pytest.raises(ValueError, match="the task follows Tamiyo's table"):
        TaskConfig(action_space=space)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (0, ValueError, "num_envs must be at least 1, got 0"),
        (-1, ValueError, "num_envs must be at least 1, got -1"),
        (2.0, TypeError, r"num_envs must be an int, got float \(2.0\)"),
        (True, TypeError, r"num_envs must be an int, got bool \(True\)"),
    ],
)
def test_the_task_refuses_a_bad_number_of_environments(
    bad: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        SeedLifecycleTask(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("space", [ActionSpace.tamiyo(slot=1), ActionSpace(slot=1)])
def test_fewer_slots_and_cues_work_and_change_the_feature_width(space: ActionSpace) -> None:
    config = TaskConfig(num_cues=2, action_space=space)
    task = SeedLifecycleTask(32, config, seed=0)
    features, masks = task.reset()
    assert features.shape == (32, config.feature_dim) == (32, 2 + 2 + 9)
    slot = masks.slot_by_op if config.hierarchical else masks.slot
    assert slot is not None
    assert slot.shape[-1] == 1
    trace = play(task, lambda t, m: oracle(t, m, t.right_blueprint()), config.episode_steps)
    torch.testing.assert_close(total_return(trace), torch.full((32,), config.best_return))


def test_each_slot_shows_its_seeds_blueprint_until_the_slot_empties() -> None:
    """`blueprint_indices`: -1 exactly where a slot is empty, else the germinated blueprint.

    Random valid actions over two episodes germinate, prune, fossilize and discard.
    """
    task = SeedLifecycleTask(32, seed=0)
    policy = UniformPolicyBundle(CONFIG.feature_dim, action_space=CONFIG.action_space)
    features, masks = task.reset()
    assert bool((task.blueprint_indices() == -1).all())
    generator = torch.Generator().manual_seed(0)
    germinated = torch.full((32, CONFIG.num_slots), -1)
    pruned = 0
    for _ in range(2 * CONFIG.episode_steps):
        action = policy.get_action(features, masks, generator=generator).action
        outcome = task.step(action)
        shown = task.blueprint_indices()
        rows = torch.arange(32)
        acted = (action["op"] == Op.GERMINATE) & (
            task.stage[rows, action["slot"]] == Stage.TRAINING
        )
        germinated[rows[acted], action["slot"][acted]] = action["blueprint"][acted]
        pruned += int((task.stage == Stage.PRUNING).sum())
        empty = task.stage == Stage.EMPTY
        assert torch.equal(shown == -1, empty)
        germinated[empty] = -1
        assert torch.equal(shown, germinated)
        features, masks = outcome.features, outcome.masks
    assert pruned > 0  # prunes ran, and their slots emptied
    shown[0, 0] = 99  # a copy: the caller cannot change the task
    assert int(task.blueprint_indices()[0, 0]) != 99


def test_the_task_gives_a_bundle_the_extra_inputs_it_declares() -> None:
    task = SeedLifecycleTask(4, seed=0)
    assert task.extra_inputs(()) == {}
    spec = ExtraInput("blueprint_indices", "integer", (3,), low=0, high=13, sentinels=(-1,))
    given = task.extra_inputs((spec,))
    assert given["blueprint_indices"].shape == (4, 3)
    with pytest.raises(
        ValueError, match="provides the extra inputs blueprint_indices; the bundle also needs 'age'"
    ):
        task.extra_inputs((spec, ExtraInput("age", "floating")))
