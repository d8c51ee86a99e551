"""The eight factored action heads of Tamiyo, the size of each, and their hierarchy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CONDITIONED_HEADS",
    "HEAD_NAMES",
    "PRIMARY_HEAD",
    "TAMIYO_HIERARCHY",
    "TAMIYO_OPS",
    "ActionHierarchy",
    "ActionSpace",
]

HEAD_NAMES: Final[tuple[str, ...]] = (
    "slot",
    "blueprint",
    "style",
    "tempo",
    "alpha_target",
    "alpha_speed",
    "alpha_curve",
    "op",
)
"""The action heads, in the order every packed tensor of this package uses."""

_PAD_MULTIPLE: Final = 8

PRIMARY_HEAD: Final = "op"
"""The head sampled first in a hierarchical space; it decides which others matter."""

CONDITIONED_HEADS: Final[tuple[str, ...]] = tuple(h for h in HEAD_NAMES if h != PRIMARY_HEAD)
"""The heads an `ActionHierarchy` can condition on the op, in `HEAD_NAMES` order."""

TAMIYO_OPS: Final[tuple[str, ...]] = (
    "WAIT",
    "GERMINATE",
    "SET_ALPHA_TARGET",
    "PRUNE",
    "FOSSILIZE",
    "ADVANCE",
)
"""Tamiyo's lifecycle operations, in the `op` head's index order."""


@dataclass(frozen=True, slots=True)
class ActionHierarchy:
    """Which heads each op uses, and what a head the chosen op ignores takes.

    Tamiyo's action is not eight independent choices: the op is chosen first and
    decides which other heads matter. A bundle whose `ActionSpace` carries a hierarchy
    samples the op first, then every other head under its masks for that op; a head
    the op does not use takes its canonical action, with log-probability and entropy
    exactly 0, so it adds nothing to a PPO ratio or an entropy bonus.

    Build one with `from_table`; `TAMIYO_HIERARCHY` is Tamiyo's. The primary head is
    always `op` (`PRIMARY_HEAD`).

    Attributes:
        ops: The op names, in the `op` head's index order (`N_op` of them).
        used: For each op, the heads it uses, in `HEAD_NAMES` order (never `op`).
        canonical: Each head's canonical action, in `HEAD_NAMES` order (`op`'s is 0
            and unused): what the head takes when the chosen op does not use it.

    Example:
        >>> table = ActionHierarchy.from_table({"WAIT": (), "MOVE": ("slot",)})
        >>> table.uses(1), table.canonical_of("slot")
        (('slot',), 0)
    """

    ops: tuple[str, ...]
    used: tuple[tuple[str, ...], ...]
    canonical: tuple[int, ...] = (0,) * len(HEAD_NAMES)

    def __post_init__(self) -> None:
        if not isinstance(self.ops, tuple) or not self.ops:
            raise ValueError(
                f"ActionHierarchy.ops must be a non-empty tuple of names, got {self.ops!r}"
            )
        for name in self.ops:
            if not isinstance(name, str) or not name:
                raise TypeError(
                    f"ActionHierarchy.ops: op names must be non-empty strs, got {name!r}"
                )
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ActionHierarchy.ops has a repeated name: {self.ops}")
        if not isinstance(self.used, tuple | list) or len(self.used) != len(self.ops):
            raise ValueError(
                f"ActionHierarchy.used must hold one tuple of heads per op "
                f"({len(self.ops)}), got {self.used!r}"
            )
        given: tuple[object, ...] = tuple(self.used)  # lists too, at run time
        for op, heads in zip(self.ops, given, strict=True):
            if not isinstance(heads, tuple | list):
                raise TypeError(
                    f"ActionHierarchy: op {op!r} must map to a tuple of head names, got {heads!r}"
                )
            _check_used(op, tuple(heads))
        # One form whatever was given: frozen, hashable, each op's heads in HEAD_NAMES order.
        ordered = tuple(tuple(h for h in HEAD_NAMES if h in heads) for heads in self.used)
        object.__setattr__(self, "used", ordered)
        if (
            not isinstance(self.canonical, tuple)
            or len(self.canonical) != len(HEAD_NAMES)
            or any(isinstance(a, bool) or not isinstance(a, int) for a in self.canonical)
        ):
            raise ValueError(
                f"ActionHierarchy.canonical must be {len(HEAD_NAMES)} ints in HEAD_NAMES "
                f"order, got {self.canonical!r}"
            )
        if self.canonical[HEAD_NAMES.index(PRIMARY_HEAD)] != 0:
            raise ValueError(
                f"ActionHierarchy: {PRIMARY_HEAD!r} has no canonical action (every op uses "
                f"it); leave its entry 0, got {self.canonical!r}"
            )
        for head, action in zip(HEAD_NAMES, self.canonical, strict=True):
            if action < 0:
                raise ValueError(
                    f"ActionHierarchy: the canonical action of {head!r} is {action}; "
                    "actions are indices from 0"
                )

    @classmethod
    def from_table(
        cls,
        table: Mapping[str, Iterable[str]],
        canonical: Mapping[str, int] | None = None,
    ) -> ActionHierarchy:
        """Build a hierarchy from op name to the heads it uses, in op index order.

        Args:
            table: One entry per op, in the `op` head's index order: the op's name to
                the heads it uses (any order; never `op` itself).
            canonical: Head name to its canonical action, for the heads that should not
                take 0 when ignored.

        Returns:
            The hierarchy.

        Raises:
            TypeError: `table` is not a mapping, or an entry is not an iterable of names.
            ValueError: A head is unknown or repeated, `op` is conditioned on itself,
                or a canonical action is negative or names an unknown head.
        """
        if not isinstance(table, Mapping):
            raise TypeError(
                f"ActionHierarchy.from_table takes a mapping of op name to heads, "
                f"got {type(table).__name__}"
            )
        used: list[tuple[str, ...]] = []
        for op, heads in table.items():
            if isinstance(heads, str) or not isinstance(heads, Iterable):
                raise TypeError(
                    f"ActionHierarchy: op {op!r} must map to an iterable of head names "
                    f"(a tuple), got {heads!r}"
                )
            named = tuple(heads)
            _check_used(op, named)
            used.append(tuple(head for head in HEAD_NAMES if head in named))
        chosen = dict(canonical or {})
        for head in chosen:
            if head not in HEAD_NAMES:
                raise ValueError(
                    f"ActionHierarchy: canonical names unknown head {head!r}; the heads "
                    f"are {', '.join(HEAD_NAMES)}"
                )
        return cls(
            ops=tuple(table),
            used=tuple(used),
            canonical=tuple(chosen.get(head, 0) for head in HEAD_NAMES),
        )

    def __repr__(self) -> str:
        if self == TAMIYO_HIERARCHY:
            return "TAMIYO_HIERARCHY"
        return (
            f"ActionHierarchy(ops={self.ops!r}, used={self.used!r}, canonical={self.canonical!r})"
        )

    @property
    def num_ops(self) -> int:
        """`N_op`: the number of ops, which must be the `op` head's size."""
        return len(self.ops)

    def uses(self, op: int) -> tuple[str, ...]:
        """The heads op `op` (an index) uses, in `HEAD_NAMES` order."""
        return self.used[op]

    def canonical_of(self, head: str) -> int:
        """The action `head` takes when the chosen op does not use it."""
        return self.canonical[HEAD_NAMES.index(head)]

    def relevance_table(self) -> list[list[bool]]:
        """`[N_op][H]`: whether op `n` uses head `h` (`op` itself always True)."""
        return [
            [head == PRIMARY_HEAD or head in heads for head in HEAD_NAMES] for heads in self.used
        ]


