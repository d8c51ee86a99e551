"""Extra per-step inputs: what a bundle needs besides its features, declared and checked.

A bundle whose network needs more than features at every step (the blueprint
installed in each slot, say) declares each such input with an `ExtraInput` and
passes them to `PolicyBundle.__init__(extra_inputs=...)`. Callers then pass them, name
to tensor, to every public method (`get_action(features, masks, hidden,
extras={"blueprint_indices": ...})`), and the base checks them and brings them to
`[B, T, ...]` in `_normalize_inputs`, with the features and masks, once per call. The hook reads
them from `PolicyInputs.extras`. A bundle that declares none sees no change.

The checks that read no values (name, type, dtype, rank, batch, sequence length,
device) always run, in `check_extras`; the range of integer inputs, and the
finiteness of floating ones, are value checks, run with `check_values` on
(`value_checks`).
"""

from __future__ import annotations

import difflib
import keyword
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

import torch

from esper.tamiyo.policy.validation import check_step_layout

__all__ = [
    "NO_EXTRAS",
    "ExtraInput",
    "ExtraKind",
    "MissingExtraInputError",
    "check_extra_declarations",
    "check_extras",
    "check_names",
    "check_present",
    "inside_range",
]

ExtraKind = Literal["integer", "floating"]
"""An extra input's dtype kind: integer (converted to int64) or floating (the bundle's)."""

NO_EXTRAS: Final[Mapping[str, torch.Tensor]] = MappingProxyType({})
"""The extras of a call that has none: one shared, read-only empty mapping."""


class MissingExtraInputError(ValueError):
    """A declared extra input was not given: the caller's, or an override's, omission."""


