"""A recurrent policy bundle on a GRU: the worked example of docs/adding-a-policy-bundle.md."""

from __future__ import annotations

from torch import Tensor, nn

from esper.tamiyo.policy import (
    ActionSpace,
    NetworkOutput,
    PolicyBundle,
    PolicyHeads,
    PolicyInputs,
    register_policy,
)


class GRUPolicyNetwork(nn.Module):
    """`Linear -> ReLU -> GRU -> PolicyHeads`: features `[B, T, F]`, state `[1, B, D]`."""

    def __init__(self, feature_dim: int, hidden_dim: int, action_space: ActionSpace) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU())
        self.gru = nn.GRU(hidden_dim, hidden_dim, batch_first=True)
        self.heads = PolicyHeads(hidden_dim, action_space)

    def forward(self, features: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns logits `[B, T, H, A_max]`, value `[B, T]` and the new state `[1, B, D]`."""
        out, h = self.gru(self.embed(features), h)  # [B, T, D], [1, B, D]
        logits, value = self.heads(out)
        return logits, value, h


@register_policy("gru")
class GRUPolicyBundle(PolicyBundle):
    """Recurrent policy on a GRU; its hidden state is a 1-tuple `(h,)`, `h` `[1, B, D]`."""

    is_recurrent = True
    network: GRUPolicyNetwork

    def __init__(
        self,
        feature_dim: int,
        *,
        hidden_dim: int = 64,
        action_space: ActionSpace = ActionSpace(),
        probability_floor: dict[str, float] | None = None,
    ) -> None:
        super().__init__(
            GRUPolicyNetwork(feature_dim, hidden_dim, action_space),
            feature_dim=feature_dim,
            action_space=action_space,  # flat, or ActionSpace.tamiyo(): the base does both
            hidden_shapes=[(1, hidden_dim)],  # one tensor, [1, B, hidden_dim]
            probability_floor=probability_floor,  # per-head floors, applied by the base
        )

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        assert inputs.hidden is not None  # the base passes zeros when the caller gave none
        logits, value, h = self.network(inputs.features, inputs.hidden[0])
        return NetworkOutput(logits, value, (h,))
