"""A replica of the seed design of Tamiyo's LSTM policy, the baseline of the benchmarks.

`SeedLSTMBundle` reproduces the bundle that `LSTMPolicyBundle` replaces, as it was
before the finding that started this project (B10-PT-06): separate per-head
`nn.Sequential` heads, eight keyword-argument masks, `nn.LSTM` run even for a single
step, one `torch.distributions.Categorical` per head (through a `MaskedCategorical`
that validates its inputs on every call), and a `forward` that defines a nested
`expand_mask` function on every call.

THE FLAWS ARE REPRODUCED ON PURPOSE. This module is the "before" of a benchmark: the
per-call closure in `SeedLSTMBundle.forward`, the per-head distributions and their
checks are exactly what is measured against. Do not "fix" them, and do not use this
bundle for anything but comparisons; `tests/test_seed_design.py` pins the closure.

`transplant_weights` copies a replica's weights into an `LSTMPolicyBundle` so both
compute the same function, which the tests check and the benchmarks rely on.
"""

from __future__ import annotations

from typing import NamedTuple, TypedDict

import torch
from torch import nn
from torch.distributions import Categorical

from esper.tamiyo.policy.action_space import HEAD_NAMES, ActionSpace
from esper.tamiyo.policy.heads import init_orthogonal_
from esper.tamiyo.policy.inputs import HiddenState
from esper.tamiyo.policy.lstm import LSTMPolicyBundle
from esper.tamiyo.policy.masks import ActionMasks

__all__ = [
    "MaskKwargs",
    "MaskedCategorical",
    "SeedActionResult",
    "SeedEvalResult",
    "SeedLSTMBundle",
    "SeedLSTMNetwork",
    "SeedNetworkOutput",
    "mask_kwargs",
    "transplant_weights",
]

_MASKED_LOGIT = -1e4
_POLICY_GAIN = 0.01
_VALUE_GAIN = 1.0


class MaskKwargs(TypedDict, total=False):
    """The seed design's eight mask keyword arguments, for `**` calls."""

    slot_mask: torch.Tensor | None
    blueprint_mask: torch.Tensor | None
    style_mask: torch.Tensor | None
    tempo_mask: torch.Tensor | None
    alpha_target_mask: torch.Tensor | None
    alpha_speed_mask: torch.Tensor | None
    alpha_curve_mask: torch.Tensor | None
    op_mask: torch.Tensor | None


def mask_kwargs(masks: ActionMasks) -> MaskKwargs:
    """`ActionMasks` as the seed design's keyword arguments (`slot_mask=...`, ...).

    Args:
        masks: One mask (or `None`) per head.

    Returns:
        The keyword arguments, ready for `bundle.get_action(x, h, **kwargs)`.
    """
    return MaskKwargs(
        slot_mask=masks.slot,
        blueprint_mask=masks.blueprint,
        style_mask=masks.style,
        tempo_mask=masks.tempo,
        alpha_target_mask=masks.alpha_target,
        alpha_speed_mask=masks.alpha_speed,
        alpha_curve_mask=masks.alpha_curve,
        op_mask=masks.op,
    )


class SeedNetworkOutput(NamedTuple):
    """What `SeedLSTMNetwork.forward` and `SeedLSTMBundle.forward` return.

    Attributes:
        logits: Head name to masked logits, `[B, T, A_h]` (`[B, A_h]` from the bundle
            for single-step features); invalid actions hold -1e4.
        value: `[B, T]` (or `[B]`) state values.
        hidden: The new `(h, c)`, each `[L, B, D]`.
    """

    logits: dict[str, torch.Tensor]
    value: torch.Tensor
    hidden: tuple[torch.Tensor, torch.Tensor]


class SeedActionResult(NamedTuple):
    """What `SeedLSTMBundle.get_action` returns; no autograd graph.

    Attributes:
        action: Head name to int64 actions, `[B]` or `[B, T]`.
        log_prob: Head name to the log-probabilities of those actions.
        value: State values.
        hidden: The new `(h, c)`.
    """

    action: dict[str, torch.Tensor]
    log_prob: dict[str, torch.Tensor]
    value: torch.Tensor
    hidden: tuple[torch.Tensor, torch.Tensor]


