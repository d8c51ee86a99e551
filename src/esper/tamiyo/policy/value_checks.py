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


def check_input_values(inputs: PolicyInputs, action_counts: torch.Tensor, masked: bool) -> None:
    """Refuse NaN/Inf features or hidden state, void mask rows, bad actions; one sync.

    Args:
        inputs: The normalized inputs.
        action_counts: `[H]` int64, each head's number of actions.
        masked: The caller gave masks (without them no row can be void).

    Raises:
        ValueError: A value is bad; the message names the argument, head and row.
    """
    # The sum is NaN or Inf if any summed value is (or if it overflows: the slow path
    # then finds nothing and returns), and dividing it by a False flag makes it Inf or
    # NaN as well.
    total = _sum(inputs.features)  # []
    for tensor in inputs.hidden or ():
        total = total + _sum(tensor)
    if masked:
        total = total / inputs.valid.any(dim=-1).all()
    if inputs.action_index is not None:
        total = total / _actions_allowed(inputs.action_index, inputs.valid, action_counts).all()
    if math.isfinite(total.item()):
        return
    _explain_inputs(inputs, action_counts)
    _overflowed(inputs.features, *(inputs.hidden or ()))


def check_output_values(
    owner: str, logits: torch.Tensor, value: torch.Tensor, heads: torch.Tensor, single_step: bool
) -> None:
    """Refuse non-finite logits (in the heads' own columns) or values out of the network.

    The new hidden state is not summed here: a network that makes it NaN makes the
    logits NaN at the same step or the next, and the next call's input check names it.

    Args:
        owner: The bundle's class name, for the message.
        logits: `[B, T, H, A_max]` as the hook returned them.
        value: `[B, T]`.
        heads: `[H, A_max]` bool, True on each head's own columns (padding is ignored).
        single_step: The caller gave one step, so rows are named without a step.

    Raises:
        FloatingPointError: The network produced a NaN or Inf; the message names the
            tensor, the head and the row.
    """
    head_logits = torch.where(heads, logits, 0.0)  # [B, T, H, A_max], padding ignored
    if math.isfinite((_sum(head_logits) + _sum(value)).item()):
        return
    bad = (~torch.isfinite(logits) & heads).any(dim=-1).nonzero()  # [n, 3]
    if bad.numel():
        head = HEAD_NAMES[int(bad[0, 2])]
        raise FloatingPointError(
            f"{owner}: the logits of head {head!r} are NaN or Inf at "
            f"{_where(bad[0], single_step)}; {_NETWORK_ADVICE}"
        )
    bad = (~torch.isfinite(value)).nonzero()  # [n, 2]
    if bad.numel():
        raise FloatingPointError(
            f"{owner}: the value is NaN or Inf at {_where(bad[0], single_step)}; {_NETWORK_ADVICE}"
        )
    _overflowed(head_logits.detach(), value.detach())


def _actions_allowed(
    action_index: torch.Tensor, valid: torch.Tensor, action_counts: torch.Tensor
) -> torch.Tensor:
    """`[B, T, H]` bool: each action is in its head's range and allowed by the mask."""
    in_range = (action_index >= 0) & (action_index < action_counts)
    safe = action_index.clamp(0, valid.shape[-1] - 1)
    return in_range & valid.gather(-1, safe.unsqueeze(-1)).squeeze(-1)


def _explain_inputs(inputs: PolicyInputs, action_counts: torch.Tensor) -> None:
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
    void = (~inputs.valid.any(dim=-1)).nonzero()  # [n, 3]
    if void.numel():
        head = HEAD_NAMES[int(void[0, 2])]
        raise ValueError(
            f"masks[{head!r}] has no valid action at {_where(void[0], single_step)}: "
            "every row needs at least one True (what should the policy do there?)"
        )
    action_index = inputs.action_index
    if action_index is None:
        return
    out_of_range = ((action_index < 0) | (action_index >= action_counts)).nonzero()  # [n, 3]
    if out_of_range.numel():
        at = out_of_range[0]
        head_i = int(at[2])
        value = int(action_index[int(at[0]), int(at[1]), head_i])
        raise ValueError(
            f"actions[{HEAD_NAMES[head_i]!r}] = {value} at {_where(at, single_step)} is "
            f"out of range: head {HEAD_NAMES[head_i]!r} has {int(action_counts[head_i])} actions"
        )
    masked = (~_actions_allowed(action_index, inputs.valid, action_counts)).nonzero()
    if masked.numel():
        at = masked[0]
        head_i = int(at[2])
        value = int(action_index[int(at[0]), int(at[1]), head_i])
        raise ValueError(
            f"actions[{HEAD_NAMES[head_i]!r}] = {value} at {_where(at, single_step)} is "
            f"masked: masks[{HEAD_NAMES[head_i]!r}] marks it invalid there"
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
