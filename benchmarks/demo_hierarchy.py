"""Train the demo's LSTM under each way of sampling Tamiyo's action (the runs of ADR 0008).

The three designs, on the demo's task (`SeedLifecycleTask`, Tamiyo's rules):

- (a) op first: `ActionSpace.tamiyo()`; the op is sampled first, the other heads under
  their masks for that op (`slot_by_op`), a head the op ignores takes its canonical
  action with log-probability 0;
- (b) the same with op-conditioned logits (`LSTMPolicyBundle(op_conditioned_logits=True)`):
  the other heads' logits depend on the op too;
- (c) independent heads: the flat `ActionSpace()`; every head sampled on its own under
  the union masks, and an op and slot that do not go together taken as `WAIT`.

For each design and seed the script trains `build_policy("lstm")` with `train_policy`,
as `esper-policy demo` does, then reports:

- the greedy evaluation on 1000 seeded episodes: success on the memory decision, mean
  return, and illegal combinations attempted;
- the first training step at which the training episodes' success reached 90%;
- the illegal combinations attempted in training, and the mean approximate KL of the
  updates;
- the training time.

Usage: `python benchmarks/demo_hierarchy.py [--seeds 0 1 2] [--steps 120000]
[--design a b c] [--surrogate per_head|joint] [--json PATH]`. Prints a Markdown table
(each run, then the mean of each design) and writes the runs as JSON (default
`demo_hierarchy.json`). One thread, so runs repeat exactly on one machine.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esper.tamiyo.policy import ActionSpace
from esper.tamiyo.policy.demo import PPOConfig, TaskConfig, evaluate_policy, train_policy
from esper.tamiyo.policy.demo.run import EVAL_SEED_OFFSET, build_policy


@dataclass(frozen=True)
class Design:
    """How the LSTM samples the action: its space, and whether its logits see the op."""

    label: str
    space: ActionSpace
    op_conditioned_logits: bool


DESIGNS = {
    "a": Design("(a) op first, masks per op", ActionSpace.tamiyo(), op_conditioned_logits=False),
    "b": Design(
        "(b) (a) + op-conditioned logits", ActionSpace.tamiyo(), op_conditioned_logits=True
    ),
    "c": Design("(c) independent heads, union masks", ActionSpace(), op_conditioned_logits=False),
}


def run(design: Design, seed: int, steps: int, surrogate: str) -> dict[str, Any]:
    """Train and evaluate one LSTM; returns the run's figures."""
    task_config = TaskConfig(action_space=design.space)
    torch.manual_seed(seed)
    bundle = build_policy(
        "lstm", task_config.feature_dim, design.space,
        op_conditioned_logits=design.op_conditioned_logits,
    )  # fmt: skip
    config = PPOConfig(surrogate=surrogate)  # type: ignore[arg-type]
    started = time.perf_counter()
    history = train_policy(bundle, steps, seed=seed, config=config, task_config=task_config)
    seconds = time.perf_counter() - started
    score = evaluate_policy(bundle, seed=seed + EVAL_SEED_OFFSET, config=task_config)
    rates = [(s.env_steps, s.success_rate) for s in history if not math.isnan(s.success_rate)]
    first = next((step for step, rate in rates if rate >= 0.9), None)
    return {
        "seed": seed,
        "eval_success": score.success_rate,
        "eval_return": score.mean_return,
        "eval_illegal": score.illegal_combinations,
        "eval_invalid": score.invalid_actions,
        "first_90": first,
        "train_illegal": sum(s.illegal_combinations for s in history),
        "mean_approx_kl": statistics.fmean(s.update.approx_kl for s in history),
        "seconds": seconds,
    }


def row(label: str, seed: str, runs: list[dict[str, Any]]) -> str:
    """One Markdown row: a run, or the mean of several."""
    firsts = [r["first_90"] for r in runs]
    first = "never" if None in firsts else f"{statistics.fmean(firsts):,.0f}"
    cells = [
        label,
        seed,
        f"{statistics.fmean(r['eval_success'] for r in runs):.1%}",
        f"{statistics.fmean(r['eval_return'] for r in runs):.3f}",
        first,
        f"{statistics.fmean(r['train_illegal'] for r in runs):,.0f}",
        f"{statistics.fmean(r['eval_illegal'] for r in runs):,.0f}",
        f"{statistics.fmean(r['mean_approx_kl'] for r in runs):.4f}",
        f"{statistics.fmean(r['seconds'] for r in runs):.1f} s",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120_000)
    parser.add_argument("--design", choices=sorted(DESIGNS), nargs="+", default=list(DESIGNS))
    parser.add_argument("--surrogate", choices=("per_head", "joint"), default="per_head")
    parser.add_argument("--json", type=Path, default=Path("demo_hierarchy.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"LSTM (64 wide), 64 environments, {args.steps:,} steps, {args.surrogate} surrogate, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}\n"
    )
    header = (
        "| design | seed | eval success | eval return | first >= 90% (steps) "
        "| illegal (train) | illegal (eval) | mean approx KL | train time |"
    )
    print(header)
    separator = "|---" * (header.count("|") - 1) + "|"
    print(separator)
    results: dict[str, list[dict[str, Any]]] = {}
    for key in args.design:
        design = DESIGNS[key]
        results[key] = []
        for seed in args.seeds:
            figures = run(design, seed, args.steps, args.surrogate)
            results[key].append(figures)
            print(row(design.label, str(seed), [figures]), flush=True)
    print("\nMeans over the seeds:\n")
    print(header)
    print(separator)
    for key, runs in results.items():
        print(row(DESIGNS[key].label, "mean", runs))
    args.json.write_text(
        json.dumps(
            {
                "steps": args.steps,
                "seeds": args.seeds,
                "surrogate": args.surrogate,
                "torch": torch.__version__,
                "designs": {key: DESIGNS[key].label for key in results},
                "runs": results,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"\nWrote {args.json}")


if __name__ == "__main__":
    main()