@dataclass(frozen=True, slots=True)
class ExtraInput:
    """One per-step input a bundle needs besides its features.

    Example:
        The blueprint installed in each of 3 slots, -1 for an empty slot:

        >>> ExtraInput("blueprint_indices", "integer", (3,), low=0, high=13, sentinels=(-1,))
        ExtraInput('blueprint_indices': [B, (T), 3] integer in [0, 13) or -1)

    Args:
        name: Its key in the `extras` mapping callers pass, a Python identifier.
        kind: `"integer"` (any integer dtype, converted to int64) or `"floating"` (the
            bundle's dtype, as features; under autocast float32 too).
        shape: Its shape at one step of one row, after `[B]` or `[B, T]`: `(3,)` for
            one value per slot, `()` for a scalar per step.
        low: Integers only: the smallest allowed value, or `None` for no bound.
        high: Integers only: one past the largest allowed value, or `None`.
        sentinels: Integers only: values allowed outside `[low, high)`, such as -1 for
            "none".

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: A bad name, kind, shape or range.
    """

    name: str
    kind: ExtraKind
    shape: tuple[int, ...] = ()
    low: int | None = None
    high: int | None = None
    sentinels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"ExtraInput: name must be a Python identifier, got {name!r}")
        if self.kind not in ("integer", "floating"):
            raise ValueError(
                f"ExtraInput {name!r}: kind must be 'integer' or 'floating', got {self.kind!r}"
            )
        if not isinstance(self.shape, tuple):
            raise TypeError(
                f"ExtraInput {name!r}: shape must be a tuple of positive ints (the shape "
                f"after [B, T]), got {type(self.shape).__name__}"
            )
        if not all(_is_int(size) and size >= 1 for size in self.shape):
            raise ValueError(
                f"ExtraInput {name!r}: shape must be a tuple of positive ints (the shape "
                f"after [B, T]), got {self.shape!r}"
            )
        self._check_bounds()

    def _check_bounds(self) -> None:
        name = self.name
        if not isinstance(self.sentinels, tuple):
            raise TypeError(
                f"ExtraInput {name!r}: sentinels must be a tuple of ints, got "
                f"{type(self.sentinels).__name__}"
            )
        bounds = [bound for bound in (self.low, self.high) if bound is not None]
        bounds += self.sentinels
        if not all(_is_int(bound) for bound in bounds):
            raise TypeError(
                f"ExtraInput {name!r}: low, high and sentinels must be ints, got low="
                f"{self.low!r}, high={self.high!r}, sentinels={self.sentinels!r}"
            )
        if any(not _INT64_MIN <= bound <= _INT64_MAX for bound in bounds):
            raise ValueError(
                f"ExtraInput {name!r}: low, high and sentinels must fit in int64, got low="
                f"{self.low!r}, high={self.high!r}, sentinels={self.sentinels!r}"
            )
        if self.kind == "floating":
            if bounds:
                raise ValueError(
                    f"ExtraInput {name!r}: low, high and sentinels are for integer inputs; "
                    "a floating input is checked for NaN and Inf only"
                )
            return
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"ExtraInput {name!r}: the range [{self.low}, {self.high}) is empty")
        if self.sentinels and not self.bounded:
            raise ValueError(
                f"ExtraInput {name!r}: sentinels are values allowed outside the range; give "
                "the range (low, high, or both) too"
            )
        inside = [value for value in self.sentinels if self._in_range(value)]
        if inside:
            raise ValueError(
                f"ExtraInput {name!r}: sentinels {inside} lie inside {self.allowed_range()}; "
                "a sentinel is a value allowed outside the range"
            )

    def _in_range(self, value: int) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value < self.high)

    @property
    def bounded(self) -> bool:
        """Whether its values are checked (an integer input with a bound)."""
        return self.low is not None or self.high is not None

    def span(self) -> tuple[int | None, int | None, tuple[int, ...]]:
        """`(low, high, lone)`: the range widened over the sentinels next to it, and the rest.

        `[0, 13)` with sentinel -1 is `(-1, 13, ())`: one interval to compare against.
        """
        low, high, sentinels = self.low, self.high, set(self.sentinels)
        if low is not None:
            while low - 1 in sentinels:
                low -= 1
        if high is not None:
            while high in sentinels:
                high += 1
        lone = tuple(
            value
            for value in sorted(sentinels)
            if (low is not None and value < low) or (high is not None and value >= high)
        )
        if high is not None and high > _INT64_MAX:  # widened past int64: no upper bound
            high = None
        return low, high, lone

    def allowed_range(self) -> str:
        """The range alone, `[0, 13)`; `[-inf, inf)` without bounds."""
        low = "-inf" if self.low is None else str(self.low)
        high = "inf" if self.high is None else str(self.high)
        return f"[{low}, {high})"

    def allowed(self) -> str:
        """The allowed values of an integer input, `[0, 13) or -1`; `""` when unbounded."""
        if not self.bounded:
            return ""
        return self.allowed_range() + "".join(f" or {value}" for value in self.sentinels)

    def describe(self) -> str:
        """`[B, (T), 3] integer in [0, 13) or -1`: what callers must pass, for messages."""
        dims = ", ".join(["B", "(T)", *(str(size) for size in self.shape)])
        text = f"[{dims}] {self.kind}"
        return f"{text} in {self.allowed()}" if self.bounded else text

    def __repr__(self) -> str:
        return f"ExtraInput({self.name!r}: {self.describe()})"


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_extra_declarations(declared: object, owner: str) -> tuple[ExtraInput, ...]:
    """Check a bundle's `extra_inputs=` argument: a sequence of `ExtraInput`, names unique.

    Returns:
        The declarations as a tuple, in the order given.
    """
    if isinstance(declared, (str, bytes, Mapping)) or not isinstance(declared, Sequence):
        raise TypeError(
            f"{owner}: extra_inputs must be a sequence of ExtraInput, got {type(declared).__name__}"
        )
    specs = tuple(declared)
    names: set[str] = set()
    for spec in specs:
        if not isinstance(spec, ExtraInput):
            raise TypeError(
                f"{owner}: extra_inputs must hold ExtraInput declarations, got "
                f"{type(spec).__name__}"
            )
        if spec.name in names:
            raise ValueError(f"{owner}: extra_inputs declares {spec.name!r} twice")
        names.add(spec.name)
    return specs


def check_extras(
    given: object,
    specs: tuple[ExtraInput, ...],
    owner: str,
    batch: int,
    steps: int,
    single_step: bool,
    device: torch.device,
    dtypes: tuple[torch.dtype, ...],
) -> Mapping[str, torch.Tensor]:
    """Check the extra inputs of a call against the declarations; bring them to `[B, T, ...]`.

    Args:
        given: What the caller passed as `extras`: name to tensor, or `None`.
        specs: The bundle's declarations.
        owner: The bundle's class name, for messages.
        batch: `B` of the features.
        steps: `T` of the features (1 for a single step).
        single_step: The features were `[B, F]`.
        device: The bundle's device.
        dtypes: The dtypes a floating input may have (the features' rule).

    Returns:
        Name to `[B, T, *shape]` tensor, in declaration order: int64 for integer
        inputs (a view of the caller's tensor when it was int64 already), the caller's
        tensor (a view) for floating ones. `NO_EXTRAS` when none are declared.

    Raises:
        TypeError: `extras` is not a mapping, an input is not a tensor or has the wrong
            dtype kind.
        ValueError: An unknown, misspelt or missing input, or a wrong shape or device.
    """
    if given is None and not specs:  # the usual case, decided without a call
        return NO_EXTRAS
    given = check_names(given, specs, owner)
    if not specs:
        return NO_EXTRAS
    check_present(given, specs, owner)
    checked: dict[str, torch.Tensor] = {}
    for spec in specs:
        checked[spec.name] = _check_one(
            given[spec.name], spec, batch, steps, single_step, device, dtypes
        )
    return MappingProxyType(checked)


