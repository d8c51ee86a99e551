"""Masked categorical arithmetic for all heads at once, on the padded layout.

These free functions replace one `torch.distributions.Categorical` per head: each
is a handful of tensor operations over `[B, T, H, A_max]`, whatever the number of
heads, so a step costs the same few kernel launches for eight heads as for one.
They hold no Python control flow on tensor values, so `torch.compile` traces them
whole.
"""

from __future__ import annotations

import torch

from esper.tamiyo.policy.floors import FloorTable
from esper.tamiyo.policy.layout import BROKEN_LOGIT

__all__ = [
    "choose",
    "choose_valid",
    "entropy_of",
    "floor_log_probs",
    "gumbel_noise",
    "log_prob_of",
    "mask_logits",
    "normalized_entropy",
    "sample",
]


def mask_logits(
    logits: torch.Tensor, valid: torch.Tensor, fill: torch.Tensor, minus_inf: torch.Tensor
) -> torch.Tensor:
    """Mask logits, after shifting each head so its largest valid logit is 0.

    Softmax, log-probabilities, argmax and their gradients are unchanged by a shift of
    a whole row; the shift makes masking independent of the network's scale: invalid
    actions (-1e4) and padding (-3e4) sit at least 1e4 below the best valid action
    whatever the logits are, so a masked action keeps probability exactly 0 even from a
    network whose logits have drifted to -1e6. The shift is detached: it carries no
    gradient, and needs none.

    Whatever the numbers, a masked action stays below every valid one: a valid logit
    that is NaN or Inf (or that the shift made so) becomes `BROKEN_LOGIT` (-5e3), above
    the masked ones. With `check_values` on the base refuses such logits right after
    the hook; this keeps the masks when it is off.

    Args:
        logits: `[B, T, H, A_max]` unmasked logits.
        valid: `[B, T, H, A_max]` bool, True where the action may be taken.
        fill: `[H, A_max]` value for invalid positions (see `HeadLayout.fill`).
        minus_inf: A 0-dim `-inf` on the logits' device (`HeadLayout.minus_inf`): a
            Python `-inf` would cost an extra op on every call.

    Returns:
        `[B, T, H, A_max]` masked logits, each head's largest valid one 0 (unless it is
        broken). An invalid position lies at least 5000 below the largest valid one, so
        after `log_softmax` its probability is exactly 0 in fp32.
    """
    top = torch.where(valid, logits, minus_inf).amax(dim=-1, keepdim=True)  # [B, T, H, 1]
    if top.requires_grad:  # under autograd only: detaching is an op of its own
        top = top.detach()
    shifted = (logits - top).nan_to_num(
        nan=BROKEN_LOGIT, posinf=BROKEN_LOGIT, neginf=BROKEN_LOGIT
    )  # [B, T, H, A_max]
    return torch.where(valid, shifted, fill)


