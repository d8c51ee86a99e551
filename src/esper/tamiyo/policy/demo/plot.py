"""The demo's learning-curve figure (needs matplotlib, from the `demo` extra)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from esper.tamiyo.policy.demo.evaluation import Evaluation
from esper.tamiyo.policy.demo.ppo import IterationStats
from esper.tamiyo.policy.demo.task import TaskConfig

__all__ = ["plot_learning_curves"]

_COLORS = {"lstm": "tab:blue", "mlp": "tab:orange", "uniform": "tab:gray"}


def plot_learning_curves(
    histories: Mapping[str, Sequence[IterationStats]],
    baseline: Evaluation,
    config: TaskConfig,
    path: Path,
) -> Path:
    """Draw mean return and memory-decision success against environment steps.

    Args:
        histories: Policy name to its training iterations.
        baseline: The uniform policy's evaluation, drawn as a dashed line.
        config: The task, for its best return and chance level (dotted lines).
        path: The PNG to write.

    Returns:
        `path`.
    """
    from matplotlib.figure import Figure  # noqa: PLC0415 - optional dependency

    figure = Figure(figsize=(10, 4), layout="constrained")
    returns, success = figure.subplots(1, 2)
    for name, history in histories.items():
        steps = [stats.env_steps for stats in history]
        color = _COLORS.get(name)
        returns.plot(steps, [s.mean_return for s in history], label=name, color=color)
        success.plot(steps, [s.success_rate for s in history], label=name, color=color)
    for axes, level in ((returns, baseline.mean_return), (success, baseline.success_rate)):
        axes.axhline(level, color=_COLORS["uniform"], linestyle="--", label="uniform")
        axes.set_xlabel("environment steps")
        axes.grid(alpha=0.3)
    returns.axhline(config.best_return, color="black", linestyle=":", linewidth=1, label="best")
    success.axhline(config.chance, color="black", linestyle=":", linewidth=1, label="chance")
    returns.set_ylabel("mean episode return")
    returns.set_title("Return (training episodes)")
    success.set_ylabel("memory decision taken right")
    success.set_title("Success on the memory decision")
    success.set_ylim(-0.02, 1.02)
    returns.legend(loc="lower right")
    success.legend(loc="upper left")
    figure.savefig(path, dpi=110)
    return path