def _check_used(op: object, heads: tuple[object, ...]) -> None:
    """Refuse an op's heads that are not distinct head names, or that include `op`."""
    for head in heads:
        if head == PRIMARY_HEAD:
            raise ValueError(
                f"ActionHierarchy: op {op!r} lists {PRIMARY_HEAD!r}; the primary head "
                "cannot be conditioned on itself"
            )
        if head not in HEAD_NAMES:
            raise ValueError(
                f"ActionHierarchy: op {op!r} uses unknown head {head!r}; the heads are "
                f"{', '.join(CONDITIONED_HEADS)}"
            )
    if len(set(heads)) != len(heads):
        raise ValueError(f"ActionHierarchy: op {op!r} lists a head twice: {heads}")


TAMIYO_HIERARCHY: Final = ActionHierarchy.from_table(
    {
        "WAIT": (),
        "GERMINATE": ("slot", "blueprint", "style", "tempo", "alpha_target"),
        "SET_ALPHA_TARGET": ("slot", "style", "alpha_target", "alpha_speed", "alpha_curve"),
        "PRUNE": ("slot", "alpha_speed", "alpha_curve"),
        "FOSSILIZE": ("slot",),
        "ADVANCE": ("slot",),
    }
)
"""Tamiyo's table: the ops in `TAMIYO_OPS` order and the heads each uses; every
canonical action is 0."""


