"""`ActionMasks`: one boolean mask per action head, in a dataclass rather than eight keywords."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from esper.tamiyo.policy.action_space import HEAD_NAMES

__all__ = ["ActionMasks", "check_mask_type"]

_VALID_NAMES = ", ".join(HEAD_NAMES)
_IN_HEAD_ORDER = operator.attrgetter(*HEAD_NAMES)


@dataclass(frozen=True, slots=True, eq=False)  # == on tensors has no truth value: identity
class ActionMasks:
    """Which actions of each head are valid at each step.

    Each field is a `torch.bool` tensor whose last dimension is that head's number of
    actions (`True` = valid), or `None`, meaning every action of the head is valid.
    Shapes are `[B, A]` for a single step or `[B, T, A]` for a sequence; the bundle
    checks them against the features it is given.

    The fields follow `HEAD_NAMES` order. Construction checks types and dtypes only:
    a non-tensor or non-bool mask is refused here, at the place it was made.

    Example:
        >>> import torch
        >>> m = ActionMasks(op=torch.tensor([[True, False, True, True, True, True]]))
        >>> m.slot is None
        True
    """

    slot: torch.Tensor | None = None
    blueprint: torch.Tensor | None = None
    style: torch.Tensor | None = None
    tempo: torch.Tensor | None = None
    alpha_target: torch.Tensor | None = None
    alpha_speed: torch.Tensor | None = None
    alpha_curve: torch.Tensor | None = None
    op: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name, mask in zip(HEAD_NAMES, self.as_tuple(), strict=True):
            check_mask_type(mask, name)

    @classmethod
    def from_mapping(cls, masks: Mapping[str, torch.Tensor | None]) -> ActionMasks:
        """Build masks from a mapping of head name to mask, strictly.

        Every head must be present, so that a misspelt or forgotten key can never
        silently leave a head unmasked: pass `None` explicitly for an unmasked head.

        Args:
            masks: Head name to a bool tensor or `None`, one entry per head.

        Returns:
            The equivalent `ActionMasks`.

        Raises:
            TypeError: `masks` is not a mapping, or a mask is not a bool tensor or `None`.
            ValueError: a key is not a head name, or a head is missing.
        """
        if not isinstance(masks, Mapping):
            raise TypeError(
                f"masks must be an ActionMasks, a mapping of head name to mask, or None; "
                f"got {type(masks).__name__}"
            )
        for key in masks:
            if key not in HEAD_NAMES:
                raise ValueError(f"masks has unknown head {key!r}; valid heads: {_VALID_NAMES}")
        for name in HEAD_NAMES:
            if name not in masks:
                raise ValueError(
                    f"masks is missing head {name!r}; pass {name}=None explicitly "
                    f"if every {name} action is valid"
                )
        return cls(**{name: masks[name] for name in HEAD_NAMES})

    @classmethod
    def stack(cls, steps: Iterable[ActionMasks]) -> ActionMasks:
        """Stack the masks of consecutive steps into sequence masks, for a PPO update.

        A head that is `None` at some steps and masked at others gets all-True rows
        at the `None` steps; a head `None` at every step stays `None`.

        Args:
            steps: One `ActionMasks` per step, in order, each head `[B, A_h]`,
                `[B, 1, A_h]` or `None` (any iterable; it is read once).

        Returns:
            Masks whose heads are `[B, T, A_h]` (or `None`).

        Raises:
            TypeError: An element is not an `ActionMasks`.
            ValueError: `steps` is empty, or a head's masks differ in shape or device
                between steps.

        Example:
            >>> import torch
            >>> step = ActionMasks(op=torch.ones(4, 6, dtype=torch.bool))
            >>> ActionMasks.stack([step, ActionMasks(), step]).op.shape
            torch.Size([4, 3, 6])
        """
        frozen = tuple(steps)
        if not frozen:
            raise ValueError("ActionMasks.stack needs at least one step")
        for index, step in enumerate(frozen):
            if not isinstance(step, ActionMasks):
                raise TypeError(
                    f"ActionMasks.stack takes ActionMasks, got {type(step).__name__} at "
                    f"step {index}; convert a mapping with ActionMasks.from_mapping"
                )
        stacked: list[torch.Tensor | None] = []
        for name in HEAD_NAMES:
            columns: list[torch.Tensor | None] = []
            template: torch.Tensor | None = None
            for index, step in enumerate(frozen):
                mask = _as_step_mask(getattr(step, name), name, index)
                if mask is not None and template is None:
                    template = mask
                elif (
                    mask is not None
                    and template is not None
                    and (mask.shape != template.shape or mask.device != template.device)
                ):
                    raise ValueError(
                        f"masks[{name!r}] is {tuple(mask.shape)} on {mask.device} at step "
                        f"{index} but {tuple(template.shape)} on {template.device} earlier"
                    )
                columns.append(mask)
            if template is None:
                stacked.append(None)
                continue
            full = torch.ones_like(template)
            dense = [full if mask is None else mask for mask in columns]
            stacked.append(torch.stack(dense, dim=1))  # [B, T, A_h]
        return cls(*stacked)

    def as_dict(self) -> dict[str, torch.Tensor | None]:
        """Head name to mask, in `HEAD_NAMES` order (the inverse of `from_mapping`)."""
        return {name: getattr(self, name) for name in HEAD_NAMES}

    def to(self, device: torch.device | str) -> ActionMasks:
        """The masks on `device` (`None` stays `None`), as `Tensor.to` moves one.

        Example:
            >>> import torch
            >>> ActionMasks(op=torch.ones(2, 6, dtype=torch.bool)).to("meta").op.device
            device(type='meta')
        """
        return ActionMasks(
            **{
                name: None if mask is None else mask.to(device)
                for name, mask in self.as_dict().items()
            }
        )

    def as_tuple(self) -> tuple[torch.Tensor | None, ...]:
        """The masks in `HEAD_NAMES` order (one C-level read of the eight fields)."""
        masks: tuple[torch.Tensor | None, ...] = _IN_HEAD_ORDER(self)
        return masks


def check_mask_type(mask: object, head: str) -> None:
    """Refuse a mask that is not a dense bool tensor (or `None`), naming the head.

    Run when `ActionMasks` is built, and again by the bundle on every call, since a
    frozen dataclass can still be changed with `object.__setattr__`.

    Raises:
        TypeError: The mask is not a tensor, not bool, or not dense.
    """
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"masks[{head!r}] must be a torch.bool tensor or None, got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"masks[{head!r}] must have dtype torch.bool (True = valid action), "
            f"got {mask.dtype}; convert it with `.bool()` or `mask != 0`"
        )
    if mask.layout != torch.strided:
        raise TypeError(
            f"masks[{head!r}] must be a dense tensor, got layout {mask.layout}; convert it "
            "with .to_dense()"
        )


def _as_step_mask(mask: torch.Tensor | None, head: str, index: int) -> torch.Tensor | None:
    """One step's mask as `[B, A]`: `[B, 1, A]` is squeezed, other ranks refused."""
    if mask is None or mask.dim() == 2:
        return mask
    if mask.dim() == 3 and mask.shape[1] == 1:
        return mask.squeeze(1)
    raise ValueError(
        f"masks[{head!r}] at step {index} has shape {tuple(mask.shape)}; "
        "ActionMasks.stack takes one step's masks, [B, A] or [B, 1, A]"
    )