class SeedEvalResult(NamedTuple):
    """What `SeedLSTMBundle.evaluate_actions` returns, with autograd.

    Attributes:
        log_prob: Head name to the log-probabilities of the given actions.
        entropy: Head name to normalized entropies in [0, 1].
        value: State values.
        hidden: The new `(h, c)`.
    """

    log_prob: dict[str, torch.Tensor]
    entropy: dict[str, torch.Tensor]
    value: torch.Tensor
    hidden: tuple[torch.Tensor, torch.Tensor]


class MaskedCategorical:
    """One head's masked `Categorical`, validating its inputs as the seed design did.

    By default (as in the seed design) construction first checks that every mask row
    has a valid action and that the logits are finite: two device syncs per head per
    call, which is part of what the benchmark measures.

    Args:
        logits: `[..., A]` logits.
        mask: `[..., A]` bool, True where the action is valid.
        validate: Run the two checks.

    Raises:
        ValueError: A mask row has no valid action, or a logit is NaN or infinite.
    """

    def __init__(self, logits: torch.Tensor, mask: torch.Tensor, *, validate: bool = True) -> None:
        if validate:
            if not bool(mask.any(dim=-1).all()):
                raise ValueError(
                    "MaskedCategorical: a mask row has no valid action; every row needs "
                    "at least one True"
                )
            if not bool(torch.isfinite(logits).all()):
                raise ValueError("MaskedCategorical: logits contain non-finite values (NaN/Inf)")
        self.mask = mask
        self.masked_logits = logits.masked_fill(~mask, _MASKED_LOGIT)
        self._dist = Categorical(logits=self.masked_logits)

    def sample(self) -> torch.Tensor:
        """One action per row, `[...]` int64."""
        action: torch.Tensor = self._dist.sample()  # type: ignore[no-untyped-call]
        return action

    def mode(self) -> torch.Tensor:
        """The most likely action of each row, `[...]` int64."""
        return self._dist.probs.argmax(dim=-1)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of `actions` (`[...]` int64), `[...]`."""
        log_prob: torch.Tensor = self._dist.log_prob(actions)  # type: ignore[no-untyped-call]
        return log_prob

    def entropy(self) -> torch.Tensor:
        """Entropy over the valid actions divided by the log of their number, `[...]`.

        It lies in [0, 1]; it is 0 where a single action is valid (the denominator is
        clamped so it never divides by zero).
        """
        probs = self._dist.probs
        log_probs = self._dist.logits - self._dist.logits.logsumexp(dim=-1, keepdim=True)
        raw = -(probs * log_probs * self.mask).sum(dim=-1)
        num_valid = self.mask.sum(dim=-1).clamp(min=1)
        max_entropy = torch.log(num_valid.to(raw.dtype))
        normalized = raw / max_entropy.clamp(min=1e-8)
        return torch.where(num_valid == 1, torch.zeros_like(normalized), normalized)


class SeedLSTMNetwork(nn.Module):
    """The seed design's network: embedding, LSTM, eight separate heads and a value head.

    `Linear(F, E) -> LayerNorm -> ReLU -> LSTM(E, D) -> LayerNorm`, then per head
    `Linear(D, D // 2) -> ReLU -> Linear(D // 2, A_h)` in an `nn.ModuleDict`, and the
    value head likewise with one output. `nn.LSTM` runs even for a single step.

    Args:
        feature_dim: `F`.
        hidden_dim: `D`.
        embed_dim: `E`.
        num_layers: Stacked LSTM layers.
        action_space: Head sizes.
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
        half = hidden_dim // 2
        self.embed = nn.Linear(feature_dim, embed_dim)
        self.embed_norm = nn.LayerNorm(embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers=num_layers, batch_first=True)
        self.lstm_norm = nn.LayerNorm(hidden_dim)
        self.heads = nn.ModuleDict()
        for name, size in zip(HEAD_NAMES, action_space.sizes, strict=True):
            self.heads[name] = nn.Sequential(
                nn.Linear(hidden_dim, half), nn.ReLU(), nn.Linear(half, size)
            )
        self.value_head = nn.Sequential(nn.Linear(hidden_dim, half), nn.ReLU(), nn.Linear(half, 1))
        self._init_weights(hidden_dim)

    @torch.no_grad()
    def _init_weights(self, hidden_dim: int) -> None:
        init_orthogonal_(self.embed)
        for name, param in self.lstm.named_parameters():
            if name.startswith("weight"):
                nn.init.orthogonal_(param)
            else:
                param.zero_()
                param[hidden_dim : 2 * hidden_dim].fill_(1.0)
        for head in self.heads.values():
            first, out = _head_linears(head)
            init_orthogonal_(first)
            init_orthogonal_(out, _POLICY_GAIN)
        first, out = _head_linears(self.value_head)
        init_orthogonal_(first)
        init_orthogonal_(out, _VALUE_GAIN)

    def forward(
        self,
        features: torch.Tensor,
        hidden: HiddenState,
        *,
        slot_mask: torch.Tensor | None = None,
        blueprint_mask: torch.Tensor | None = None,
        style_mask: torch.Tensor | None = None,
        tempo_mask: torch.Tensor | None = None,
        alpha_target_mask: torch.Tensor | None = None,
        alpha_speed_mask: torch.Tensor | None = None,
        alpha_curve_mask: torch.Tensor | None = None,
        op_mask: torch.Tensor | None = None,
    ) -> SeedNetworkOutput:
        """Run a sequence (a single step is a sequence of one) and mask each head.

        Args:
            features: `[B, T, F]`.
            hidden: `(h, c)`, each `[L, B, D]`.
            slot_mask: `[B, T, A_slot]` bool or `None`; likewise the other seven.
            blueprint_mask: As `slot_mask`.
            style_mask: As `slot_mask`.
            tempo_mask: As `slot_mask`.
            alpha_target_mask: As `slot_mask`.
            alpha_speed_mask: As `slot_mask`.
            alpha_curve_mask: As `slot_mask`.
            op_mask: As `slot_mask`.

        Returns:
            Masked logits `[B, T, A_h]` per head, values `[B, T]`, the new `(h, c)`.
        """
        masks = {
            "slot": slot_mask,
            "blueprint": blueprint_mask,
            "style": style_mask,
            "tempo": tempo_mask,
            "alpha_target": alpha_target_mask,
            "alpha_speed": alpha_speed_mask,
            "alpha_curve": alpha_curve_mask,
            "op": op_mask,
        }
        x = torch.relu(self.embed_norm(self.embed(features)))  # [B, T, E]
        out, (h, c) = self.lstm(x, (hidden[0], hidden[1]))  # [B, T, D]
        out = self.lstm_norm(out)
        logits: dict[str, torch.Tensor] = {}
        for name in HEAD_NAMES:
            head_logits: torch.Tensor = self.heads[name](out)  # [B, T, A_h]
            mask = masks[name]
            if mask is not None:
                head_logits = head_logits.masked_fill(~mask, _MASKED_LOGIT)
            logits[name] = head_logits
        value: torch.Tensor = self.value_head(out).squeeze(-1)  # [B, T]
        return SeedNetworkOutput(logits, value, (h, c))


