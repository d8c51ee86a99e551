"""What hooks return to the base, and what the base returns to callers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from esper.tamiyo.policy.inputs import HiddenState
from esper.tamiyo.policy.layout import per_head

__all__ = [
    "ActionResult",
    "EvalResult",
    "ForwardResult",
    "HookOutput",
    "NetworkOutput",
    "OpConditionedOutput",
]


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


class OpConditionedOutput(NamedTuple):
    """What a `_forward` hook that opts into op-conditioned logits returns.

    A bundle under a hierarchical space may make every other head's logits depend on
    the op, so the policy can prefer slot 0 to germinate and slot 2 to fossilize in the
    same state. The base reads the op's logits from `logits`, then every other head's
    from `logits_by_op` at the sampled (or stored) op. A hook returns `NetworkOutput`
    or this, and may switch between them.

    Attributes:
        logits: `[B, T, H, A_max]`, as in `NetworkOutput`. The op is sampled and
            scored from its `op` row; the other rows are checked for NaN like any
            logits and are what `forward` returns, but sampling and scoring take those
            heads' logits from `logits_by_op`.
        value: `[B, T]`.
        hidden: As in `NetworkOutput`.
        logits_by_op: `[B, T, N_op, H, A_max]`: `[..., n, h, :]` are head `h`'s logits
            when op `n` is chosen (`OpConditionedLogits` builds them). The `op` row is
            not read.
    """

    logits: torch.Tensor
    value: torch.Tensor
    hidden: HiddenState | None
    logits_by_op: torch.Tensor | None


class HookOutput(NamedTuple):
    """Either kind of hook output as one type, inside the base: `logits_by_op` or `None`."""

    logits: torch.Tensor
    value: torch.Tensor
    hidden: HiddenState | None
    logits_by_op: torch.Tensor | None = None


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

    Under a hierarchical space every per-head figure is conditional on the taken op:
    a head the op does not use has log-probability and entropy exactly 0 (and no
    gradient), and a used head's are those under its masks for that op.

    Attributes:
        log_prob: Head name to log-probabilities of the given actions, `[B]` or `[B, T]`.
        entropy: Head name to entropy normalized to [0, 1] by the log of the number of
            valid actions (0 where one action is valid), `[B]` or `[B, T]`.
        value: State-value estimates, `[B]` or `[B, T]`.
        hidden: Recurrent state after the last step, or `None` when stateless.
        relevance: Head name to bool, `[B]` or `[B, T]`: the head mattered for the
            taken op (always True in a flat space, and for `op`). Mask each head's
            advantage (policy-gradient term) with it.
        availability: Head name to bool, `[B]` or `[B, T]`: some op valid at that step
            uses the head (always True in a flat space, and for `op`). Mask each head's
            entropy bonus with it, so a head keeps exploring while its op is an option.
        joint_entropy: `[B]` or `[B, T]`, in nats, with `joint_entropy=True`: the
            exact entropy of the whole action, `H(op) + sum_n pi(n) sum_{h used by n}
            H(h | n)` (the sum of every head's entropy in a flat space). Else `None`.
    """

    log_prob: dict[str, torch.Tensor]
    entropy: dict[str, torch.Tensor]
    value: torch.Tensor
    hidden: HiddenState | None
    relevance: dict[str, torch.Tensor]
    availability: dict[str, torch.Tensor]
    joint_entropy: torch.Tensor | None = None

    @classmethod
    def from_packed(
        cls,
        log_prob: torch.Tensor,
        entropy: torch.Tensor,
        value: torch.Tensor,
        hidden: HiddenState | None,
        single_step: bool,
        relevance: torch.Tensor,
        availability: torch.Tensor,
        joint_entropy: torch.Tensor | None = None,
    ) -> EvalResult:
        """Shape the compute path's packed tensors for the caller.

        Args:
            log_prob: `[B, T, H]`.
            entropy: `[B, T, H]`.
            value: `[B, T]`.
            hidden: The new hidden state.
            single_step: The caller gave `[B, F]` features: drop the `T` axis.
            relevance: `[B, T, H]` bool.
            availability: `[B, T, H]` bool.
            joint_entropy: `[B, T]`, or `None`.
        """
        if single_step:
            log_prob, entropy, value = log_prob.squeeze(1), entropy.squeeze(1), value.squeeze(1)
            relevance, availability = relevance.squeeze(1), availability.squeeze(1)
            if joint_entropy is not None:
                joint_entropy = joint_entropy.squeeze(1)
        return cls(
            per_head(log_prob),
            per_head(entropy),
            value,
            hidden,
            per_head(relevance),
            per_head(availability),
            joint_entropy,
        )
