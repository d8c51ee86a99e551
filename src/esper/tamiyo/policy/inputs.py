"""`PolicyInputs`: what `_normalize_inputs` hands every bundle hook."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esper.tamiyo.policy.action_space import HEAD_NAMES
from esper.tamiyo.policy.layout import per_head
from esper.tamiyo.policy.masks import ActionMasks

__all__ = ["HiddenState", "PolicyInputs", "reset_hidden", "steps_of"]

HiddenState = tuple[torch.Tensor, ...]
"""Recurrent state: a tuple of tensors, each `[d0, B, ...]` (batch in dimension 1, as
in `torch.nn.LSTM`); `(h, c)` for an LSTM. Stateless bundles use `None`."""


@dataclass(frozen=True, slots=True, eq=False)  # == on tensors has no truth value: identity
class PolicyInputs:
    """Inputs after normalization: checked, and always batched and sequenced.

    Built by `PolicyBundle._normalize_inputs` once per public call; hooks read it and
    never need to look at how the caller shaped its arguments. The base masks the
    hook's logits itself: a hook that wants the masks as inputs (to attend over valid
    actions, say) reads `masks`, views made on access, so a hook that does not read
    them pays nothing for them.

    Attributes:
        features: `[B, T, F]` floating features.
        hidden: Recurrent state for this call (zeros when the caller gave none), or
            `None` for a stateless bundle.
        action_index: `[B, T, H]` int64 actions in `HEAD_NAMES` order, for
            `evaluate_actions`; else `None`.
        single_step: The caller gave `[B, F]` features, so outputs drop the `T` axis.
        given_masks: The caller's masks after checking, as given (`[B, A_h]` for a
            single step); read `masks` instead.
        episode_start: `[B, T]` bool, the rows whose episode starts at each step, or
            `None`. The base has already zeroed `hidden` for the first step's resets
            and splits a sequence at later ones, so a hook needs it only to know
            episode boundaries (an attention mask, say).
        reset_steps: The steps after the first where some row's episode starts; the
            base calls the hook once per stretch between them. Empty in a hook call.
    """

    features: torch.Tensor
    hidden: HiddenState | None
    action_index: torch.Tensor | None
    single_step: bool
    given_masks: ActionMasks
    episode_start: torch.Tensor | None = None
    reset_steps: tuple[int, ...] = ()

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
        """Per-head masks, each `[B, T, A_h]` bool, or `None` where all are valid."""
        given = self.given_masks
        shaped: list[torch.Tensor | None] = []
        for name in HEAD_NAMES:
            mask = getattr(given, name)
            shaped.append(mask.unsqueeze(1) if mask is not None and mask.dim() == 2 else mask)
        return ActionMasks(*shaped)

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
    reset: list[torch.Tensor] = []
    for tensor in hidden:
        flags = rows.view(1, -1, *([1] * (tensor.dim() - 2)))  # [1, B, 1, ...]
        reset.append(tensor.masked_fill(flags, 0.0))  # where(flags, 0, tensor), one kernel
    return tuple(reset)


def steps_of(
    inputs: PolicyInputs, begin: int, end: int, hidden: HiddenState | None
) -> PolicyInputs:
    """The inputs of steps `[begin, end)` of a sequence, starting from `hidden`."""
    masks: list[torch.Tensor | None] = []
    for name in HEAD_NAMES:
        mask = getattr(inputs.given_masks, name)
        masks.append(None if mask is None else mask[:, begin:end])  # [B, t, A_h]
    starts = inputs.episode_start
    return PolicyInputs(
        features=inputs.features[:, begin:end],
        hidden=hidden,
        action_index=None if inputs.action_index is None else inputs.action_index[:, begin:end],
        single_step=False,
        given_masks=ActionMasks(*masks),
        episode_start=None if starts is None else starts[:, begin:end],
    )
