"""Shared fixtures: small bundles and random masks with a fixed seed."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import settings

from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionMasks,
    ActionSpace,
    LSTMPolicyBundle,
    NetworkOutput,
    PolicyBundle,
    PolicyHeads,
    PolicyInputs,
    registry,
)

# Same examples every run: CI must not pass or fail by luck.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=40)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FEATURE_DIM = 6
GUIDE_EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "gru_bundle.py"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def imported_script(path: Path, module_name: str) -> Iterator[ModuleType]:
    """A script imported from its path as `module_name` for the block.

    For the scripts in `benchmarks/`, which is not a package. The module is in
    `sys.modules` while the block runs (dataclasses look their module up there) and
    removed after it.
    """
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(module_name, None)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


def small_lstm(**kwargs: object) -> LSTMPolicyBundle:
    """An LSTM bundle small enough for fast tests."""
    options: dict[str, object] = {"hidden_dim": 16, "embed_dim": 12}
    options.update(kwargs)
    return LSTMPolicyBundle(FEATURE_DIM, **options)  # type: ignore[arg-type]


@pytest.fixture
def bundle() -> LSTMPolicyBundle:
    return small_lstm()


def one_hot_masks(lead: tuple[int, ...], choice: dict[str, int]) -> ActionMasks:
    """Masks allowing exactly `choice[head]` for every head, shaped `[*lead, A_h]`."""
    masks: dict[str, torch.Tensor | None] = {}
    for name, size in zip(HEAD_NAMES, ActionSpace().sizes, strict=True):
        mask = torch.zeros(*lead, size, dtype=torch.bool)
        mask[..., choice[name]] = True
        masks[name] = mask
    return ActionMasks.from_mapping(masks)


class TinyNetwork(torch.nn.Module):
    """A feed-forward torso and `PolicyHeads`: the smallest real network."""

    def __init__(self, feature_dim: int, space: ActionSpace) -> None:
        super().__init__()
        self.torso = torch.nn.Sequential(torch.nn.Linear(feature_dim, 16), torch.nn.Tanh())
        self.heads = PolicyHeads(16, space)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, T, F]` -> logits `[B, T, H, A_max]`, value `[B, T]`."""
        result: tuple[torch.Tensor, torch.Tensor] = self.heads(self.torso(features))
        return result


class TinyStatelessBundle(PolicyBundle):
    """A stateless bundle built in a few lines on the base, as a contributor would."""

    def __init__(self, feature_dim: int = FEATURE_DIM, action_space: ActionSpace | None = None):
        space = action_space or ActionSpace()
        super().__init__(
            TinyNetwork(feature_dim, space), feature_dim=feature_dim, action_space=space
        )

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        logits, value = self.network(inputs.features)
        return NetworkOutput(logits, value, None)


def load_guide_example(*, keep_registration: bool = False) -> ModuleType:
    """Import the guide's worked example afresh, as `gru_bundle`.

    Its `@register_policy("gru")` runs on import; the registry is restored afterwards
    unless `keep_registration`, so that no test sees another test's registrations.
    """
    saved = dict(registry._REGISTRY)
    registry._REGISTRY.pop("gru", None)
    spec = importlib.util.spec_from_file_location("gru_bundle", GUIDE_EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gru_bundle"] = module  # inspect.getsource finds classes through it
    try:
        spec.loader.exec_module(module)
    finally:
        if not keep_registration:
            registry._REGISTRY.clear()
            registry._REGISTRY.update(saved)
    return module
