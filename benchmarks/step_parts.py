"""Where a step's time goes, part by part, against the seed design (performance.md).

Issue 14's targets are ratios to the seed design's whole step. This script times, in
the same interleaved repeats as the seed design's step and the new one (the bench
harness, `esper.tamiyo.policy.bench.harness`), each part of the new step that the
library's contract requires, alone:

- `network`: the network alone, eager (`bench.suite.network_step`, or forward and
  backward for a training step, `network_training_step`);
- `normalize`: `_normalize_inputs`, every argument check and the packing of the masks
  (and of the actions, for a training step);
- `value_checks`: the whole step with `check_values` on minus the same step with it
  off (the checks before and after the network; a difference of two medians, so noisy);
- `mask_and_sample` (`get_action`): masking, the Gumbel draw, log-softmax, argmax and
  the chosen log-probability of every head at once, on the network's logits;
- `scoring` (training): masking, log-softmax, the chosen log-probability and the
  normalized entropy, forward and backward;
- `results` (`get_action`): the per-head dicts of the result;
- `ppo_loss` (training): the benchmark's loss, the same code for both designs.

It prints, per case, the budget a target leaves (`target x` the seed design's time),
the parts and their sum: where the sum passes the budget, no change to what joins the
parts can meet the target. The training sum is approximate: its parts run three
backward passes where the step runs one (about 30 µs each here). Run it with `.venv/bin/python benchmarks/step_parts.py
[--quick]`.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch

from esper.tamiyo.policy import HEAD_NAMES, categorical
from esper.tamiyo.policy.base import PolicyBundle
from esper.tamiyo.policy.bench.harness import (
    Settings,
    git_commit,
    machine_info,
    single_thread,
    time_interleaved,
)
from esper.tamiyo.policy.bench.suite import (
    RATIO_TARGETS,
    Bundles,
    Case,
    build_bundles,
    make_case,
    network_step,
    network_training_step,
    new_get_action,
    new_training_step,
    old_get_action,
    old_training_step,
    ppo_loss,
)
from esper.tamiyo.policy.layout import HeadLayout
from esper.tamiyo.policy.outputs import ActionResult, EvalResult

FULL = Settings(mode="full", repeats=15, target_block_s=0.05, warmup_calls=20)
QUICK = Settings(mode="quick", repeats=3, target_block_s=0.002, warmup_calls=2)
FEATURE_DIM = 32
_LIMITS = {key: limit for key, _, limit in RATIO_TARGETS}
STEP_TARGETS = {batch: _LIMITS[f"get_action/B={batch}"] for batch in (1, 32)}
"""`get_action` batch size to its target, from `bench.suite.RATIO_TARGETS`."""
TRAIN_TARGETS = {(b, t): _LIMITS[f"evaluate/B={b},T={t}"] for b, t in ((8, 16), (32, 32))}
"""Training `(B, T)` to its target, from `bench.suite.RATIO_TARGETS`."""


def _mask_and_sample(
    logits: torch.Tensor, valid: torch.Tensor, layout: HeadLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute.act`'s tensor work on a flat space, without the network.

    Returns:
        The sampled actions `[B, T, H]` and their log-probabilities `[B, T, H]`.
    """
    noise = categorical.gumbel_noise(logits)
    masked = categorical.mask_logits(logits, valid, layout.fill, layout.minus_inf)
    log_probs = masked.log_softmax(-1)  # [B, T, H, A_max]
    actions = categorical.choose(log_probs, noise)  # [B, T, H]
    return actions, categorical.log_prob_of(log_probs, actions)


