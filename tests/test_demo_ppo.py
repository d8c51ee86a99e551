"""PPOTrainer: the reference user of the public API; rollouts replay exactly in updates."""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import load_guide_example
from esper.tamiyo import policy
from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionSpace,
    LSTMPolicyBundle,
    MLPPolicyBundle,
    NetworkOutput,
    PolicyBundle,
    PolicyInputs,
)
from esper.tamiyo.policy.demo import (
    Op,
    PPOConfig,
    PPOTrainer,
    SeedLifecycleTask,
    TaskConfig,
    evaluate_policy,
    evaluation,
    gae,
    ppo,
)
from esper.tamiyo.policy.demo.ppo import TensorBoardScalars

FEATURES = TaskConfig().feature_dim
SPACE = TaskConfig().action_space  # ActionSpace.tamiyo()
FLAT = TaskConfig(action_space=ActionSpace())


def demo_lstm(
    seed: int = 0, *, op_conditioned_logits: bool = False, blueprint_embed_dim: int = 0
) -> LSTMPolicyBundle:
    torch.manual_seed(seed)
    return LSTMPolicyBundle(
        FEATURES,
        hidden_dim=16,
        embed_dim=16,
        action_space=SPACE,
        op_conditioned_logits=op_conditioned_logits,
        blueprint_embed_dim=blueprint_embed_dim,
    )


class PerHeadBias(PolicyBundle):
    """A policy with one logit vector per head and nothing shared: a head's gradient is its own."""

    def __init__(self, action_space: ActionSpace = SPACE) -> None:
        width = action_space.padded_size
        network = nn.ParameterDict(
            {head: nn.Parameter(torch.zeros(width)) for head in HEAD_NAMES}
            | {"value": nn.Parameter(torch.zeros(()))}
        )
        super().__init__(network, feature_dim=FEATURES, action_space=action_space)

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        batch, steps = inputs.batch_size, inputs.seq_len
        network = self.network
        assert isinstance(network, nn.ParameterDict)
        biases = torch.stack([network[head] for head in HEAD_NAMES])  # [H, A_max]
        logits = biases.expand(batch, steps, -1, -1)  # [B, T, H, A_max]
        value = network["value"] + inputs.features.new_zeros(batch, steps)  # not a view
        return NetworkOutput(logits, value, None)


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


def _guide_gru() -> PolicyBundle:
    bundle = load_guide_example().GRUPolicyBundle(FEATURES, action_space=SPACE)
    assert isinstance(bundle, PolicyBundle)
    return bundle


@pytest.mark.parametrize(
    "make",
    [
        demo_lstm,
        lambda: demo_lstm(op_conditioned_logits=True),
        _guide_gru,
        lambda: demo_lstm(blueprint_embed_dim=4),
    ],
    ids=["lstm", "lstm-op-conditioned", "guide-gru", "lstm-blueprints"],
)
def test_updates_replay_the_rollout_across_episode_resets_inside_sequences(
    make: Callable[[], PolicyBundle],
) -> None:
    """Rollouts of 24 steps over 16-step episodes: resets inside every sequence.

    The second rollout starts from a carried, non-zero hidden state. Under Tamiyo's
    hierarchical space the per-head log-probabilities replay too, with the masks per
    op stacked over the sequence.
    """
    bundle = make()
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
    assert second.masks.slot_by_op is not None
    assert second.masks.slot_by_op.shape == (8, 24, 6, 3)
    stats = trainer.update(second)
    assert stats.first_ratio_error < 1e-5
    if bundle.extra_inputs:  # stored step by step, aligned with the features
        assert set(second.extras) == {"blueprint_indices"}
        stored = second.extras["blueprint_indices"]
        assert stored.shape == (8, 24, 3)
        assert bool((stored >= 0).any())  # seeds were germinated, and their blueprints seen
        assert bool((stored[second.episode_start] == -1).all())  # a new episode: all empty
    else:
        assert second.extras == {}


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
    bundle = MLPPolicyBundle(FEATURES, hidden_dim=16, action_space=SPACE)
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
    flat = LSTMPolicyBundle(FEATURES, hidden_dim=8, embed_dim=8)
    with pytest.raises(
        ValueError, match=r"the bundle's action space ActionSpace.* is not the task's"
    ):
        PPOTrainer(flat, SeedLifecycleTask(4))


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
        ({"surrogate": "ratio"}, ValueError, "surrogate must be 'per_head' or 'joint'"),
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


