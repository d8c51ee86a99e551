"""SeedLifecycleTask: seeded episodes, a cue shown once, masks that are exactly the rules."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import pytest
import torch

from esper.tamiyo.policy import HEAD_NAMES, ActionMasks, ActionSpace, UniformPolicyBundle
from esper.tamiyo.policy.demo import Op, SeedLifecycleTask, Stage, TaskConfig

CONFIG = TaskConfig()
CUE = slice(0, CONFIG.num_cues)  # the cue's columns of the features


def valid(masks: ActionMasks, head: str) -> torch.Tensor:
    """The task sets every head's mask."""
    mask = getattr(masks, head)
    assert isinstance(mask, torch.Tensor)
    return mask


def first_valid(
    masks: ActionMasks, *, force: bool = False, **wanted: int | torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each head's `wanted` action where the mask allows it (always if `force`).

    Elsewhere, the head's first valid action.
    """
    action: dict[str, torch.Tensor] = {}
    for head in HEAD_NAMES:
        mask = getattr(masks, head)  # [N, A]
        choice = mask.float().argmax(dim=1)  # [N]
        if head in wanted:
            want = torch.as_tensor(wanted[head]).expand_as(choice)
            allowed = mask.gather(1, want.unsqueeze(1)).squeeze(1) | force
            choice = torch.where(allowed, want, choice)
        action[head] = choice
    return action


def oracle(
    task: SeedLifecycleTask, masks: ActionMasks, blueprint: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Fossilize, else advance, else germinate `blueprint`, with the best settings."""
    op = torch.full_like(blueprint, Op.WAIT)
    for candidate in (Op.GERMINATE, Op.ADVANCE, Op.FOSSILIZE):  # the last allowed wins
        op = torch.where(valid(masks, "op")[:, candidate], candidate, op)
    return first_valid(
        masks, op=op, blueprint=blueprint, style=1, tempo=0, alpha_target=2, alpha_speed=3
    )


def play(
    task: SeedLifecycleTask, policy: object, steps: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run `policy(task, masks)`; returns (features, reward, done) of each step."""
    assert callable(policy)
    features, masks = task.reset()
    trace = []
    for _ in range(steps):
        outcome = task.step(policy(task, masks))
        trace.append((features, outcome.reward, outcome.done))
        features, masks = outcome.features, outcome.masks
    return trace


def test_the_cue_is_shown_at_step_zero_only_and_names_the_right_blueprint() -> None:
    task = SeedLifecycleTask(64, seed=3)
    features, masks = task.reset()
    cue = features[:, CUE]  # [N, K]
    assert torch.equal(cue.sum(1), torch.ones(64))
    assert torch.equal(cue.argmax(1) + 1, task.right_blueprint())
    for _ in range(CONFIG.episode_steps - 1):
        outcome = task.step(first_valid(masks))
        masks = outcome.masks
        assert not outcome.done.any()
        assert torch.all(outcome.features[:, CUE] == 0)
    last = task.step(first_valid(masks))
    assert last.done.all()
    assert torch.equal(last.features[:, CUE].sum(1), torch.ones(64))  # a new episode's cue


def test_the_same_seed_gives_the_same_episodes_and_another_seed_others() -> None:
    def episodes(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        task = SeedLifecycleTask(256, seed=seed)
        first = task.right_blueprint().clone()
        play(task, lambda t, m: first_valid(m), CONFIG.episode_steps)
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


def test_until_germination_opens_only_wait_is_offered_and_other_heads_have_one_choice() -> None:
    task = SeedLifecycleTask(128, seed=1)
    _, masks = task.reset()
    for _ in range(CONFIG.cue_delay[1]):
        closed = task.t < task.open_step  # [N]
        assert closed.any()
        for head in HEAD_NAMES:
            mask = getattr(masks, head)[closed]
            assert torch.equal(mask.sum(1), torch.ones(int(closed.sum()), dtype=torch.long))
            assert torch.all(mask[:, 0]), head
        opened = ~closed
        assert torch.all(valid(masks, "op")[opened, Op.GERMINATE])
        assert torch.equal(
            valid(masks, "blueprint")[opened].sum(1), torch.full_like(task.t[opened], 4)
        )
        masks = task.step(first_valid(masks)).masks


@pytest.mark.parametrize("seed", [0, 1])
def test_every_combination_of_valid_choices_is_legal_and_every_other_refused(seed: int) -> None:
    """The heads are sampled independently: masks must be a product of legal choices.

    From states reached by a uniform policy, every (slot, op) pair is tried in a copy
    of the task: the task accepts exactly the pairs the masks allow (its own rules
    refuse none of them), and each allowed pair obeys the rules as written here.
    """
    task = SeedLifecycleTask(256, seed=seed)
    policy = UniformPolicyBundle()
    generator = torch.Generator().manual_seed(seed)
    features, masks = task.reset()
    stages_seen: set[int] = set()
    for _ in range(2 * CONFIG.episode_steps):
        stages_seen.update(task.stage.flatten().tolist())
        for slot in range(CONFIG.num_slots):
            for op in Op:
                trial = copy.deepcopy(task)
                outcome = trial.step(first_valid(masks, force=True, slot=slot, op=op))
                allowed = valid(masks, "slot")[:, slot] & valid(masks, "op")[:, op]
                refused = outcome.episodes.invalid_actions - task.invalid_actions  # [N]
                assert torch.equal(refused, (~allowed).long()), (slot, op.name)
                assert bool((~allowed | rule(task, slot, op)).all()), (slot, op.name)
        step = policy.get_action(features, masks, generator=generator)
        outcome = task.step(step.action)
        features, masks = outcome.features, outcome.masks
    assert stages_seen == {int(stage) for stage in Stage}


def rule(task: SeedLifecycleTask, slot: int, op: Op) -> torch.Tensor:
    """`[N]` whether the task's rules, as the issue states them, allow `op` on `slot`."""
    stage, timer = task.stage[:, slot], task.timer[:, slot]
    is_open = task.t >= task.open_step
    live = (stage == Stage.TRAINING) | (stage == Stage.BLENDING) | (stage == Stage.HOLDING)
    return {
        Op.WAIT: torch.ones_like(is_open),
        Op.GERMINATE: (stage == Stage.EMPTY) & is_open,  # no germinating an occupied slot
        Op.ADVANCE: (stage == Stage.TRAINING) & (timer == 0),  # trained seeds only
        Op.SET_ALPHA_TARGET: stage == Stage.BLENDING,
        Op.FOSSILIZE: stage == Stage.HOLDING,  # only once blended and evaluated
        Op.PRUNE: live,
    }[op]


@pytest.mark.parametrize(
    "forced",
    [
        {"op": Op.GERMINATE},  # germination is not open yet
        {"style": 99},  # out of range
        {"slot": -1},
        {"op": len(Op)},
    ],
)
def test_a_refused_action_is_counted_and_taken_as_wait(forced: dict[str, int]) -> None:
    task = SeedLifecycleTask(8, seed=0)
    _, masks = task.reset()
    waited, refused = copy.deepcopy(task), copy.deepcopy(task)
    expected = waited.step(first_valid(masks))
    action = first_valid(masks)
    for head, value in forced.items():
        action[head][:3] = value  # rows 0-2 refused, the others valid
    result = refused.step(action)
    assert result.episodes.invalid_actions.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert torch.equal(result.features, expected.features)
    assert torch.equal(refused.stage, waited.stage)


def test_an_oracle_that_reads_the_cue_earns_the_best_return_every_episode() -> None:
    task = SeedLifecycleTask(512, seed=2)
    trace = play(task, lambda t, m: oracle(t, m, t.right_blueprint()), CONFIG.episode_steps)
    rewards = torch.stack([reward for _, reward, _ in trace], dim=1)  # [N, T]
    assert CONFIG.best_return == pytest.approx(3.0)
    torch.testing.assert_close(rewards.sum(1), torch.full((512,), CONFIG.best_return))
    outcome_done = trace[-1][2]
    assert outcome_done.all()


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


def test_a_pruned_seed_gives_back_what_it_added() -> None:
    task = SeedLifecycleTask(1, seed=0)
    _, masks = task.reset()
    total = torch.zeros(1)
    pruned = False
    for _ in range(CONFIG.episode_steps):
        if bool(valid(masks, "op")[0, Op.PRUNE]) and float(task.alpha.sum()) > 0:
            action = first_valid(masks, op=Op.PRUNE)
            pruned = True
        elif pruned:
            action = first_valid(masks)  # wait out the episode
        else:
            action = oracle(task, masks, task.right_blueprint())
        outcome = task.step(action)
        total += outcome.reward
        masks = outcome.masks
    assert pruned
    torch.testing.assert_close(total, torch.zeros(1))


def test_unfossilized_seeds_are_discarded_at_the_end() -> None:
    """A policy that blends but never fossilizes ends every episode at 0."""
    task = SeedLifecycleTask(64, seed=0)

    def no_fossil(t: SeedLifecycleTask, masks: ActionMasks) -> dict[str, torch.Tensor]:
        action = oracle(t, masks, t.right_blueprint())
        fossilize = action["op"] == Op.FOSSILIZE
        action["op"] = torch.where(fossilize, Op.WAIT, action["op"])
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
    good = first_valid(masks)
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
        ({"episode_steps": 8}, "episode_steps=8 leaves no time"),
        ({"action_space": ActionSpace(op=5)}, "the task uses 6 op actions, the action space has 5"),
        ({"action_space": ActionSpace(slot=4)}, "the task has 1 to 3 slots"),
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


def test_fewer_slots_and_cues_work_and_change_the_feature_width() -> None:
    config = TaskConfig(num_cues=2, action_space=ActionSpace(slot=1))
    task = SeedLifecycleTask(32, config, seed=0)
    features, masks = task.reset()
    assert features.shape == (32, config.feature_dim) == (32, 2 + 2 + 8)
    assert valid(masks, "slot").shape == (32, 1)
    trace = play(task, lambda t, m: oracle(t, m, t.right_blueprint()), config.episode_steps)
    rewards = torch.stack([reward for _, reward, _ in trace], dim=1)
    torch.testing.assert_close(rewards.sum(1), torch.full((32,), config.best_return))
