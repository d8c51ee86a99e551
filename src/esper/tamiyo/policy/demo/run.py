"""`esper-policy demo`: train the LSTM bundle with PPO and show it beat the baselines.

The run, start to end:

1. train `LSTMPolicyBundle` on `SeedLifecycleTask` with `PPOTrainer`, with a
   progress bar;
2. train `MLPPolicyBundle` the same way (same settings, seeds and episodes): the
   same heads without memory;
3. evaluate both, greedily, and `UniformPolicyBundle`, sampling, on the same seeded
   episodes, and print a table with the acceptance checks;
4. save both checkpoints, a learning-curve PNG and `results.json` in the output
   folder, and name it. A file that cannot be written (a full disk, say) does not
   stop the others: the run ends with one line naming each failed file and its cause,
   and exit status 2.

With `--logdir DIR`, each policy's training scalars also go to TensorBoard, one run
per policy: `DIR/lstm` and `DIR/mlp`.

`--load PATH` evaluates a saved checkpoint on the same episodes instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from esper.tamiyo.policy.action_space import ActionSpace
from esper.tamiyo.policy.base import PolicyBundle
from esper.tamiyo.policy.checkpoint import CheckpointError, UnregisteredPolicyError, load_policy
from esper.tamiyo.policy.demo.evaluation import Evaluation, evaluate_policy
from esper.tamiyo.policy.demo.ppo import (
    IterationStats,
    PPOConfig,
    TensorBoardScalars,
    train_policy,
)
from esper.tamiyo.policy.demo.task import TaskConfig
from esper.tamiyo.policy.floors import check_probability_floor
from esper.tamiyo.policy.lstm import LSTMPolicyBundle
from esper.tamiyo.policy.mlp import MLPPolicyBundle
from esper.tamiyo.policy.registry import name_of
from esper.tamiyo.policy.uniform import UniformPolicyBundle
from esper.tamiyo.policy.validation import check_positive_int

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["Acceptance", "DemoError", "DemoOptions", "build_policy", "check_acceptance", "run_demo"]

TRAINED = ("lstm", "mlp")
"""The policies the demo trains, in order."""
EVAL_SEED_OFFSET = 1_000_003
"""Evaluation episodes use `seed + EVAL_SEED_OFFSET`, apart from the training episodes."""
_EXTRA_HINT = "install the demo extra: pip install 'esper-tamiyo-policy[demo]'"


class DemoError(Exception):
    """A demo option that cannot work; the message says which and why."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What `esper-policy demo` does.

    Attributes:
        steps: Training environment steps per policy, all environments together.
        envs: Environments stepped together in training (a multiple of the PPO
            minibatch count, 4).
        seed: Seeds weights, episodes and sampling: the same seed gives the same run.
        output: Folder for checkpoints, plot and results; `demo-runs/<time>` if `None`.
        device: Where to train and evaluate (`"cpu"`, `"cuda"`, `"cuda:1"`, ...).
        eval_episodes: Evaluation episodes per policy.
        threads: torch threads. One is fastest for these small tensors, and keeps
            a run exactly repeatable.
        progress: Show progress bars.
        load: Evaluate this checkpoint instead of training.
        logdir: Write each trained policy's scalars for TensorBoard in
            `logdir/<policy>` (needs the `tensorboard` package, in the demo extra).
        probability_floor: Per-head probability floors for both trained policies
            (see `PolicyBundle`), e.g. `{"op": 0.02}`; none by default.
        blueprint_embed_dim: Give the LSTM the blueprint in each slot as an extra
            input, embedded in this many values (`LSTMPolicyBundle`); 0, the
            default, gives it features alone. The MLP has no such option.
    """

    steps: int = 120_000
    envs: int = 64
    seed: int = 0
    output: Path | None = None
    device: str = "cpu"
    eval_episodes: int = 1000
    threads: int = 1
    progress: bool = True
    load: Path | None = None
    logdir: Path | None = None
    probability_floor: dict[str, float] | None = None
    blueprint_embed_dim: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "envs", "eval_episodes", "threads"):
            check_positive_int(getattr(self, name), name, "DemoOptions")
        check_positive_int(self.blueprint_embed_dim, "blueprint_embed_dim", "DemoOptions", 0)
        check_probability_floor(self.probability_floor, "DemoOptions")


@dataclass(frozen=True, slots=True)
class Acceptance:
    """One acceptance check of the demo: a sentence and whether it holds."""

    check: str
    passed: bool


@dataclass(slots=True)
class _Run:
    histories: dict[str, list[IterationStats]] = field(default_factory=dict)
    bundles: dict[str, PolicyBundle] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def build_policy(
    name: str,
    feature_dim: int,
    action_space: ActionSpace = ActionSpace.tamiyo(),
    *,
    op_conditioned_logits: bool = False,
    probability_floor: Mapping[str, float] | None = None,
    blueprint_embed_dim: int = 0,
) -> PolicyBundle:
    """The demo's `"lstm"` or `"mlp"` bundle: 64 wide, so training takes seconds.

    Args:
        name: `"lstm"` or `"mlp"`.
        feature_dim: The task's feature width.
        action_space: The task's action space (`TaskConfig.action_space`).
        op_conditioned_logits: Give the LSTM op-conditioned logits (a hierarchical
            space only); the demo does not.
        probability_floor: Per-head probability floors (see `PolicyBundle`); none by
            default.
        blueprint_embed_dim: The LSTM's blueprint embedding (its extra input
            `blueprint_indices`); 0, the default, for none. The MLP has none.

    Raises:
        ValueError: An unknown name, or a blueprint embedding asked of the MLP.
    """
    if name == "lstm":
        return LSTMPolicyBundle(
            feature_dim, hidden_dim=64, embed_dim=64, action_space=action_space,
            op_conditioned_logits=op_conditioned_logits, probability_floor=probability_floor,
            blueprint_embed_dim=blueprint_embed_dim,
        )  # fmt: skip
    if blueprint_embed_dim:
        raise ValueError(f"build_policy: only the LSTM takes blueprint_embed_dim, not {name!r}")
    if name == "mlp":
        return MLPPolicyBundle(
            feature_dim, hidden_dim=64, action_space=action_space,
            probability_floor=probability_floor,
        )  # fmt: skip
    raise ValueError(f"the demo trains {' and '.join(TRAINED)}, not {name!r}")


def check_acceptance(evaluations: dict[str, Evaluation], chance: float) -> list[Acceptance]:
    """The demo's claims about its evaluations, each checked.

    Args:
        evaluations: `"lstm"`, `"mlp"` and `"uniform"` to their scores.
        chance: Success rate of guessing the memory decision.
    """
    lstm, mlp, uniform = evaluations["lstm"], evaluations["mlp"], evaluations["uniform"]
    lowest = uniform.mean_return < min(lstm.mean_return, mlp.mean_return)
    invalid = sum(e.invalid_actions for e in evaluations.values())
    return [
        Acceptance("the LSTM takes the memory decision right in at least 95% of episodes",
                   lstm.success_rate >= 0.95),
        Acceptance(f"the MLP stays within 10 points of chance ({chance:.0%}) on it",
                   abs(mlp.success_rate - chance) <= 0.10),
        Acceptance("the uniform baseline has the lowest mean return", lowest),
        Acceptance("no policy took an invalid action", invalid == 0),
    ]  # fmt: skip


def run_demo(options: DemoOptions) -> int:
    """Run the demo; returns the exit code: 0 when every acceptance check holds.

    Raises:
        DemoError: An option cannot work here (no such device, a checkpoint that
            does not fit the task, a missing optional package, ...).
    """
    device = _resolve_device(options.device)
    if options.load is None and options.envs % PPOConfig().minibatches != 0:
        raise DemoError(
            f"--envs {options.envs}: must be a multiple of {PPOConfig().minibatches}, "
            "the PPO minibatch count"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        if options.load is not None:
            return _evaluate_checkpoint(options.load, options, device)
        return _train_and_compare(options, device)
    finally:
        torch.set_num_threads(threads)


def _train_and_compare(options: DemoOptions, device: torch.device) -> int:
    progress_bar = _import_optional(with_tensorboard=options.logdir is not None)
    output = _output_folder(options)
    config = TaskConfig()
    print(
        f"Training on SeedLifecycleTask: {options.envs} environments, "
        f"{options.steps:,} steps per policy, seed {options.seed}, {device}, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}"
        + (f", probability floors {options.probability_floor}" if options.probability_floor else "")
        + (
            f", LSTM blueprint embedding {options.blueprint_embed_dim}"
            if options.blueprint_embed_dim
            else ""
        )
    )
    run = _Run()
    for name in TRAINED:
        started = time.perf_counter()
        torch.manual_seed(options.seed)
        bundle = build_policy(
            name, config.feature_dim, config.action_space,
            probability_floor=options.probability_floor,
            blueprint_embed_dim=options.blueprint_embed_dim if name == "lstm" else 0,
        ).to(device)  # fmt: skip
        ppo = PPOConfig()
        per_iteration = options.envs * ppo.rollout_steps
        with contextlib.ExitStack() as stack:
            bar = stack.enter_context(
                progress_bar(
                    total=-(-options.steps // per_iteration) * per_iteration,
                    desc=f"train {name:<4}", unit="step", unit_scale=True,
                    disable=not options.progress, dynamic_ncols=True,
                )
            )  # fmt: skip
            callbacks = [_show_progress(bar)]
            if options.logdir is not None:
                callbacks.append(stack.enter_context(_scalars(options.logdir / name)))
            run.histories[name] = train_policy(
                bundle, options.steps, num_envs=options.envs, seed=options.seed, config=ppo,
                task_config=config, on_iteration=_CallEach(callbacks),
            )  # fmt: skip
        run.bundles[name] = bundle
        run.seconds[f"train_{name}"] = time.perf_counter() - started
    started = time.perf_counter()
    evaluations = _evaluate_all(run.bundles, options, config)
    run.seconds["evaluate"] = time.perf_counter() - started
    acceptance = check_acceptance(evaluations, config.chance)
    _print_table(evaluations, options, config)
    _print_acceptance(acceptance)
    written, failed = _save(run, evaluations, acceptance, options, config, output)
    total = sum(run.seconds.values())
    saved = ", ".join(path.name for path in written) or "nothing"
    print(f"\nDone in {total:.0f} s. Saved in {output}/: {saved}")
    if failed:
        raise DemoError(f"--output {output}: could not write {', '.join(failed)}")
    return 0 if all(a.passed for a in acceptance) else 1


def _evaluate_checkpoint(path: Path, options: DemoOptions, device: torch.device) -> int:
    config = TaskConfig()
    try:
        bundle = load_policy(path, map_location=device)
    except FileNotFoundError:
        raise DemoError(f"--load {path}: no such file") from None
    except OSError as error:
        raise DemoError(f"--load {path}: cannot read it: {error}") from None
    except UnregisteredPolicyError as error:
        hint = "--import the module or file that registers it"
        raise DemoError(f"--load: {error} ({hint})") from None
    except CheckpointError as error:
        raise DemoError(f"--load: {error}") from None
    what = f"--load {path}: the {name_of(type(bundle))!r} bundle in it"
    hint = "load a checkpoint that `esper-policy demo` saved"
    if bundle.feature_dim not in (None, config.feature_dim):
        raise DemoError(
            f"{what} takes {bundle.feature_dim} features, the demo task gives "
            f"{config.feature_dim}; {hint}"
        )
    if bundle.action_space != config.action_space:
        raise DemoError(
            f"{what} has heads {bundle.action_space}, the demo task uses "
            f"{config.action_space}; {hint}"
        )
    uniform = UniformPolicyBundle(config.feature_dim, action_space=config.action_space).to(device)
    evaluations = {
        str(path): _evaluate(bundle, options, config),
        "uniform": _evaluate(uniform, options, config),
    }
    _print_table(evaluations, options, config)
    return 0


def _evaluate_all(
    bundles: dict[str, PolicyBundle], options: DemoOptions, config: TaskConfig
) -> dict[str, Evaluation]:
    evaluations = {name: _evaluate(bundle, options, config) for name, bundle in bundles.items()}
    device = next(iter(bundles.values())).device
    uniform = UniformPolicyBundle(config.feature_dim, action_space=config.action_space).to(device)
    evaluations["uniform"] = _evaluate(uniform, options, config)
    return evaluations


def _evaluate(bundle: PolicyBundle, options: DemoOptions, config: TaskConfig) -> Evaluation:
    """Score `bundle` on the demo's evaluation episodes.

    A trained policy acts greedily. The uniform policy samples: greedy, it would
    always take each head's first valid action, a constant policy, not a baseline.
    """
    return evaluate_policy(
        bundle,
        episodes=options.eval_episodes,
        seed=options.seed + EVAL_SEED_OFFSET,
        deterministic=not isinstance(bundle, UniformPolicyBundle),
        config=config,
    )


def _print_table(
    evaluations: dict[str, Evaluation], options: DemoOptions, config: TaskConfig
) -> None:
    width = max(len("policy"), *(len(name) for name in evaluations))
    print(
        f"\nEvaluation on {options.eval_episodes} seeded episodes "
        f"(seed {options.seed} + {EVAL_SEED_OFFSET}); chance on the memory decision "
        f"is {config.chance:.0%}:"
    )
    print(
        f"  {'policy':<{width}}  {'acts':<7}  {'mean return':>11}  "
        f"{'memory decision':>15}  {'invalid actions':>15}"
    )
    for name, score in evaluations.items():
        acts = "greedy" if score.deterministic else "samples"
        print(
            f"  {name:<{width}}  {acts:<7}  {score.mean_return:>11.3f}  "
            f"{score.success_rate:>15.1%}  {score.invalid_actions:>15d}"
        )


def _print_acceptance(acceptance: list[Acceptance]) -> None:
    print("\nAcceptance:")
    for item in acceptance:
        print(f"  [{'PASS' if item.passed else 'FAIL'}] {item.check}")


def _save(
    run: _Run,
    evaluations: dict[str, Evaluation],
    acceptance: list[Acceptance],
    options: DemoOptions,
    config: TaskConfig,
    output: Path,
) -> tuple[list[Path], list[str]]:
    """Write the checkpoints, the plot and `results.json`, each whatever became of the others.

    Returns:
        The files written, and `"name (cause)"` for each that could not be.
    """
    from esper.tamiyo.policy.demo.plot import plot_learning_curves  # noqa: PLC0415

    results: dict[str, Any] = {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "task": {"feature_dim": config.feature_dim, "episode_steps": config.episode_steps,
                 "num_cues": config.num_cues, "chance": config.chance},
        "evaluations": {name: asdict(score) for name, score in evaluations.items()},
        "acceptance": [asdict(item) for item in acceptance],
        "histories": {name: [_history_row(s) for s in history]
                      for name, history in run.histories.items()},
        "seconds": run.seconds,
        "machine": {"torch": torch.__version__, "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
    }  # fmt: skip
    writers: list[tuple[Path, Callable[[Path], object]]] = [
        (output / f"{name}.pt", bundle.save) for name, bundle in run.bundles.items()
    ]
    writers.append(
        (
            output / "learning_curves.png",
            functools.partial(plot_learning_curves, run.histories, evaluations["uniform"], config),
        )
    )
    writers.append((output / "results.json", functools.partial(_write_json, results)))
    written: list[Path] = []
    failed: list[str] = []
    for path, write in writers:
        try:
            write(path)
        except (OSError, ValueError) as error:  # ValueError: weights a checkpoint refuses
            failed.append(f"{path.name} ({_cause(error)})")
        else:
            written.append(path)
    return written, failed


def _write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")


def _cause(error: Exception) -> str:
    """Why a write failed, in a few words: the OS's own for an errno."""
    if isinstance(error, OSError) and error.errno is not None:
        return os.strerror(error.errno)
    return str(error)


