"""The compute paths: the hook, then masking, sampling and scoring of all heads at once.

Every public method of `PolicyBundle` checks its arguments (`PolicyBundle._prepare`),
then runs one of these functions on a `Call`, then shapes the results. They take
tensors and return tensors, check nothing about the caller's arguments, and hold no
Python branch on tensor values: they are what `PolicyBundle.compile` hands to
`torch.compile` (`act` and `evaluate`), with the checks left eager outside them.
They take the bundle as an argument, so one compiled function serves any bundle, and
a copy of a compiled bundle runs its own network.

Under a hierarchical space (`ActionHierarchy`) the op is chosen first, then every other
head under its validity given that op (`HeadLayout.valid_at_op`, where a head the op
ignores has its canonical action alone) and, if the hook gives them, its logits at that
op (`_given_op`). `act` samples under them at the sampled op, `evaluate` scores under
them at the stored op: one rule, so the rollout and the update cannot drift apart.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from types import MappingProxyType
from typing import NamedTuple, Protocol

import torch

from esper.tamiyo.policy import categorical
from esper.tamiyo.policy.floors import FloorTables
from esper.tamiyo.policy.inputs import HiddenState, PolicyInputs, reset_hidden
from esper.tamiyo.policy.layout import PRIMARY, HeadLayout, at_op
from esper.tamiyo.policy.outputs import HookOutput, NetworkOutput, OpConditionedOutput
from esper.tamiyo.policy.validation import check_network_output

__all__ = ["Acted", "Bundle", "Call", "Scored", "act", "evaluate", "masked", "run_network"]


class Bundle(Protocol):
    """What the compute paths need of a `PolicyBundle`: its hook and its hidden shapes."""

    _hidden_shapes: tuple[tuple[int, ...], ...] | None

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput | OpConditionedOutput:
        """The bundle's network on normalized inputs."""


class Call(NamedTuple):
    """One public call, after its arguments were checked: what the compute paths need.

    Attributes:
        inputs: What the hook receives.
        layout: The padded layout's tables on the bundle's device.
        resets: The steps after the first where some row's episode starts (the hook
            then runs once per stretch between them); empty in the usual case.
        joint_entropy: `evaluate` also computes the exact joint entropy.
        floors: The bundle's probability floors on the device, or `None` without any.
    """

    inputs: PolicyInputs
    layout: HeadLayout
    resets: tuple[int, ...] = ()
    joint_entropy: bool = False
    floors: FloorTables | None = None


def run_network(bundle: Bundle, call: Call) -> HookOutput:
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
    return HookOutput(*out)


def _run_stretches(bundle: Bundle, call: Call) -> HookOutput:
    inputs, layout = call.inputs, call.layout
    starts = inputs.episode_start
    assert starts is not None  # resets come from the flags
    outs: list[HookOutput] = []
    hidden = inputs.hidden
    for begin, end in itertools.pairwise((0, *call.resets, inputs.seq_len)):
        if begin > 0 and hidden is not None:
            hidden = reset_hidden(hidden, starts[:, begin])
        stretch = _steps(inputs, begin, end, hidden)
        raw = bundle._forward(stretch)
        _check_output(bundle, stretch, layout, raw)
        outs.append(HookOutput(*raw))
        hidden = outs[-1].hidden
    by_op: torch.Tensor | None = None
    if any(out.logits_by_op is not None for out in outs):
        # A hook may return per-op logits for some stretches only: a `NetworkOutput`
        # means the same logits whatever the op.
        shape = (inputs.batch_size, -1, layout.num_ops, layout.num_heads, layout.padded_size)
        by_op = torch.cat(
            [
                out.logits.unsqueeze(2).expand(shape)
                if out.logits_by_op is None
                else out.logits_by_op
                for out in outs
            ],
            dim=1,
        )  # [B, T, N_op, H, A_max]
    return HookOutput(
        torch.cat([out.logits for out in outs], dim=1),
        torch.cat([out.value for out in outs], dim=1),
        hidden,
        by_op,
    )


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
        valid_by_op=None if inputs.valid_by_op is None else inputs.valid_by_op[:, begin:end],
        extras=(
            MappingProxyType({name: value[:, begin:end] for name, value in inputs.extras.items()})
            if inputs.extras
            else inputs.extras
        ),
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
        layout.num_ops if layout.hierarchical else None,
    )


def masked(logits: torch.Tensor, call: Call) -> torch.Tensor:
    """`[B, T, H, A_max]` logits masked by the call's `valid` (`categorical.mask_logits`).

    With probability floors, the floored distribution's log-probabilities in the same
    convention: each row's largest valid entry 0, invalid ones at the layout's fill.
    """
    layout, valid = call.layout, call.inputs.valid
    masked_logits = categorical.mask_logits(logits, valid, layout.fill, layout.minus_inf)
    if call.floors is None:
        return masked_logits
    floored = categorical.floor_log_probs(
        masked_logits.log_softmax(dim=-1), valid, call.floors.heads
    )  # [B, T, H, A_max]
    top = torch.where(valid, floored, layout.minus_inf).amax(dim=-1, keepdim=True).detach()
    return torch.where(valid, floored - top, layout.fill)