def _scoring(
    logits: torch.Tensor, valid: torch.Tensor, actions: torch.Tensor, layout: HeadLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute.evaluate`'s tensor work on a flat space, forward and backward.

    Returns:
        The log-probabilities of `actions` and the normalized entropies, `[B, T, H]`.
    """
    leaf = logits.detach().requires_grad_()
    masked = categorical.mask_logits(leaf, valid, layout.fill, layout.minus_inf)
    log_probs = masked.log_softmax(-1)  # [B, T, H, A_max]
    chosen = categorical.log_prob_of(log_probs, actions)  # [B, T, H]
    entropy = categorical.normalized_entropy(masked, log_probs, valid, layout.inv_log_count)
    torch.autograd.backward(chosen.sum() + entropy.sum())
    return chosen.detach(), entropy.detach()


def _evaluate_no_grad(bundle: PolicyBundle, case: Case) -> None:
    """`evaluate_actions` forward on `case`, without an autograd graph."""
    assert case.actions is not None
    with torch.no_grad():
        bundle.evaluate_actions(case.features, case.actions, case.masks, case.hidden)


def _loss_alone(out: EvalResult) -> None:
    """The benchmark's PPO loss alone, forward and backward, on `out` detached."""
    log_prob = {head: t.detach().requires_grad_() for head, t in out.log_prob.items()}
    entropy = {head: t.detach().requires_grad_() for head, t in out.entropy.items()}
    torch.autograd.backward(ppo_loss(log_prob, entropy, out.value.detach().requires_grad_()))


def step_parts(bundles: Bundles, batch: int, settings: Settings) -> dict[str, float]:
    """Median µs of a `get_action` step of both designs and of the new step's parts."""
    new, unchecked = bundles.new, bundles.new_unchecked
    generator = torch.Generator().manual_seed(batch)
    case = make_case(new, (batch,), FEATURE_DIM, generator)
    layout = HeadLayout(new.action_space, new.device)
    step_features = case.features.unsqueeze(1)  # [B, 1, F]
    logits = network_step(new, step_features, case)[0]  # [B, 1, H, A_max]
    valid = new._normalize_inputs(case.features, case.masks, case.hidden).valid
    heads = new.action_space.num_heads
    actions = torch.zeros(batch, 1, heads, dtype=torch.int64)
    chosen = torch.zeros(batch, 1, heads)
    value = torch.zeros(batch, 1)
    calls: dict[str, Callable[[], object]] = {
        "old": functools.partial(old_get_action, bundles.old, case),
        "new": functools.partial(new_get_action, new, case),
        "unchecked": functools.partial(new_get_action, unchecked, case),
        "network": functools.partial(network_step, new, step_features, case),
        "normalize": functools.partial(
            new._normalize_inputs, case.features, case.masks, case.hidden
        ),
        "mask_and_sample": functools.partial(_mask_and_sample, logits, valid, layout),
        "results": functools.partial(
            ActionResult.from_packed, actions, chosen, value, case.hidden, True
        ),
    }
    medians = {name: t.median_us for name, t in time_interleaved(calls, settings).items()}
    medians["value_checks"] = max(medians["new"] - medians.pop("unchecked"), 0.0)
    return medians


def training_parts(
    bundles: Bundles, batch: int, steps: int, settings: Settings
) -> dict[str, float]:
    """Median µs of a training step of both designs and of the new step's parts."""
    new, unchecked = bundles.new, bundles.new_unchecked
    generator = torch.Generator().manual_seed(batch * steps)
    case = make_case(new, (batch, steps), FEATURE_DIM, generator, with_actions=True)
    assert case.actions is not None
    layout = HeadLayout(new.action_space, new.device)
    logits = network_step(new, case.features, case)[0]  # [B, T, H, A_max]
    valid = new._normalize_inputs(case.features, case.masks, case.hidden).valid
    actions = torch.stack([case.actions[head] for head in HEAD_NAMES], -1)  # [B, T, H]
    with torch.no_grad():
        scored = new.evaluate_actions(case.features, case.actions, case.masks, case.hidden)

    calls: dict[str, Callable[[], object]] = {
        "old": functools.partial(old_training_step, bundles.old, case),
        "new": functools.partial(new_training_step, new, case),
        "network": functools.partial(network_training_step, new, case),
        "normalize": functools.partial(
            new._normalize_inputs, case.features, case.masks, case.hidden, case.actions
        ),
        "forward_on": functools.partial(_evaluate_no_grad, new, case),
        "forward_off": functools.partial(_evaluate_no_grad, unchecked, case),
        "scoring": functools.partial(_scoring, logits, valid, actions, layout),
        "ppo_loss": functools.partial(_loss_alone, scored),
    }
    medians = {name: t.median_us for name, t in time_interleaved(calls, settings).items()}
    medians["value_checks"] = max(medians.pop("forward_on") - medians.pop("forward_off"), 0.0)
    return medians


def _print_case(title: str, target: float, medians: dict[str, float]) -> None:
    medians = dict(medians)
    old, new = medians.pop("old"), medians.pop("new")
    budget = target * old
    required = sum(medians.values())
    print(f"\n{title}: target new/old <= {target:.2f}")
    print(f"  seed design {old:9.1f} µs, budget {budget:9.1f} µs, new step {new:9.1f} µs")
    for name, value in medians.items():
        print(f"  {name:<18s} {value:9.1f} µs")
    verdict = "over" if required > budget else "within"
    print(f"  required parts {required:9.1f} µs = {required / old:.3f} of old, {verdict} budget")


def main(argv: list[str] | None = None) -> int:
    """Measure and print each case's budget and parts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    with single_thread():
        info = machine_info(torch.device("cpu"))
        torch.manual_seed(0)
        bundles = build_bundles(FEATURE_DIM, torch.device("cpu"))
        print(
            f"{info['processor']}, torch {info['torch']}, {info['threads']} thread, "
            f"commit {git_commit()}, {settings.mode} ({settings.repeats} repeats)"
        )
        for batch, target in STEP_TARGETS.items():
            _print_case(f"get_action B={batch}", target, step_parts(bundles, batch, settings))
        for (batch, steps), target in TRAIN_TARGETS.items():
            if args.quick and (batch, steps) != (8, 16):
                continue
            medians = training_parts(bundles, batch, steps, settings)
            _print_case(f"training step B={batch}, T={steps}", target, medians)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
