"""`esper-policy`, the command line of the package (also `python -m esper.tamiyo.policy`)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from esper.tamiyo.policy.action_space import HEAD_NAMES
from esper.tamiyo.policy.base import PolicyBundle
from esper.tamiyo.policy.loader import TargetError, load_bundle_class
from esper.tamiyo.policy.registry import create_policy, get_policy, list_policies
from esper.tamiyo.policy.testing import random_masks, run_checks

__all__ = ["CommandError", "main", "run_check", "run_demo", "run_list"]


def _demo_bundle(
    name: str, bundle: PolicyBundle, steps: int, batch: int, feature_dim: int, seed: int
) -> tuple[list[str], float]:
    """Run a masked rollout; return one table row per step of env 0 and µs per call."""
    gen = torch.Generator().manual_seed(seed)
    hidden = bundle.initial_hidden(batch)
    rows: list[str] = []
    times: list[float] = []
    for step in range(steps):
        features = torch.randn(batch, feature_dim, generator=gen)
        masks = random_masks((batch,), space=bundle.action_space, keep=0.6, generator=gen)
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
        rows, micros = _demo_bundle(name, bundle, steps, batch, feature_dim, seed)
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


def run_list(feature_dim: int = 32) -> int:
    """Print every registered policy: class, recurrent or not, parameter count.

    Returns the process exit code.
    """
    rows: list[tuple[str, str, str, str]] = [("name", "class", "recurrent", "parameters")]
    for name in list_policies():
        cls = get_policy(name)
        try:
            bundle = create_policy(name, feature_dim=feature_dim)
        except Exception as error:  # a contributor's class; report it and go on
            rows.append((name, cls.__name__, "?", f"cannot build: {type(error).__name__}"))
            continue
        recurrent = "yes" if bundle.is_recurrent else "no"
        parameters = sum(p.numel() for p in bundle.network.parameters())
        rows.append((name, cls.__name__, recurrent, f"{parameters:,}"))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    print(f"Registered policies, built with feature_dim={feature_dim}:")
    for name, cls_name, recurrent, count in rows:
        print(
            f"  {name:<{widths[0]}}  {cls_name:<{widths[1]}}  "
            f"{recurrent:>{widths[2]}}  {count:>{widths[3]}}"
        )
    return 0


def run_check(target: str, feature_dim: int = 7, seed: int = 0) -> int:
    """Run the conformance kit on a bundle class and print each clause.

    The class is the kit's factory: it is built as `Class(feature_dim)`, as
    `check_bundle(Class)` builds it.

    Args:
        target: `MODULE:CLASS` (importable from the current directory),
            `path/to/file.py:CLASS`, or a registered policy name.
        feature_dim: The width to build the bundle with.
        seed: Seeds the bundle's weights, inputs and sampling.

    Returns:
        0 when every clause passes, 1 otherwise.

    Raises:
        CommandError: `target` does not name a concrete `PolicyBundle` subclass.
    """
    try:
        cls = load_bundle_class(target)
    except TargetError as error:
        raise CommandError(str(error)) from None
    report = run_checks(cls, feature_dim=feature_dim, seed=seed)
    print(report.format())
    return 0 if report.passed else 1


class CommandError(Exception):
    """A bad command-line argument: printed as one line, exit status 2."""


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63), got {value}")
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
    listing = commands.add_parser(
        "list", help="list the registered policies with their parameter counts"
    )
    listing.add_argument(
        "--feature-dim", type=_positive_int, default=32, help="width to build them with (32)"
    )
    check = commands.add_parser(
        "check",
        help="run the conformance kit on a bundle class",
        description="Run the conformance kit (esper.tamiyo.policy.testing) on a bundle "
        "class and print each clause as PASS or FAIL; exit 0 only if all pass.",
    )
    check.add_argument(
        "target",
        metavar="MODULE:CLASS",
        help="e.g. my_policies.gru:GRUPolicyBundle, path/to/gru.py:GRUPolicyBundle, "
        "or a registered name such as lstm",
    )
    check.add_argument(
        "--feature-dim", type=_positive_int, default=7, help="width to build it with (7)"
    )
    check.add_argument("--seed", type=_seed, default=0, help="random seed (0)")
    _add_bench_parser(commands)
    return parser


def _add_bench_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "bench",
        help="time the seed design (old) against LSTMPolicyBundle (new)",
        description="Time the seed design's replica (old) against LSTMPolicyBundle (new), "
        "same weights, one thread, interleaved; print medians, new/old ratios, peak "
        "memory and where the performance targets stand.",
    )
    bench.add_argument(
        "--quick", action="store_true", help="a smoke run of seconds: few repeats, fewer sizes"
    )
    bench.add_argument("--json", metavar="PATH", type=Path, help="also write the results here")
    bench.add_argument(
        "--repeats", type=_positive_int, help="timed repeats per figure (21; 5 with --quick)"
    )
    bench.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where to compute (cpu)"
    )
    bench.add_argument(
        "--compile", action="store_true", help="also time a bundle from PolicyBundle.compile"
    )
    bench.add_argument("--feature-dim", type=_positive_int, default=32, help="features (32)")


def _run_bench(args: argparse.Namespace) -> int:
    """Run `esper-policy bench` with parsed arguments; returns the exit code.

    Raises:
        CommandError: `--device cuda` without a usable GPU.
    """
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: torch sees no CUDA device here")
    from esper.tamiyo.policy.bench import suite  # noqa: PLC0415 - only `bench` needs it

    options = suite.BenchOptions(
        quick=args.quick,
        repeats=args.repeats,
        device=args.device,
        compile=args.compile,
        feature_dim=args.feature_dim,
        json_path=args.json,
    )
    return suite.run_bench(options)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `esper-policy`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.command == "demo":
            return run_demo(args.steps, args.batch, args.feature_dim, args.seed, args.threads)
        if args.command == "list":
            return run_list(args.feature_dim)
        if args.command == "check":
            return run_check(args.target, args.feature_dim, args.seed)
        if args.command == "bench":
            return _run_bench(args)
    except CommandError as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    finally:
        torch.set_num_threads(threads)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse refuses others


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
