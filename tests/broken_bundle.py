"""A bundle that breaks the contract on purpose, to show the conformance kit reporting it.

`esper-policy check tests/broken_bundle.py:BrokenBundle` must fail with these clauses
named: rows independent (it centres features over the batch), float64 (it forces its
values to float32) and no per-call closures (its hook defines a function per call).
"""

from __future__ import annotations

import torch
from torch import nn

from esper.tamiyo.policy import ActionSpace, NetworkOutput, PolicyBundle, PolicyHeads, PolicyInputs


class BrokenBundle(PolicyBundle):
    """Three bugs a contributor could plausibly write; everything else is fine."""

    def __init__(self, feature_dim: int) -> None:
        space = ActionSpace()
        network = nn.Sequential(nn.Linear(feature_dim, 16), nn.Tanh(), PolicyHeads(16, space))
        super().__init__(network, feature_dim=feature_dim, action_space=space)

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        def centre(x: torch.Tensor) -> torch.Tensor:  # bug: a closure built on every call
            return x - x.mean(dim=0, keepdim=True)  # bug: mixes the rows of the batch

        logits, value = self.network(centre(inputs.features))
        return NetworkOutput(logits, value.float(), None)  # bug: a fixed dtype
