"""The demo: a toy of Tamiyo's job, and a compact PPO that trains bundles on it.

`SeedLifecycleTask` is a vectorized task of seed slots whose reward needs memory;
`PPOTrainer` is recurrent, masked PPO written against the public `PolicyBundle` API
only, the reference for training code; `evaluate_policy` scores a bundle on seeded
episodes. `esper-policy demo` (`make demo`) puts them together: see `demo.run`.

Example:
    >>> from esper.tamiyo.policy import LSTMPolicyBundle
    >>> from esper.tamiyo.policy.demo import PPOTrainer, SeedLifecycleTask, evaluate_policy
    >>> task = SeedLifecycleTask(num_envs=8, seed=0)
    >>> bundle = LSTMPolicyBundle(task.config.feature_dim, hidden_dim=16, embed_dim=16,
    ...                           action_space=task.config.action_space)
    >>> history = PPOTrainer(bundle, task, seed=0).train(env_steps=256)
    >>> [stats.env_steps for stats in history]
    [128, 256]
    >>> evaluate_policy(bundle, episodes=16).invalid_actions
    0
"""

from esper.tamiyo.policy.demo.evaluation import Evaluation, evaluate_policy
from esper.tamiyo.policy.demo.ppo import (
    IterationStats,
    PPOConfig,
    PPOTrainer,
    Rollout,
    UpdateStats,
    gae,
    train_policy,
)
from esper.tamiyo.policy.demo.task import (
    EpisodeStats,
    Op,
    SeedLifecycleTask,
    Stage,
    StepResult,
    TaskConfig,
)

__all__ = [
    "EpisodeStats",
    "Evaluation",
    "IterationStats",
    "Op",
    "PPOConfig",
    "PPOTrainer",
    "Rollout",
    "SeedLifecycleTask",
    "Stage",
    "StepResult",
    "TaskConfig",
    "UpdateStats",
    "evaluate_policy",
    "gae",
    "train_policy",
]