def _history_row(stats: IterationStats) -> dict[str, Any]:
    row: dict[str, Any] = {
        "env_steps": stats.env_steps,
        "episodes": stats.episodes,
        "invalid_actions": stats.invalid_actions,
        "illegal_combinations": stats.illegal_combinations,
    }
    for name, value in (
        ("mean_return", stats.mean_return),
        ("success_rate", stats.success_rate),
        *asdict(stats.update).items(),
    ):
        # JSON has no NaN: an iteration in which no episode ended records null.
        if isinstance(value, dict):  # per head
            row[name] = value
        else:
            row[name] = None if math.isnan(value) else value
    return row


class _CallEach:
    """One `on_iteration` callback that calls several, in order."""

    def __init__(self, callbacks: list[Callable[[IterationStats], None]]) -> None:
        self.callbacks = callbacks

    def __call__(self, stats: IterationStats) -> None:
        for callback in self.callbacks:
            callback(stats)


def _scalars(folder: Path) -> TensorBoardScalars:
    try:
        return TensorBoardScalars(folder)
    except OSError as error:
        raise DemoError(f"--logdir {folder.parent}: cannot write there: {error}") from None


def _show_progress(bar: tqdm[Any]) -> Callable[[IterationStats], None]:
    def show(stats: IterationStats) -> None:
        bar.update(stats.env_steps - bar.n)
        if stats.episodes:
            bar.set_postfix(
                {"return": f"{stats.mean_return:.2f}", "success": f"{stats.success_rate:.0%}"},
                refresh=False,
            )

    return show


