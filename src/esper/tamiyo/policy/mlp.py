"""`MLPPolicyBundle`: a stateless feed-forward policy, on the `PolicyBundle` base."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from esper.tamiyo.policy.action_space import ActionSpace
from esper.tamiyo.policy.base import PolicyBundle
from esper.tamiyo.policy.heads import PolicyHeads, init_orthogonal_
from esper.tamiyo.policy.inputs import PolicyInputs
from esper.tamiyo.policy.outputs import NetworkOutput
from esper.tamiyo.policy.registry import register_policy
from esper.tamiyo.policy.validation import check_positive_int

__all__ = ["MLPPolicyBundle", "MLPPolicyNetwork"]


class MLPPolicyNetwork(nn.Module):
    """Two hidden layers and the fused policy and value heads, applied to each step alone.

    `Linear(F, D) -> LayerNorm -> ReLU -> Linear(D, D) -> LayerNorm -> ReLU ->
    PolicyHeads(D)`, the LSTM network's shape with a second dense layer where the LSTM
    was, so the two differ only in memory.

    Args:
        feature_dim: `F`.
        hidden_dim: `D`; the heads' hidden layers are `D // 2`.
        action_space: Head sizes.

    Shape:
        `forward(features [B, T, F])` returns logits `[B, T, H, A_max]` and value `[B, T]`.
    """

    def __init__(self, feature_dim: int, hidden_dim: int, action_space: ActionSpace) -> None:
        super().__init__()
        self.torso = nn.Sequential(
            init_orthogonal_(nn.Linear(feature_dim, hidden_dim)),
            nn.LayerNorm(hidden_dim),
            nn.ReLU(),
            init_orthogonal_(nn.Linear(hidden_dim, hidden_dim)),
            nn.LayerNorm(hidden_dim),
            nn.ReLU(),
        )
        self.heads = PolicyHeads(hidden_dim, action_space, hidden_dim=hidden_dim // 2)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, T, F]` -> `(logits [B, T, H, A_max], value [B, T])`."""
        result: tuple[torch.Tensor, torch.Tensor] = self.heads(self.torso(features))
        return result


@register_policy("mlp")
class MLPPolicyBundle(PolicyBundle):
    """Stateless policy: a feed-forward network on each step's features alone.

    The memoryless baseline for `LSTMPolicyBundle`: same heads, same training code,
    no hidden state. `initial_hidden` returns `None`, and a hidden state passed to it
    is refused.

    Example:
        >>> bundle = MLPPolicyBundle(feature_dim=16)
        >>> step = bundle.get_action(torch.randn(4, 16), masks=None)
        >>> step.action["op"].shape, step.hidden
        (torch.Size([4]), None)

    Args:
        feature_dim: `F`, width of the features.
        hidden_dim: Width `D` of the two hidden layers; each head's hidden layer is
            `D // 2`.
        action_space: Head sizes.
        probability_floor: Per-head probability floors, e.g. `{"op": 0.15}`; `None`
            (the default) floors nothing. See `PolicyBundle`.
    """

    network: MLPPolicyNetwork

    def __init__(
        self,
        feature_dim: int,
        *,
        hidden_dim: int = 128,
        action_space: ActionSpace = ActionSpace(),
        probability_floor: Mapping[str, float] | None = None,
    ) -> None:
        owner = type(self).__name__
        check_positive_int(feature_dim, "feature_dim", owner)
        check_positive_int(hidden_dim, "hidden_dim", owner, minimum=2)
        super().__init__(
            MLPPolicyNetwork(feature_dim, hidden_dim, action_space),
            feature_dim=feature_dim,
            action_space=action_space,
            probability_floor=probability_floor,
        )
        self.hidden_dim = hidden_dim

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        logits, value = self.network(inputs.features)  # [B, T, H, A_max], [B, T]
        return NetworkOutput(logits, value, None)
