"""`esper-policy`, the command line of the package (also `python -m esper.tamiyo.policy`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from esper.tamiyo.policy.floors import check_probability_floor
from esper.tamiyo.policy.loader import TargetError, import_module_or_file, load_bundle_class
from esper.tamiyo.policy.registry import create_policy, get_policy, list_policies
from esper.tamiyo.policy.testing import run_checks

__all__ = ["CommandError", "main", "run_check", "run_list"]


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
        CommandError: `target` does not name a concrete `PolicyBundle` subclass, its
            module called `sys.exit` while being imported, or the bundle called it
            during the checks (which would otherwise end the command with no report,
            with status 0 for `sys.exit(0)`).
    """
    try:
        cls = load_bundle_class(target)
    except TargetError as error:
        raise CommandError(str(error)) from None
    try:
        report = run_checks(cls, feature_dim=feature_dim, seed=seed)
    except SystemExit as stop:
        call = "sys.exit()" if stop.code is None else f"sys.exit({stop.code!r})"
        raise CommandError(
            f"{target} called {call} during the checks; a bundle must not exit the process"
        ) from None
    print(report.format())
    return 0 if report.passed else 1


class CommandError(Exception):
    """A bad command-line argument: printed as one line, exit status 2."""


def _floor_item(text: str) -> tuple[str, float]:
    head, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return head.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected HEAD=VALUE such as op=0.02, got {text!r}"
        ) from None


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
    _add_demo_parser(commands)
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


def _add_demo_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="train the LSTM bundle with PPO on a built-in task and compare it with baselines",
        description="Train LSTMPolicyBundle with recurrent, masked PPO on SeedLifecycleTask, "
        "train MLPPolicyBundle the same way, evaluate both and UniformPolicyBundle on the same "
        "seeded episodes, and save checkpoints, a learning-curve PNG and results.json. Exit 0 "
        "when every acceptance check holds. Needs the demo extra (tqdm, matplotlib; tensorboard for --logdir).",
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        help="training environment steps per policy, rounded up to whole rollouts of "
        "ENVS x 16 (120000)",
    )
    demo.add_argument("--seed", type=_seed, default=0, help="random seed (0)")
    demo.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="output folder (a new demo-runs/<date-time>); files in it are replaced",
    )
    demo.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (cpu)")
    demo.add_argument(
        "--load", type=Path, metavar="PATH", help="evaluate this checkpoint instead of training"
    )
    demo.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE|FILE.py",
        help="import this first, so that --load can rebuild a bundle it registers (repeatable)",
    )
    demo.add_argument(
        "--envs", type=_positive_int, help="training environments, a multiple of 4 (64)"
    )
    demo.add_argument(
        "--eval-episodes", type=_positive_int, default=1000, help="evaluation episodes (1000)"
    )
    demo.add_argument("--threads", type=_positive_int, default=1, help="torch threads (1)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.add_argument(
        "--probability-floor",
        type=_floor_item,
        action="append",
        default=[],
        metavar="HEAD=VALUE",
        help="keep every valid action of HEAD at probability VALUE or more, in both trained "
        "policies (repeatable; see docs/adr/0009)",
    )
    demo.add_argument(
        "--blueprint-embed-dim",
        type=_positive_int,
        metavar="N",
        help="give the LSTM the blueprint in each slot as an extra input, embedded in N "
        "values (docs/adr/0010)",
    )
    demo.add_argument(
        "--logdir",
        type=Path,
        metavar="DIR",
        help="also write each policy's training scalars for TensorBoard, in DIR/lstm and "
        "DIR/mlp (needs tensorboard, in the demo extra)",
    )


def _run_demo(args: argparse.Namespace) -> int:
    """Run `esper-policy demo` with parsed arguments; returns the exit code.

    Raises:
        CommandError: An option cannot work here.
    """
    from esper.tamiyo.policy.demo.run import DemoError, DemoOptions, run_demo  # noqa: PLC0415

    training_only = {
        "--steps": args.steps,
        "--envs": args.envs,
        "--output": args.output,
        "--logdir": args.logdir,
        "--probability-floor": args.probability_floor or None,
        "--blueprint-embed-dim": args.blueprint_embed_dim,
    }
    given = [flag for flag, value in training_only.items() if value is not None]
    if args.load is not None and given:
        raise CommandError(
            f"--load evaluates a checkpoint and trains nothing: {', '.join(given)} would be ignored"
        )
    if args.imports and args.load is None:
        raise CommandError("--import is for --load: it registers the bundle a checkpoint names")
    for target in args.imports:
        try:
            import_module_or_file(target)
        except TargetError as error:
            raise CommandError(f"--import: {error}") from None
    floors = dict(args.probability_floor)
    if len(floors) < len(args.probability_floor):
        raise CommandError("--probability-floor: a head is given twice")
    try:
        check_probability_floor(floors, "--probability-floor")
    except (TypeError, ValueError) as error:
        raise CommandError(str(error)) from None
    defaults = DemoOptions()
    options = DemoOptions(
        steps=defaults.steps if args.steps is None else args.steps,
        envs=defaults.envs if args.envs is None else args.envs,
        seed=args.seed,
        output=args.output,
        device=args.device,
        eval_episodes=args.eval_episodes,
        threads=args.threads,
        progress=not args.no_progress,
        load=args.load,
        logdir=args.logdir,
        probability_floor=floors or None,
        blueprint_embed_dim=args.blueprint_embed_dim or 0,
    )
    try:
        return run_demo(options)
    except DemoError as error:
        raise CommandError(str(error)) from None


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
            return _run_demo(args)
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
