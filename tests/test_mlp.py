"""`MLPPolicyBundle`: stateless, memoryless, and nothing but the required hook."""

from __future__ import annotations

import pytest
import torch

from conftest import FEATURE_DIM
from esper.tamiyo.policy import ActionSpace, MLPPolicyBundle, PolicyHeads, create_policy


def test_it_implements_only_the_required_hook() -> None:
    methods = {name for name, obj in vars(MLPPolicyBundle).items() if callable(obj)}
    assert methods == {"__init__", "_forward"}


def test_it_is_stateless() -> None:
    bundle = MLPPolicyBundle(FEATURE_DIM, hidden_dim=8)
    assert not bundle.is_recurrent
    assert bundle.initial_hidden(3) is None
    step = bundle.get_action(torch.randn(3, FEATURE_DIM), None)
    assert step.hidden is None
    with pytest.raises(ValueError, match=r"hidden must be None: MLPPolicyBundle is stateless"):
        bundle.get_action(torch.randn(3, FEATURE_DIM), None, (torch.zeros(1, 3, 8),))


def test_each_step_depends_on_its_own_features_only() -> None:
    bundle = MLPPolicyBundle(FEATURE_DIM, hidden_dim=8)
    x = torch.randn(2, 5, FEATURE_DIM)
    sequence = bundle.forward(x, None)
    reversed_steps = bundle.forward(x.flip(1), None)
    torch.testing.assert_close(reversed_steps.value, sequence.value.flip(1))
    for t in range(5):
        torch.testing.assert_close(bundle.forward(x[:, t], None).value, sequence.value[:, t])
    assert not torch.equal(sequence.value[:, 0], sequence.value[:, 1])  # features matter


def test_the_network_shape_and_size() -> None:
    bundle = MLPPolicyBundle(10, hidden_dim=32, action_space=ActionSpace(slot=5))
    heads = bundle.network.heads
    assert isinstance(heads, PolicyHeads)
    assert heads.head_hidden_dim == 16
    assert heads.action_sizes[0] == 5
    assert bundle.hidden_dim == 32
    torso = 10 * 32 + 32 + 2 * 32 + 32 * 32 + 32 + 2 * 32
    assert sum(p.numel() for p in bundle.network.torso.parameters()) == torso


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        ({"feature_dim": 0}, ValueError, "MLPPolicyBundle: feature_dim must be at least 1"),
        ({"feature_dim": 4, "hidden_dim": 1}, ValueError, "hidden_dim must be at least 2"),
        ({"feature_dim": 4.0}, TypeError, "feature_dim must be an int, got float"),
        ({"feature_dim": 4, "action_space": 3}, TypeError, "action_space must be an ActionSpace"),
    ],
)
def test_bad_constructor_arguments_are_refused(
    kwargs: dict[str, object], error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        create_policy("mlp", **kwargs)
