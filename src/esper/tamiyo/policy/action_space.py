"""The eight factored action heads of Tamiyo and the size of each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["HEAD_NAMES", "ActionSpace"]

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


@dataclass(frozen=True, slots=True)
class ActionSpace:
    """Number of actions of each head.

    The defaults are Tamiyo's: three seed slots (the slot count is a parameter of the
    run), thirteen blueprints, and so on. Every head needs at least one action.

    Attributes:
        slot: Seed slots the action can address.
        blueprint: Blueprints a seed can be germinated from.
        style: Germination styles.
        tempo: Germination tempos.
        alpha_target: Blend targets.
        alpha_speed: Blend speeds.
        alpha_curve: Blend curves.
        op: Lifecycle operations (wait, germinate, fossilize, ...).

    Example:
        >>> ActionSpace(slot=5).sizes
        (5, 13, 4, 3, 3, 4, 3, 6)
    """

    slot: int = 3
    blueprint: int = 13
    style: int = 4
    tempo: int = 3
    alpha_target: int = 3
    alpha_speed: int = 4
    alpha_curve: int = 3
    op: int = 6

    def __post_init__(self) -> None:
        for name in HEAD_NAMES:
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int):
                raise TypeError(
                    f"ActionSpace.{name} must be an int, got {type(size).__name__} ({size!r})"
                )
            if size < 1:
                raise ValueError(f"ActionSpace.{name} must be at least 1 action, got {size}")

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
