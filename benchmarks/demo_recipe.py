"""Train the demo's LSTM under each candidate training recipe (the runs of ADR 0005).

A recipe is the reward of a seed from the wrong blueprint, the PPO step-size
schedule, and how the policy loss treats the heads (clipped per head over the steps
where each was relevant, or one clipped joint ratio). For each recipe and seed the script trains `build_policy("lstm")` with
`train_policy`, as `esper-policy demo` does, then reports:

- the greedy evaluation on 1000 seeded episodes: mean return, and success on the
  memory decision;
- the first training step at which the training episodes' success reached 90%;
- the lowest training success after that: a collapse shows here.

Usage: `python benchmarks/demo_recipe.py [--seeds 0 1 2] [--steps 60000]
[--recipe NAME ...]`. Prints a Markdown table; one thread, so runs repeat exactly on
one machine.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

from esper.tamiyo.policy.demo import PPOConfig, TaskConfig, evaluate_policy, train_policy
from esper.tamiyo.policy.demo.run import EVAL_SEED_OFFSET, build_policy


@dataclass(frozen=True)
class Recipe:
    """The reward of a seed from the wrong blueprint, the PPO step size and surrogate."""

    wrong_quality: float
    learning_rate: float
    anneal: bool
    surrogate: str = "per_head"


RECIPES = {
    "chosen": Recipe(wrong_quality=0.25, learning_rate=1e-3, anneal=True),
    "wrong=-1": Recipe(wrong_quality=-1.0, learning_rate=1e-3, anneal=True),
    "lr=2e-3 constant": Recipe(wrong_quality=0.25, learning_rate=2e-3, anneal=False),
    "wrong=-1, lr=2e-3 constant": Recipe(wrong_quality=-1.0, learning_rate=2e-3, anneal=False),
    "joint surrogate": Recipe(
        wrong_quality=0.25, learning_rate=1e-3, anneal=True, surrogate="joint"
    ),
}


def run(recipe: Recipe, seed: int, steps: int) -> list[str]:
    task_config = TaskConfig(wrong_blueprint_quality=recipe.wrong_quality)
    torch.manual_seed(seed)
    bundle = build_policy("lstm", task_config.feature_dim, task_config.action_space)
    config = PPOConfig(
        learning_rate=recipe.learning_rate,
        anneal_lr=recipe.anneal,
        surrogate=recipe.surrogate,  # type: ignore[arg-type]
    )
    started = time.perf_counter()
    history = train_policy(bundle, steps, seed=seed, config=config, task_config=task_config)
    seconds = time.perf_counter() - started
    score = evaluate_policy(bundle, seed=seed + EVAL_SEED_OFFSET, config=task_config)
    rates = [(s.env_steps, s.success_rate) for s in history if not math.isnan(s.success_rate)]
    first = next((step for step, rate in rates if rate >= 0.9), None)
    after = [rate for step, rate in rates if first is not None and step > first]
    return [
        str(seed),
        f"{score.mean_return:.3f}",
        f"{score.success_rate:.1%}",
        "never" if first is None else f"{first:,}",
        f"{min(after):.0%}" if after else "-",
        f"{seconds:.0f} s",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60_000)
    parser.add_argument("--recipe", choices=sorted(RECIPES), nargs="+", default=list(RECIPES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"LSTM, 64 environments, {args.steps:,} steps, torch {torch.__version__}\n")
    print("| recipe | seed | eval return | eval success | first >= 90% | lowest after | time |")
    print("|---|---|---|---|---|---|---|")
    for name in args.recipe:
        for seed in args.seeds:
            print(f"| {name} | " + " | ".join(run(RECIPES[name], seed, args.steps)) + " |")


if __name__ == "__main__":
    main()
