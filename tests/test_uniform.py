"""`UniformPolicyBundle`: uniform over valid actions, value 0, no parameters."""

from __future__ import annotations

import pytest
import torch

from esper.tamiyo.policy import HEAD_NAMES, ActionMasks, UniformPolicyBundle, create_policy
from esper.tamiyo.policy.testing import random_masks


def test_it_has_no_parameters_and_an_empty_state_dict() -> None:
    bundle = UniformPolicyBundle()
    assert list(bundle.network.parameters()) == []
    assert bundle.state_dict() == {}
    other = UniformPolicyBundle()
    other.load_state_dict(bundle.state_dict())
    with pytest.raises(ValueError, match="unexpected"):
        other.load_state_dict({"weight": torch.zeros(2)})


def test_it_implements_only_the_required_hook() -> None:
    methods = {name for name, obj in vars(UniformPolicyBundle).items() if callable(obj)}
    assert methods == {"__init__", "_forward"}


def test_probabilities_are_uniform_over_valid_actions_and_entropy_is_one() -> None:
    bundle = UniformPolicyBundle()
    masks = random_masks((16, 3), keep=0.4)
    out = bundle.forward(torch.randn(16, 3, 5), masks)
    actions = {name: logits.argmax(-1) for name, logits in out.logits.items()}
    ev = bundle.evaluate_actions(torch.randn(16, 3, 5), actions, masks)
    for name in HEAD_NAMES:
        mask = getattr(masks, name)
        assert mask is not None
        count = mask.sum(-1, keepdim=True).float()  # [B, T, 1]
        expected = torch.where(mask, 1.0 / count, torch.zeros(()))
        torch.testing.assert_close(out.logits[name].softmax(-1), expected)
        torch.testing.assert_close(ev.log_prob[name], -count.squeeze(-1).log())
        expected_entropy = (count.squeeze(-1) > 1).float()  # 1, or 0 with one valid action
        torch.testing.assert_close(ev.entropy[name], expected_entropy)
    assert bool((out.value == 0).all())
    assert bool((ev.value == 0).all())


def test_sampled_frequencies_are_uniform() -> None:
    bundle = UniformPolicyBundle()
    allowed = torch.tensor([False, True, False, True, True, False])
    masks = ActionMasks(op=allowed.expand(6000, 6))
    torch.manual_seed(0)
    taken = bundle.get_action(torch.zeros(6000, 1), masks).action["op"]
    counts = torch.bincount(taken, minlength=6)
    assert counts[~allowed].sum() == 0
    # Chi-square, 2 degrees of freedom: 13.8 is the 0.999 quantile.
    chi2 = float(((counts[allowed].float() - 2000.0) ** 2 / 2000.0).sum())
    assert chi2 < 13.8


def test_deterministic_takes_the_first_valid_action() -> None:
    masks = ActionMasks(op=torch.tensor([[False, False, True, True, False, False]]))
    step = UniformPolicyBundle().get_action(torch.zeros(1, 2), masks, deterministic=True)
    assert int(step.action["op"]) == 2


def test_feature_width_is_free_unless_given() -> None:
    free = UniformPolicyBundle()
    assert free.feature_dim is None
    for width in (1, 7, 300):
        assert free.get_value(torch.randn(2, width)).shape == (2,)
    fixed = create_policy("uniform", feature_dim=7)
    with pytest.raises(ValueError, match="built for feature_dim=7"):
        fixed.get_value(torch.randn(2, 8))
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        free.get_value(torch.ones(2, 3, dtype=torch.long))


def test_it_moves_and_computes_in_another_dtype() -> None:
    bundle = UniformPolicyBundle().to(torch.float64)
    assert bundle.dtype == torch.float64
    out = bundle.forward(torch.zeros(2, 3, dtype=torch.float64), None)
    assert out.value.dtype == torch.float64
