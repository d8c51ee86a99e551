"""Leaf layers called as functions of their parameters when nothing hooks them.

At batch 1 a policy step is Python overhead: `nn.Module.__call__` on a `Linear` or
`LayerNorm` costs about as much as the kernel. These helpers call `F.linear` and
`F.layer_norm` directly, but only when the module has no hooks and no global module
hooks are installed, which is the test `nn.Module.__call__` itself makes before its
own fast path; with a hook (a forward hook for debugging, `torch.nn.utils.prune`'s
pre-hook) they call the module, so the hook runs and sees what it always saw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

__all__ = ["hookless", "layer_norm", "linear"]

# The registries of global module hooks: dicts torch mutates in place, so holding
# them here reads the current contents at the cost of one truth test each.
_GLOBAL_HOOKS = tuple(
    getattr(_module, name, {})
    for name in (
        "_global_backward_pre_hooks",
        "_global_backward_hooks",
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
    )
)


def hookless(layer: nn.Module) -> bool:
    """Whether calling `layer` would skip every hook, as `nn.Module.__call__` decides."""
    backward_pre, backward, forward, forward_pre = _GLOBAL_HOOKS
    return not (
        layer._forward_hooks
        or layer._forward_pre_hooks
        or layer._backward_hooks
        or layer._backward_pre_hooks
        or backward_pre
        or backward
        or forward
        or forward_pre
    )


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, without the module call when nothing hooks the layer."""
    if hookless(layer):
        return F.linear(x, layer.weight, layer.bias)
    result: torch.Tensor = layer(x)
    return result


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)`, without the module call when nothing hooks the norm."""
    if hookless(norm):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    result: torch.Tensor = norm(x)
    return result
