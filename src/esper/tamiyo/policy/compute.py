"""The compute paths: the hook, then masking, sampling and scoring of all heads at once.

Every public method of `PolicyBundle` checks its arguments (`PolicyBundle._prepare`),
then runs one of these functions on a `Call`, then shapes the results. They take
tensors and return tensors, check nothing about the caller's arguments, and hold no
Python branch on tensor values: they are what `PolicyBundle.compile` hands to
`torch.compile` (`act` and `evaluate`), with the checks left eager outside them.
They take the bundle as an argument, so one compiled function serves any bundle, and
a copy of a compiled bundle runs its own network.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import NamedTuple, Protocol

import torch

from esper.tamiyo.policy import categorical
from esper.tamiyo.policy.inputs import HiddenState, PolicyInputs, reset_hidden
from esper.tamiyo.policy.layout import HeadLayout
from esper.tamiyo.policy.outputs import NetworkOutput
from esper.tamiyo.policy.validation import check_network_output

__all__ = ["Acted", "Bundle", "Call", "Scored", "act", "evaluate", "masked", "run_network"]


class Bundle(Protocol):
    """What the compute paths need of a `PolicyBundle`: its hook and its hidden shapes."""

    _hidden_shapes: tuple[tuple[int, ...], ...] | None

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        """The bundle's network on normalized inputs."""


class Call(NamedTuple):
    """One public call, after its arguments were checked: what the compute paths need.

    Attributes:
        inputs: What the hook receives.
        layout: The padded layout's tables on the bundle's device.
        resets: The steps after the first where some row's episode starts (the hook
            then runs once per stretch between them); empty in the usual case.
    """

    inputs: PolicyInputs
    layout: HeadLayout
    resets: tuple[int, ...] = ()


def run_network(bundle: Bundle, call: Call) -> NetworkOutput:
    """Call the hook and check what it returned; once per stretch between episode resets.

    Without resets inside the sequence (the usual case) the hook runs once. With resets
    at steps `t1 < t2 < ...`, it runs on `[0, t1)`, `[t1, t2)`, ... in turn, the hidden
    state of the rows that reset zeroed between stretches, and the outputs are joined
    along `T`.
    """
    if call.resets:
        return _run_stretches(bundle, call)
    out = bundle._forward(call.inputs)
    _check_output(bundle, call.inputs, call.layout, out)
    return out


def _run_stretches(bundle: Bundle, call: Call) -> NetworkOutput:
    inputs = call.inputs
    starts = inputs.episode_start
    assert starts is not None  # resets come from the flags
    logits: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    hidden = inputs.hidden
    for begin, end in itertools.pairwise((0, *call.resets, inputs.seq_len)):
        if begin > 0 and hidden is not None:
            hidden = reset_hidden(hidden, starts[:, begin])
        stretch = _steps(inputs, begin, end, hidden)
        out = bundle._forward(stretch)
        _check_output(bundle, stretch, call.layout, out)
        logits.append(out.logits)
        values.append(out.value)
        hidden = out.hidden
    return NetworkOutput(torch.cat(logits, dim=1), torch.cat(values, dim=1), hidden)


def _steps(inputs: PolicyInputs, begin: int, end: int, hidden: HiddenState | None) -> PolicyInputs:
    """The inputs of steps `[begin, end)` of the sequence, starting from `hidden`."""
    starts = inputs.episode_start
    index = inputs.action_index
    return replace(
        inputs,
        features=inputs.features[:, begin:end],
        hidden=hidden,
        valid=inputs.valid[:, begin:end],
        action_index=None if index is None else index[:, begin:end],
        episode_start=None if starts is None else starts[:, begin:end],
    )


def _check_output(bundle: Bundle, inputs: PolicyInputs, layout: HeadLayout, out: object) -> None:
    check_network_output(
        out,
        type(bundle).__name__,
        inputs.batch_size,
        inputs.seq_len,
        (layout.num_heads, layout.padded_size),
        bundle._hidden_shapes,
        inputs.hidden,
    )


def masked(logits: torch.Tensor, call: Call) -> torch.Tensor:
    """`[B, T, H, A_max]` logits masked by the call's `valid` (`categorical.mask_logits`)."""
    layout = call.layout
    return categorical.mask_logits(logits, call.inputs.valid, layout.fill, layout.minus_inf)


class Acted(NamedTuple):
    """What `act` returns: `[B, T, H]` actions and log-probs, `[B, T]` values, hidden, logits.

    `logits` are the hook's, unmasked, for the base's check of the network's numbers.
    """

    actions: torch.Tensor
    log_prob: torch.Tensor
    value: torch.Tensor
    hidden: HiddenState | None
    logits: torch.Tensor


class Scored(NamedTuple):
    """What `evaluate` returns: `[B, T, H]` log-probs and entropies, values, hidden, logits."""

    log_prob: torch.Tensor
    entropy: torch.Tensor
    value: torch.Tensor
    hidden: HiddenState | None
    logits: torch.Tensor


def act(
    bundle: Bundle, call: Call, deterministic: bool, generator: torch.Generator | None = None
) -> Acted:
    """Sample (or take the mode of) every head, for `get_action`."""
    logits, value, hidden = run_network(bundle, call)
    log_probs = masked(logits, call).log_softmax(dim=-1)  # [B, T, H, A_max]
    actions = categorical.sample(
        log_probs, deterministic=deterministic, generator=generator
    )  # [B, T, H]
    return Acted(actions, categorical.log_prob_of(log_probs, actions), value, hidden, logits)


def evaluate(bundle: Bundle, call: Call) -> Scored:
    """Score the actions of `call.inputs`, for `evaluate_actions`."""
    inputs = call.inputs
    assert inputs.action_index is not None  # evaluate_actions always packs actions
    logits, value, hidden = run_network(bundle, call)
    masked_logits = masked(logits, call)  # [B, T, H, A_max]
    log_probs = masked_logits.log_softmax(dim=-1)
    chosen = categorical.log_prob_of(log_probs, inputs.action_index)  # [B, T, H]
    entropy = categorical.normalized_entropy(
        masked_logits, log_probs, inputs.valid, call.layout.inv_log_count
    )  # [B, T, H]
    return Scored(chosen, entropy, value, hidden, logits)
