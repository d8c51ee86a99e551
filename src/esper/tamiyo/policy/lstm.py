"""`LSTMPolicyBundle`: Tamiyo's recurrent policy, on the `PolicyBundle` base."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esper.tamiyo.policy import fast_layers
from esper.tamiyo.policy.action_space import ActionSpace
from esper.tamiyo.policy.base import PolicyBundle
from esper.tamiyo.policy.heads import PolicyHeads, init_orthogonal_
from esper.tamiyo.policy.inputs import HiddenState, PolicyInputs
from esper.tamiyo.policy.outputs import NetworkOutput
from esper.tamiyo.policy.registry import register_policy
from esper.tamiyo.policy.validation import check_positive_int

__all__ = ["LSTMPolicyBundle", "LSTMPolicyNetwork"]


class LSTMPolicyNetwork(nn.Module):
    """Feature embedding, an LSTM, and the fused policy and value heads.

    `Linear(F, E) -> LayerNorm -> ReLU -> LSTM(E, D) -> LayerNorm -> PolicyHeads(D)`.

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

    Shape:
        `forward(features [B, T, F], (h, c) each [L, B, D])` returns logits
        `[B, T, H, A_max]`, value `[B, T]` and the new `(h, c)`.
    """

    def __init__(
        self,
        feature_dim: int,
        hidden_dim: int,
        embed_dim: int,
        num_layers: int,
        action_space: ActionSpace,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(feature_dim, embed_dim)
        self.embed_norm = nn.LayerNorm(embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers=num_layers, batch_first=True)
        self.lstm_norm = nn.LayerNorm(hidden_dim)
        self.heads = PolicyHeads(hidden_dim, action_space, hidden_dim=hidden_dim // 2)
        self.num_layers = num_layers
        # The single-step path reads the LSTM's parameters from here: torch.compile
        # cannot trace any use of an `nn.LSTM` module, and `all_weights` rebuilds its
        # lists on every access. `_current_cell_weights` renews them when a parameter
        # is replaced (reassigned, `assign=True` loads, `torch.func.functional_call`).
        self._cell_weight_names = _weight_names(num_layers)
        self._set_cell_weights()
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
        self, features: torch.Tensor, hidden: HiddenState
    ) -> tuple[torch.Tensor, torch.Tensor, HiddenState]:
        """Run a step or a sequence.

        Args:
            features: `[B, T, F]`.
            hidden: `(h, c)`, each `[L, B, D]`.

        Returns:
            `(logits [B, T, H, A_max], value [B, T], (h, c))`.
        """
        if features.shape[1] == 1:
            return self._single_step(features, hidden)
        x = torch.relu(self.embed_norm(self.embed(features)))  # [B, T, E]
        out, (h, c) = self.lstm(x, (hidden[0], hidden[1]))  # [B, T, D]
        logits, value = self.heads(self.lstm_norm(out))  # [B, T, H, A_max], [B, T]
        return logits, value, (h, c)

    def _current_cell_weights(self) -> tuple[_CellWeights, ...]:
        """The references of `_cell_weights`, renewed if an LSTM parameter was replaced.

        Compares them with the LSTM's registered parameters (reassigned, loaded with
        `assign=True`, swapped in by `torch.func.functional_call`), by identity: well
        under a microsecond. Not under torch.compile, which cannot read an `nn.LSTM`
        (a compiled bundle uses the references it was traced with).
        """
        params = self.lstm._parameters
        for name, weight in zip(self._cell_weight_names, self._flat_cell_weights, strict=True):
            if params[name] is not weight:
                self._set_cell_weights()
                break
        return self._cell_weights

    def _set_cell_weights(self) -> None:
        """Take references to the LSTM's parameters as registered now."""
        self._cell_weights = _cell_weights(self.lstm)
        flat: list[torch.Tensor] = []
        for layer in self._cell_weights:
            flat.extend(layer)
        self._flat_cell_weights = tuple(flat)

    def _single_step(
        self, features: torch.Tensor, hidden: HiddenState
    ) -> tuple[torch.Tensor, torch.Tensor, HiddenState]:
        """`forward` for T == 1: `torch.lstm_cell` on `nn.LSTM`'s own weights, in `[B, ...]`.

        Valid for the LSTM this module builds: unidirectional, no dropout, no projection.
        Working on `[B, ...]` rather than `[B, 1, ...]` saves the reshapes a 3-D
        `Linear` costs; at batch 1 every tensor op counts.
        """
        # The leaf layers run as functions of their own parameters when nothing hooks
        # them: at batch 1 a step is Python overhead, and module calls cost ~15% more.
        x = F.relu(
            fast_layers.layer_norm(self.embed_norm, fast_layers.linear(self.embed, features[:, 0]))
        )  # [B, E]
        h_all, c_all = hidden[0], hidden[1]  # [L, B, D]
        cell_weights = (
            self._cell_weights if torch.compiler.is_compiling() else self._current_cell_weights()
        )
        hs: list[torch.Tensor] = []
        cs: list[torch.Tensor] = []
        h = x
        for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(cell_weights):
            h, c = torch.lstm_cell(h, (h_all[layer], c_all[layer]), w_ih, w_hh, b_ih, b_hh)
            hs.append(h)  # [B, D]
            cs.append(c)
        if len(hs) == 1:
            new_hidden: HiddenState = (hs[0].unsqueeze(0), cs[0].unsqueeze(0))
        else:
            new_hidden = (torch.stack(hs), torch.stack(cs))  # [L, B, D] each
        logits, value = self.heads(fast_layers.layer_norm(self.lstm_norm, h))  # [B, H, A_max], [B]
        return logits.unsqueeze(1), value.unsqueeze(1), new_hidden


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
        action_space: Head sizes.
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
    ) -> None:
        owner = type(self).__name__
        check_positive_int(feature_dim, "feature_dim", owner)
        check_positive_int(hidden_dim, "hidden_dim", owner, minimum=2)
        check_positive_int(embed_dim, "embed_dim", owner)
        check_positive_int(num_layers, "num_layers", owner)
        super().__init__(
            LSTMPolicyNetwork(feature_dim, hidden_dim, embed_dim, num_layers, action_space),
            feature_dim=feature_dim,
            action_space=action_space,
            hidden_shapes=((num_layers, hidden_dim), (num_layers, hidden_dim)),
        )
        self.hidden_dim = hidden_dim
        self.embed_dim = embed_dim
        self.num_layers = num_layers

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        assert inputs.hidden is not None  # the base fills in zeros for a recurrent bundle
        logits, value, hidden = self.network(inputs.features, inputs.hidden)
        return NetworkOutput(logits, value, hidden)


_CellWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _weight_names(num_layers: int) -> tuple[str, ...]:
    """`nn.LSTM`'s parameter names, layer by layer in `torch.lstm_cell`'s argument order."""
    names: list[str] = []
    for k in range(num_layers):
        names.extend((f"weight_ih_l{k}", f"weight_hh_l{k}", f"bias_ih_l{k}", f"bias_hh_l{k}"))
    return tuple(names)


def _cell_weights(lstm: nn.LSTM) -> tuple[_CellWeights, ...]:
    """Each layer's `(w_ih, w_hh, b_ih, b_hh)`, as registered now."""
    params = lstm._parameters
    names = _weight_names(lstm.num_layers)
    layers: list[_CellWeights] = []
    for first in range(0, len(names), 4):
        w_ih, w_hh, b_ih, b_hh = (params[name] for name in names[first : first + 4])
        if w_ih is None or w_hh is None or b_ih is None or b_hh is None:
            raise TypeError("LSTMPolicyNetwork needs an nn.LSTM with both bias vectors")
        layers.append((w_ih, w_hh, b_ih, b_hh))
    return tuple(layers)
