"""`esper-policy`, the command line of the package (also `python -m esper.tamiyo.policy`)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from esper.tamiyo.policy.action_space import HEAD_NAMES, ActionSpace
from esper.tamiyo.policy.base import PolicyBundle
from esper.tamiyo.policy.masks import ActionMasks
from esper.tamiyo.policy.registry import create_policy, list_policies

__all__ = ["main", "random_masks", "run_demo"]


def random_masks(
    space: ActionSpace, batch: int, generator: torch.Generator, keep: float = 0.6
) -> ActionMasks:
    """Random `[B, A_h]` masks with at least one valid action in every row.

    Args:
        space: Head sizes.
        batch: `B`.
        generator: Random source.
        keep: Probability that each action is valid.
    """
    masks: dict[str, torch.Tensor | None] = {}
    for name, size in zip(HEAD_NAMES, space.sizes, strict=True):
        mask = torch.rand(batch, size, generator=generator) < keep
        forced = torch.randint(size, (batch,), generator=generator)
        mask[torch.arange(batch), forced] = True  # never a void row
        masks[name] = mask
    return ActionMasks.from_mapping(masks)


def _demo_bundle(
    name: str, bundle: PolicyBundle, steps: int, batch: int, seed: int
) -> tuple[list[str], float]:
    """Run a masked rollout; return one table row per step of env 0 and µs per call."""
    gen = torch.Generator().manual_seed(seed)
    hidden = bundle.initial_hidden(batch)
    rows: list[str] = []
    times: list[float] = []
    for step in range(steps):
        features = torch.randn(batch, bundle.feature_dim, generator=gen)
        masks = random_masks(bundle.action_space, batch, gen)
        start = time.perf_counter()
        result = bundle.get_action(features, masks, hidden)
        times.append(time.perf_counter() - start)
        hidden = result.hidden
        for head in HEAD_NAMES:
            mask = getattr(masks, head)
            taken = result.action[head]
            if mask is not None and not bool(mask.gather(1, taken.unsqueeze(1)).all()):
                raise RuntimeError(f"{name}: a masked {head} action was sampled")  # never
        if step < 3:
            cells = "".join(f"{int(result.action[h][0]):>13d}" for h in HEAD_NAMES)
            logp = float(sum(result.log_prob[h][0] for h in HEAD_NAMES))
            rows.append(f"  {name:<8}{step:>5d}{cells}{logp:>10.2f}{float(result.value[0]):>9.3f}")
    return rows, statistics.median(times[1:] or times) * 1e6


def run_demo(
    steps: int = 50, batch: int = 8, feature_dim: int = 32, seed: int = 0, threads: int = 1
) -> int:
    """Build each registered bundle and run a short masked rollout on random features.

    Prints the first actions each bundle chose (environment 0) and its median time per
    `get_action` call. Returns the process exit code.
    """
    # Small tensors: one thread is fastest, and steady on a shared machine.
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    print(
        f"Masked rollouts: {steps} steps, batch {batch}, feature_dim {feature_dim}, "
        f"seed {seed}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n"
    )
    print("First steps of environment 0 (log_prob: summed over the eight heads):")
    header = "".join(f"{h:>13s}" for h in HEAD_NAMES)
    print(f"  {'policy':<8}{'step':>5s}{header}{'log_prob':>10s}{'value':>9s}")
    summary: list[str] = []
    for name in list_policies():
        bundle = create_policy(name, feature_dim=feature_dim)
        rows, micros = _demo_bundle(name, bundle, steps, batch, seed)
        print("\n".join(rows))
        recurrent = "yes" if bundle.is_recurrent else "no"
        summary.append(f"  {name:<8}{type(bundle).__name__:<22}{recurrent:>10s}{micros:>20.0f}")
    print(f"\n  {'policy':<8}{'class':<22}{'recurrent':>10s}{'µs per get_action':>20s}")
    print("\n".join(summary))
    print("\nEvery sampled action was valid under its mask.")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `esper-policy`."""
    parser = argparse.ArgumentParser(
        prog="esper-policy", description="Tamiyo policy bundles: demo and tools."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="run a short masked rollout with every registered bundle"
    )
    demo.add_argument("--steps", type=_positive_int, default=50, help="rollout steps (50)")
    demo.add_argument("--batch", type=_positive_int, default=8, help="environments (8)")
    demo.add_argument("--feature-dim", type=_positive_int, default=32, help="features (32)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.add_argument("--threads", type=_positive_int, default=1, help="torch threads (1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `esper-policy`; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        threads = torch.get_num_threads()
        try:
            return run_demo(args.steps, args.batch, args.feature_dim, args.seed, args.threads)
        finally:
            torch.set_num_threads(threads)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse refuses others


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
