"""`PolicyBundle.compile` support: the compute paths, eager or compiled with `torch.compile`.

A bundle holds one `Paths`: `EAGER` until `compile()`, then a `CompiledPaths`. Only the
compute paths of `compute` are compiled; the argument checks and the shaping of results
stay eager around them, so a bad argument gets the same error and no check can break
the graph. A `CompiledPaths` pickles and copies as its arguments and compiles again
where it is restored, so a copy of a compiled bundle runs compiled code of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from esper.tamiyo.policy import compute

__all__ = ["EAGER", "CompiledPaths", "Paths"]

ActPath = Callable[[compute.Bundle, compute.Call, bool, torch.Generator | None], compute.Acted]
EvaluatePath = Callable[[compute.Bundle, compute.Call], compute.Scored]


class Paths:
    """The functions `get_action` and `evaluate_actions` compute with.

    Args:
        act: `compute.act`, or a compiled version of it.
        evaluate: `compute.evaluate`, or a compiled version of it.
    """

    def __init__(self, act: ActPath, evaluate: EvaluatePath) -> None:
        self.act = act
        self.evaluate = evaluate


EAGER = Paths(compute.act, compute.evaluate)
"""The compute paths as written: what every bundle runs until `compile()`."""


class CompiledPaths(Paths):
    """`torch.compile` of the compute paths, with the arguments it was given.

    Args:
        compile_kwargs: Passed to `torch.compile` (`backend`, `mode`, `dynamic`, ...).
    """

    def __init__(self, compile_kwargs: dict[str, Any]) -> None:
        self.compile_kwargs = dict(compile_kwargs)
        super().__init__(
            torch.compile(compute.act, **self.compile_kwargs),
            torch.compile(compute.evaluate, **self.compile_kwargs),
        )

    def __reduce__(self) -> tuple[type[CompiledPaths], tuple[dict[str, Any]]]:
        """Pickle and copy as the arguments: the copy compiles its own functions."""
        return CompiledPaths, (self.compile_kwargs,)
