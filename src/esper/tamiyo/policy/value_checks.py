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
from esper.tamiyo.policy.extra_inputs import ExtraInput, inside_range
from esper.tamiyo.policy.inputs import PolicyInputs
from esper.tamiyo.policy.layout import PRIMARY, HeadLayout
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


def check_input_values(
    inputs: PolicyInputs, layout: HeadLayout, masked: bool, specs: tuple[ExtraInput, ...] = ()
) -> None:
    """Refuse NaN/Inf features or hidden state, void mask rows, bad actions; one sync.

    Under a hierarchical space a head that a valid op uses also needs a valid action
    under its flat AND per-op masks for that op; an action of a head the stored op
    does not use must be the head's canonical action.

    Args:
        inputs: The normalized inputs.
        layout: The padded layout's tables (head sizes, hierarchy).
        masked: The caller gave masks (without them no row can be void).
        specs: The bundle's extra inputs: an integer one outside its range and
            sentinels, or a floating one with a NaN or Inf, is refused.

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
        total = total / inputs.valid.any(dim=-1).all()
        if inputs.valid_by_op is not None:
            total = total / _usable_given_op(inputs, layout).all()
    if inputs.action_index is not None:
        total = total / _actions_allowed(inputs, layout).all()
    for spec in specs:
        value = inputs.extras[spec.name]
        if spec.kind == "floating":
            total = total + _sum(value)
        elif spec.bounded:
            total = total / inside_range(value, spec).all()
    if math.isfinite(total.item()):
        return
    _explain_extras(inputs, specs)
    _explain_inputs(inputs, layout)
    floating = (inputs.extras[spec.name] for spec in specs if spec.kind == "floating")
    _overflowed(inputs.features, *(inputs.hidden or ()), *floating)


def check_output_values(owner: str, out: HookOutput, layout: HeadLayout, single_step: bool) -> None:
    """Refuse non-finite logits (in the heads' own columns) or values out of the network.

    The new hidden state is not summed here: a network that makes it NaN makes the
    logits NaN at the same step or the next, and the next call's input check names it.
    Op-conditioned logits are summed too, but for their `op` row, which is not read.

    Args:
        owner: The bundle's class name, for the message.
        out: What the hook returned: logits `[B, T, H, A_max]`, value `[B, T]`, and
            maybe logits per op `[B, T, N_op, H, A_max]`.
        layout: The padded layout's tables: which columns are the heads' own.
        single_step: The caller gave one step, so rows are named without a step.

    Raises:
        FloatingPointError: The network produced a NaN or Inf; the message names the
            tensor, the head and the row.
    """
    logits, value, by_op = out.logits, out.value, out.logits_by_op
    heads = layout.structural_valid  # [H, A_max], padding ignored
    head_logits = torch.where(heads, logits, 0.0)  # [B, T, H, A_max]
    total = _sum(head_logits) + _sum(value)
    by_op_heads = layout.conditioned_valid  # the op row of per-op logits is not read
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
            table = layout.action_space.hierarchy
            assert table is not None  # per-op logits need a hierarchy (checked)
            raise FloatingPointError(
                f"{owner}: the op-conditioned logits of head {head!r} for op "
                f"{table.ops[int(bad[0, 2])]} are NaN or Inf at {_where(bad[0], single_step)}; "
                f"{_NETWORK_ADVICE}"
            )
        by_op = torch.where(by_op_heads, by_op, 0.0).detach()
    bad = (~torch.isfinite(value)).nonzero()  # [n, 2]
    if bad.numel():
        raise FloatingPointError(
            f"{owner}: the value is NaN or Inf at {_where(bad[0], single_step)}; {_NETWORK_ADVICE}"
        )
    _overflowed(head_logits.detach(), value.detach(), *(() if by_op is None else (by_op,)))


def _explain_extras(inputs: PolicyInputs, specs: tuple[ExtraInput, ...]) -> None:
    """Raise naming the first extra input with a bad value, the values and a row."""
    for spec in specs:
        value = inputs.extras[spec.name]  # [B, T, *shape]
        what = f"extra input {spec.name!r}"
        if spec.kind == "floating":
            bad = ~torch.isfinite(value)
            if bad.any():
                raise ValueError(f"{what} has NaN or Inf at {_first_row(bad, inputs.single_step)}")
            continue
        if not spec.bounded:
            continue
        bad = ~inside_range(value, spec)
        if bad.any():
            values = torch.unique(value[bad]).tolist()
            shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
            raise ValueError(
                f"{what} has values outside {spec.allowed()}: {shown} (first at "
                f"{_first_row(bad, inputs.single_step)})"
            )


def _first_row(bad: torch.Tensor, single_step: bool) -> str:
    """Where the first True of `bad` `[B, T, ...]` is, as `_where` names it."""
    per_step = bad.reshape(bad.shape[0], bad.shape[1], -1).any(dim=-1)  # [B, T]
    return _where(per_step.nonzero()[0], single_step)


def _usable_given_op(inputs: PolicyInputs, layout: HeadLayout) -> torch.Tensor:
    """`[B, T, N_op, H]` bool, False where a valid op's head has no valid action.

    That is: op `n` is valid and uses the head, but the head's flat mask AND its per-op
    mask at `n` leave it nothing.
    """
    assert inputs.valid_by_op is not None  # per-op masks given
    offered = (inputs.valid.unsqueeze(2) & inputs.valid_by_op).any(dim=-1)  # [B, T, N_op, H]
    return offered >= layout.needed(inputs.valid)


def _actions_allowed(inputs: PolicyInputs, layout: HeadLayout) -> torch.Tensor:
    """`[B, T, H]` bool: each action is in range and allowed by its masks.

    Hierarchical: allowed given the stored op, so a head the op ignores allows only
    its canonical action.
    """
    action_index = inputs.action_index
    assert action_index is not None  # evaluate_actions
    in_range = (action_index >= 0) & (action_index < layout.action_counts)
    safe = action_index.clamp(0, layout.padded_size - 1)  # [B, T, H]
    valid = inputs.valid
    if layout.hierarchical:
        op = safe[..., PRIMARY].clamp(max=layout.num_ops - 1)  # [B, T]
        valid = layout.valid_at_op(valid, inputs.valid_by_op, op)
    return in_range & valid.gather(-1, safe.unsqueeze(-1)).squeeze(-1)


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
    """Raise naming the first mask row that offers no valid action."""
    single_step = inputs.single_step
    void = (~inputs.valid.any(dim=-1)).nonzero()  # [n, 3]
    if void.numel():
        head = HEAD_NAMES[int(void[0, 2])]
        raise ValueError(
            f"masks[{head!r}] has no valid action at {_where(void[0], single_step)}: "
            "every row needs at least one True (what should the policy do there?)"
        )
    if inputs.valid_by_op is None:
        return
    stuck = (~_usable_given_op(inputs, layout)).nonzero()  # [n, 4]: (row, step, op, head)
    if not stuck.numel():
        return
    op, head = int(stuck[0, 2]), HEAD_NAMES[int(stuck[0, 3])]
    table = inputs.action_space.hierarchy
    assert table is not None  # per-op masks need a hierarchy
    name = table.ops[op]
    raise ValueError(
        f"masks[{head!r}] AND masks['{head}_by_op'] at op {name} leave no valid {head} at "
        f"{_where(stuck[0], single_step)}, where {name} is valid and uses {head!r}: allow "
        f"an action there, or mask {name} out in masks['op']"
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
            "(what get_action returns there), whatever the masks"
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

    Every value is finite then. The fast sum can overflow on the way even where large
    values cancel in the end, so the float64 total of their magnitudes tells: under
    half float32's largest value, no partial sum could have overflowed.
    """
    total = sum(float(tensor.abs().sum(dtype=torch.float64)) for tensor in tensors)
    if total > torch.finfo(torch.float32).max / 2:
        return  # finite values whose sum is too large for the fast check: accepted
    raise AssertionError(
        "esper.tamiyo.policy: the value check flagged values its slow path finds valid; "
        "please report this"
    )


def _where(index: torch.Tensor, single_step: bool) -> str:
    row = int(index[0])
    return f"batch row {row}" if single_step else f"batch row {row}, step {int(index[1])}"