def check_names(given: object, specs: tuple[ExtraInput, ...], owner: str) -> Mapping[str, object]:
    """Check `extras` is a mapping (or `None`) whose keys are all declared; return it.

    What `check_extras` checks first, and all a bundle that declares no extra inputs
    needs (`None` or an empty mapping): the base runs it alone for such a bundle, whose
    `_normalize_inputs` override may predate extra inputs.

    Raises:
        TypeError: `given` is neither a mapping nor `None`.
        ValueError: A key is not a declared input.
    """
    if given is None:
        return NO_EXTRAS
    if not isinstance(given, Mapping):
        raise TypeError(
            f"extras must be a mapping of input name to tensor, or None; got {type(given).__name__}"
        )
    known = {spec.name for spec in specs}
    for name in given:
        if name not in known:
            raise ValueError(_unknown_message(name, specs, owner))
    return given


def check_present(given: Mapping[str, object], specs: tuple[ExtraInput, ...], owner: str) -> None:
    """Refuse extras that lack a declared input, naming it and what to pass.

    Raises:
        MissingExtraInputError: A declared input is not in `given`.
    """
    for spec in specs:
        if spec.name not in given:
            raise MissingExtraInputError(
                f"missing extra input {spec.name!r}: {owner} needs it at every call, "
                f"{spec.describe()}; pass extras={{{spec.name!r}: ...}}"
            )


def _unknown_message(name: object, specs: tuple[ExtraInput, ...], owner: str) -> str:
    if not specs:
        return f"extras has {name!r}, but {owner} declares no extra inputs; pass extras=None"
    names = [spec.name for spec in specs]
    close = difflib.get_close_matches(name, names, n=1) if isinstance(name, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"extras has an unknown input {name!r}; {owner} declares: {', '.join(names)}{hint}"


def _check_one(
    value: object,
    spec: ExtraInput,
    batch: int,
    steps: int,
    single_step: bool,
    device: torch.device,
    dtypes: tuple[torch.dtype, ...],
) -> torch.Tensor:
    """One input: its type and dtype, then its shape, then its device; `[B, T, *shape]`."""
    tensor = _check_type(value, spec, dtypes)
    _check_shape(tuple(tensor.shape), spec, batch, steps, single_step)
    if tensor.device != device:
        raise ValueError(
            f"extra input {spec.name!r} is on {tensor.device} but the bundle is on {device}; "
            f"move it with .to({str(device)!r})"
        )
    if tensor.dim() == 1 + len(spec.shape):
        tensor = tensor.unsqueeze(1)  # [B, 1, *shape]
    if spec.kind == "integer" and tensor.dtype != torch.long:
        tensor = tensor.long()
    return tensor


def _check_type(value: object, spec: ExtraInput, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    what = f"extra input {spec.name!r}"
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{what} must be a torch.Tensor, {spec.describe()}; got {type(value).__name__}"
        )
    if value.layout != torch.strided:
        raise TypeError(f"{what} must be a dense tensor, got layout {value.layout}")
    if spec.kind == "integer":
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{what} must be an integer tensor (int64), {spec.describe()}; got dtype "
                f"{value.dtype}"
            )
        if value.dtype == torch.uint64:  # values past 2**63 would wrap to negatives in int64
            raise TypeError(
                f"{what} has dtype torch.uint64, which int64 cannot hold; give it as int64"
            )
    elif value.dtype not in dtypes:
        allowed = ", ".join(str(dtype) for dtype in dtypes)
        raise TypeError(
            f"{what} has dtype {value.dtype}; the bundle takes {allowed} (as its features)"
        )
    return value


def _check_shape(
    shape: tuple[int, ...], spec: ExtraInput, batch: int, steps: int, single_step: bool
) -> None:
    """`[B, *shape]` (when `T == 1`), `[B, 1, *shape]` or `[B, T, *shape]`, as masks are."""
    what = f"extra input {spec.name!r}"
    inner = spec.shape
    form = ", ".join(str(size) for size in inner)
    check_step_layout(shape, what, form, len(inner), batch, steps, single_step)
    if shape[len(shape) - len(inner) :] != inner:
        raise ValueError(
            f"{what} has shape {shape}; its trailing dimensions must be {inner} ({spec.describe()})"
        )


def inside_range(value: torch.Tensor, spec: ExtraInput) -> torch.Tensor:
    """Bool, like `value`: True where an integer input is in its range or a sentinel.

    Sentinels next to the range (-1 below `[0, 13)`) widen it, so the usual
    declaration costs two comparisons and an `and`; others add an `==` each.
    """
    low, high, lone = spec.span()
    ok = torch.ones_like(value, dtype=torch.bool) if low is None else value >= low
    if high is not None:
        ok = ok & (value < high)
    for sentinel in lone:
        ok = ok | (value == sentinel)
    return ok
