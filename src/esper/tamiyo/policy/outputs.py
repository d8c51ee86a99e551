"""What hooks return to the base, and what the base returns to callers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from esper.tamiyo.policy.inputs import HiddenState
from esper.tamiyo.policy.layout import per_head

__all__ = ["ActionResult", "EvalResult", "ForwardResult", "NetworkOutput"]


class NetworkOutput(NamedTuple):
    """What a bundle's `_forward` hook returns.

    A named tuple, so a compiled or traced network can return it as a plain tuple.

    Attributes:
        logits: `[B, T, H, A_max]` unmasked logits in the padded head layout (head `h`
            in `[..., h, :A_h]`; padding columns are ignored). `PolicyHeads` builds it.
        value: `[B, T]` state-value estimates.
        hidden: The recurrent state after the last step, or `None` when stateless.
    """

    logits: torch.Tensor
    value: torch.Tensor
    hidden: HiddenState | None


@dataclass(frozen=True, slots=True, eq=False)  # == on tensors has no truth value: identity
class ActionResult:
    """Result of `PolicyBundle.get_action`. Tensors carry no autograd graph.

    Shapes follow the features: `[B]` for `[B, F]` features, `[B, T]` for `[B, T, F]`.

    Attributes:
        action: Head name to int64 actions.
        log_prob: Head name to the log-probability of that action (0 for a head with
            one valid action).
        value: State-value estimates.
        hidden: Recurrent state to pass to the next step, or `None` when stateless.
    """

    action: dict[str, torch.Tensor]
    log_prob: dict[str, torch.Tensor]
    value: torch.Tensor
    hidden: HiddenState | None

    @classmethod
    def from_packed(
        cls,
        actions: torch.Tensor,
        log_prob: torch.Tensor,
        value: torch.Tensor,
        hidden: HiddenState | None,
        single_step: bool,
    ) -> ActionResult:
        """Shape the compute path's packed tensors for the caller.

        Args:
            actions: `[B, T, H]` int64.
            log_prob: `[B, T, H]`.
            value: `[B, T]`.
            hidden: The new hidden state.
            single_step: The caller gave `[B, F]` features: drop the `T` axis.
        """
        if single_step:
            actions, log_prob, value = actions.squeeze(1), log_prob.squeeze(1), value.squeeze(1)
        return cls(per_head(actions), per_head(log_prob), value, hidden)


@dataclass(frozen=True, slots=True, eq=False)  # == on tensors has no truth value: identity
class ForwardResult:
    """Result of `PolicyBundle.forward`, with autograd.

    Attributes:
        logits: Head name to masked logits, `[B, A_h]` or `[B, T, A_h]`, each row
            shifted so its largest valid logit is 0; invalid actions hold
            `MASKED_LOGIT` (-1e4).
        value: State-value estimates, `[B]` or `[B, T]`.
        hidden: Recurrent state after the last step, or `None` when stateless.
    """

    logits: dict[str, torch.Tensor]
    value: torch.Tensor
    hidden: HiddenState | None


@dataclass(frozen=True, slots=True, eq=False)  # == on tensors has no truth value: identity
class EvalResult:
    """Result of `PolicyBundle.evaluate_actions`, with autograd, for a PPO update.

    Attributes:
        log_prob: Head name to log-probabilities of the given actions, `[B]` or `[B, T]`.
        entropy: Head name to entropy normalized to [0, 1] by the log of the number of
            valid actions (0 where one action is valid), `[B]` or `[B, T]`.
        value: State-value estimates, `[B]` or `[B, T]`.
        hidden: Recurrent state after the last step, or `None` when stateless.
    """

    log_prob: dict[str, torch.Tensor]
    entropy: dict[str, torch.Tensor]
    value: torch.Tensor
    hidden: HiddenState | None

    @classmethod
    def from_packed(
        cls,
        log_prob: torch.Tensor,
        entropy: torch.Tensor,
        value: torch.Tensor,
        hidden: HiddenState | None,
        single_step: bool,
    ) -> EvalResult:
        """Shape the compute path's packed tensors for the caller.

        Args:
            log_prob: `[B, T, H]`.
            entropy: `[B, T, H]`.
            value: `[B, T]`.
            hidden: The new hidden state.
            single_step: The caller gave `[B, F]` features: drop the `T` axis.
        """
        if single_step:
            log_prob, entropy, value = log_prob.squeeze(1), entropy.squeeze(1), value.squeeze(1)
        return cls(per_head(log_prob), per_head(entropy), value, hidden)
