"""A compact recurrent, masked PPO: the reference user of the `PolicyBundle` API.

It touches a bundle only through its public methods, and shows how training code is
meant to call them:

* rollouts call `get_action(features, masks, hidden, episode_start=...)` step by step,
  threading the hidden state and flagging the steps where an episode starts;
* each rollout stores the hidden state it started from (`initial_hidden` at first);
* updates call `evaluate_actions` on whole stored sequences, from that stored state,
  with the same masks and `episode_start` flags, so the log-probabilities equal the
  rollout's before the first gradient step (`UpdateStats.first_ratio_error` shows it);
* optimizers see `bundle.network.parameters()`.

The algorithm is PPO with the clipped objective, GAE(λ), a value loss and an entropy
bonus (Schulman et al., 2017), batched over environments: a minibatch is a set of
environment rows with all their steps, so the recurrence runs over real sequences.
A joint action's log-probability is the sum over the heads, and the entropy bonus is
the sum of the heads' normalized entropies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from esper.tamiyo.policy import HEAD_NAMES, ActionMasks, HiddenState, PolicyBundle
from esper.tamiyo.policy.demo.task import EpisodeStats, SeedLifecycleTask, TaskConfig
from esper.tamiyo.policy.validation import check_positive_int

__all__ = [
    "IterationStats",
    "PPOConfig",
    "PPOTrainer",
    "Rollout",
    "UpdateStats",
    "gae",
    "train_policy",
]


@dataclass(frozen=True, slots=True)
class PPOConfig:
    """PPO settings. The defaults train the demo's LSTM in about 15 s on 2 CPU cores.

    Attributes:
        rollout_steps: Steps per rollout, `T`; each update trains on `[N, T]`.
        learning_rate: Adam's step size.
        anneal_lr: Decay the step size linearly to 0 over each `train` call, which
            keeps the end of training stable. Each call starts the decay again: to
            train in chunks, turn it off or anneal the optimizer's step size yourself.
        gamma: Discount.
        gae_lambda: GAE's λ.
        clip: PPO's clip range ε on the probability ratio.
        value_coef: Weight of the value loss.
        entropy_coef: Weight of the entropy bonus (normalized entropies, summed
            over heads).
        epochs: Passes over each rollout.
        minibatches: Minibatches per pass; each is `N / minibatches` whole rows.
        max_grad_norm: Gradients are clipped to this global norm.
    """

    rollout_steps: int = 16
    learning_rate: float = 1e-3
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    epochs: int = 4
    minibatches: int = 4
    max_grad_norm: float = 0.5

    def __post_init__(self) -> None:
        for name in ("rollout_steps", "epochs", "minibatches"):
            check_positive_int(getattr(self, name), name, "PPOConfig")
        for name, low, high, open_low in (
            ("learning_rate", 0.0, math.inf, True),
            ("gamma", 0.0, 1.0, False),
            ("gae_lambda", 0.0, 1.0, False),
            ("clip", 0.0, math.inf, True),
            ("value_coef", 0.0, math.inf, False),
            ("entropy_coef", 0.0, math.inf, False),
            ("max_grad_norm", 0.0, math.inf, True),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"PPOConfig: {name} must be a number, got {value!r}")
            if not (low < value if open_low else low <= value) or not value <= high:
                bracket = "(" if open_low else "["
                raise ValueError(
                    f"PPOConfig: {name} must be in {bracket}{low}, {high}], got {value}"
                )


@dataclass(frozen=True, slots=True, eq=False)
class Rollout:
    """One rollout of `N` environments over `T` steps, as the update needs it.

    Attributes:
        features: `[N, T, F]`.
        masks: `[N, T, A_h]` per head.
        actions: Head name to `[N, T]` int64.
        log_prob: `[N, T]` joint log-probability (summed over heads) at collection.
        value: `[N, T]` values at collection.
        reward: `[N, T]`.
        done: `[N, T]` bool, the episode ended with that step.
        episode_start: `[N, T]` bool, the flags `get_action` was given.
        hidden: The state the rollout started from (`None` when stateless).
        last_value: `[N]` value of the state after the last step, to bootstrap.
    """

    features: torch.Tensor
    masks: ActionMasks
    actions: dict[str, torch.Tensor]
    log_prob: torch.Tensor
    value: torch.Tensor
    reward: torch.Tensor
    done: torch.Tensor
    episode_start: torch.Tensor
    hidden: HiddenState | None
    last_value: torch.Tensor


@dataclass(frozen=True, slots=True)
class UpdateStats:
    """Averages over one update's minibatches.

    Attributes:
        policy_loss: The clipped surrogate loss.
        value_loss: Mean squared error of the values against the returns.
        entropy: Mean summed normalized entropy over the heads.
        approx_kl: Mean of `(ratio - 1) - log(ratio)`, an estimate of KL(old, new).
        clip_fraction: Share of steps whose ratio was clipped.
        first_ratio_error: Largest `|ratio - 1|` in the first minibatch, before any
            gradient step: how far `evaluate_actions` is from what `get_action`
            returned (float rounding only).
    """

    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    clip_fraction: float
    first_ratio_error: float


@dataclass(frozen=True, slots=True)
class IterationStats:
    """What one iteration (a rollout and an update) did.

    Attributes:
        iteration: 1-based count.
        env_steps: Environment steps taken so far, all environments together.
        episodes: Episodes that ended in this rollout.
        mean_return: Their mean return (NaN when none ended).
        success_rate: Their share of memory decisions taken right (NaN when none).
        invalid_actions: Actions the task refused in those episodes.
        update: The update's statistics.
    """

    iteration: int
    env_steps: int
    episodes: int
    mean_return: float
    success_rate: float
    invalid_actions: int
    update: UpdateStats


@dataclass(slots=True)
class _RolloutState:
    """Where the next rollout continues from."""

    features: torch.Tensor
    masks: ActionMasks
    hidden: HiddenState | None
    episode_start: torch.Tensor


@dataclass(slots=True)
class _EpisodeTotals:
    """Sums over the episodes that ended in a rollout."""

    count: int = 0
    returns: float = 0.0
    successes: int = 0
    invalid: int = 0

    def add(self, episodes: EpisodeStats) -> None:
        """Count the episodes that ended at one step."""
        done = episodes.done  # [N]
        self.count += int(done.sum())
        self.returns += float(episodes.episode_return[done].sum())
        self.successes += int(episodes.success[done].sum())
        self.invalid += int(episodes.invalid_actions[done].sum())


class PPOTrainer:
    """Trains a bundle on a `SeedLifecycleTask` with PPO.

    Example:
        >>> from esper.tamiyo.policy import MLPPolicyBundle
        >>> task = SeedLifecycleTask(num_envs=8, seed=0)
        >>> bundle = MLPPolicyBundle(task.config.feature_dim, hidden_dim=16)
        >>> trainer = PPOTrainer(bundle, task, PPOConfig(minibatches=2), seed=0)
        >>> stats = trainer.iterate()
        >>> stats.env_steps, stats.update.first_ratio_error < 1e-4
        (128, True)

    Args:
        bundle: The policy to train, on the task's device.
        task: The environments; the trainer resets them.
        config: PPO settings.
        seed: Seeds the action sampling.
    """

    def __init__(
        self,
        bundle: PolicyBundle,
        task: SeedLifecycleTask,
        config: PPOConfig = PPOConfig(),
        *,
        seed: int = 0,
    ) -> None:
        if task.num_envs % config.minibatches != 0:
            raise ValueError(
                f"PPOTrainer: {task.num_envs} environments do not split into "
                f"{config.minibatches} minibatches of whole rows; pick num_envs divisible "
                f"by minibatches"
            )
        if task.num_envs // config.minibatches * config.rollout_steps < 2:
            raise ValueError(
                "PPOTrainer: a minibatch would hold a single step, whose advantage cannot "
                "be normalized; use more environments or rollout steps, or fewer minibatches"
            )
        self.bundle = bundle
        self.task = task
        self.config = config
        self.optimizer = torch.optim.Adam(
            bundle.network.parameters(), lr=config.learning_rate, eps=1e-5
        )
        self.iteration = 0
        self.env_steps = 0
        self._generator = torch.Generator(device=task.device).manual_seed(seed)
        features, masks = task.reset()
        self._state = _RolloutState(
            features=features,
            masks=masks,
            hidden=bundle.initial_hidden(task.num_envs),
            episode_start=torch.ones(task.num_envs, dtype=torch.bool, device=task.device),
        )

    @property
    def steps_per_iteration(self) -> int:
        """Environment steps in one rollout, all environments together: `N * T`."""
        return self.task.num_envs * self.config.rollout_steps

    def train(
        self, env_steps: int, on_iteration: Callable[[IterationStats], None] | None = None
    ) -> list[IterationStats]:
        """Run iterations until `env_steps` more environment steps have been taken.

        Args:
            env_steps: Environment steps to take, all environments together; rounded
                up to whole rollouts.
            on_iteration: Called after each iteration (progress bars, logging).

        Returns:
            Each iteration's statistics.
        """
        history: list[IterationStats] = []
        start, target = self.env_steps, self.env_steps + env_steps
        while self.env_steps < target:
            if self.config.anneal_lr:
                remaining = 1 - (self.env_steps - start) / env_steps
                for group in self.optimizer.param_groups:
                    group["lr"] = self.config.learning_rate * remaining
            stats = self.iterate()
            history.append(stats)
            if on_iteration is not None:
                on_iteration(stats)
        return history

    def iterate(self) -> IterationStats:
        """Collect one rollout and update the policy on it."""
        self.bundle.network.train()
        rollout, totals = self.collect()
        update = self.update(rollout)
        self.iteration += 1
        self.env_steps += rollout.reward.numel()
        nan = float("nan")
        return IterationStats(
            iteration=self.iteration,
            env_steps=self.env_steps,
            episodes=totals.count,
            mean_return=totals.returns / totals.count if totals.count else nan,
            success_rate=totals.successes / totals.count if totals.count else nan,
            invalid_actions=totals.invalid,
            update=update,
        )

    def collect(self) -> tuple[Rollout, _EpisodeTotals]:
        """Run `rollout_steps` steps of every environment with the current policy.

        Returns:
            The rollout, and the totals of the episodes that ended in it.
        """
        state, bundle, task = self._state, self.bundle, self.task
        start_hidden = state.hidden
        columns: dict[str, list[torch.Tensor]] = {
            key: [] for key in ("features", "log_prob", "value", "reward", "done", "start")
        }
        masks: list[ActionMasks] = []
        actions: list[dict[str, torch.Tensor]] = []
        totals = _EpisodeTotals()
        for _ in range(self.config.rollout_steps):
            result = bundle.get_action(
                state.features,
                state.masks,
                state.hidden,
                episode_start=state.episode_start,
                generator=self._generator,
            )
            outcome = task.step(result.action)
            columns["features"].append(state.features)  # [N, F]
            columns["log_prob"].append(_joint(result.log_prob))  # [N]
            columns["value"].append(result.value)
            columns["reward"].append(outcome.reward)
            columns["done"].append(outcome.done)
            columns["start"].append(state.episode_start)
            masks.append(state.masks)
            actions.append(result.action)
            totals.add(outcome.episodes)
            state.features, state.masks = outcome.features, outcome.masks
            state.hidden, state.episode_start = result.hidden, outcome.done
        last_value = bundle.get_value(
            state.features, state.hidden, episode_start=state.episode_start
        )  # [N]
        stacked = {key: torch.stack(column, dim=1) for key, column in columns.items()}
        rollout = Rollout(
            features=stacked["features"],  # [N, T, F]
            masks=ActionMasks.stack(masks),  # [N, T, A_h]
            actions={h: torch.stack([a[h] for a in actions], dim=1) for h in HEAD_NAMES},
            log_prob=stacked["log_prob"],  # [N, T]
            value=stacked["value"],
            reward=stacked["reward"],
            done=stacked["done"],
            episode_start=stacked["start"],
            hidden=start_hidden,
            last_value=last_value,
        )
        return rollout, totals

    def update(self, rollout: Rollout) -> UpdateStats:
        """Run `epochs` passes of clipped PPO over the rollout, in minibatches of rows."""
        cfg = self.config
        advantages = gae(
            rollout.reward, rollout.value, rollout.done, rollout.last_value, cfg.gamma,
            cfg.gae_lambda,
        )  # fmt: skip
        returns = advantages + rollout.value  # [N, T]
        n = rollout.reward.shape[0]
        rows_per_batch = n // cfg.minibatches
        sums = torch.zeros(5)
        first_ratio_error: float | None = None
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=self._generator, device=rollout.reward.device)
            for rows in torch.split(order, rows_per_batch):
                losses, ratio = self._minibatch_loss(rollout, rows, advantages, returns)
                if first_ratio_error is None:  # before any gradient step
                    first_ratio_error = float((ratio - 1).abs().max())
                self.optimizer.zero_grad(set_to_none=True)
                total = losses[0] + cfg.value_coef * losses[1] - cfg.entropy_coef * losses[2]
                total.backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(self.bundle.network.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                sums += torch.stack(losses).detach().cpu()
        means = (sums / (cfg.epochs * cfg.minibatches)).tolist()
        assert first_ratio_error is not None  # epochs and minibatches are at least 1
        policy_loss, value_loss, entropy, approx_kl, clip_fraction = means
        return UpdateStats(
            policy_loss, value_loss, entropy, approx_kl, clip_fraction, first_ratio_error
        )

    def _minibatch_loss(
        self,
        rollout: Rollout,
        rows: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """PPO's losses on the rollout's `rows`, each over all `T` steps.

        Returns:
            `[policy loss, value loss, entropy, approx KL, clip fraction]` and the
            `[n, T]` probability ratios.
        """
        cfg = self.config
        hidden = None if rollout.hidden is None else tuple(h[:, rows] for h in rollout.hidden)
        result = self.bundle.evaluate_actions(
            rollout.features[rows],
            {h: a[rows] for h, a in rollout.actions.items()},
            _select_rows(rollout.masks, rows),
            hidden,
            episode_start=rollout.episode_start[rows],
        )
        log_prob = _joint(result.log_prob)  # [n, T]
        entropy = _joint(result.entropy)  # [n, T]
        log_ratio = log_prob - rollout.log_prob[rows]
        ratio = log_ratio.exp()  # [n, T]
        adv = advantages[rows]
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv).mean()
        value_loss = (result.value - returns[rows]).pow(2).mean()
        with torch.no_grad():
            approx_kl = ((ratio - 1) - log_ratio).mean()
            clipped = ((ratio - 1).abs() > cfg.clip).float().mean()
        return [policy_loss, value_loss, entropy.mean(), approx_kl, clipped], ratio.detach()


def train_policy(
    bundle: PolicyBundle,
    env_steps: int,
    *,
    num_envs: int = 64,
    seed: int = 0,
    config: PPOConfig = PPOConfig(),
    task_config: TaskConfig = TaskConfig(),
    on_iteration: Callable[[IterationStats], None] | None = None,
) -> list[IterationStats]:
    """Train `bundle` on `SeedLifecycleTask` with the demo's recipe.

    `esper-policy demo` trains its LSTM and MLP with this. Build the bundle right
    after `torch.manual_seed(seed)` and the whole run repeats exactly (same machine,
    same thread count).

    Example:
        >>> from esper.tamiyo.policy import MLPPolicyBundle
        >>> _ = torch.manual_seed(0)
        >>> bundle = MLPPolicyBundle(TaskConfig().feature_dim, hidden_dim=16)
        >>> history = train_policy(bundle, env_steps=2048, num_envs=8)
        >>> len(history), history[-1].env_steps
        (16, 2048)

    Args:
        bundle: The policy, built for `task_config.feature_dim` features; the task
            runs on its device.
        env_steps: Environment steps, all environments together, rounded up to whole
            rollouts of `num_envs * config.rollout_steps`. 120,000 in the demo: the
            LSTM first reaches 90% success after about 35,000.
        num_envs: Environments stepped together.
        seed: Seeds the episodes and the action sampling.
        config: PPO settings.
        task_config: The task's shape.
        on_iteration: Called after each iteration.

    Returns:
        Each iteration's statistics.
    """
    task = SeedLifecycleTask(num_envs, task_config, seed=seed, device=bundle.device)
    return PPOTrainer(bundle, task, config, seed=seed).train(env_steps, on_iteration)


def gae(
    reward: torch.Tensor,
    value: torch.Tensor,
    done: torch.Tensor,
    last_value: torch.Tensor,
    gamma: float,
    lam: float,
) -> torch.Tensor:
    """Generalized advantage estimates over `[N, T]` steps.

    Args:
        reward: `[N, T]`.
        value: `[N, T]` values of the states the actions were taken in.
        done: `[N, T]` bool: the episode ended with that step (no bootstrap across it).
        last_value: `[N]` value of the state after step `T - 1`.
        gamma: Discount.
        lam: GAE's λ.

    Returns:
        `[N, T]` advantages.
    """
    advantages = torch.zeros_like(reward)
    next_value, running = last_value, torch.zeros_like(last_value)
    alive = (~done).to(reward.dtype)  # [N, T]
    for t in reversed(range(reward.shape[1])):
        delta = reward[:, t] + gamma * next_value * alive[:, t] - value[:, t]
        running = delta + gamma * lam * alive[:, t] * running
        advantages[:, t] = running
        next_value = value[:, t]
    return advantages


def _joint(per_head: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the heads, `[N, ...]`.

    Of log-probabilities, the joint action's: the heads are independent. Of normalized
    entropies, the bonus `entropy_coef` weighs (each head counts up to 1).
    """
    return torch.stack([per_head[h] for h in HEAD_NAMES]).sum(dim=0)


def _select_rows(masks: ActionMasks, rows: torch.Tensor) -> ActionMasks:
    """The masks of the environments `rows`."""
    return ActionMasks.from_mapping(
        {head: None if mask is None else mask[rows] for head, mask in masks.as_dict().items()}
    )
