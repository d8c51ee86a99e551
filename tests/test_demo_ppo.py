"""PPOTrainer: the reference user of the public API; rollouts replay exactly in updates."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import load_guide_example
from esper.tamiyo import policy
from esper.tamiyo.policy import LSTMPolicyBundle, MLPPolicyBundle, PolicyBundle
from esper.tamiyo.policy.demo import (
    PPOConfig,
    PPOTrainer,
    SeedLifecycleTask,
    TaskConfig,
    evaluate_policy,
    evaluation,
    gae,
    ppo,
)

FEATURES = TaskConfig().feature_dim


def demo_lstm(seed: int = 0) -> LSTMPolicyBundle:
    torch.manual_seed(seed)
    return LSTMPolicyBundle(FEATURES, hidden_dim=16, embed_dim=16)


def test_gae_equals_the_discounted_sum_of_td_errors_cut_at_episode_ends() -> None:
    gen = torch.Generator().manual_seed(0)
    n, t, gamma, lam = 5, 9, 0.9, 0.8
    reward = torch.randn(n, t, generator=gen, dtype=torch.float64)
    value = torch.randn(n, t, generator=gen, dtype=torch.float64)
    last = torch.randn(n, generator=gen, dtype=torch.float64)
    done = torch.rand(n, t, generator=gen) < 0.25
    advantages = gae(reward, value, done, last, gamma, lam)
    next_value = torch.cat((value[:, 1:], last.unsqueeze(1)), dim=1)
    delta = reward + gamma * next_value * (~done) - value  # [N, T]
    for row in range(n):
        for start in range(t):
            expected, weight = 0.0, 1.0
            for k in range(start, t):
                expected += weight * float(delta[row, k])
                if done[row, k]:
                    break
                weight *= gamma * lam
            assert float(advantages[row, start]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("make", [demo_lstm, None], ids=["lstm", "guide-gru"])
def test_updates_replay_the_rollout_across_episode_resets_inside_sequences(
    make: Callable[[], PolicyBundle] | None,
) -> None:
    """Rollouts of 24 steps over 16-step episodes: resets inside every sequence.

    The second rollout starts from a carried, non-zero hidden state.
    """
    bundle = load_guide_example().GRUPolicyBundle(FEATURES) if make is None else make()
    assert isinstance(bundle, PolicyBundle)
    task = SeedLifecycleTask(8, seed=0)
    trainer = PPOTrainer(bundle, task, PPOConfig(rollout_steps=24, minibatches=2), seed=0)
    first, _ = trainer.collect()
    assert first.episode_start[:, 0].all()
    assert first.episode_start[:, 16].all()
    assert not first.episode_start[:, 1:16].any()
    trainer.update(first)
    second, _ = trainer.collect()
    assert second.hidden is not None
    assert all(bool(h.abs().sum() > 0) for h in second.hidden)
    assert second.episode_start[:, 8].all()
    stats = trainer.update(second)
    assert stats.first_ratio_error < 1e-5


PUBLIC_SOURCES = {
    "esper.tamiyo.policy": set(policy.__all__),
    "esper.tamiyo.policy.validation": {"check_positive_int"},  # PPOConfig's argument check
}


def library_uses_outside_the_public_api(source: str) -> list[str]:
    """Private attributes of anything but `self`, and library names outside the API."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", "?")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if ast.unparse(node.value) != "self":
                found.append(f"{line}: {ast.unparse(node)}")
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("getattr", "setattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and str(node.args[1].value).startswith("_")
        ):
            found.append(f"{line}: {ast.unparse(node)}")
        elif isinstance(node, ast.Import):
            found.extend(
                f"{line}: import {alias.name}"
                for alias in node.names
                if alias.name.startswith("esper")
            )
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                found.append(f"{line}: a relative import")
            elif module == "esper.tamiyo.policy.demo" or module.startswith(
                "esper.tamiyo.policy.demo."
            ):
                continue  # the demo's own modules
            elif not module.startswith("esper"):
                continue
            elif module not in PUBLIC_SOURCES:
                found.append(f"{line}: from {module} import ...")
            else:
                found.extend(
                    f"{line}: {module}.{alias.name}"
                    for alias in node.names
                    if alias.name not in PUBLIC_SOURCES[module]
                )
    return found


def test_the_trainer_and_evaluation_use_only_the_public_bundle_api() -> None:
    """The demo is the reference user, so it may not cheat.

    No `bundle._anything`, and the library's names come from the package's `__all__`
    (the demo's own modules aside, and the one argument check its settings reuse).
    """
    for module in (ppo, evaluation):
        source = Path(inspect.getfile(module)).read_text()
        assert library_uses_outside_the_public_api(source) == [], module.__name__