def sample(
    log_probs: torch.Tensor,
    *,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one action per head with the Gumbel-max trick, or take the mode.

    `choose(log_probs, gumbel_noise(log_probs, generator))`, or `choose(log_probs,
    None)` when `deterministic`.

    Args:
        log_probs: `[..., A_max]` normalized log-probabilities.
        deterministic: Take the most likely action instead of sampling.
        generator: Random source for the noise; the global one when `None`.

    Returns:
        `[...]` int64 action indices.
    """
    return choose(log_probs, None if deterministic else gumbel_noise(log_probs, generator))


def gumbel_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """`-log(-log(u))` for the Gumbel-max trick, negated: `[...]` shaped like `like`.

    `argmax(log_p + g)` with `g = -log(-log(u))`, `u ~ U[0, 1)`, is an exact sample
    of the categorical; this returns `-g = log(-log(u))`, for `choose` to subtract. `u`
    is raised to the dtype's smallest normal number, so the noise is finite: between
    about -4.5 and 17 in float32 (`u` below 1 by at least one ulp). It can never lift a
    masked action over the most likely valid one, which is at least 5000 above it (see
    `mask_logits`). Unclamped, `torch.rand`'s `u = 0` (one draw in 2**24 in float32)
    would give the valid action `-inf` and hand a head with one valid action to a
    masked one.

    One draw serves every stage of a hierarchical sample: the op's stage reads the op
    row, the next stage the rest, so both stages see the same noise for the op.

    Drawn in float32 at least, like the scores it is subtracted from: bfloat16 noise
    is coarse enough to draw a floored action measurably less often than its
    log-probability says (1.8% for a 2% floor).

    Args:
        like: The log-probabilities (or logits) the noise is for; its shape and device.
        generator: Random source; the global one when `None`.
    """
    dtype = torch.promote_types(like.dtype, torch.float32)  # bf16 noise would skew the draws
    if generator is None:  # rand_like: `torch.rand(..., generator=None)` breaks dynamic shapes
        noise = torch.rand_like(like, dtype=dtype)
    else:
        noise = torch.rand(like.shape, dtype=dtype, device=like.device, generator=generator)
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny).log_().neg_().log_()


def choose(log_probs: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """`argmax(log_probs - noise)`: a sample with `gumbel_noise`, the mode with `None`.

    Args:
        log_probs: `[..., A_max]` normalized log-probabilities.
        noise: `[..., A_max]` from `gumbel_noise`, or `None` for the most likely action.

    Returns:
        `[...]` int64 action indices.
    """
    if noise is None:
        return log_probs.argmax(dim=-1)
    return (log_probs - noise).argmax(dim=-1)


def choose_valid(
    logits: torch.Tensor,
    valid: torch.Tensor,
    noise: torch.Tensor | None,
    minus_inf: torch.Tensor,
) -> torch.Tensor:
    """`argmax(logits - noise)` over the valid actions: a sample, or the mode with `None`.

    The first stage of a hierarchical sample, which needs the op and not yet its
    probability: the Gumbel-max trick needs no normalization, so this takes four
    kernels where `mask_logits` then `choose` take seven (the op's log-probability
    comes from the second stage, with every other head's). Whatever the numbers a
    masked action is never chosen over a valid one: a valid logit that is NaN or Inf
    becomes `BROKEN_LOGIT`, finite, and masked actions `-inf`. Such a logit is a broken
    network, which `check_values` refuses; with the checks off the masks hold, but the
    choice among the valid actions then need not follow the log-probability reported
    for it (the second stage makes every valid action of that row `BROKEN_LOGIT`).

    Args:
        logits: `[..., A_max]` unmasked logits.
        valid: `[..., A_max]` bool, True where the action may be taken.
        noise: `[..., A_max]` from `gumbel_noise`, or `None` for the most likely action.
        minus_inf: A 0-dim `-inf` on the logits' device (`HeadLayout.minus_inf`).

    Returns:
        `[...]` int64 action indices.
    """
    # In float32 at least, as the second stage scores (`mask_logits` against the float32
    # fill): in bfloat16, `logits - noise` rounds into ties that argmax gives to the
    # lower index, a bias of several points at logits near 100.
    wide = logits.to(torch.promote_types(logits.dtype, minus_inf.dtype))
    scores = wide.nan_to_num(nan=BROKEN_LOGIT, posinf=BROKEN_LOGIT, neginf=BROKEN_LOGIT)
    if noise is not None:
        scores = scores - noise
    return torch.where(valid, scores, minus_inf).argmax(dim=-1)


def floor_log_probs(
    log_probs: torch.Tensor, valid: torch.Tensor, table: FloorTable
) -> torch.Tensor:
    """Log-probabilities under probability floors: `log((1 - n f) p + f)` on valid actions.

    The one place floors are applied, for the rollout and the update alike (see
    `floors`): every valid action of a floored head keeps at least its effective floor
    `f = min(floor, 0.99 / n)`, masked actions keep their log-probability (probability
    0), rows still sum to 1, and a head with at most one valid action is unchanged
    exactly. Float32 at least, whatever the logits' dtype, like the rest of the scoring.

    Args:
        log_probs: `[..., H, A_max]` normalized log-probabilities under `valid`, float32
            or wider (from `mask_logits(...).log_softmax(-1)`).
        valid: `[..., H, A_max]` bool.
        table: The floors of these `H` heads (`FloorTables.heads`, or `.op` for the op
            row alone as `[..., 1, A_max]`).

    Returns:
        `[..., H, A_max]` floored log-probabilities; differentiable in `log_probs`.
    """
    entry = valid.sum(dim=-1, keepdim=True) + table.offsets  # [..., H, 1]: (head, count)
    floored = torch.logaddexp(
        log_probs + table.log_scale.take(entry), table.log_floor.take(entry)
    )  # [..., H, A_max]
    return torch.where(valid, floored, log_probs)


def log_prob_of(log_probs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Log-probability of the given actions.

    Args:
        log_probs: `[..., A_max]`.
        actions: `[...]` int64 indices.

    Returns:
        `[...]` log-probabilities.
    """
    return log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def normalized_entropy(
    masked_logits: torch.Tensor,
    log_probs: torch.Tensor,
    valid: torch.Tensor,
    inv_log_count: torch.Tensor,
) -> torch.Tensor:
    """Entropy of each head divided by the log of its number of valid actions.

    The result lies in [0, 1] whatever the head's size or mask, so heads of 3 and 13
    actions weigh alike in an entropy bonus; it is 0 where a single action is valid.

    Args:
        masked_logits: `[..., A_max]` from `mask_logits`.
        log_probs: `[..., A_max]`, their `log_softmax`.
        valid: `[..., A_max]` bool.
        inv_log_count: `[A_max + 1]` table of `1 / log(n)` (0 for `n <= 1`).

    Returns:
        `[...]` normalized entropies.
    """
    return entropy_of(masked_logits, log_probs) * inv_log_count[valid.sum(dim=-1)]


def entropy_of(masked_logits: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row: `[..., A_max]` masked logits and their log-softmax to `[...]`."""
    # softmax rather than exp(log_probs): exp() of the ~-1e4 entries takes a slow path.
    probs = torch.softmax(masked_logits, dim=-1)
    return -(probs * log_probs).sum(dim=-1)
