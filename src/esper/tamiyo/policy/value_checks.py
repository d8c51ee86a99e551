"""The value checks: the checks that read tensor values, and so cost a device sync each.

`PolicyBundle` runs two when `check_values` is on. Before the network,
`check_input_values` refuses NaN/Inf features or hidden state, a mask row with no
valid action, and out-of-range or masked actions. After it, `check_output_values`
refuses non-finite logits or values coming out of the hook. Each folds
its conditions into one scalar, one sync; only when that scalar is not finite does a
slow path look for the first offending row to name it.
"""

from __future__ import annotations

import math

import torch

from esper.tamiyo.policy.action_space import HEAD_NAMES
from esper.tamiyo.policy.inputs import PolicyInputs
from esper.tamiyo.policy.layout import PRIMARY, HeadLayout, at_op
from esper.tamiyo.policy.outputs import HookOutput

__all__ = ["check_input_values", "check_output_values"]

# Half-precision sums overflow early (fp16 at 65504): sum those in float32.
_SUM_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}

_NETWORK_ADVICE = (
    "the network produced it: look at its weights (NaN after a diverged update or a bad "
    "load?), the hidden state it was given, and the scale of the features"
)


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor.sum()` as a 0-dim tensor: NaN or Inf if any element is (or if it overflows)."""
    return tensor.sum(dtype=_SUM_DTYPE.get(tensor.dtype))


def check_input_values(inputs: PolicyInputs, layout: HeadLayout, masked: bool) -> None:
    """Refuse NaN/Inf features or hidden state, void mask rows, bad actions; one sync.

    Under a hierarchical space a mask row may be void where no valid op uses the head;
    a head a valid op uses needs a valid action under its masks for that op. An action
    of a head the stored op does not use must be the head's canonical action.

    Args:
        inputs: The normalized inputs.
        layout: The padded layout's tables (head sizes, hierarchy).
        masked: The caller gave masks (without them no row can be void).

    Raises:
        ValueError: A value is bad; the message names the argument, head, op and row.
    """
    # The sum is NaN or Inf if any summed value is (or if it overflows: the slow path
    # then finds nothing and returns), and dividing it by a False flag makes it Inf or
    # NaN as well.
    total = _sum(inputs.features)  # []
    for tensor in inputs.hidden or ():
        total = total + _sum(tensor)
    if masked:
        total = total / _rows_not_void(inputs, layout).all()
    if inputs.action_index is not None:
        total = total / _actions_allowed(inputs, layout).all()
    if math.isfinite(total.item()):
        return
    _explain_inputs(inputs, layout)
    _overflowed(inputs.features, *(inputs.hidden or ()))


def check_output_values(
    owner: str, out: HookOutput, heads: torch.Tensor, single_step: bool
) -> None:
    """Refuse non-finite logits (in the heads' own columns) or values out of the network.

    The new hidden state is not summed here: a network that makes it NaN makes the
    logits NaN at the same step or the next, and the next call's input check names it.
    Op-conditioned logits are summed too, but for their `op` row, which is not read.

    Args:
        owner: The bundle's class name, for the message.
        out: What the hook returned: logits `[B, T, H, A_max]`, value `[B, T]`, and
            maybe logits per op `[B, T, N_op, H, A_max]`.
        heads: `[H, A_max]` bool, True on each head's own columns (padding is ignored).
        single_step: The caller gave one step, so rows are named without a step.

    Raises:
        FloatingPointError: The network produced a NaN or Inf; the message names the
            tensor, the head and the row.
    """
    logits, value, by_op = out.logits, out.value, out.logits_by_op
    head_logits = torch.where(heads, logits, 0.0)  # [B, T, H, A_max], padding ignored
    total = _sum(head_logits) + _sum(value)
    by_op_heads = heads.clone()
    by_op_heads[PRIMARY] = False  # the op row of per-op logits is not read
    if by_op is not None:
        total = total + _sum(torch.where(by_op_heads, by_op, 0.0))
    if math.isfinite(total.item()):
        return
    bad = (~torch.isfinite(logits) & heads).any(dim=-1).nonzero()  # [n, 3]
    if bad.numel():
        head = HEAD_NAMES[int(bad[0, 2])]
        raise FloatingPointError(
            f"{owner}: the logits of head {head!r} are NaN or Inf at "
            f"{_where(bad[0], single_step)}; {_NETWORK_ADVICE}"
        )
    if by_op is not None:
        bad = (~torch.isfinite(by_op) & by_op_heads).any(dim=-1).nonzero()  # [n, 4]
        if bad.numel():
            head = HEAD_NAMES[int(bad[0, 3])]
            raise FloatingPointError(
                f"{owner}: the op-conditioned logits of head {head!r} for op "
                f"{int(bad[0, 2])} are NaN or Inf at {_where(bad[0], single_step)}; "
                f"{_NETWORK_ADVICE}"
            )
        by_op = torch.where(by_op_heads, by_op, 0.0).detach()
    bad = (~torch.isfinite(value)).nonzero()  # [n, 2]
    if bad.numel():
        raise FloatingPointError(
            f"{owner}: the value is NaN or Inf at {_where(bad[0], single_step)}; {_NETWORK_ADVICE}"
        )
    _overflowed(head_logits.detach(), value.detach(), *(() if by_op is None else (by_op,)))


def _rows_not_void(inputs: PolicyInputs, layout: HeadLayout) -> torch.Tensor:
    """Bool, False where a mask row that must offer an action offers none.

    Flat: `[B, T, H]`, every row. Hierarchical: a head's row at op `n` must offer an
    action where op `n` is valid and uses the head (`[B, T, N_op, H]` with per-op
    masks, `[B, T, H]` without: some valid op uses the head); the op's row always.
    """
    if not layout.hierarchical:
        return inputs.valid.any(dim=-1)
    return _offered(inputs).any(dim=-1) >= _needed(inputs, layout)


def _offered(inputs: PolicyInputs) -> torch.Tensor:
    """`[B, T, N_op, H, A_max]` with per-op masks, else `[B, T, H, A_max]`: what is valid."""
    return inputs.valid if inputs.valid_by_op is None else inputs.valid_by_op


def _needed(inputs: PolicyInputs, layout: HeadLayout) -> torch.Tensor:
    """Bool, the rows `_offered` must not leave void (hierarchical)."""
    assert layout.relevance is not None
    assert layout.primary_row is not None
    valid_ops = inputs.valid[..., PRIMARY, : layout.num_ops].unsqueeze(-1)  # [B, T, N_op, 1]
    needed = (valid_ops & layout.relevance) | layout.primary_row.view(-1)  # [B, T, N_op, H]
    return needed if inputs.valid_by_op is not None else needed.any(dim=-2)


def _actions_allowed(inputs: PolicyInputs, layout: HeadLayout) -> torch.Tensor:
    """`[B, T, H]` bool: each action is in range and allowed by its masks.

    Hierarchical: allowed by the masks at the stored op where the op uses the head,
    and the head's canonical action where it does not.
    """
    action_index = inputs.action_index
    assert action_index is not None  # evaluate_actions
    in_range = (action_index >= 0) & (action_index < layout.action_counts)
    safe = action_index.clamp(0, layout.padded_size - 1)  # [B, T, H]
    if not layout.hierarchical:
        valid = inputs.valid
        return in_range & valid.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    assert layout.relevance is not None
    assert layout.canonical is not None
    op = safe[..., PRIMARY].clamp(max=layout.num_ops - 1)  # [B, T]
    valid = inputs.valid if inputs.valid_by_op is None else at_op(inputs.valid_by_op, op)
    allowed = valid.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [B, T, H]
    canonical = action_index == layout.canonical
    return in_range & torch.where(layout.relevance[op], allowed, canonical)


def _explain_inputs(inputs: PolicyInputs, layout: HeadLayout) -> None:
    """Raise a `ValueError` naming the first bad input value; return if there is none."""
    single_step = inputs.single_step
    bad = (~torch.isfinite(inputs.features)).any(dim=-1).nonzero()  # [n, 2]
    if bad.numel():
        raise ValueError(f"features contain NaN or Inf at {_where(bad[0], single_step)}")
    for index, tensor in enumerate(inputs.hidden or ()):
        rows = _non_finite_rows(tensor)
        if rows.numel():
            raise ValueError(
                f"hidden[{index}] contains NaN or Inf at batch row {int(rows[0])}; start "
                "that row over with episode_start, or from initial_hidden (a state "
                "returned by get_action is NaN only if the network produced it)"
            )
    _explain_void(inputs, layout)
    if inputs.action_index is not None:
        _explain_actions(inputs, layout)


def _explain_void(inputs: PolicyInputs, layout: HeadLayout) -> None:
    """Raise naming the first mask row that must offer an action and offers none."""
    single_step = inputs.single_step
    if not layout.hierarchical:
        void = (~inputs.valid.any(dim=-1)).nonzero()  # [n, 3]
    else:
        void = (_offered(inputs).any(dim=-1) < _needed(inputs, layout)).nonzero()
    if not void.numel():
        return
    at = void[0]
    head = HEAD_NAMES[int(at[-1])]
    if int(at[-1]) == PRIMARY or not layout.hierarchical:
        raise ValueError(
            f"masks[{head!r}] has no valid action at {_where(at, single_step)}: "
            "every row needs at least one True (what should the policy do there?)"
        )
    table = inputs.action_space.hierarchy
    assert table is not None
    assert layout.relevance is not None
    row, step = int(at[0]), int(at[1])
    if inputs.valid_by_op is not None:
        op = int(at[2])
        given = f"masks[{head!r}] AND masks['{head}_by_op'] at that op leave"
    else:
        valid_ops = (
            inputs.valid[row, step, PRIMARY, : layout.num_ops] & layout.relevance[:, int(at[-1])]
        )
        op = int(valid_ops.nonzero()[0, 0])
        given = f"masks[{head!r}] leaves"
    name = table.ops[op]
    raise ValueError(
        f"{given} no valid {head} under op {name} at {_where(at, single_step)}, "
        f"where {name} is valid and uses {head!r}: allow an action there, or mask {name} "
        "out in masks['op']"
    )


def _explain_actions(inputs: PolicyInputs, layout: HeadLayout) -> None:
    """Raise naming the first action out of range, masked, or not canonical."""
    action_index = inputs.action_index
    assert action_index is not None  # evaluate_actions
    single_step = inputs.single_step
    counts = layout.action_counts
    out_of_range = ((action_index < 0) | (action_index >= counts)).nonzero()  # [n, 3]
    if out_of_range.numel():
        at = out_of_range[0]
        head_i = int(at[2])
        value = int(action_index[int(at[0]), int(at[1]), head_i])
        raise ValueError(
            f"actions[{HEAD_NAMES[head_i]!r}] = {value} at {_where(at, single_step)} is "
            f"out of range: head {HEAD_NAMES[head_i]!r} has {int(counts[head_i])} actions"
        )
    refused = (~_actions_allowed(inputs, layout)).nonzero()
    if not refused.numel():
        return
    at = refused[0]
    row, step, head_i = int(at[0]), int(at[1]), int(at[2])
    head = HEAD_NAMES[head_i]
    value = int(action_index[row, step, head_i])
    table = inputs.action_space.hierarchy
    if table is None:
        raise ValueError(
            f"actions[{head!r}] = {value} at {_where(at, single_step)} is "
            f"masked: masks[{head!r}] marks it invalid there"
        )
    op = int(action_index[row, step, PRIMARY])
    name = table.ops[op]
    if head_i != PRIMARY and head not in table.uses(op):
        raise ValueError(
            f"actions[{head!r}] = {value} at {_where(at, single_step)}: op {name} does not "
            f"use {head!r}, so its action must be the canonical {table.canonical[head_i]} "
            "(what get_action returns there)"
        )
    given = (
        f"masks[{head!r}]" if head_i == PRIMARY else f"masks[{head!r}] and masks['{head}_by_op']"
    )
    raise ValueError(
        f"actions[{head!r}] = {value} at {_where(at, single_step)} is masked: under op "
        f"{name}, {given} mark it invalid there"
    )


def _non_finite_rows(hidden: torch.Tensor) -> torch.Tensor:
    """The batch rows (dimension 1) of a `[d0, B, ...]` tensor holding a NaN or Inf."""
    bad = ~torch.isfinite(hidden)
    return bad.reshape(bad.shape[0], bad.shape[1], -1).any(dim=-1).any(dim=0).nonzero()[:, 0]


def _overflowed(*tensors: torch.Tensor) -> None:
    """After a slow path found no bad value, the sum must have overflowed; else a bug.

    Every value is finite then, so their total in float64 is exact enough to tell.
    """
    total = sum(float(tensor.sum(dtype=torch.float64)) for tensor in tensors)
    if abs(total) > torch.finfo(torch.float32).max / 2:
        return  # finite values whose sum is too large for the fast check: accepted
    raise AssertionError(
        "esper.tamiyo.policy: the value check flagged values its slow path finds valid; "
        "please report this"
    )


def _where(index: torch.Tensor, single_step: bool) -> str:
    row = int(index[0])
    return f"batch row {row}" if single_step else f"batch row {row}, step {int(index[1])}"
