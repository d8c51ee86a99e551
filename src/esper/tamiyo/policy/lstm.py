"""`LSTMPolicyBundle`: Tamiyo's recurrent policy, on the `PolicyBundle` base."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from esper.tamiyo.policy.action_space import ActionSpace
from esper.tamiyo.policy.base import PolicyBundle
from esper.tamiyo.policy.extra_inputs import ExtraInput
from esper.tamiyo.policy.heads import OpConditionedLogits, PolicyHeads, init_orthogonal_
from esper.tamiyo.policy.inputs import HiddenState, PolicyInputs
from esper.tamiyo.policy.outputs import NetworkOutput, OpConditionedOutput
from esper.tamiyo.policy.registry import register_policy
from esper.tamiyo.policy.validation import check_action_space, check_flag, check_positive_int

__all__ = ["BLUEPRINT_INDICES", "BlueprintEmbedding", "LSTMPolicyBundle", "LSTMPolicyNetwork"]

BLUEPRINT_INDICES = "blueprint_indices"
"""The extra input of an LSTM bundle built with `blueprint_embed_dim`: per slot, the
blueprint installed there, -1 for an empty slot."""


class BlueprintEmbedding(nn.Module):
    """A learned vector per blueprint, and a learned null vector for an empty slot.

    Row 0 of the table is the null embedding and blueprint `i` is row `i + 1`, so an
    empty slot (`-1`) needs no branch: one `add` (an integer `remainder`, to keep the
    null row last as the host does, costs three times as much at batch 1). The bundle
    checks the indices before they get here (`ExtraInput`, with `check_values` on);
    with the checks off, an index outside `[-1, N)` fails in `F.embedding` (an
    `IndexError` on a CPU, a device-side assert on CUDA). The table is a parameter of this module, read with
    `F.embedding`: one module call per step rather than two.

    Args:
        num_blueprints: `N`, the blueprints `0 .. N-1`.
        embed_dim: Width of each vector.

    Shape:
        `[..., S]` int64 indices in `[-1, N)` to `[..., S * embed_dim]`.
    """

    def __init__(self, num_blueprints: int, embed_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_blueprints + 1, embed_dim))  # [N + 1, E]
        nn.init.normal_(self.weight, std=0.02)  # small: the features lead at first

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """Embed each slot's blueprint and join the slots: `[..., S]` to `[..., S * E]`."""
        return F.embedding(indices + 1, self.weight).flatten(-2)  # [..., S * E]; -1 -> row 0


