"""Train the demo's LSTM with and without probability floors (the runs of ADR 0009).

The demo's default design (`ActionSpace.tamiyo()`, the op first, masks per op), on the
demo's task, for each seed, once without floors and once with each set of floors given
(by default `FLOORS`, the defaults of the system Tamiyo comes from: op 0.15, blueprint
and tempo 0.12). It reports, per run and as means over the seeds:

- the greedy evaluation on 1000 seeded episodes: success on the memory decision;
- the first training step at which the training episodes' success reached 90%;
- collapses after that: stretches of iterations whose training success fell under
  `COLLAPSE_BELOW` (80%), their number and the lowest success in them;
- each floored head's normalized entropy over training, averaged over the first and
  last quarters of the updates (availability-masked, as the PPO bonus uses it);
- the training time.

Usage: `python benchmarks/demo_floors.py [--seeds 0 1 2] [--steps 120000] [--floors
op=0.15,blueprint=0.12,tempo=0.12 ...] [--json PATH]`. Prints Markdown tables and writes the runs, with their success and entropy
curves, as JSON (default `demo_floors.json`). One thread, so runs repeat exactly on one
machine.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from esper.tamiyo.policy import ActionSpace
from esper.tamiyo.policy.demo import IterationStats, TaskConfig, evaluate_policy, train_policy
from esper.tamiyo.policy.demo.run import EVAL_SEED_OFFSET, build_policy

FLOORS = {"op": 0.15, "blueprint": 0.12, "tempo": 0.12}
"""The floors compared with none by default; their heads' entropies are reported."""

COLLAPSE_BELOW = 0.8
"""Training success under this, after first reaching 90%, counts as a collapse."""

REACHED = 0.9
"""The success that counts as learnt."""


def collapses(history: list[IterationStats]) -> list[float]:
    """The lowest training success of each collapse after success first reached 90%.

    A collapse is a maximal stretch of iterations whose success is under
    `COLLAPSE_BELOW`; iterations where no episode ended (NaN) neither start nor end one.
    """
    rates = [s.success_rate for s in history if not math.isnan(s.success_rate)]
    start = next((i for i, rate in enumerate(rates) if rate >= REACHED), None)
    if start is None:
        return []
    lows: list[float] = []
    low: float | None = None
    for rate in rates[start:]:
        if rate < COLLAPSE_BELOW:
            low = rate if low is None else min(low, rate)
        elif low is not None:
            lows.append(low)
            low = None
    if low is not None:
        lows.append(low)
    return lows


def run(seed: int, steps: int, floors: dict[str, float] | None) -> dict[str, Any]:
    """Train and evaluate one LSTM; returns the run's figures and curves."""
    space = ActionSpace.tamiyo()
    task_config = TaskConfig(action_space=space)
    torch.manual_seed(seed)
    bundle = build_policy("lstm", task_config.feature_dim, space, probability_floor=floors)
    started = time.perf_counter()
    history = train_policy(bundle, steps, seed=seed, task_config=task_config)
    seconds = time.perf_counter() - started
    score = evaluate_policy(bundle, seed=seed + EVAL_SEED_OFFSET, config=task_config)
    curve = [(s.env_steps, s.success_rate) for s in history]
    first = next((step for step, rate in curve if rate >= REACHED), None)
    quarter = max(1, len(history) // 4)
    entropy = {
        head: {
            "first_quarter": statistics.fmean(
                s.update.head_entropy[head] for s in history[:quarter]
            ),
            "last_quarter": statistics.fmean(
                s.update.head_entropy[head] for s in history[-quarter:]
            ),
        }
        for head in FLOORS
    }
    return {
        "seed": seed,
        "eval_success": score.success_rate,
        "first_90": first,
        "collapses": collapses(history),
        "entropy": entropy,
        "seconds": seconds,
        "success_curve": curve,
        "entropy_curve": {head: [s.update.head_entropy[head] for s in history] for head in FLOORS},
    }


def parse_floors(text: str) -> dict[str, float]:
    """`op=0.15,tempo=0.12` as a dict, for `--floors`."""
    floors: dict[str, float] = {}
    for item in text.split(","):
        head, _, value = item.partition("=")
        floors[head.strip()] = float(value)
    return floors


def label_of(floors: dict[str, float] | None) -> str:
    """`none`, or the floors as `op 0.15, tempo 0.12`."""
    return "none" if not floors else ", ".join(f"{h} {v:g}" for h, v in floors.items())


def _mean(values: list[float]) -> str:
    return "-" if not values else f"{statistics.fmean(values):.2f}"


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
        first,
        f"{statistics.fmean(counts):.1f}" if len(runs) > 1 else str(counts[0]),
        "-" if not lows else f"{min(lows):.0%}",
        *(
            f"{_mean([r['entropy'][h]['first_quarter'] for r in runs])} -> "
            f"{_mean([r['entropy'][h]['last_quarter'] for r in runs])}"
            for h in FLOORS
        ),
        f"{statistics.fmean(r['seconds'] for r in runs):.1f} s",
    ]
    return "| " + " | ".join(cells) + " |"


Row = Callable[[str, str, list[dict[str, Any]]], str]
"""Formats a Markdown row: `row(label, seed, runs)`, one run or the mean of several."""


def separator_of(header: str) -> str:
    """The Markdown separator line under `header`."""
    return "|---" * (header.count("|") - 1) + "|"


def print_means_and_save(
    header: str,
    results: dict[str, list[dict[str, Any]]],
    row: Row,
    path: Path,
    meta: dict[str, Any],
) -> None:
    """Print the table of means over the seeds, then write `meta` and every run to `path`."""
    print("\nMeans over the seeds (collapses: mean count; lowest: over all runs):\n")
    print(header)
    print(separator_of(header))
    for label, runs in results.items():
        print(row(label, "mean", runs))
    document = {**meta, "torch": torch.__version__, "runs": results}
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"\nWrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120_000)
    parser.add_argument(
        "--floors", type=parse_floors, nargs="+", default=[FLOORS], help="head=value,..."
    )
    parser.add_argument("--json", type=Path, default=Path("demo_floors.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"LSTM (64 wide), ActionSpace.tamiyo(), 64 environments, {args.steps:,} steps, "
        f"torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}\n"
    )
    heads = " | ".join(f"{h} entropy (first -> last quarter)" for h in FLOORS)
    header = (
        f"| floors | seed | eval success | first >= 90% (steps) | collapses < "
        f"{COLLAPSE_BELOW:.0%} after | lowest success in them | {heads} | train time |"
    )
    print(header)
    print(separator_of(header))
    results: dict[str, list[dict[str, Any]]] = {}
    for floors in (None, *args.floors):
        label = label_of(floors)
        results[label] = []
        for seed in args.seeds:
            figures = run(seed, args.steps, floors)
            results[label].append(figures)
            print(row(label, str(seed), [figures]), flush=True)
    meta = {
        "steps": args.steps,
        "seeds": args.seeds,
        "floors": [label_of(floors) for floors in args.floors],
        "collapse_below": COLLAPSE_BELOW,
    }
    print_means_and_save(header, results, row, args.json, meta)


if __name__ == "__main__":
    main()
