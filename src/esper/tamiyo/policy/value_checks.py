"""The value checks: NaN/Inf features, void mask rows, out-of-range or masked actions.

They need to read tensor values, which costs one device sync, so `PolicyBundle._prepare`
runs them together, once per call (when `check_values` is on): `check_values` folds
every condition into one scalar, and only when it is not finite does
`explain_invalid_values` look for the first offending row to name it.
"""

from __future__ import annotations

import math

import torch

from esper.tamiyo.policy.action_space import HEAD_NAMES

__all__ = ["check_values", "explain_invalid_values"]

# Half-precision sums overflow early (fp16 at 65504): sum those in float32.
_SUM_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def check_values(
    features: torch.Tensor,
    valid: torch.Tensor,
    action_index: torch.Tensor | None,
    sizes: torch.Tensor,
    single_step: bool,
) -> None:
    """Refuse NaN/Inf features, void mask rows, and out-of-range or masked actions.

    One device sync for all of them; only when one fails does the slow path
    (`explain_invalid_values`) look for the first offending row to name it.

    Args:
        features: `[B, T, F]`.
        valid: `[B, T, H, A_max]` packed masks.
        action_index: `[B, T, H]` packed actions, or `None`.
        sizes: `[H]` head sizes.
        single_step: The caller gave one step, so rows are named without a step.

    Raises:
        ValueError: A value is bad; the message names the argument, head and row.
    """
    # One scalar, one sync: the features' sum is NaN or Inf if any feature is (or if the
    # sum overflows: the slow path then finds nothing and returns), and dividing it by a
    # False flag makes it Inf or NaN as well.
    total = features.sum(dtype=_SUM_DTYPE.get(features.dtype))  # []
    total = total / valid.any(dim=-1).all()
    if action_index is not None:
        in_range = (action_index >= 0) & (action_index < sizes)
        safe = action_index.clamp(0, valid.shape[-1] - 1)
        allowed = valid.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [B, T, H]
        total = total / (in_range & allowed).all()
    if math.isfinite(total.item()):
        return
    explain_invalid_values(features, valid, action_index, sizes, single_step)
    # It returned: every value is fine, so the features' sum must have overflowed.
    if math.isfinite(features.sum(dtype=_SUM_DTYPE.get(features.dtype)).item()):
        raise AssertionError(
            "esper.tamiyo.policy: the value check flagged inputs its slow path finds "
            "valid; please report this"
        )


def explain_invalid_values(
    features: torch.Tensor,
    valid: torch.Tensor,
    action_index: torch.Tensor | None,
    sizes: torch.Tensor,
    single_step: bool,
) -> None:
    """Raise a `ValueError` describing the first bad value; the slow path of the value check.

    Returns normally when it finds none: the fast check flags a sum of finite features
    that overflows too.

    Args:
        features: `[B, T, F]`.
        valid: `[B, T, H, A_max]` packed masks.
        action_index: `[B, T, H]` packed actions, or `None`.
        sizes: `[H]` head sizes.
        single_step: The caller gave one step, so rows are named without a step.
    """
    bad_rows = (~torch.isfinite(features)).any(dim=-1).nonzero()  # [n, 2]
    if bad_rows.numel():
        raise ValueError(f"features contain NaN or Inf at {_where(bad_rows[0], single_step)}")
    void = (~valid.any(dim=-1)).nonzero()  # [n, 3]
    if void.numel():
        head = HEAD_NAMES[int(void[0, 2])]
        raise ValueError(
            f"masks[{head!r}] has no valid action at {_where(void[0], single_step)}: "
            "every row needs at least one True (what should the policy do there?)"
        )
    if action_index is not None:
        out_of_range = ((action_index < 0) | (action_index >= sizes)).nonzero()  # [n, 3]
        if out_of_range.numel():
            at = out_of_range[0]
            head_i = int(at[2])
            value = int(action_index[int(at[0]), int(at[1]), head_i])
            raise ValueError(
                f"actions[{HEAD_NAMES[head_i]!r}] = {value} at {_where(at, single_step)} is "
                f"out of range: head {HEAD_NAMES[head_i]!r} has {int(sizes[head_i])} actions"
            )
        taken = valid.gather(-1, action_index.unsqueeze(-1)).squeeze(-1)  # [B, T, H]
        masked = (~taken).nonzero()
        if masked.numel():
            at = masked[0]
            head_i = int(at[2])
            value = int(action_index[int(at[0]), int(at[1]), head_i])
            raise ValueError(
                f"actions[{HEAD_NAMES[head_i]!r}] = {value} at {_where(at, single_step)} is "
                f"masked: masks[{HEAD_NAMES[head_i]!r}] marks it invalid there"
            )


def _where(index: torch.Tensor, single_step: bool) -> str:
    row = int(index[0])
    return f"batch row {row}" if single_step else f"batch row {row}, step {int(index[1])}"