def _import_optional(*, with_tensorboard: bool) -> type[tqdm[Any]]:
    """tqdm, checked with matplotlib (and tensorboard for --logdir) up front.

    A missing package fails before training.
    """
    try:
        import matplotlib  # noqa: F401, PLC0415
        from tqdm import tqdm  # noqa: PLC0415
    except ImportError as error:
        raise DemoError(f"the demo needs {error.name}: {_EXTRA_HINT}") from None
    if with_tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise DemoError(f"--logdir needs tensorboard: {_EXTRA_HINT}")
    return tqdm


def _output_folder(options: DemoOptions) -> Path:
    """The output folder, made and proven writable before any training.

    The default is a new folder, `demo-runs/<date-time>` (`-2`, `-3`, ... when a run in
    the same second took the name); files in a given `--output` are replaced.
    """
    try:
        if options.output is not None:
            folder = options.output
            folder.mkdir(parents=True, exist_ok=True)
        else:
            folder = _new_folder(Path("demo-runs") / time.strftime("%Y%m%d-%H%M%S"))
        with tempfile.TemporaryFile(dir=folder):
            pass  # a folder we cannot write to fails here, not after training
    except (FileExistsError, NotADirectoryError):
        raise DemoError(f"--output {options.output}: a file is in the way of this folder") from None
    except OSError as error:
        raise DemoError(
            f"--output {options.output or 'demo-runs'}: cannot write there: {error}"
        ) from None
    return folder


def _new_folder(base: Path) -> Path:
    for attempt in range(1, 100):
        folder = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"{base}: 99 runs in one second")


def _resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DemoError(
            f"--device {name}: not a torch device name (cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {name}: torch sees no CUDA device here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DemoError(
            f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s) here"
        )
    if device.type not in ("cpu", "cuda"):
        raise DemoError(f"--device {name}: the demo runs on cpu or cuda")
    return device