@pytest.mark.parametrize(
    "line",
    [
        "x = bundle._layout",
        "y = self.bundle.network._parameters",
        "z = self.bundle.network.heads._w",
        "w = policy._layout",
        "v = getattr(bundle, '_layout')",
        "from esper.tamiyo.policy.demonstration import X",
        "import esper.tamiyo.policy.masks as m",
        "from esper.tamiyo.policy.base import PolicyBundle",
        "from esper.tamiyo.policy import HeadLayout",
        "from esper.tamiyo.policy.validation import check_mask",
        "from ..masks import ActionMasks",
    ],
)
def test_the_public_api_scan_finds_each_kind_of_private_use(line: str) -> None:
    assert len(library_uses_outside_the_public_api(line)) == 1


def _train(seed: int, iterations: int = 2) -> tuple[list[float], dict[str, torch.Tensor]]:
    bundle = demo_lstm(seed)
    task = SeedLifecycleTask(8, seed=seed)
    trainer = PPOTrainer(bundle, task, PPOConfig(minibatches=2), seed=seed)
    history = trainer.train(iterations * trainer.steps_per_iteration)
    numbers = [s.update.policy_loss for s in history] + [s.mean_return for s in history]
    return numbers, dict(bundle.network.named_parameters())


def test_training_repeats_exactly_under_a_seed_and_differs_under_another() -> None:
    numbers, weights = _train(seed=4)
    again, weights_again = _train(seed=4)
    other, _ = _train(seed=5)
    assert numbers == again
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)
    assert numbers != other


def test_train_counts_steps_and_anneals_the_learning_rate_to_near_zero() -> None:
    bundle = MLPPolicyBundle(FEATURES, hidden_dim=16)
    trainer = PPOTrainer(bundle, SeedLifecycleTask(8, seed=0), PPOConfig(minibatches=2))
    seen: list[int] = []
    history = trainer.train(300, on_iteration=lambda s: seen.append(s.env_steps))
    assert seen == [s.env_steps for s in history] == [128, 256, 384]  # whole rollouts
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(PPOConfig().learning_rate * (1 - 256 / 300))
    assert [s.iteration for s in history] == [1, 2, 3]


def test_a_training_run_changes_the_weights_and_every_parameter_gets_a_gradient() -> None:
    bundle = demo_lstm()
    before = {k: v.detach().clone() for k, v in bundle.network.named_parameters()}
    PPOTrainer(bundle, SeedLifecycleTask(8, seed=0), PPOConfig(minibatches=2)).iterate()
    params = dict(bundle.network.named_parameters())
    changed = [k for k, v in params.items() if not torch.equal(v, before[k])]
    assert set(changed) == set(before)


def test_the_trainer_refuses_environments_that_do_not_split_into_minibatches() -> None:
    with pytest.raises(ValueError, match="6 environments do not split into 4 minibatches"):
        PPOTrainer(demo_lstm(), SeedLifecycleTask(6), PPOConfig(minibatches=4))
    with pytest.raises(ValueError, match="a minibatch would hold a single step"):
        PPOTrainer(demo_lstm(), SeedLifecycleTask(4), PPOConfig(rollout_steps=1, minibatches=4))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"minibatches": 0}, ValueError, "minibatches must be at least 1, got 0"),
        ({"epochs": 0}, ValueError, "epochs must be at least 1, got 0"),
        ({"rollout_steps": 2.5}, TypeError, "rollout_steps must be an int"),
        ({"learning_rate": 0.0}, ValueError, r"learning_rate must be in \(0.0, inf\], got 0.0"),
        ({"gamma": 1.5}, ValueError, r"gamma must be in \[0.0, 1.0\], got 1.5"),
        ({"gae_lambda": -0.1}, ValueError, r"gae_lambda must be in \[0.0, 1.0\]"),
        ({"clip": True}, TypeError, "clip must be a number, got True"),
        ({"entropy_coef": float("nan")}, ValueError, "entropy_coef must be in"),
    ],
)
def test_ppo_config_refuses_settings_that_cannot_train(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        PPOConfig(**kwargs)  # type: ignore[arg-type]


def test_evaluation_restores_training_mode_and_meets_the_same_episodes() -> None:
    bundle = demo_lstm()
    modes = []
    for training in (True, False):
        bundle.network.train(training)
        modes.append(evaluate_policy(bundle, episodes=32, seed=9))
        assert bundle.network.training is training
    first, second = modes
    assert first == second
    assert first.invalid_actions == 0
    assert first.deterministic