class SeedLSTMBundle:
    """The seed design's LSTM policy bundle, kept only as a benchmark baseline.

    Same defaults as `LSTMPolicyBundle`. Masks are eight keyword arguments
    (`slot_mask=...`; `mask_kwargs` converts `ActionMasks`), `[B, A_h]` with `[B, F]`
    features or `[B, T, A_h]` with `[B, T, F]`. Move it with `bundle.network.to(...)`.

    Args:
        feature_dim: `F`.
        hidden_dim: LSTM width `D`; each head's hidden layer is `D // 2`.
        embed_dim: Width of the feature embedding.
        num_layers: Stacked LSTM layers.
        action_space: Head sizes.
    """

    def __init__(
        self,
        feature_dim: int,
        *,
        hidden_dim: int = 128,
        embed_dim: int = 128,
        num_layers: int = 1,
        action_space: ActionSpace = ActionSpace(),
    ) -> None:
        self.network = SeedLSTMNetwork(feature_dim, hidden_dim, embed_dim, num_layers, action_space)
        self.feature_dim = feature_dim
        self.hidden_dim = hidden_dim
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.action_space = action_space

    def initial_hidden(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero `(h, c)`, each `[num_layers, batch_size, hidden_dim]`."""
        param = self.network.embed.weight
        shape = (self.num_layers, batch_size, self.hidden_dim)
        h = torch.zeros(shape, device=param.device, dtype=param.dtype)
        c = torch.zeros(shape, device=param.device, dtype=param.dtype)
        return h, c

    def forward(
        self,
        features: torch.Tensor,
        hidden: HiddenState | None = None,
        *,
        slot_mask: torch.Tensor | None = None,
        blueprint_mask: torch.Tensor | None = None,
        style_mask: torch.Tensor | None = None,
        tempo_mask: torch.Tensor | None = None,
        alpha_target_mask: torch.Tensor | None = None,
        alpha_speed_mask: torch.Tensor | None = None,
        alpha_curve_mask: torch.Tensor | None = None,
        op_mask: torch.Tensor | None = None,
    ) -> SeedNetworkOutput:
        """Masked logits and values, with autograd; defines `expand_mask` on every call.

        The nested function is the finding (B10-PT-06), reproduced on purpose.

        Args:
            features: `[B, F]` or `[B, T, F]`.
            hidden: `(h, c)`, or `None` for zeros.
            slot_mask: `[B, A_slot]` or `[B, T, A_slot]` bool, or `None`.
            blueprint_mask: As `slot_mask`.
            style_mask: As `slot_mask`.
            tempo_mask: As `slot_mask`.
            alpha_target_mask: As `slot_mask`.
            alpha_speed_mask: As `slot_mask`.
            alpha_curve_mask: As `slot_mask`.
            op_mask: As `slot_mask`.

        Returns:
            Masked logits per head, values and the new `(h, c)`; without the `T` axis
            for `[B, F]` features.
        """
        if hidden is None:
            hidden = self.initial_hidden(features.shape[0])
        need_expand = features.dim() == 2
        if need_expand:
            features = features.unsqueeze(1)

        def expand_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
            if mask is None:
                return None
            if need_expand and mask.dim() == 2:
                return mask.unsqueeze(1)
            return mask

        slot_mask = expand_mask(slot_mask)
        blueprint_mask = expand_mask(blueprint_mask)
        style_mask = expand_mask(style_mask)
        tempo_mask = expand_mask(tempo_mask)
        alpha_target_mask = expand_mask(alpha_target_mask)
        alpha_speed_mask = expand_mask(alpha_speed_mask)
        alpha_curve_mask = expand_mask(alpha_curve_mask)
        op_mask = expand_mask(op_mask)

        out: SeedNetworkOutput = self.network(
            features,
            hidden,
            slot_mask=slot_mask,
            blueprint_mask=blueprint_mask,
            style_mask=style_mask,
            tempo_mask=tempo_mask,
            alpha_target_mask=alpha_target_mask,
            alpha_speed_mask=alpha_speed_mask,
            alpha_curve_mask=alpha_curve_mask,
            op_mask=op_mask,
        )
        if not need_expand:
            return out
        logits: dict[str, torch.Tensor] = {}
        for name, head_logits in out.logits.items():
            logits[name] = head_logits.squeeze(1)
        return SeedNetworkOutput(logits, out.value.squeeze(1), out.hidden)

    def get_action(
        self,
        features: torch.Tensor,
        hidden: HiddenState | None = None,
        *,
        slot_mask: torch.Tensor | None = None,
        blueprint_mask: torch.Tensor | None = None,
        style_mask: torch.Tensor | None = None,
        tempo_mask: torch.Tensor | None = None,
        alpha_target_mask: torch.Tensor | None = None,
        alpha_speed_mask: torch.Tensor | None = None,
        alpha_curve_mask: torch.Tensor | None = None,
        op_mask: torch.Tensor | None = None,
        deterministic: bool = False,
    ) -> SeedActionResult:
        """Sample (or take the mode of) every head, without autograd.

        Args:
            features: `[B, F]` or `[B, T, F]`.
            hidden: `(h, c)`, or `None` for zeros.
            slot_mask: As for `forward`; likewise the other seven.
            blueprint_mask: As `slot_mask`.
            style_mask: As `slot_mask`.
            tempo_mask: As `slot_mask`.
            alpha_target_mask: As `slot_mask`.
            alpha_speed_mask: As `slot_mask`.
            alpha_curve_mask: As `slot_mask`.
            op_mask: As `slot_mask`.
            deterministic: Take each head's most likely action.

        Returns:
            Actions and log-probabilities per head, values, the new `(h, c)`.

        Raises:
            ValueError: A mask row has no valid action, or the logits are not finite.
        """
        masks = {
            "slot": slot_mask,
            "blueprint": blueprint_mask,
            "style": style_mask,
            "tempo": tempo_mask,
            "alpha_target": alpha_target_mask,
            "alpha_speed": alpha_speed_mask,
            "alpha_curve": alpha_curve_mask,
            "op": op_mask,
        }
        with torch.no_grad():
            out = self.forward(
                features,
                hidden,
                slot_mask=slot_mask,
                blueprint_mask=blueprint_mask,
                style_mask=style_mask,
                tempo_mask=tempo_mask,
                alpha_target_mask=alpha_target_mask,
                alpha_speed_mask=alpha_speed_mask,
                alpha_curve_mask=alpha_curve_mask,
                op_mask=op_mask,
            )
            actions: dict[str, torch.Tensor] = {}
            log_probs: dict[str, torch.Tensor] = {}
            for name in HEAD_NAMES:
                dist = _head_distribution(out.logits[name], masks[name])
                action = dist.mode() if deterministic else dist.sample()
                actions[name] = action
                log_probs[name] = dist.log_prob(action)
        return SeedActionResult(actions, log_probs, out.value, out.hidden)

    def evaluate_actions(
        self,
        features: torch.Tensor,
        actions: dict[str, torch.Tensor],
        hidden: HiddenState | None = None,
        *,
        slot_mask: torch.Tensor | None = None,
        blueprint_mask: torch.Tensor | None = None,
        style_mask: torch.Tensor | None = None,
        tempo_mask: torch.Tensor | None = None,
        alpha_target_mask: torch.Tensor | None = None,
        alpha_speed_mask: torch.Tensor | None = None,
        alpha_curve_mask: torch.Tensor | None = None,
        op_mask: torch.Tensor | None = None,
    ) -> SeedEvalResult:
        """Log-probabilities and normalized entropies of given actions, with autograd.

        Args:
            features: `[B, F]` or `[B, T, F]`.
            actions: Head name to int64 actions, `[B]` or `[B, T]`.
            hidden: `(h, c)`, or `None` for zeros.
            slot_mask: As for `forward`; likewise the other seven.
            blueprint_mask: As `slot_mask`.
            style_mask: As `slot_mask`.
            tempo_mask: As `slot_mask`.
            alpha_target_mask: As `slot_mask`.
            alpha_speed_mask: As `slot_mask`.
            alpha_curve_mask: As `slot_mask`.
            op_mask: As `slot_mask`.

        Returns:
            Log-probabilities and entropies per head, values, the new `(h, c)`.

        Raises:
            ValueError: A mask row has no valid action, or the logits are not finite.
        """
        masks = {
            "slot": slot_mask,
            "blueprint": blueprint_mask,
            "style": style_mask,
            "tempo": tempo_mask,
            "alpha_target": alpha_target_mask,
            "alpha_speed": alpha_speed_mask,
            "alpha_curve": alpha_curve_mask,
            "op": op_mask,
        }
        out = self.forward(
            features,
            hidden,
            slot_mask=slot_mask,
            blueprint_mask=blueprint_mask,
            style_mask=style_mask,
            tempo_mask=tempo_mask,
            alpha_target_mask=alpha_target_mask,
            alpha_speed_mask=alpha_speed_mask,
            alpha_curve_mask=alpha_curve_mask,
            op_mask=op_mask,
        )
        log_probs: dict[str, torch.Tensor] = {}
        entropies: dict[str, torch.Tensor] = {}
        for name in HEAD_NAMES:
            dist = _head_distribution(out.logits[name], masks[name])
            log_probs[name] = dist.log_prob(actions[name])
            entropies[name] = dist.entropy()
        return SeedEvalResult(log_probs, entropies, out.value, out.hidden)


def _head_distribution(logits: torch.Tensor, mask: torch.Tensor | None) -> MaskedCategorical:
    """A head's `MaskedCategorical`; an absent mask means every action is valid."""
    if mask is None:
        mask = torch.ones_like(logits, dtype=torch.bool)
    return MaskedCategorical(logits, mask)


def _head_linears(head: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The first and output `nn.Linear` of a `Linear -> ReLU -> Linear` head."""
    assert isinstance(head, nn.Sequential)
    first, out = head[0], head[2]
    assert isinstance(first, nn.Linear)
    assert isinstance(out, nn.Linear)
    return first, out


def transplant_weights(seed: SeedLSTMBundle, bundle: LSTMPolicyBundle) -> None:
    """Copy a replica's weights into an `LSTMPolicyBundle`, so both compute one function.

    The embedding, its norm, the LSTM and its norm copy as they are; the eight heads and
    the value head go into the fused `PolicyHeads` (block `h` of `hidden` and of
    `out_weight`/`out_bias` is head `h`, block `H` the value head). Padding columns of
    the fused output layer are set to zero.

    Args:
        seed: The replica to copy from.
        bundle: The bundle to copy into, built with the same sizes.

    Raises:
        ValueError: The two were built with different sizes.
    """
    mine = (seed.feature_dim, seed.hidden_dim, seed.embed_dim, seed.num_layers)
    theirs = (bundle.feature_dim, bundle.hidden_dim, bundle.embed_dim, bundle.num_layers)
    if mine != theirs or seed.action_space != bundle.action_space:
        raise ValueError(
            "transplant_weights: the bundles differ in (feature_dim, hidden_dim, embed_dim, "
            f"num_layers, action_space): {(*mine, seed.action_space)} vs "
            f"{(*theirs, bundle.action_space)}"
        )
    src, dst = seed.network, bundle.network
    dst.embed.load_state_dict(src.embed.state_dict())
    dst.embed_norm.load_state_dict(src.embed_norm.state_dict())
    dst.lstm.load_state_dict(src.lstm.state_dict())
    dst.lstm_norm.load_state_dict(src.lstm_norm.state_dict())
    heads = dst.heads
    width = heads.head_hidden_dim
    sources: list[nn.Module] = []
    for name in HEAD_NAMES:
        sources.append(src.heads[name])
    sources.append(src.value_head)
    with torch.no_grad():
        heads.out_weight.zero_()
        heads.out_bias.zero_()
        for block, head in enumerate(sources):
            first, out = _head_linears(head)
            rows = slice(block * width, (block + 1) * width)
            heads.hidden.weight[rows].copy_(first.weight)
            heads.hidden.bias[rows].copy_(first.bias)
            size = out.out_features
            heads.out_weight[block, :, :size].copy_(out.weight.T)
            heads.out_bias[block, 0, :size].copy_(out.bias)
