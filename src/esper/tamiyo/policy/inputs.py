"""`PolicyInputs`: what a bundle's `_forward` hook receives, and the hidden-state type."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from esper.tamiyo.policy.action_space import PRIMARY_HEAD, ActionSpace
from esper.tamiyo.policy.extra_inputs import NO_EXTRAS
from esper.tamiyo.policy.layout import per_head, split_heads
from esper.tamiyo.policy.masks import ActionMasks, by_op_name

__all__ = ["HiddenState", "PolicyInputs", "reset_hidden", "zero_hidden"]

HiddenState = tuple[torch.Tensor, ...]
"""Recurrent state: a tuple of tensors, each `[d0, B, ...]` (batch in dimension 1, as
in `torch.nn.LSTM`); `(h, c)` for an LSTM. Stateless bundles use `None`."""


# Keyword-only: the fields changed (ADR 0006), and a positional call in the old order
# must fail at once rather than put the masks where the action space goes.
@dataclass(frozen=True, slots=True, eq=False, kw_only=True)  # eq: tensors have no truth value
class PolicyInputs:
    """Inputs after normalization: checked, and always batched and sequenced.

    Built by `PolicyBundle._normalize_inputs` once per public call; the hook reads it
    and never needs to look at how the caller shaped its arguments. The base masks the
    hook's logits itself: a hook reads `valid` (or `masks`) only to use the masks as an
    input, to attend over valid actions, say.

    Attributes:
        features: `[B, T, F]` floating features.
        hidden: Recurrent state for this call: zeros when the caller gave none, and the
            rows whose episode starts at the first step already zeroed. `None` for a
            stateless bundle.
        valid: `[B, T, H, A_max]` bool, the masks of every head packed in the padded
            layout: True where an action may be taken, False for masked actions and
            padding columns.
        action_space: The head sizes, which say the columns of each head in `valid`,
            and the hierarchy, if any.
        valid_by_op: `[B, T, N_op, H, A_max]` bool when the caller gave per-op masks
            (a hierarchical space only): each head's per-op mask at op `n`, as given,
            True for a head without one; `None` otherwise. What each head may take
            given an op is `HeadLayout.valid_at_op` of `valid` and this, so a
            `_normalize_inputs` that narrows `valid` narrows it under every op.
        action_index: `[B, T, H]` int64 actions in `HEAD_NAMES` order, for
            `evaluate_actions`; else `None`.
        single_step: The caller gave `[B, F]` features, so the base drops the `T` axis
            from the results. `T` is 1 then; a hook need not read this.
        episode_start: `[B, T]` bool, the rows whose episode starts at each step, or
            `None`. The base has already zeroed `hidden` for the first step's resets
            and calls the hook once per stretch between later ones, so a hook needs
            it only to know episode boundaries (an attention mask, say).
        extras: The bundle's extra inputs (`extra_inputs`), name to `[B, T, *shape]`,
            read-only: int64 for integer inputs; for floating ones the dtype the caller
            gave, one the features may have (the bundle's, or under autocast float32
            or the autocast dtype, which need not be the features'). Empty for a
            bundle that declares none.
    """

    features: torch.Tensor
    hidden: HiddenState | None
    valid: torch.Tensor
    action_space: ActionSpace
    action_index: torch.Tensor | None = None
    single_step: bool = False
    episode_start: torch.Tensor | None = None
    valid_by_op: torch.Tensor | None = None
    extras: Mapping[str, torch.Tensor] = field(default_factory=lambda: NO_EXTRAS)

    @property
    def batch_size(self) -> int:
        """`B`."""
        return self.features.shape[0]

    @property
    def seq_len(self) -> int:
        """`T`."""
        return self.features.shape[1]

    @property
    def masks(self) -> ActionMasks:
        """Per-head masks, `[B, T, A_h]` bool views of `valid` (made on access).

        With per-op masks, `<head>_by_op` are `[B, T, N_op, A_h]` views of
        `valid_by_op`, as given (all True for a head without one).
        """
        flat = split_heads(self.valid, self.action_space.sizes)
        if self.valid_by_op is None:
            return ActionMasks(**flat)
        by_op = split_heads(self.valid_by_op, self.action_space.sizes)
        return ActionMasks(
            **flat,
            **{by_op_name(head): mask for head, mask in by_op.items() if head != PRIMARY_HEAD},
        )

    @property
    def actions(self) -> dict[str, torch.Tensor] | None:
        """Head name to `[B, T]` int64 actions (views of `action_index`), or `None`."""
        if self.action_index is None:
            return None
        return per_head(self.action_index)


def reset_hidden(hidden: HiddenState, rows: torch.Tensor) -> HiddenState:
    """Zero the hidden state of the flagged rows, branch-free.

    Args:
        hidden: Tensors `[d0, B, ...]`.
        rows: `[B]` bool, True where the state starts over.

    Returns:
        The state with those rows zeroed (new tensors; the inputs are not modified).
    """
    return tuple(
        tensor.masked_fill(rows.view(1, -1, *([1] * (tensor.dim() - 2))), 0.0)  # [1, B, 1, ...]
        for tensor in hidden
    )


def zero_hidden(
    shapes: tuple[tuple[int, ...], ...], batch: int, device: torch.device, dtype: torch.dtype
) -> HiddenState:
    """Zero hidden state, each tensor `[d0, B, ...]` for a declared shape `(d0, ...)`."""
    return tuple(
        torch.zeros((shape[0], batch, *shape[1:]), device=device, dtype=dtype) for shape in shapes
    )
