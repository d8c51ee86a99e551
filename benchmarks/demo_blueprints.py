"""Train the demo's LSTM with and without the blueprint embedding (the runs of ADR 0010).

The demo's default design (`ActionSpace.tamiyo()`), on the demo's task, for each seed,
once on features alone and once with each slot's blueprint as the extra input
`blueprint_indices`, embedded in `--dim` values (`LSTMPolicyBundle(blueprint_embed_dim
=...)`). The task's features say each slot's stage, timer, alpha and contribution, but
not which blueprint it holds. It reports, per run and as means over the seeds:

- the greedy evaluation on 1000 seeded episodes: success on the memory decision, and
  the mean return;
- the first training step at which the training episodes' success reached 90%;
- collapses after that (`demo_floors.collapses`): their number and lowest success;
- the mean training success and return over the last quarter of the iterations;
- the training time.

Usage: `python benchmarks/demo_blueprints.py [--seeds 0 1 2] [--steps 120000] [--dim 4]
[--json PATH]`. Prints Markdown tables and writes the runs, with their success curves,
as JSON (default `demo_blueprints.json`). One thread, so runs repeat exactly on one
machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from demo_floors import (
    COLLAPSE_BELOW,
    REACHED,
    collapses,
    print_means_and_save,
    separator_of,
)
from esper.tamiyo.policy import ActionSpace
from esper.tamiyo.policy.demo import TaskConfig, evaluate_policy, train_policy
from esper.tamiyo.policy.demo.run import EVAL_SEED_OFFSET, build_policy


def run(seed: int, steps: int, blueprint_embed_dim: int) -> dict[str, Any]:
    """Train and evaluate one LSTM; returns the run's figures and its success curve."""
    space = ActionSpace.tamiyo()
    task_config = TaskConfig(action_space=space)
    torch.manual_seed(seed)
    bundle = build_policy(
        "lstm", task_config.feature_dim, space, blueprint_embed_dim=blueprint_embed_dim
    )
    started = time.perf_counter()
    history = train_policy(bundle, steps, seed=seed, task_config=task_config)
    seconds = time.perf_counter() - started
    score = evaluate_policy(bundle, seed=seed + EVAL_SEED_OFFSET, config=task_config)
    curve = [(s.env_steps, s.success_rate) for s in history]
    last = history[-max(1, len(history) // 4) :]
    return {
        "seed": seed,
        "blueprint_embed_dim": blueprint_embed_dim,
        "eval_success": score.success_rate,
        "eval_return": score.mean_return,
        "first_90": next((step for step, rate in curve if rate >= REACHED), None),
        "collapses": collapses(history),
        "late_success": statistics.fmean(s.success_rate for s in last),
        "late_return": statistics.fmean(s.mean_return for s in last),
        "seconds": seconds,
        "success_curve": curve,
    }


def row(label: str, seed: str, runs: list[dict[str, Any]]) -> str:
    """One Markdown row: a run, or the mean of several."""
    firsts = [r["first_90"] for r in runs]
    first = "never" if None in firsts else f"{statistics.fmean(firsts):,.0f}"
    counts = [len(r["collapses"]) for r in runs]
    lows = [min(r["collapses"]) for r in runs if r["collapses"]]
    cells = [
        label,
        seed,
        f"{statistics.fmean(r['eval_success'] for r in runs):.1%}",
        f"{statistics.fmean(r['eval_return'] for r in runs):.3f}",
        first,
        f"{statistics.fmean(counts):.1f}" if len(runs) > 1 else str(counts[0]),
        "-" if not lows else f"{min(lows):.0%}",
        f"{statistics.fmean(r['late_success'] for r in runs):.1%}",
        f"{statistics.fmean(r['late_return'] for r in runs):.3f}",
        f"{statistics.fmean(r['seconds'] for r in runs):.1f} s",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120_000)
    parser.add_argument("--dim", type=int, default=4, help="blueprint_embed_dim (4)")
    parser.add_argument("--json", type=Path, default=Path("demo_blueprints.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"LSTM (64 wide), ActionSpace.tamiyo(), 64 environments, {args.steps:,} steps, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}\n"
    )
    header = (
        "| blueprint embedding | seed | eval success | eval return | first >= 90% (steps) "
        f"| collapses < {COLLAPSE_BELOW:.0%} after | lowest success in them | last-quarter "
        "success | last-quarter return | train time |"
    )
    print(header)
    print(separator_of(header))
    results: dict[str, list[dict[str, Any]]] = {}
    for dim in (0, args.dim):
        label = "none" if dim == 0 else f"{dim} per slot"
        results[label] = []
        for seed in args.seeds:
            figures = run(seed, args.steps, dim)
            results[label].append(figures)
            print(row(label, str(seed), [figures]), flush=True)
    meta = {"steps": args.steps, "seeds": args.seeds, "dim": args.dim}
    print_means_and_save(header, results, row, args.json, meta)


if __name__ == "__main__":
    main()
