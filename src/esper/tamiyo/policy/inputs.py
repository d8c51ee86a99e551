"""`PolicyInputs`: what `_normalize_inputs` hands every bundle hook."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esper.tamiyo.policy.action_space import HEAD_NAMES
from esper.tamiyo.policy.layout import per_head
from esper.tamiyo.policy.masks import ActionMasks

__all__ = ["HiddenState", "PolicyInputs"]

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
    """

    features: torch.Tensor
    hidden: HiddenState | None
    action_index: torch.Tensor | None
    single_step: bool
    given_masks: ActionMasks

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
