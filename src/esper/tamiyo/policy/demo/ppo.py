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

The action is eight heads, and under a hierarchical space most of them matter only for
some ops. `evaluate_actions` says, per head and step, whether the head mattered for
the op taken (`relevance`) and whether some op offered at that step uses it
(`availability`); the trainer uses both, as esper-lite's PPO does:

* the policy loss is clipped per head (`PPOConfig.surrogate = "per_head"`): each head's
  ratio is clipped on its own, and its surrogate averaged over the steps where the
  head was relevant, so a head gets no gradient from a step whose op ignored it, and
  a head the policy rarely uses is not diluted by the steps it had no part in.
  `"joint"` clips the joint ratio instead (irrelevant heads' log-probabilities are 0,
  so it ignores them too); the ADR records both;
* the entropy bonus sums, over the heads, each head's normalized entropy averaged
  over the steps where it was available, so a head keeps exploring while its op is an
  option, whether or not the op was taken.

In a flat space every head is relevant and available at every step: the entropy bonus
is then the textbook sum, and the per-head surrogate is the factorized one (a sum of
each head's clipped term, as esper-lite uses), which equals PPO's clipped joint
objective to first order; `"joint"` is the textbook objective itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

import torch

from esper.tamiyo.policy import HEAD_NAMES, ActionMasks, HiddenState, PolicyBundle
from esper.tamiyo.policy.demo.task import EpisodeStats, SeedLifecycleTask, TaskConfig
from esper.tamiyo.policy.validation import check_positive_int

__all__ = [
    "IterationStats",
    "PPOConfig",
    "PPOTrainer",
    "Rollout",
    "TensorBoardScalars",
    "UpdateStats",
    "gae",
    "train_policy",
]


@dataclass(frozen=True, slots=True)
class PPOConfig:
    """PPO settings, the demo's recipe (ADR 0005).

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
        entropy_coef: Weight of the entropy bonus: each head's normalized entropy
            averaged over the steps where the head was available, summed over heads.
        epochs: Passes over each rollout.
        minibatches: Minibatches per pass; each is `N / minibatches` whole rows.
        max_grad_norm: Gradients are clipped to this global norm.
        surrogate: `"per_head"`: each head's ratio clipped on its own, its surrogate
            averaged over the steps where it was relevant, the heads' summed.
            `"joint"`: one clipped surrogate on the joint ratio, averaged over steps.
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
    surrogate: Literal["per_head", "joint"] = "per_head"

    def __post_init__(self) -> None:
        if self.surrogate not in ("per_head", "joint"):
            raise ValueError(
                f"PPOConfig: surrogate must be 'per_head' or 'joint', got {self.surrogate!r}"
            )
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
        log_prob: Head name to `[N, T]` log-probabilities at collection (0 where the
            op taken ignores the head); their sum is the joint log-probability.
        value: `[N, T]` values at collection.
        reward: `[N, T]`.
        done: `[N, T]` bool, the episode ended with that step.
        episode_start: `[N, T]` bool, the flags `get_action` was given.
        hidden: The state the rollout started from (`None` when stateless).
        last_value: `[N]` value of the state after the last step, to bootstrap.
        extras: The bundle's extra inputs, name to `[N, T, ...]` (empty without any).
    """

    features: torch.Tensor
    masks: ActionMasks
    actions: dict[str, torch.Tensor]
    log_prob: dict[str, torch.Tensor]
    value: torch.Tensor
    reward: torch.Tensor
    done: torch.Tensor
    episode_start: torch.Tensor
    hidden: HiddenState | None
    last_value: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UpdateStats:
    """Averages over one update's minibatches.

    Attributes:
        policy_loss: The clipped surrogate loss.
        value_loss: Mean squared error of the values against the returns.
        entropy: The entropy bonus: the heads' availability-masked mean normalized
            entropies, summed (each head up to 1).
        approx_kl: Mean of `(ratio - 1) - log(ratio)` of the joint ratio, an estimate
            of KL(old, new).
        clip_fraction: Share of ratios the loss clipped: of (step, relevant head)
            pairs with the per-head surrogate, of steps with the joint one.
        first_ratio_error: Largest `|ratio - 1|`, per head or joint, in the first
            minibatch, before any gradient step: how far `evaluate_actions` is from
            what `get_action` returned (float rounding only).
        head_entropy: Head name to its normalized entropy, averaged over the steps
            where it was available.
        relevance_rate: Head name to the share of steps where it mattered for the op
            taken (1 for `op`, and for every head in a flat space).
    """

    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    clip_fraction: float
    first_ratio_error: float
    head_entropy: dict[str, float]
    relevance_rate: dict[str, float]


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
        illegal_combinations: Op and slot pairs that did not go together in those
            episodes (a flat space's union masks allow them; always 0 otherwise).
        update: The update's statistics.
    """

    iteration: int
    env_steps: int
    episodes: int
    mean_return: float
    success_rate: float
    invalid_actions: int
    illegal_combinations: int
    update: UpdateStats


@dataclass(slots=True)
class _RolloutState:
    """Where the next rollout continues from."""

    features: torch.Tensor
    masks: ActionMasks
    hidden: HiddenState | None
    episode_start: torch.Tensor
    extras: dict[str, torch.Tensor]


@dataclass(slots=True)
class _EpisodeTotals:
    """Sums over the episodes that ended in a rollout."""

    count: int = 0
    returns: float = 0.0
    successes: int = 0
    invalid: int = 0
    illegal: int = 0

    def add(self, episodes: EpisodeStats) -> None:
        """Count the episodes that ended at one step."""
        done = episodes.done  # [N]
        self.count += int(done.sum())
        self.returns += float(episodes.episode_return[done].sum())
        self.successes += int(episodes.success[done].sum())
        self.invalid += int(episodes.invalid_actions[done].sum())
        self.illegal += int(episodes.illegal_combinations[done].sum())


class PPOTrainer:
    """Trains a bundle on a `SeedLifecycleTask` with PPO.

    Example:
        >>> from esper.tamiyo.policy import MLPPolicyBundle
        >>> task = SeedLifecycleTask(num_envs=8, seed=0)
        >>> space = task.config.action_space  # Tamiyo's: ActionSpace.tamiyo()
        >>> bundle = MLPPolicyBundle(task.config.feature_dim, hidden_dim=16, action_space=space)
        >>> trainer = PPOTrainer(bundle, task, PPOConfig(minibatches=2), seed=0)
        >>> stats = trainer.iterate()
        >>> stats.env_steps, stats.update.first_ratio_error < 1e-4
        (128, True)

    Args:
        bundle: The policy to train, on the task's device, with the task's action
            space (`task.config.action_space`).
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
        if bundle.action_space != task.config.action_space:
            raise ValueError(
                f"PPOTrainer: the bundle's action space {bundle.action_space} is not the "
                f"task's {task.config.action_space}; build the task with "
                "TaskConfig(action_space=bundle.action_space)"
            )
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
            extras=task.extra_inputs(bundle.extra_inputs),
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
            illegal_combinations=totals.illegal,
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
            key: [] for key in ("features", "value", "reward", "done", "start")
        }
        masks: list[ActionMasks] = []
        extras: list[dict[str, torch.Tensor]] = []
        actions: list[dict[str, torch.Tensor]] = []
        log_probs: list[dict[str, torch.Tensor]] = []
        totals = _EpisodeTotals()
        for _ in range(self.config.rollout_steps):
            result = bundle.get_action(
                state.features,
                state.masks,
                state.hidden,
                episode_start=state.episode_start,
                generator=self._generator,
                extras=state.extras,
            )
            outcome = task.step(result.action)
            columns["features"].append(state.features)  # [N, F]
            columns["value"].append(result.value)
            columns["reward"].append(outcome.reward)
            columns["done"].append(outcome.done)
            columns["start"].append(state.episode_start)
            masks.append(state.masks)
            extras.append(state.extras)
            actions.append(result.action)
            log_probs.append(result.log_prob)
            totals.add(outcome.episodes)
            state.features, state.masks = outcome.features, outcome.masks
            state.hidden, state.episode_start = result.hidden, outcome.done
            state.extras = task.extra_inputs(bundle.extra_inputs)
        last_value = bundle.get_value(
            state.features, state.hidden, episode_start=state.episode_start, extras=state.extras
        )  # [N]
        stacked = {key: torch.stack(column, dim=1) for key, column in columns.items()}
        rollout = Rollout(
            features=stacked["features"],  # [N, T, F]
            masks=ActionMasks.stack(masks),  # [N, T, A_h], per op [N, T, N_op, A_h]
            actions={h: torch.stack([a[h] for a in actions], dim=1) for h in HEAD_NAMES},
            log_prob={h: torch.stack([lp[h] for lp in log_probs], dim=1) for h in HEAD_NAMES},
            value=stacked["value"],
            reward=stacked["reward"],
            done=stacked["done"],
            episode_start=stacked["start"],
            hidden=start_hidden,
            last_value=last_value,
            extras={name: torch.stack([e[name] for e in extras], dim=1) for name in state.extras},
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
        heads = len(HEAD_NAMES)
        sums = torch.zeros(5 + 2 * heads)
        first_ratio_error: float | None = None
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=self._generator, device=rollout.reward.device)
            for rows in torch.split(order, rows_per_batch):
                losses, ratio_error = self._minibatch_loss(rollout, rows, advantages, returns)
                if first_ratio_error is None:  # before any gradient step
                    first_ratio_error = float(ratio_error)
                self.optimizer.zero_grad(set_to_none=True)
                total = losses[0] + cfg.value_coef * losses[1] - cfg.entropy_coef * losses[2]
                total.backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(self.bundle.network.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                sums += torch.cat([loss.detach().reshape(-1) for loss in losses]).cpu()
        means = (sums / (cfg.epochs * cfg.minibatches)).tolist()
        assert first_ratio_error is not None  # epochs and minibatches are at least 1
        policy_loss, value_loss, entropy, approx_kl, clip_fraction = means[:5]
        return UpdateStats(
            policy_loss,
            value_loss,
            entropy,
            approx_kl,
            clip_fraction,
            first_ratio_error,
            head_entropy=dict(zip(HEAD_NAMES, means[5 : 5 + heads], strict=True)),
            relevance_rate=dict(zip(HEAD_NAMES, means[5 + heads :], strict=True)),
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
            `[policy loss, value loss, entropy bonus, approx KL, clip fraction, [H]
            per-head entropies, [H] per-head relevance rates]`, and the largest
            `|ratio - 1|`, per head or joint.
        """
        cfg = self.config
        hidden = None if rollout.hidden is None else tuple(h[:, rows] for h in rollout.hidden)
        result = self.bundle.evaluate_actions(
            rollout.features[rows],
            {h: a[rows] for h, a in rollout.actions.items()},
            _select_rows(rollout.masks, rows),
            hidden,
            episode_start=rollout.episode_start[rows],
            extras={name: value[rows] for name, value in rollout.extras.items()},
        )
        log_ratio = {h: result.log_prob[h] - rollout.log_prob[h][rows] for h in HEAD_NAMES}
        relevant = torch.stack([result.relevance[h] for h in HEAD_NAMES])  # [H, n, T] bool
        available = torch.stack([result.availability[h] for h in HEAD_NAMES])
        head_log_ratio = torch.stack([log_ratio[h] for h in HEAD_NAMES])  # [H, n, T]
        head_ratio = head_log_ratio.exp()
        joint_log_ratio = head_log_ratio.sum(dim=0)  # [n, T]: irrelevant heads add 0
        joint_ratio = joint_log_ratio.exp()
        adv = advantages[rows]
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)  # [n, T]
        low, high = 1 - cfg.clip, 1 + cfg.clip
        if cfg.surrogate == "per_head":
            surrogate = torch.min(head_ratio * adv, head_ratio.clamp(low, high) * adv)
            policy_loss = -_masked_mean(surrogate, relevant).sum()
            with torch.no_grad():
                clipped = ((head_ratio - 1).abs() > cfg.clip) & relevant
                clip_fraction = clipped.sum() / relevant.sum().clamp(min=1)
        else:
            surrogate = torch.min(joint_ratio * adv, joint_ratio.clamp(low, high) * adv)
            policy_loss = -surrogate.mean()
            with torch.no_grad():
                clip_fraction = ((joint_ratio - 1).abs() > cfg.clip).float().mean()
        entropy = torch.stack([result.entropy[h] for h in HEAD_NAMES])  # [H, n, T]
        head_entropy = _masked_mean(entropy, available)  # [H]
        value_loss = (result.value - returns[rows]).pow(2).mean()
        with torch.no_grad():
            approx_kl = ((joint_ratio - 1) - joint_log_ratio).mean()
            ratio_error = torch.max((head_ratio - 1).abs().max(), (joint_ratio - 1).abs().max())
            relevance_rate = relevant.flatten(1).float().mean(dim=1)  # [H]
        losses = [
            policy_loss,
            value_loss,
            head_entropy.sum(),
            approx_kl,
            clip_fraction,
            head_entropy.detach(),
            relevance_rate,
        ]
        return losses, ratio_error


class TensorBoardScalars:
    """Writes each iteration's statistics as TensorBoard scalars: an `on_iteration` callback.

    Needs the `tensorboard` package (the `demo` extra); it is imported only when one
    of these is made. Scalars, at `env_steps`: `return` and `success` (when an episode
    ended), `approx_kl`, `clip_fraction`, `policy_loss`, `value_loss`, `entropy`
    (the bonus), and per head `entropy/<head>` and `relevance/<head>`.

    Example:
        >>> import tempfile
        >>> from esper.tamiyo.policy import MLPPolicyBundle
        >>> _ = torch.manual_seed(0)
        >>> bundle = MLPPolicyBundle(TaskConfig().feature_dim, hidden_dim=16,
        ...                          action_space=TaskConfig().action_space)
        >>> with tempfile.TemporaryDirectory() as folder, TensorBoardScalars(folder) as log:
        ...     _ = train_policy(bundle, env_steps=256, num_envs=8, on_iteration=log)

    Args:
        logdir: The folder of the event file (made if missing): one run of
            TensorBoard's, so give each policy its own.
    """

    def __init__(self, logdir: Path | str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional package

        self._writer = SummaryWriter(log_dir=str(logdir))

    def __call__(self, stats: IterationStats) -> None:
        """Write one iteration's scalars."""
        update, step = stats.update, stats.env_steps
        scalars = {
            "return": stats.mean_return,
            "success": stats.success_rate,
            "approx_kl": update.approx_kl,
            "clip_fraction": update.clip_fraction,
            "policy_loss": update.policy_loss,
            "value_loss": update.value_loss,
            "entropy": update.entropy,
            "invalid_actions": float(stats.invalid_actions),
            "illegal_combinations": float(stats.illegal_combinations),
        }
        scalars |= {f"entropy/{h}": value for h, value in update.head_entropy.items()}
        scalars |= {f"relevance/{h}": value for h, value in update.relevance_rate.items()}
        for tag, value in scalars.items():
            if not math.isnan(value):  # no episode ended: no return or success
                self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()

    def __enter__(self) -> TensorBoardScalars:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def train_policy(
    bundle: PolicyBundle,
    env_steps: int,
    *,
    num_envs: int = 64,
    seed: int = 0,
    config: PPOConfig = PPOConfig(),
    task_config: TaskConfig | None = None,
    on_iteration: Callable[[IterationStats], None] | None = None,
) -> list[IterationStats]:
    """Train `bundle` on `SeedLifecycleTask` with the demo's recipe.

    `esper-policy demo` trains its LSTM and MLP with this. Build the bundle right
    after `torch.manual_seed(seed)` and the whole run repeats exactly (same machine,
    same thread count).

    Example:
        >>> from esper.tamiyo.policy import ActionSpace, MLPPolicyBundle
        >>> _ = torch.manual_seed(0)
        >>> bundle = MLPPolicyBundle(TaskConfig().feature_dim, hidden_dim=16,
        ...                          action_space=ActionSpace.tamiyo())
        >>> history = train_policy(bundle, env_steps=2048, num_envs=8)
        >>> len(history), history[-1].env_steps
        (16, 2048)

    Args:
        bundle: The policy, built for `task_config.feature_dim` features; the task
            runs on its device.
        env_steps: Environment steps, all environments together, rounded up to whole
            rollouts of `num_envs * config.rollout_steps`. 120,000 in the demo.
        num_envs: Environments stepped together.
        seed: Seeds the episodes and the action sampling.
        config: PPO settings.
        task_config: The task's shape; its action space must be the bundle's. `None`:
            the default task under the bundle's action space (the masks per op of
            Tamiyo's hierarchical space, or a flat space's union masks).
        on_iteration: Called after each iteration (`TensorBoardScalars`, a progress bar).

    Returns:
        Each iteration's statistics.
    """
    if task_config is None:
        task_config = TaskConfig(action_space=bundle.action_space)
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


def _masked_mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """`[H]`: each head's mean of `values` `[H, n, T]` over its steps `where` (0 if none)."""
    weights = where.to(values.dtype)
    return (values * weights).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1).clamp(min=1)


def _select_rows(masks: ActionMasks, rows: torch.Tensor) -> ActionMasks:
    """The masks of the environments `rows` (per-op masks too)."""
    return ActionMasks(
        **{name: None if mask is None else mask[rows] for name, mask in masks.as_dict().items()}
    )