@pytest.mark.parametrize("surrogate", ["per_head", "joint"])
def test_the_policy_loss_masks_advantages_by_relevance_and_the_bonus_by_availability(
    surrogate: str,
) -> None:
    """The update's first loss, at ratio 1, recomputed here from `evaluate_actions`.

    Per head, each head's surrogate is its advantages averaged over the steps where it
    was relevant; joint, the advantages averaged over all steps. The entropy bonus is
    each head's entropy averaged over the steps where it was available, summed.
    """
    bundle = demo_lstm()
    config = PPOConfig(minibatches=1, epochs=1, surrogate=surrogate)  # type: ignore[arg-type]
    trainer = PPOTrainer(bundle, SeedLifecycleTask(16, seed=0), config, seed=0)
    rollout, _ = trainer.collect()
    with torch.no_grad():
        result = bundle.evaluate_actions(
            rollout.features, rollout.actions, rollout.masks, rollout.hidden,
            episode_start=rollout.episode_start,
        )  # fmt: skip
    advantages = gae(rollout.reward, rollout.value, rollout.done, rollout.last_value, 0.99, 0.95)
    adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    def masked_mean(values: torch.Tensor, where: torch.Tensor) -> float:
        return float((values * where).sum() / where.sum().clamp(min=1))

    if surrogate == "per_head":
        expected = -sum(masked_mean(adv, result.relevance[h]) for h in HEAD_NAMES)
    else:
        expected = -float(adv.mean())
    bonus = sum(masked_mean(result.entropy[h], result.availability[h]) for h in HEAD_NAMES)
    stats = trainer.update(rollout)
    assert stats.policy_loss == pytest.approx(expected, abs=1e-5)
    assert stats.entropy == pytest.approx(bonus, abs=1e-5)
    rates = {h: float(result.relevance[h].float().mean()) for h in HEAD_NAMES}
    assert stats.relevance_rate == pytest.approx(rates)
    # Not a flat space in disguise: heads matter on some steps only, and are available
    # (their op offered) on steps where they did not matter.
    assert rates["op"] == 1.0
    assert 0 < rates["blueprint"] < rates["slot"] < 1
    assert bool((result.availability["blueprint"] & ~result.relevance["blueprint"]).any())
    assert stats.head_entropy["op"] > 0


def test_a_head_no_step_used_gets_no_gradient_while_the_others_learn() -> None:
    """SET_ALPHA_TARGET and PRUNE are never sampled: no step uses alpha_speed or alpha_curve.

    Seeds are germinated, advanced and fossilized, so rewards and advantages are not
    0, and every head those ops use learns. The two alpha schedule heads were
    available at many steps (PRUNE is offered whenever a seed lives), but relevant at
    none: their log-probability and entropy are 0 at every step whose op ignored
    them, so neither the policy loss nor the entropy bonus moves them.
    """
    bundle = PerHeadBias()
    assert isinstance(bundle.network, nn.ParameterDict)
    with torch.no_grad():  # probability about 4e-18 each
        bundle.network["op"][[Op.SET_ALPHA_TARGET, Op.PRUNE]] = -40.0
    before = {k: v.detach().clone() for k, v in bundle.network.named_parameters()}
    task = SeedLifecycleTask(8, seed=0)
    trainer = PPOTrainer(bundle, task, PPOConfig(minibatches=2, entropy_coef=0.1), seed=0)
    history = trainer.train(2 * trainer.steps_per_iteration)
    after = dict(bundle.network.named_parameters())
    unchanged = {k for k, v in after.items() if torch.equal(v, before[k])}
    assert unchanged == {"alpha_speed", "alpha_curve"}
    for stats in history:
        assert stats.update.relevance_rate["alpha_speed"] == 0
        assert stats.update.head_entropy["alpha_speed"] == 0
        assert 0 < stats.update.relevance_rate["tempo"] < stats.update.relevance_rate["slot"] < 1
        assert stats.mean_return > 0


def test_a_flat_space_trains_on_union_masks_and_counts_illegal_combinations() -> None:
    """Option (c): independent heads, union masks, an illegal combination taken as WAIT."""
    torch.manual_seed(0)
    bundle = LSTMPolicyBundle(FEATURES, hidden_dim=16, embed_dim=16)  # a flat space
    history = ppo.train_policy(bundle, 512, num_envs=8, config=PPOConfig(minibatches=2))
    assert sum(s.illegal_combinations for s in history) > 0
    assert sum(s.invalid_actions for s in history) == 0
    assert history[-1].update.relevance_rate == dict.fromkeys(HEAD_NAMES, 1.0)
    assert max(s.update.first_ratio_error for s in history) < 1e-5
    score = evaluate_policy(bundle, episodes=64)  # the flat task, from the bundle's space
    assert score.invalid_actions == 0
    with pytest.raises(ValueError, match=r"the bundle's action space .* is not the task's"):
        evaluate_policy(bundle, episodes=8, config=TaskConfig())


SCALARS = {"return", "success", "approx_kl", "clip_fraction", "policy_loss", "value_loss",
           "entropy"} | {f"entropy/{h}" for h in HEAD_NAMES} | {f"relevance/{h}" for h in HEAD_NAMES}  # fmt: skip


def test_tensorboard_scalars_are_written_and_read_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bundle = MLPPolicyBundle(FEATURES, hidden_dim=16, action_space=SPACE)
    with TensorBoardScalars(tmp_path / "mlp") as log:
        history = ppo.train_policy(
            bundle, 384, num_envs=8, config=PPOConfig(minibatches=2), on_iteration=log
        )
    accumulator = importlib.import_module(
        "tensorboard.backend.event_processing.event_accumulator"
    ).EventAccumulator(str(tmp_path / "mlp"))
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) >= SCALARS
    kl = accumulator.Scalars("approx_kl")
    assert [event.step for event in kl] == [s.env_steps for s in history] == [128, 256, 384]
    assert [event.value for event in kl] == pytest.approx([s.update.approx_kl for s in history])
    blueprint = [event.value for event in accumulator.Scalars("relevance/blueprint")]
    assert blueprint == pytest.approx([s.update.relevance_rate["blueprint"] for s in history])
    returns = [event.value for event in accumulator.Scalars("return")]
    assert returns == pytest.approx([s.mean_return for s in history])


def test_tensorboard_is_imported_only_when_scalars_are_asked_for() -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = (
        "import sys\n"
        "import esper.tamiyo.policy.demo.run, esper.tamiyo.policy.demo.ppo\n"
        "assert not [m for m in sys.modules if 'tensorboard' in m], "
        "[m for m in sys.modules if 'tensorboard' in m]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