class Acted(NamedTuple):
    """What `act` returns: `[B, T, H]` actions and log-probs, and the network's output.

    `network` holds the hook's unmasked logits, for the base's check of its numbers,
    with the values and the new hidden state.
    """

    actions: torch.Tensor
    log_prob: torch.Tensor
    network: HookOutput


class Scored(NamedTuple):
    """What `evaluate` returns: `[B, T, H]` log-probs, entropies, relevance, availability."""

    log_prob: torch.Tensor
    entropy: torch.Tensor
    relevance: torch.Tensor
    availability: torch.Tensor
    joint_entropy: torch.Tensor | None
    network: HookOutput


def act(
    bundle: Bundle, call: Call, deterministic: bool, generator: torch.Generator | None = None
) -> Acted:
    """Sample (or take the mode of) every head, for `get_action`.

    Flat space: every head at once under its mask. Hierarchical, two stages, the
    dependency depth: the op under its mask (`categorical.choose_valid`, no
    normalization), then every head at once under its validity and logits given that
    op (`_given_op`, as `evaluate` scores them), where a head the op ignores has one
    valid action, its canonical one, with log-prob exactly 0. One Gumbel draw serves
    both stages; the op's log-prob comes from the second.
    """
    out = run_network(bundle, call)
    inputs, layout = call.inputs, call.layout
    logits = out.logits  # [B, T, H, A_max]
    noise = None if deterministic else categorical.gumbel_noise(logits, generator)
    valid = inputs.valid
    if layout.hierarchical:
        op = _choose_op(logits, valid, noise, layout, call.floors)  # [B, T]
        logits, valid = _given_op(out, inputs, layout, op)  # [B, T, H, A_max] each
    log_probs = _log_probs(logits, valid, layout, call.floors)  # [B, T, H, A_max]
    actions = categorical.choose(log_probs, noise)  # [B, T, H]
    if layout.hierarchical:
        actions.select(-1, PRIMARY).copy_(op)  # the op row's draw, rounded otherwise, can differ
    return Acted(actions, categorical.log_prob_of(log_probs, actions), out)


def evaluate(bundle: Bundle, call: Call) -> Scored:
    """Score the actions of `call.inputs`, for `evaluate_actions`.

    Hierarchical: under the validity and logits given the stored op, what `act`
    sampled under, so the log-probs equal the rollout's; a head the op ignores has one
    valid action, so its log-prob, entropy and gradient are exactly 0.
    """
    inputs, layout = call.inputs, call.layout
    actions = inputs.action_index
    assert actions is not None  # evaluate_actions always packs actions
    out = run_network(bundle, call)
    logits, valid = out.logits, inputs.valid  # [B, T, H, A_max]
    op = actions[..., PRIMARY]  # [B, T]
    if layout.hierarchical:
        logits, valid = _given_op(out, inputs, layout, op)
    masked_logits = categorical.mask_logits(logits, valid, layout.fill, layout.minus_inf)
    log_probs = masked_logits.log_softmax(dim=-1)  # [B, T, H, A_max]
    if call.floors is not None:
        log_probs = categorical.floor_log_probs(log_probs, valid, call.floors.heads)
        masked_logits = log_probs  # the entropy's softmax: of the floored distribution
    chosen = categorical.log_prob_of(log_probs, actions)  # [B, T, H]
    entropy = categorical.normalized_entropy(
        masked_logits, log_probs, valid, layout.inv_log_count
    )  # [B, T, H]
    joint = (
        _joint_entropy(out, inputs, layout, masked_logits, log_probs, call.floors)
        if call.joint_entropy
        else None
    )
    if not layout.hierarchical:  # every head matters: new tensors, the caller's to change
        every = torch.ones(actions.shape, dtype=torch.bool, device=actions.device)  # [B, T, H]
        return Scored(chosen, entropy, every, every.clone(), joint, out)
    relevance = layout.relevance_at(op)  # [B, T, H]
    return Scored(chosen, entropy, relevance, availability(inputs.valid, layout), joint, out)


