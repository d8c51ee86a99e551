"""`UniformPolicyBundle`: the parameter-free baseline every learned policy must beat."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from esper.tamiyo.policy.action_space import ActionSpace
from esper.tamiyo.policy.base import PolicyBundle
from esper.tamiyo.policy.inputs import PolicyInputs
from esper.tamiyo.policy.outputs import NetworkOutput
from esper.tamiyo.policy.registry import register_policy

__all__ = ["UniformPolicyBundle"]


@register_policy("uniform")
class UniformPolicyBundle(PolicyBundle):
    """Picks each head's action uniformly among its valid actions; values are 0.

    It has no parameters: its `network` is an empty `nn.Module`, its `state_dict` is
    empty (and round trips), and it ignores the features. Its hook returns all-zero
    logits and the base's masking does the rest, which also shows the base assumes
    no neural network. `deterministic=True` takes each head's first valid action.

    Example:
        >>> import torch
        >>> from esper.tamiyo.policy import ActionMasks
        >>> bundle = UniformPolicyBundle()
        >>> masks = ActionMasks(op=torch.tensor([[False, True, True, False, False, False]]))
        >>> out = bundle.forward(torch.zeros(1, 3), masks)
        >>> out.logits["op"].softmax(-1)
        tensor([[0.0000, 0.5000, 0.5000, 0.0000, 0.0000, 0.0000]])

    Args:
        feature_dim: The width of the features to accept, so that it refuses the same
            inputs a learned bundle built with that width would; `None` (the default)
            accepts any width.
        action_space: Head sizes.
        probability_floor: Accepted like every bundle's (see `PolicyBundle`); a
            uniform distribution already meets any floor, so it changes nothing but rounding.
    """

    def __init__(
        self,
        feature_dim: int | None = None,
        *,
        action_space: ActionSpace = ActionSpace(),
        probability_floor: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(
            nn.Module(),
            feature_dim=feature_dim,
            action_space=action_space,
            probability_floor=probability_floor,
        )

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        batch, steps = inputs.batch_size, inputs.seq_len
        space = self.action_space
        logits = inputs.features.new_zeros(
            (batch, steps, space.num_heads, space.padded_size)
        )  # [B, T, H, A_max]
        value = inputs.features.new_zeros((batch, steps))  # [B, T]
        return NetworkOutput(logits, value, None)