@dataclass(frozen=True, slots=True)
class ActionSpace:
    """Number of actions of each head, and optionally the hierarchy between them.

    The defaults are Tamiyo's: three seed slots (the slot count is a parameter of the
    run), thirteen blueprints, and so on. Every head needs at least one action.

    Without a hierarchy (the default) the space is flat: the eight heads are sampled
    independently, each under its own mask. With one (`ActionSpace.tamiyo()`), the op
    is sampled first and decides which other heads matter; see `ActionHierarchy`.

    Attributes:
        slot: Seed slots the action can address.
        blueprint: Blueprints a seed can be germinated from.
        style: Germination styles.
        tempo: Germination tempos.
        alpha_target: Blend targets.
        alpha_speed: Blend speeds.
        alpha_curve: Blend curves.
        op: Lifecycle operations (wait, germinate, fossilize, ...).
        hierarchy: Which heads each op uses, or `None` for a flat space.

    Example:
        >>> ActionSpace(slot=5).sizes
        (5, 13, 4, 3, 3, 4, 3, 6)
        >>> ActionSpace.tamiyo(slot=5).hierarchy.uses(4)  # FOSSILIZE
        ('slot',)
    """

    slot: int = 3
    blueprint: int = 13
    style: int = 4
    tempo: int = 3
    alpha_target: int = 3
    alpha_speed: int = 4
    alpha_curve: int = 3
    op: int = 6
    hierarchy: ActionHierarchy | None = None

    def __post_init__(self) -> None:
        for name in HEAD_NAMES:
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int):
                raise TypeError(
                    f"ActionSpace.{name} must be an int, got {type(size).__name__} ({size!r})"
                )
            if size < 1:
                raise ValueError(f"ActionSpace.{name} must be at least 1 action, got {size}")
        table = self.hierarchy
        if table is None:
            return
        if not isinstance(table, ActionHierarchy):
            raise TypeError(
                f"ActionSpace.hierarchy must be an ActionHierarchy or None, "
                f"got {type(table).__name__}"
            )
        if table.num_ops != self.op:
            raise ValueError(
                f"ActionSpace: the hierarchy names {table.num_ops} ops {table.ops} but the "
                f"op head has {self.op} actions"
            )
        for name, action in zip(HEAD_NAMES, table.canonical, strict=True):
            if action >= getattr(self, name):
                raise ValueError(
                    f"ActionSpace: the canonical action of {name!r} is {action}, out of "
                    f"range for its {getattr(self, name)} actions"
                )

    @classmethod
    def tamiyo(cls, **sizes: int) -> ActionSpace:
        """Tamiyo's hierarchical space: `TAMIYO_HIERARCHY` over the given head sizes.

        Args:
            **sizes: Head sizes that differ from the defaults (`slot=5`, say); the op
                head keeps its six ops.

        Example:
            >>> ActionSpace.tamiyo().hierarchy.ops[1]
            'GERMINATE'
        """
        return cls(**sizes, hierarchy=TAMIYO_HIERARCHY)

    @property
    def is_hierarchical(self) -> bool:
        """Whether the op is sampled first and decides which heads matter."""
        return self.hierarchy is not None

    @property
    def sizes(self) -> tuple[int, ...]:
        """Head sizes in `HEAD_NAMES` order."""
        return tuple(getattr(self, name) for name in HEAD_NAMES)

    @property
    def num_heads(self) -> int:
        """Number of heads, `H` in shape comments."""
        return len(HEAD_NAMES)

    @property
    def padded_size(self) -> int:
        """Width `A_max` of the padded logits layout `[B, T, H, A_max]`.

        The largest head rounded up to a multiple of 8: reductions over a last
        dimension of 13 run about 10x slower than over 16 on CPU, because the
        vectorized kernels want a multiple of 8 or 16.
        """
        largest = max(self.sizes)
        return -(-largest // _PAD_MULTIPLE) * _PAD_MULTIPLE

    def size_of(self, head: str) -> int:
        """Number of actions of `head`.

        Raises:
            ValueError: `head` is not one of `HEAD_NAMES`.
        """
        if head not in HEAD_NAMES:
            raise ValueError(f"unknown head {head!r}; the heads are {', '.join(HEAD_NAMES)}")
        size: int = getattr(self, head)
        return size