class LSTMPolicyNetwork(nn.Module):
    """Feature embedding, an LSTM, and the fused policy and value heads.

    `Linear(F, E) -> LayerNorm -> ReLU -> LSTM(E, D) -> LayerNorm -> PolicyHeads(D)`,
    and `OpConditionedLogits(D)` beside the heads when `op_conditioned` is set.

    A single step (`T == 1`) runs `torch.lstm_cell` on the LSTM's own weights, layer by
    layer, instead of `nn.LSTM`: the same function (pinned by a test), about 100 µs
    cheaper per step at batch 1 on CPU, and traceable by `torch.compile`. Sequences use
    `nn.LSTM` and its fused kernels.

    Args:
        feature_dim: `F`.
        hidden_dim: `D`, the LSTM's width; the heads' hidden layers are `D // 2`.
        embed_dim: `E`, the embedding width.
        num_layers: Stacked LSTM layers.
        action_space: Head sizes.
        op_conditioned: Also compute per-op logits (a hierarchical space only).
        blueprint_embed_dim: `E_bp`; when above 0, each slot's blueprint is embedded
            (`BlueprintEmbedding`) and the `S * E_bp` values are joined to the
            features before the feature embedding.

    Shape:
        `forward(features [B, T, F], (h, c) each [L, B, D], blueprints [B, T, S])`
        returns logits `[B, T, H, A_max]`, value `[B, T]`, the new `(h, c)`, and per-op
        logits `[B, T, N_op, H, A_max]` or `None`.
    """

    def __init__(
        self,
        feature_dim: int,
        hidden_dim: int,
        embed_dim: int,
        num_layers: int,
        action_space: ActionSpace,
        op_conditioned: bool = False,
        blueprint_embed_dim: int = 0,
    ) -> None:
        super().__init__()
        self.blueprints = (
            BlueprintEmbedding(action_space.blueprint, blueprint_embed_dim)
            if blueprint_embed_dim
            else None
        )
        joined = feature_dim + action_space.slot * blueprint_embed_dim
        self.embed = nn.Linear(joined, embed_dim)
        self.embed_norm = nn.LayerNorm(embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers=num_layers, batch_first=True)
        self.lstm_norm = nn.LayerNorm(hidden_dim)
        self.heads = PolicyHeads(hidden_dim, action_space, hidden_dim=hidden_dim // 2)
        self.op_logits = OpConditionedLogits(hidden_dim, action_space) if op_conditioned else None
        self.num_layers = num_layers
        # The single-step path's own references to the LSTM's parameters, for
        # torch.compile, which cannot trace any use of an `nn.LSTM` module: see
        # `_layer_weights`. Renewed when a parameter is replaced, and after every load.
        self._cell_weight_names = _weight_names(num_layers)
        self._cell_weights = self._read_cell_weights()
        self.register_load_state_dict_post_hook(_renew_cell_weights)  # type: ignore[no-untyped-call]  # untyped in torch
        self._init_weights(hidden_dim)

    @torch.no_grad()
    def _init_weights(self, hidden_dim: int) -> None:
        init_orthogonal_(self.embed)
        for name, param in self.lstm.named_parameters():
            if name.startswith("weight"):
                nn.init.orthogonal_(param)
            else:
                # Gate order is (input, forget, cell, output). Both bias vectors (b_ih
                # and b_hh) get 1 on the forget slice, so the gate's bias is 2: memory
                # flows early in training.
                param.zero_()
                param[hidden_dim : 2 * hidden_dim].fill_(1.0)

    def forward(
        self,
        features: torch.Tensor,
        hidden: HiddenState,
        blueprints: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, HiddenState, torch.Tensor | None]:
        """Run a step or a sequence.

        Args:
            features: `[B, T, F]`.
            hidden: `(h, c)`, each `[L, B, D]`.
            blueprints: `[B, T, S]` int64, each slot's blueprint or -1; required with
                a blueprint embedding, ignored without.

        Returns:
            `(logits [B, T, H, A_max], value [B, T], (h, c), logits_by_op)`, the last
            `[B, T, N_op, H, A_max]` or `None`.
        """
        if self.blueprints is not None:
            if blueprints is None:
                raise ValueError(
                    "LSTMPolicyNetwork: this network embeds blueprints; pass blueprints "
                    "[B, T, S] (-1 for an empty slot)"
                )
            features = torch.cat((features, self.blueprints(blueprints)), dim=-1)  # [B, T, F']
        if features.shape[1] == 1:
            return self._single_step(features, hidden)
        x = torch.relu(self.embed_norm(self.embed(features)))  # [B, T, E]
        out, (h, c) = self.lstm(x, (hidden[0], hidden[1]))  # [B, T, D]
        top = self.lstm_norm(out)  # [B, T, D]
        logits, value = self.heads(top)  # [B, T, H, A_max], [B, T]
        by_op = None if self.op_logits is None else self.op_logits(top, logits)
        return logits, value, (h, c), by_op

    def _read_cell_weights(self) -> tuple[torch.Tensor, ...]:
        """The LSTM's parameters as registered now, in `torch.lstm_cell`'s order per layer."""
        lstm = self.lstm
        return tuple([getattr(lstm, name) for name in self._cell_weight_names])

    def _layer_weights(self) -> tuple[torch.Tensor, ...]:
        """The LSTM's parameters for the single step, 4 per layer: `w_ih, w_hh, b_ih, b_hh`.

        Eager, read through the LSTM's attributes on every step, so a replaced parameter
        (reassigned, loaded with `assign=True`, swapped in by
        `torch.func.functional_call`) is the one used. Compiled, the references kept
        for torch.compile: renewed after every `load_state_dict`, and by an eager step
        that finds new registered parameters (not the plain tensors `functional_call`
        lends for one call).
        """
        if torch.compiler.is_compiling():
            return self._cell_weights
        current = self._read_cell_weights()
        for now, kept in zip(current, self._cell_weights, strict=True):
            if now is not kept:
                if all(isinstance(weight, nn.Parameter) for weight in current):
                    self._cell_weights = current
                break
        return current

    def _single_step(
        self, features: torch.Tensor, hidden: HiddenState
    ) -> tuple[torch.Tensor, torch.Tensor, HiddenState, torch.Tensor | None]:
        """`forward` for T == 1: `torch.lstm_cell` on `nn.LSTM`'s own weights, in `[B, ...]`.

        Valid for the LSTM this module builds: unidirectional, no dropout, no projection.
        Working on `[B, ...]` rather than `[B, 1, ...]` saves the reshapes a 3-D
        `Linear` costs; at batch 1 every tensor op counts.
        """
        x = torch.relu(self.embed_norm(self.embed(features[:, 0])))  # [B, E]
        h_all, c_all = hidden[0], hidden[1]  # [L, B, D]
        weights = self._layer_weights()
        hs: list[torch.Tensor] = []
        cs: list[torch.Tensor] = []
        h = x
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = weights[4 * layer : 4 * layer + 4]
            h, c = torch.lstm_cell(h, (h_all[layer], c_all[layer]), w_ih, w_hh, b_ih, b_hh)
            hs.append(h)  # [B, D]
            cs.append(c)
        if len(hs) == 1:
            new_hidden: HiddenState = (hs[0].unsqueeze(0), cs[0].unsqueeze(0))
        else:
            new_hidden = (torch.stack(hs), torch.stack(cs))  # [L, B, D] each
        top = self.lstm_norm(h)  # [B, D]
        logits, value = self.heads(top)  # [B, H, A_max], [B]
        by_op = None if self.op_logits is None else self.op_logits(top, logits).unsqueeze(1)
        return logits.unsqueeze(1), value.unsqueeze(1), new_hidden, by_op


@register_policy("lstm")
class LSTMPolicyBundle(PolicyBundle):
    """Recurrent policy: an LSTM over embedded features, with fused factored heads.

    Hidden state is `(h, c)`, each `[num_layers, B, hidden_dim]`. Pass the state
    `get_action` returns to the next step; store the state a sequence started from
    and pass it to `evaluate_actions` with that sequence in the PPO update.

    Example:
        >>> bundle = LSTMPolicyBundle(feature_dim=16)
        >>> hidden = bundle.initial_hidden(batch_size=4)
        >>> step = bundle.get_action(torch.randn(4, 16), masks=None, hidden=hidden)
        >>> step.action["blueprint"].shape, step.hidden[0].shape
        (torch.Size([4]), torch.Size([1, 4, 128]))

    Args:
        feature_dim: `F`, width of the features.
        hidden_dim: LSTM width `D`; each head's hidden layer is `D // 2`.
        embed_dim: Width of the feature embedding.
        num_layers: Stacked LSTM layers.
        action_space: Head sizes; `ActionSpace.tamiyo()` for Tamiyo's op-first
            hierarchy.
        op_conditioned_logits: Make every other head's logits depend on the op
            (`OpConditionedLogits`); needs a hierarchical `action_space`.
        probability_floor: Per-head probability floors, e.g. `{"op": 0.15}`; `None`
            (the default) floors nothing. See `PolicyBundle`.
        blueprint_embed_dim: When above 0 (4 in the host system), the bundle takes the
            extra input `blueprint_indices`, `[B, S]` (`[B, T, S]` for a sequence)
            int64, the blueprint installed in each of the `S = action_space.slot`
            slots, -1 for an empty one; each is embedded in this many values
            (`BlueprintEmbedding`, -1 to a learned null vector) and joined to the
            features. 0, the default, takes features alone.

    Example:
        With the blueprint in each slot as an input:

        >>> bundle = LSTMPolicyBundle(feature_dim=16, blueprint_embed_dim=4)
        >>> installed = torch.tensor([[3, -1, -1], [0, 12, -1]])  # [B, S]: -1 is empty
        >>> extras = {"blueprint_indices": installed}
        >>> step = bundle.get_action(torch.randn(2, 16), None, extras=extras)
        >>> step.value.shape
        torch.Size([2])
    """

    is_recurrent = True
    network: LSTMPolicyNetwork

    def __init__(
        self,
        feature_dim: int,
        *,
        hidden_dim: int = 128,
        embed_dim: int = 128,
        num_layers: int = 1,
        action_space: ActionSpace = ActionSpace(),
        op_conditioned_logits: bool = False,
        probability_floor: Mapping[str, float] | None = None,
        blueprint_embed_dim: int = 0,
    ) -> None:
        owner = type(self).__name__
        check_positive_int(feature_dim, "feature_dim", owner)
        check_positive_int(hidden_dim, "hidden_dim", owner, minimum=2)
        check_positive_int(embed_dim, "embed_dim", owner)
        check_positive_int(num_layers, "num_layers", owner)
        check_positive_int(blueprint_embed_dim, "blueprint_embed_dim", owner, minimum=0)
        check_flag(op_conditioned_logits, "op_conditioned_logits")
        check_action_space(action_space, owner)
        if op_conditioned_logits and action_space.hierarchy is None:
            raise ValueError(
                f"{owner}: op_conditioned_logits=True needs a hierarchical action space "
                "(the op is chosen first); pass action_space=ActionSpace.tamiyo()"
            )
        network = LSTMPolicyNetwork(
            feature_dim,
            hidden_dim,
            embed_dim,
            num_layers,
            action_space,
            op_conditioned_logits,
            blueprint_embed_dim,
        )
        extra_inputs: tuple[ExtraInput, ...] = ()
        if blueprint_embed_dim:
            extra_inputs = (
                ExtraInput(
                    BLUEPRINT_INDICES,
                    "integer",
                    (action_space.slot,),
                    low=0,
                    high=action_space.blueprint,
                    sentinels=(-1,),
                ),
            )
        super().__init__(
            network,
            feature_dim=feature_dim,
            action_space=action_space,
            hidden_shapes=((num_layers, hidden_dim), (num_layers, hidden_dim)),
            probability_floor=probability_floor,
            extra_inputs=extra_inputs,
        )
        self.hidden_dim = hidden_dim
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.op_conditioned_logits = op_conditioned_logits
        self.blueprint_embed_dim = blueprint_embed_dim

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput | OpConditionedOutput:
        assert inputs.hidden is not None  # the base fills in zeros for a recurrent bundle
        blueprints = inputs.extras.get(BLUEPRINT_INDICES)  # [B, T, S] or None
        logits, value, hidden, by_op = self.network(inputs.features, inputs.hidden, blueprints)
        if by_op is None:
            return NetworkOutput(logits, value, hidden)
        return OpConditionedOutput(logits, value, hidden, by_op)


def _weight_names(num_layers: int) -> tuple[str, ...]:
    """`nn.LSTM`'s parameter names, layer by layer in `torch.lstm_cell`'s argument order."""
    return tuple(
        name
        for k in range(num_layers)
        for name in (f"weight_ih_l{k}", f"weight_hh_l{k}", f"bias_ih_l{k}", f"bias_hh_l{k}")
    )


def _renew_cell_weights(network: nn.Module, incompatible_keys: object) -> None:
    """`load_state_dict` post-hook: take the references of the parameters just loaded."""
    if isinstance(network, LSTMPolicyNetwork):
        network._cell_weights = network._read_cell_weights()
