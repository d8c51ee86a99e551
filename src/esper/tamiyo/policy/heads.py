"""`PolicyHeads`: all policy heads and the value head as one module, in the padded layout."""

from __future__ import annotations

import math

import torch
from torch import nn

from esper.tamiyo.policy.action_space import ActionSpace
from esper.tamiyo.policy.validation import check_action_space

__all__ = ["OpConditionedLogits", "PolicyHeads", "init_orthogonal_"]

_TORSO_GAIN = math.sqrt(2.0)
_POLICY_GAIN = 0.01
_VALUE_GAIN = 1.0


def init_orthogonal_(linear: nn.Linear, gain: float = _TORSO_GAIN) -> nn.Linear:
    """Orthogonal weights with `gain` and zero bias, the PPO-standard initialization."""
    nn.init.orthogonal_(linear.weight, gain=gain)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class PolicyHeads(nn.Module):
    """Eight policy heads and a value head, each `Linear -> ReLU -> Linear`, fused.

    The function is exactly that of nine separate heads `Linear(input_dim, K) -> ReLU
    -> Linear(K, A_h)` (`K = hidden_dim`, `A_h = 1` for the value), but computed in two
    kernels whatever the number of heads: one matmul for all first layers, one batched
    matmul for all output layers. The output is already the padded layout the base
    expects, so a new bundle ends its network with `PolicyHeads` and is done.

    Parameters:
        `hidden.weight` `[(H + 1) * K, input_dim]`: block `h` is head `h`'s first layer,
        block `H` the value head's.
        `out_weight` `[H + 1, K, A_max]`: `out_weight[h, :, :A_h]` is head `h`'s output
        layer, transposed; `out_weight[H, :, 0]` the value's. Columns past `A_h` are
        padding: their logits are always masked by the base, so they receive exactly
        zero gradient and keep their zero initialization.
        `out_bias` `[H + 1, 1, A_max]`: laid out like `out_weight`.

    Initialization: first layers orthogonal with gain sqrt(2), policy output layers
    gain 0.01 (near-uniform initial policy), value output gain 1, biases zero; each
    head's block is initialized on its own, as a separate `nn.Linear` would be.

    Args:
        input_dim: Width of the input features, the torso's output.
        action_space: Head sizes.
        hidden_dim: `K`, width of each head's hidden layer; `input_dim // 2` by default.

    Shape:
        Input `[..., input_dim]`; output `(logits [..., H, A_max], value [...])`.
    """

    def __init__(
        self, input_dim: int, action_space: ActionSpace, hidden_dim: int | None = None
    ) -> None:
        super().__init__()
        check_action_space(action_space, type(self).__name__)
        width = hidden_dim if hidden_dim is not None else max(1, input_dim // 2)
        heads = action_space.num_heads
        padded = action_space.padded_size
        self.num_heads = heads
        self.padded_size = padded
        self.head_hidden_dim = width
        self.action_sizes = action_space.sizes
        self.hidden = nn.Linear(input_dim, (heads + 1) * width)
        self.out_weight = nn.Parameter(torch.zeros(heads + 1, width, padded))
        self.out_bias = nn.Parameter(torch.zeros(heads + 1, 1, padded))
        self._init_weights(input_dim, action_space.sizes)

    @torch.no_grad()
    def _init_weights(self, input_dim: int, sizes: tuple[int, ...]) -> None:
        width = self.head_hidden_dim
        for block, size in enumerate((*sizes, 1)):
            first = nn.Linear(input_dim, width)
            init_orthogonal_(first, _TORSO_GAIN)
            self.hidden.weight[block * width : (block + 1) * width].copy_(first.weight)
            out = nn.Linear(width, size)
            init_orthogonal_(out, _VALUE_GAIN if block == self.num_heads else _POLICY_GAIN)
            self.out_weight[block, :, :size].copy_(out.weight.T)
        self.hidden.bias.zero_()
        self.out_bias.zero_()

    def get_extra_state(self) -> dict[str, tuple[int, ...]]:
        """Saved in the `state_dict`: the head sizes the padded weights are laid out for.

        Different action spaces can share the padded weight shapes (3 and 5 slots both
        pad to 16), so the shapes alone cannot tell a checkpoint was made for another.
        """
        return {"action_sizes": self.action_sizes}

    def set_extra_state(self, state: dict[str, tuple[int, ...]]) -> None:
        """Refuse a checkpoint made for other head sizes."""
        sizes = tuple(state["action_sizes"])
        if sizes != self.action_sizes:
            raise ValueError(
                f"PolicyHeads: the checkpoint was made for head sizes {sizes}, "
                f"these heads have {self.action_sizes}"
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute all heads' logits and the value.

        Args:
            x: `[..., input_dim]`.

        Returns:
            `(logits, value)`: `[..., H, A_max]` and `[...]`.
        """
        lead = x.shape[:-1]
        blocks = self.num_heads + 1
        z = torch.relu(self.hidden(x))  # [..., (H+1) * K]
        z = z.reshape(-1, blocks, self.head_hidden_dim).transpose(0, 1)  # [H+1, N, K]
        out = torch.baddbmm(self.out_bias, z, self.out_weight).transpose(0, 1)  # [N, H+1, A]
        logits = out[:, : self.num_heads]  # [N, H, A]
        value = out[:, self.num_heads, 0]  # [N]
        if len(lead) != 1:  # [N] is already the shape of a 2-D input: skip two no-op views
            logits = logits.reshape(*lead, self.num_heads, self.padded_size)
            value = value.reshape(lead)
        return logits, value


class OpConditionedLogits(nn.Module):
    """Per-op logits for every head: `PolicyHeads`' logits plus a learned offset per op.

    Opt into op-conditioned logits under a hierarchical space with this module: its
    output is `OpConditionedOutput.logits_by_op`, so a policy can prefer slot 0 to
    germinate and slot 2 to fossilize in the same state, which per-head logits cannot
    say. `logits_by_op[..., n, h, :] = logits[..., h, :] + W_{n,h} x + b_{n,h}`: one
    `Linear(input_dim, N_op * H * A_max)`, zero-initialized, so a new network starts as
    exactly the op-independent one and learns how far each op moves each head.

    Args:
        input_dim: Width of the input, the torso's output (what `PolicyHeads` reads).
        action_space: A hierarchical space (`N_op` is its op head's size).

    Shape:
        `forward(x [..., input_dim], logits [..., H, A_max])` returns
        `[..., N_op, H, A_max]`.

    Raises:
        ValueError: The space has no hierarchy.
    """

    def __init__(self, input_dim: int, action_space: ActionSpace) -> None:
        super().__init__()
        check_action_space(action_space, type(self).__name__)
        if action_space.hierarchy is None:
            raise ValueError(
                "OpConditionedLogits needs a hierarchical action space (the op is chosen "
                "first); got a flat one: use ActionSpace.tamiyo()"
            )
        self.num_ops = action_space.op
        self.num_heads = action_space.num_heads
        self.padded_size = action_space.padded_size
        self.action_sizes = action_space.sizes
        self.offset = nn.Linear(input_dim, self.num_ops * self.num_heads * self.padded_size)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def get_extra_state(self) -> dict[str, tuple[int, ...]]:
        """Saved in the `state_dict`: the head sizes the offsets are laid out for."""
        return {"action_sizes": self.action_sizes}

    def set_extra_state(self, state: dict[str, tuple[int, ...]]) -> None:
        """Refuse a checkpoint made for other head sizes."""
        sizes = tuple(state["action_sizes"])
        if sizes != self.action_sizes:
            raise ValueError(
                f"OpConditionedLogits: the checkpoint was made for head sizes {sizes}, "
                f"this module has {self.action_sizes}"
            )

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-op logits: `x` `[..., input_dim]`, `logits` `[..., H, A_max]`."""
        flat: torch.Tensor = self.offset(x)  # [..., N_op * H * A_max]
        offset = flat.view(*x.shape[:-1], self.num_ops, self.num_heads, self.padded_size)
        return logits.unsqueeze(-3) + offset  # [..., N_op, H, A_max]
