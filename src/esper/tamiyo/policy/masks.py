"""`ActionMasks`: one boolean mask per action head, and per op, in a dataclass of tensors."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import torch

from esper.tamiyo.policy.action_space import CONDITIONED_HEADS, HEAD_NAMES

__all__ = ["BY_OP_NAMES", "ActionMasks", "by_op_name", "check_mask_type"]


def by_op_name(head: str) -> str:
    """The `ActionMasks` field of `head`'s op-conditioned mask: `slot` -> `slot_by_op`."""
    return f"{head}_by_op"


BY_OP_NAMES: Final[tuple[str, ...]] = tuple(by_op_name(head) for head in CONDITIONED_HEADS)
"""The op-conditioned mask fields, in `HEAD_NAMES` order (no `op_by_op`)."""

_VALID_NAMES = ", ".join(HEAD_NAMES + BY_OP_NAMES)
_IN_HEAD_ORDER = operator.attrgetter(*HEAD_NAMES)
_BY_OP_IN_HEAD_ORDER = operator.attrgetter(*BY_OP_NAMES)


@dataclass(frozen=True, slots=True, eq=False)  # == on tensors has no truth value: identity
class ActionMasks:
    """Which actions of each head are valid at each step.

    Each field is a `torch.bool` tensor whose last dimension is that head's number of
    actions (`True` = valid), or `None`, meaning every action of the head is valid.
    Shapes are `[B, A]` for a single step or `[B, T, A]` for a sequence; the bundle
    checks them against the features it is given.

    For a hierarchical space (`ActionSpace.tamiyo()`) every head but `op` may also
    carry a mask per op, `<head>_by_op`, `[B, N_op, A]` for a step or
    `[B, T, N_op, A]` for a sequence: row `n` holds the actions legal when op `n` is
    chosen ("germinate an empty slot, fossilize a blended one"). The bundle ANDs it
    with the head's flat mask, gathered at the chosen op. A row of an op that is
    masked may be all False.

    The fields follow `HEAD_NAMES` order, then the per-op masks in the same order.
    Besides the constructor: `from_mapping` (head name to mask, strictly), `from_envs`
    (one unbatched mapping per env, as Esper's `compute_action_masks` makes them) and
    `stack` (consecutive steps to a sequence).
    Construction checks types and dtypes only: a non-tensor or non-bool mask is
    refused here, at the place it was made; a misspelt field is a `TypeError`.

    Example:
        >>> import torch
        >>> m = ActionMasks(op=torch.tensor([[True, False, True, True, True, True]]))
        >>> m.slot is None
        True
        >>> slots = torch.ones(1, 6, 3, dtype=torch.bool)  # [B, N_op, S]
        >>> ActionMasks(slot_by_op=slots).has_by_op
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
    slot_by_op: torch.Tensor | None = None
    blueprint_by_op: torch.Tensor | None = None
    style_by_op: torch.Tensor | None = None
    tempo_by_op: torch.Tensor | None = None
    alpha_target_by_op: torch.Tensor | None = None
    alpha_speed_by_op: torch.Tensor | None = None
    alpha_curve_by_op: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name, mask in zip(HEAD_NAMES, self.as_tuple(), strict=True):
            check_mask_type(mask, name)
        for name, mask in zip(BY_OP_NAMES, self.by_op_tuple(), strict=True):
            check_mask_type(mask, name)

    @classmethod
    def from_mapping(cls, masks: Mapping[str, torch.Tensor | None]) -> ActionMasks:
        """Build masks from a mapping of head name to mask, strictly.

        Every head must be present, so that a misspelt or forgotten key can never
        silently leave a head unmasked: pass `None` explicitly for an unmasked head.
        The per-op masks (`slot_by_op`, ...) are optional keys.

        Args:
            masks: Head name to a bool tensor or `None`, one entry per head, and
                optionally `<head>_by_op` entries.

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
        _check_keys(masks, "masks")
        return cls(**{name: masks[name] for name in HEAD_NAMES + BY_OP_NAMES if name in masks})

    @classmethod
    def from_envs(cls, envs: Sequence[Mapping[str, torch.Tensor | None]]) -> ActionMasks:
        """Build one step's masks from one mapping per env, stacked along a new batch dim.

        For masks made env by env, as Esper's `compute_action_masks` makes them: each
        env's mapping holds unbatched masks, a head `[A_h]` and a per-op mask
        `[N_op, A_h]`, and env `b` becomes batch row `b`. (A mapping already batched,
        `[B, A_h]`, as `compute_batch_masks` returns, needs no conversion: pass it to
        the bundle, or to `from_mapping`.)

        Each mapping is strict, as for `from_mapping`: every head must be present
        (`None` for an unmasked head), the per-op masks are optional, and every env
        must give the same keys. A mask `None` in every env stays `None`; a mask `None`
        in some envs and set in others gets all-True rows for the `None` envs (every
        action valid, which is what `None` means), as `stack` does for steps.

        Args:
            envs: One mapping per env, in batch order: head name to a `[A_h]` bool
                tensor or `None`, and optionally `<head>_by_op` to a `[N_op, A_h]` bool
                tensor or `None`. The envs' masks for a key must agree in shape and
                device.

        Returns:
            Masks for one step: heads `[B, A_h]`, per-op masks `[B, N_op, A_h]` (or
            `None`), with `B = len(envs)`.

        Raises:
            TypeError: `envs` is a single mapping or not iterable, an env is not a
                mapping, or a mask is not a bool tensor or `None`.
            ValueError: `envs` is empty; or, naming the env and key, a key is unknown,
                a head is missing, a per-op mask is given for some envs only, a mask
                already has a batch dimension (or no action dimension), or a key's
                masks differ in shape or device between envs.

        Example:
            >>> import torch
            >>> envs = []
            >>> for empty in ([True, False, True], [False, False, False]):  # per slot
            ...     slot_by_op = torch.zeros(6, 3, dtype=torch.bool)  # [N_op, S]
            ...     slot_by_op[0] = True  # WAIT
            ...     slot_by_op[1] = torch.tensor(empty)  # GERMINATE: the empty slots
            ...     envs.append(dict.fromkeys(HEAD_NAMES) | {
            ...         "slot": torch.ones(3, dtype=torch.bool),
            ...         "slot_by_op": slot_by_op,
            ...         "op": slot_by_op.any(dim=-1)})  # [N_op]
            >>> masks = ActionMasks.from_envs(envs)
            >>> masks.slot.shape, masks.slot_by_op.shape, masks.blueprint
            (torch.Size([2, 3]), torch.Size([2, 6, 3]), None)
            >>> masks.op[:, 1].tolist()  # GERMINATE, per env
            [True, False]
        """
        if isinstance(envs, Mapping) or not isinstance(envs, Iterable):
            raise TypeError(
                f"ActionMasks.from_envs takes a sequence of mappings, one per env, got "
                f"{type(envs).__name__}; pass a mapping already batched ([B, A_h], as "
                "compute_batch_masks returns) to the bundle or to ActionMasks.from_mapping"
            )
        frozen = tuple(envs)
        if not frozen:
            raise ValueError("ActionMasks.from_envs needs at least one env")
        for index, env in enumerate(frozen):
            _check_env(env, index, frozen[0])
        names = [name for name in HEAD_NAMES + BY_OP_NAMES if name in frozen[0]]
        return cls(
            **{
                name: _stack_columns([env[name] for env in frozen], name, "env", 0)
                for name in names
            }
        )

    @classmethod
    def stack(cls, steps: Iterable[ActionMasks]) -> ActionMasks:
        """Stack the masks of consecutive steps into sequence masks, for a PPO update.

        A head that is `None` at some steps and masked at others gets all-True rows
        at the `None` steps; a head `None` at every step stays `None`. Per-op masks
        stack the same way, `[B, N_op, A_h]` per step to `[B, T, N_op, A_h]`.

        Args:
            steps: One `ActionMasks` per step, in order, each head `[B, A_h]`,
                `[B, 1, A_h]` or `None` (any iterable; it is read once); per-op masks
                `[B, N_op, A_h]` or `[B, 1, N_op, A_h]`.

        Returns:
            Masks whose heads are `[B, T, A_h]` and per-op masks `[B, T, N_op, A_h]`
            (or `None`).

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
        stacked = {name: _stack_field(frozen, name, 2) for name in HEAD_NAMES}
        for name in BY_OP_NAMES:
            stacked[name] = _stack_field(frozen, name, 3)
        return cls(**stacked)

    def as_dict(self) -> dict[str, torch.Tensor | None]:
        """Head name to mask, in `HEAD_NAMES` order (the inverse of `from_mapping`).

        The per-op masks follow, under their own names, only where they are set.
        """
        flat = {name: getattr(self, name) for name in HEAD_NAMES}
        by_op = {name: getattr(self, name) for name in BY_OP_NAMES}
        return flat | {name: mask for name, mask in by_op.items() if mask is not None}

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
        """The flat masks in `HEAD_NAMES` order (one C-level read of the eight fields)."""
        masks: tuple[torch.Tensor | None, ...] = _IN_HEAD_ORDER(self)
        return masks

    def by_op_tuple(self) -> tuple[torch.Tensor | None, ...]:
        """The per-op masks in `BY_OP_NAMES` order (the seven heads other than `op`)."""
        masks: tuple[torch.Tensor | None, ...] = _BY_OP_IN_HEAD_ORDER(self)
        return masks

    @property
    def has_by_op(self) -> bool:
        """Whether any per-op mask is set."""
        return any(mask is not None for mask in self.by_op_tuple())


def check_mask_type(mask: object, head: str, *, at: str = "") -> None:
    """Refuse a mask that is not a dense bool tensor (or `None`), naming the head.

    Run when `ActionMasks` is built, and again by the bundle on every call, since a
    frozen dataclass can still be changed with `object.__setattr__`.

    Args:
        mask: The mask to check.
        head: Its field, `slot` or `slot_by_op` say, for messages.
        at: Where it was found, appended to the field in messages (`" at env 2"`).

    Raises:
        TypeError: The mask is not a tensor, not bool, or not dense.
    """
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"masks[{head!r}]{at} must be a torch.bool tensor or None, got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"masks[{head!r}]{at} must have dtype torch.bool (True = valid action), "
            f"got {mask.dtype}; convert it with `.bool()` or `mask != 0`"
        )
    if mask.layout != torch.strided:
        raise TypeError(
            f"masks[{head!r}]{at} must be a dense tensor, got layout {mask.layout}; convert "
            "it with .to_dense()"
        )


def _check_keys(masks: Mapping[str, object], owner: str) -> None:
    """Refuse a key that is not a field, or a missing head; `owner` names the mapping."""
    for key in masks:
        if key not in HEAD_NAMES and key not in BY_OP_NAMES:
            raise ValueError(f"{owner} has unknown head {key!r}; valid heads: {_VALID_NAMES}")
    for name in HEAD_NAMES:
        if name not in masks:
            raise ValueError(
                f"{owner} is missing head {name!r}; pass {name}=None explicitly "
                f"if every {name} action is valid"
            )


def _check_env(env: object, index: int, first: Mapping[str, object]) -> None:
    """Refuse env `index`'s masks unless a strict mapping of unbatched bool masks.

    Its keys must be `first`'s (env 0's, checked before it); `_stack_columns` compares
    shapes and devices across envs.
    """
    if not isinstance(env, Mapping):
        raise TypeError(
            f"ActionMasks.from_envs: env {index} must be a mapping of head name to mask, "
            f"got {type(env).__name__}"
        )
    _check_keys(env, f"masks at env {index}")
    for name in BY_OP_NAMES:
        if (name in env) != (name in first):
            given, lacking = (index, 0) if name in env else (0, index)
            raise ValueError(
                f"masks[{name!r}] is given at env {given} but not at env {lacking}: give "
                "it for every env (None where every action is valid) or for none"
            )
    for name, mask in env.items():
        check_mask_type(mask, name, at=f" at env {index}")
        rank = 1 if name in HEAD_NAMES else 2
        if mask is not None and mask.dim() != rank:
            shape = "[A]" if rank == 1 else "[N_op, A]"
            raise ValueError(
                f"masks[{name!r}] at env {index} has shape {tuple(mask.shape)}; "
                f"ActionMasks.from_envs takes one env's masks, {shape}, without a batch "
                "dimension (a mapping already batched goes to the bundle or from_mapping)"
            )


def _stack_field(steps: tuple[ActionMasks, ...], name: str, rank: int) -> torch.Tensor | None:
    """One field of every step stacked along a new dimension 1; `None` if never set.

    `rank` is the field's rank for one step: 2 for `[B, A]`, 3 for `[B, N_op, A]`.
    """
    columns = [
        _as_step_mask(getattr(step, name), name, index, rank) for index, step in enumerate(steps)
    ]
    return _stack_columns(columns, name, "step", 1)


def _stack_columns(
    columns: Sequence[torch.Tensor | None], name: str, unit: str, dim: int
) -> torch.Tensor | None:
    """One field's masks stacked along a new dimension `dim`; `None` if all are `None`.

    A `None` becomes an all-True mask (every action valid). The masks must agree in
    shape and device; `unit` (`"step"`, `"env"`) names what they are one of, in messages.
    """
    first = next((index for index, mask in enumerate(columns) if mask is not None), None)
    if first is None:
        return None
    template = columns[first]
    assert template is not None  # found above
    for index, mask in enumerate(columns):
        if mask is not None and (mask.shape != template.shape or mask.device != template.device):
            raise ValueError(
                f"masks[{name!r}] is {tuple(mask.shape)} on {mask.device} at {unit} {index} "
                f"but {tuple(template.shape)} on {template.device} at {unit} {first}"
            )
    full = torch.ones_like(template)
    return torch.stack([full if mask is None else mask for mask in columns], dim=dim)


def _as_step_mask(
    mask: torch.Tensor | None, name: str, index: int, rank: int
) -> torch.Tensor | None:
    """One step's mask at `rank`: a singleton step dimension 1 is squeezed, else refused."""
    if mask is None or mask.dim() == rank:
        return mask
    if mask.dim() == rank + 1 and mask.shape[1] == 1:
        return mask.squeeze(1)
    shape = "[B, A] or [B, 1, A]" if rank == 2 else "[B, N_op, A] or [B, 1, N_op, A]"
    raise ValueError(
        f"masks[{name!r}] at step {index} has shape {tuple(mask.shape)}; "
        f"ActionMasks.stack takes one step's masks, {shape}"
    )
