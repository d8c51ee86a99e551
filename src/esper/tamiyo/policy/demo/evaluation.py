"""Score a policy on a fixed, seeded set of `SeedLifecycleTask` episodes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esper.tamiyo.policy import PolicyBundle
from esper.tamiyo.policy.demo.task import SeedLifecycleTask, TaskConfig

__all__ = ["Evaluation", "evaluate_policy"]


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A policy's score over a set of episodes.

    Attributes:
        episodes: Episodes played.
        mean_return: Mean episode return.
        success_rate: Share of episodes whose first germination used the cue's
            blueprint: the memory decision. Chance is `TaskConfig.chance`.
        invalid_actions: Actions the task refused, over all episodes (0 for a policy
            that respects the masks).
        deterministic: The policy took its most likely action instead of sampling.
        illegal_combinations: Op and slot pairs that did not go together, over all
            episodes: a flat space's union masks allow them (0 under a hierarchical
            space, whose masks are exact).
    """

    episodes: int
    mean_return: float
    success_rate: float
    invalid_actions: int
    deterministic: bool
    illegal_combinations: int = 0


def evaluate_policy(
    bundle: PolicyBundle,
    *,
    episodes: int = 1000,
    seed: int = 0,
    deterministic: bool = True,
    config: TaskConfig | None = None,
) -> Evaluation:
    """Play `episodes` episodes, all at once, and score them.

    The episodes (cues and cue delays) depend on `seed` only, so every policy
    evaluated with the same seed meets the same episodes. The bundle is switched to
    eval mode for the episodes and back to its former mode after.

    Args:
        bundle: The policy, built for `config.feature_dim` features.
        episodes: Episodes to play, as one batch of environments.
        seed: Seeds the episodes and, when sampling, the actions.
        deterministic: Take each head's most likely action (a trained policy's
            usual evaluation); `False` samples, as a random baseline must.
        config: The task's shape; its action space must be the bundle's. `None`: the
            default task under the bundle's action space.

    Returns:
        The scores.

    Raises:
        ValueError: The bundle's action space is not the task's.
    """
    if config is None:
        config = TaskConfig(action_space=bundle.action_space)
    if bundle.action_space != config.action_space:
        raise ValueError(
            f"evaluate_policy: the bundle's action space {bundle.action_space} is not the "
            f"task's {config.action_space}"
        )
    task = SeedLifecycleTask(episodes, config, seed=seed, device=bundle.device)
    generator = torch.Generator(device=bundle.device).manual_seed(seed)
    features, masks = task.reset()
    hidden = bundle.initial_hidden(episodes)
    was_training = bundle.network.training
    bundle.network.eval()
    try:
        for _ in range(config.episode_steps):
            result = bundle.get_action(
                features,
                masks,
                hidden,
                deterministic=deterministic,
                generator=generator,
                extras=task.extra_inputs(bundle.extra_inputs),
            )
            outcome = task.step(result.action)
            features, masks, hidden = outcome.features, outcome.masks, result.hidden
    finally:
        bundle.network.train(was_training)
    final = outcome.episodes  # every episode ends at the last step
    assert bool(final.done.all())
    return Evaluation(
        episodes=episodes,
        mean_return=float(final.episode_return.mean()),
        success_rate=float(final.success.float().mean()),
        invalid_actions=int(final.invalid_actions.sum()),
        deterministic=deterministic,
        illegal_combinations=int(final.illegal_combinations.sum()),
    )