def _given_op(
    out: HookOutput, inputs: PolicyInputs, layout: HeadLayout, op: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head's logits and validity given each row's op `[B, T]`: `[B, T, H, A_max]` each.

    The rule of the hierarchy, for `act` at the sampled op and `evaluate` at the stored
    one. The op's own row keeps its flat logits and mask.
    """
    valid = layout.valid_at_op(inputs.valid, inputs.valid_by_op, op)
    if out.logits_by_op is None:
        return out.logits, valid
    return _with_op_row(out.logits, at_op(out.logits_by_op, op), layout), valid


def _logits_given_op(out: HookOutput, layout: HeadLayout) -> torch.Tensor:
    """Every head's logits given each op: `[B, T, N_op, H, A_max]`, or `[B, T, 1, ...]`.

    The hook's per-op logits with the op's row from its flat logits; without them the
    flat logits, one row that broadcasts over the ops.
    """
    flat = out.logits.unsqueeze(2)
    return flat if out.logits_by_op is None else _with_op_row(flat, out.logits_by_op, layout)


def _with_op_row(flat: torch.Tensor, given_op: torch.Tensor, layout: HeadLayout) -> torch.Tensor:
    """`given_op` with its `op` row taken from `flat`: the op's logits never depend on it."""
    assert layout.primary_row is not None  # hierarchical
    return torch.where(layout.primary_row, flat, given_op)


def _log_probs(
    logits: torch.Tensor, valid: torch.Tensor, layout: HeadLayout, floors: FloorTables | None
) -> torch.Tensor:
    """Log-probabilities of every head under `valid` and the floors, on the last dimension."""
    masked_logits = categorical.mask_logits(logits, valid, layout.fill, layout.minus_inf)
    log_probs = masked_logits.log_softmax(dim=-1)  # [B, T, H, A_max]
    return (
        log_probs if floors is None else categorical.floor_log_probs(log_probs, valid, floors.heads)
    )


def _choose_op(
    logits: torch.Tensor,
    valid: torch.Tensor,
    noise: torch.Tensor | None,
    layout: HeadLayout,
    floors: FloorTables | None,
) -> torch.Tensor:
    """The first stage of a hierarchical `get_action`: `[B, T]` ops.

    Without a floor on the op, a Gumbel argmax over its valid logits
    (`categorical.choose_valid`, no normalization needed). With one, the op's floored
    log-probabilities, the distribution the second stage scores the op under.
    """
    if floors is None or floors.op is None:
        return categorical.choose_valid(
            logits.select(-2, PRIMARY),
            valid.select(-2, PRIMARY),
            None if noise is None else noise.select(-2, PRIMARY),
            layout.minus_inf,
        )
    rows = slice(PRIMARY, PRIMARY + 1)  # the op row, kept as a head dimension of 1
    op_valid = valid[..., rows, :]  # [B, T, 1, A_max]
    masked_logits = categorical.mask_logits(
        logits[..., rows, :], op_valid, layout.fill[rows], layout.minus_inf
    )
    log_probs = categorical.floor_log_probs(masked_logits.log_softmax(dim=-1), op_valid, floors.op)
    op_noise = None if noise is None else noise[..., rows, :]
    return categorical.choose(log_probs, op_noise).squeeze(-1)  # [B, T]


def availability(valid: torch.Tensor, layout: HeadLayout) -> torch.Tensor:
    """`[B, T, H]` bool: some op the flat op mask allows uses the head.

    Args:
        valid: `[B, T, H, A_max]`, the packed flat masks.
        layout: A hierarchical layout.
    """
    return layout.needed(valid).any(dim=-2)  # [B, T, H]


def _joint_entropy(
    out: HookOutput,
    inputs: PolicyInputs,
    layout: HeadLayout,
    masked_logits: torch.Tensor,
    log_probs: torch.Tensor,
    floors: FloorTables | None,
) -> torch.Tensor:
    """`[B, T]` exact entropy of the whole action, in nats, under the floors if any.

    Flat: the heads are independent, so the sum of their entropies. Hierarchical:
    `H(op) + sum_n pi(n) sum_{h != op} H(h | n)`, each head's conditional entropy under
    its validity and logits given every op at once, `[B, T, N_op, H]` (a head op `n`
    ignores has one valid action: entropy 0).
    """
    if not layout.hierarchical:
        return categorical.entropy_of(masked_logits, log_probs).sum(dim=-1)  # [B, T]
    assert layout.other_heads is not None  # hierarchical
    valid_every_op = layout.valid_every_op(inputs.valid, inputs.valid_by_op)
    masked_by_op = categorical.mask_logits(
        _logits_given_op(out, layout), valid_every_op, layout.fill, layout.minus_inf
    )  # [B, T, N_op, H, A_max]
    log_probs_by_op = masked_by_op.log_softmax(dim=-1)
    if floors is not None:
        log_probs_by_op = categorical.floor_log_probs(log_probs_by_op, valid_every_op, floors.heads)
        masked_by_op = log_probs_by_op
    entropy_by_op = categorical.entropy_of(masked_by_op, log_probs_by_op)
    conditional = (entropy_by_op * layout.other_heads).sum(dim=-1)  # [B, T, N_op]
    op_log_probs = log_probs[..., PRIMARY, : layout.num_ops]  # [B, T, N_op]
    op_probs = op_log_probs.exp()
    op_entropy = -(op_probs * op_log_probs).sum(dim=-1)  # [B, T]
    return op_entropy + (op_probs * conditional).sum(dim=-1)
