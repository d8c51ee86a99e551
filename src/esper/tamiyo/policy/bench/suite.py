"""`esper-policy bench`: the seed design (old) against `LSTMPolicyBundle` (new).

Both run in one process, with the same sizes and the same weights (the replica's,
copied with `transplant_weights`, so they compute the same function), on the same
inputs, with one torch thread, interleaved within every repeat (`harness`). Measured:

1. input normalization alone at B=1: the seed design's per-call closure (the
   baseline), the module-level `_expand_mask` helper the original code review
   proposed, and `PolicyBundle._normalize_inputs` (every argument checked, features
   to `[B, T, F]`, masks packed to `[B, T, H, A_max]`), alone and followed by the
   value checks `_prepare` adds before the compute path;
2. `get_action` for one step at several batch sizes;
3. `evaluate_actions` forward and backward, a PPO-like training step;
4. the op-first hierarchy against the flat space, same weights and inputs;
5. the share of a new `get_action` step at B=1 spent in `_normalize_inputs`, the
   value checks and shaping the results;
6. the peak memory of the training step (`memory`);
7. probability floors on two heads against none, same weights and inputs (`floors`);
8. the LSTM's blueprint embedding (the extra input `blueprint_indices`) against
   features alone (`blueprints`);
9. with `compile=True`, a new bundle compiled with `PolicyBundle.compile`, and
   section 7's floors with both bundles compiled.

Sections 2 and 3 also time the seed design with `torch.distributions` validation
off, and the new bundle's network alone (`network_step`, `network_training_step`):
no input checks, masking, sampling or scoring, so `network/old` is the eager
floor under any step that computes the same function with the same weights.

Then it says whether each performance target is met. Timings are medians of
repeats; compare them only within one run.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from esper.tamiyo.policy.action_space import HEAD_NAMES, ActionSpace
from esper.tamiyo.policy.base import PolicyBundle
from esper.tamiyo.policy.bench.harness import (
    Settings,
    Timing,
    git_commit,
    machine_info,
    no_sync,
    single_thread,
    time_interleaved,
)
from esper.tamiyo.policy.bench.memory import peak_bytes
from esper.tamiyo.policy.bench.report import (
    Comparison,
    Report,
    Share,
    Target,
    format_report,
    write_json,
)
from esper.tamiyo.policy.bench.seed_design import (
    MaskKwargs,
    SeedLSTMBundle,
    mask_kwargs,
    transplant_weights,
)
from esper.tamiyo.policy.inputs import HiddenState
from esper.tamiyo.policy.lstm import LSTMPolicyBundle
from esper.tamiyo.policy.masks import ActionMasks
from esper.tamiyo.policy.outputs import ActionResult
from esper.tamiyo.policy.testing import random_masks

__all__ = [
    "FULL",
    "QUICK",
    "SECTIONS",
    "BenchOptions",
    "normalize_closure",
    "normalize_module_helper",
    "run_bench",
    "run_suite",
]

FULL = Settings(mode="full", repeats=21, target_block_s=0.02, warmup_calls=20)
"""Settings of a full run: about a minute on a small machine."""

QUICK = Settings(mode="quick", repeats=5, target_block_s=0.002, warmup_calls=2)
"""Settings of a `--quick` run: a smoke test of a few seconds."""

SECTIONS: dict[str, str] = {
    "normalize": "1. Input normalization at B=1; old: the seed design's per-call closure\n"
    "   (2-D: features [B, F], masks [B, A_h]; 3-D: features [B, 1, F], masks [B, 1, A_h])",
    "get_action": "2. get_action, one step (features [B, F])",
    "evaluate": "3. evaluate_actions forward + backward (features [B, T, F])",
    "hierarchy": "4. Op-first hierarchy; old: the new bundle on the flat ActionSpace(); new: the\n"
    "   same weights on ActionSpace.tamiyo() with per-op slot masks (slot_by_op), or with the\n"
    "   flat masks alone (the two stages and the rule, without the per-op masks' checks)",
    "share": "5. Share of a new get_action step at B=1 (µs, % of the step)",
    "memory": "6. Peak memory of the training step of section 3",
    "floors": "7. Probability floors; old: the new bundle without floors; new: the same weights\n"
    "   with floors on two heads (op 0.15, blueprint 0.12), flat and on ActionSpace.tamiyo()",
    "blueprints": "8. Blueprint embedding; old: the new bundle on features alone; new: the same\n"
    "   bundle with blueprint_embed_dim=4, taking blueprint_indices [B, 3] as an extra input",
    "compile": "9. New bundle compiled with PolicyBundle.compile (--compile)",
}
"""Section key to the title printed above its table, in print order."""

ENTROPY_COEF = 0.01
"""Weight of the entropy bonus in the benchmark's PPO-like loss."""

MaskTuple = tuple[torch.Tensor | None, ...]
"""The eight masks in `HEAD_NAMES` order."""


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What to measure and where to write it.

    Attributes:
        quick: A smoke run of seconds: few repeats, B in (1, 32), one training shape.
        repeats: Overrides the repeats of the mode when set.
        device: `cpu` or `cuda`.
        compile: Also measure a bundle compiled with `PolicyBundle.compile`.
        feature_dim: `F`.
        json_path: Where to write the JSON report, or `None`.
        compile_kwargs: Passed to `PolicyBundle.compile`.
    """

    quick: bool = False
    repeats: int | None = None
    device: str = "cpu"
    compile: bool = False
    feature_dim: int = 32
    json_path: Path | None = None
    compile_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        """The timing settings of the mode, with `repeats` applied."""
        base = QUICK if self.quick else FULL
        return base if self.repeats is None else dataclasses.replace(base, repeats=self.repeats)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Batch sizes of the `get_action` section."""
        return (1, 32) if self.quick else (1, 8, 32, 256)

    @property
    def train_shapes(self) -> tuple[tuple[int, int], ...]:
        """`(B, T)` of the training-step sections."""
        return ((8, 16),) if self.quick else ((8, 16), (32, 32))


# ------------------------------------------------------------------ the normalizations


def normalize_closure(
    features: torch.Tensor,
    *,
    slot_mask: torch.Tensor | None = None,
    blueprint_mask: torch.Tensor | None = None,
    style_mask: torch.Tensor | None = None,
    tempo_mask: torch.Tensor | None = None,
    alpha_target_mask: torch.Tensor | None = None,
    alpha_speed_mask: torch.Tensor | None = None,
    alpha_curve_mask: torch.Tensor | None = None,
    op_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MaskTuple]:
    """The seed design's normalization (`SeedLSTMBundle.forward`), verbatim: the baseline.

    Args:
        features: `[B, F]` or `[B, 1, F]`.
        slot_mask: `[B, A]` or `[B, 1, A]`, or `None`; likewise the other seven.
        blueprint_mask: As `slot_mask`.
        style_mask: As `slot_mask`.
        tempo_mask: As `slot_mask`.
        alpha_target_mask: As `slot_mask`.
        alpha_speed_mask: As `slot_mask`.
        alpha_curve_mask: As `slot_mask`.
        op_mask: As `slot_mask`.

    Returns:
        Features `[B, 1, F]` and the masks `[B, 1, A]` in `HEAD_NAMES` order.
    """
    need_expand = features.dim() == 2
    if need_expand:
        features = features.unsqueeze(1)

    # ON PURPOSE: the per-call closure of finding B10-PT-06, the "before" being measured.
    def expand_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None:
            return None
        if need_expand and mask.dim() == 2:
            return mask.unsqueeze(1)
        return mask

    slot_mask = expand_mask(slot_mask)
    blueprint_mask = expand_mask(blueprint_mask)
    style_mask = expand_mask(style_mask)
    tempo_mask = expand_mask(tempo_mask)
    alpha_target_mask = expand_mask(alpha_target_mask)
    alpha_speed_mask = expand_mask(alpha_speed_mask)
    alpha_curve_mask = expand_mask(alpha_curve_mask)
    op_mask = expand_mask(op_mask)
    return features, (
        slot_mask,
        blueprint_mask,
        style_mask,
        tempo_mask,
        alpha_target_mask,
        alpha_speed_mask,
        alpha_curve_mask,
        op_mask,
    )


def _expand_mask(mask: torch.Tensor | None, need_expand: bool) -> torch.Tensor | None:
    """The finding's proposed module-level helper: add a `T` axis of 1 to a 2-D mask."""
    if mask is None:
        return None
    if need_expand and mask.dim() == 2:
        return mask.unsqueeze(1)
    return mask


def normalize_module_helper(
    features: torch.Tensor,
    *,
    slot_mask: torch.Tensor | None = None,
    blueprint_mask: torch.Tensor | None = None,
    style_mask: torch.Tensor | None = None,
    tempo_mask: torch.Tensor | None = None,
    alpha_target_mask: torch.Tensor | None = None,
    alpha_speed_mask: torch.Tensor | None = None,
    alpha_curve_mask: torch.Tensor | None = None,
    op_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MaskTuple]:
    """`normalize_closure` with the finding's fix: the module-level `_expand_mask`.

    Args:
        features: `[B, F]` or `[B, 1, F]`.
        slot_mask: `[B, A]` or `[B, 1, A]`, or `None`; likewise the other seven.
        blueprint_mask: As `slot_mask`.
        style_mask: As `slot_mask`.
        tempo_mask: As `slot_mask`.
        alpha_target_mask: As `slot_mask`.
        alpha_speed_mask: As `slot_mask`.
        alpha_curve_mask: As `slot_mask`.
        op_mask: As `slot_mask`.

    Returns:
        Features `[B, 1, F]` and the masks `[B, 1, A]` in `HEAD_NAMES` order.
    """
    need_expand = features.dim() == 2
    if need_expand:
        features = features.unsqueeze(1)
    return features, (
        _expand_mask(slot_mask, need_expand),
        _expand_mask(blueprint_mask, need_expand),
        _expand_mask(style_mask, need_expand),
        _expand_mask(tempo_mask, need_expand),
        _expand_mask(alpha_target_mask, need_expand),
        _expand_mask(alpha_speed_mask, need_expand),
        _expand_mask(alpha_curve_mask, need_expand),
        _expand_mask(op_mask, need_expand),
    )


# ------------------------------------------------------------------ bundles and inputs


@dataclass(frozen=True, slots=True)
class Bundles:
    """The designs under comparison, all with the replica's weights.

    Attributes:
        old: The seed design's replica.
        new: `LSTMPolicyBundle`, `check_values=True` (the default).
        new_unchecked: `LSTMPolicyBundle`, `check_values=False`.
    """

    old: SeedLSTMBundle
    new: LSTMPolicyBundle
    new_unchecked: LSTMPolicyBundle


@dataclass(frozen=True, slots=True)
class Case:
    """Inputs of one measurement, built once, as a caller holds them.

    Attributes:
        features: `[B, F]`, `[B, 1, F]` or `[B, T, F]`.
        masks: Random masks with a valid action in every row, shaped like `features`.
        old_masks: The same masks as the seed design's keyword arguments.
        hidden: Zero `(h, c)` for `B` episodes.
        actions: Valid actions under `masks`, `[B, T]` per head, for training steps.
        extras: The extra inputs of a bundle that declares some, shaped like the masks.
    """

    features: torch.Tensor
    masks: ActionMasks
    old_masks: MaskKwargs
    hidden: HiddenState
    actions: dict[str, torch.Tensor] | None = None
    extras: dict[str, torch.Tensor] | None = None


def matching_bundle(old: SeedLSTMBundle) -> LSTMPolicyBundle:
    """An `LSTMPolicyBundle` of `old`'s sizes holding `old`'s weights (both on the CPU)."""
    bundle = LSTMPolicyBundle(
        old.feature_dim,
        hidden_dim=old.hidden_dim,
        embed_dim=old.embed_dim,
        num_layers=old.num_layers,
        action_space=old.action_space,
    )
    transplant_weights(old, bundle)
    return bundle


def build_bundles(feature_dim: int, device: torch.device) -> Bundles:
    """The replica and two new bundles with its weights, moved to `device`."""
    old = SeedLSTMBundle(feature_dim)
    new, unchecked = matching_bundle(old), matching_bundle(old)
    unchecked.check_values = False
    old.network.to(device)
    return Bundles(old, new.to(device), unchecked.to(device))


def make_case(
    bundle: PolicyBundle,
    lead: tuple[int, ...],
    feature_dim: int,
    generator: torch.Generator,
    *,
    with_actions: bool = False,
) -> Case:
    """Random inputs of leading shape `lead` (`(B,)`, `(B, 1)` or `(B, T)`).

    Args:
        bundle: Gives the hidden state and, with `with_actions`, samples the actions.
        lead: Leading shape of features and masks.
        feature_dim: `F`.
        generator: Source of the features and masks.
        with_actions: Also sample valid actions under the masks.

    Returns:
        The case, on the bundle's device.
    """
    device = bundle.device
    features = torch.randn(*lead, feature_dim, generator=generator).to(device)
    masks = random_masks(lead, generator=generator).to(device)
    hidden = bundle.initial_hidden(lead[0])
    assert hidden is not None  # both designs are recurrent
    actions = bundle.get_action(features, masks, hidden).action if with_actions else None
    return Case(features, masks, mask_kwargs(masks), hidden, actions)


# ------------------------------------------------------------------ what is timed


@contextmanager
def _distribution_validation(enabled: bool) -> Iterator[None]:
    """`torch.distributions` argument validation set for the block, then restored.

    Set explicitly on every call of the seed design: PyTorch validates by default, but
    the first `torch.compile` in a process switches validation off for good
    (`torch._dynamo` does so when it loads), which would change the baseline mid-run.
    """
    before = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(enabled)
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(before)


def old_get_action(bundle: SeedLSTMBundle, case: Case) -> object:
    """One `get_action` of the seed design on `case`, as it ran: validation on."""
    with _distribution_validation(True):
        return bundle.get_action(case.features, case.hidden, **case.old_masks)


def old_get_action_unvalidated(bundle: SeedLSTMBundle, case: Case) -> object:
    """`old_get_action` with `torch.distributions` argument validation off.

    The seed design ran with PyTorch's default, validation on (off only under
    `python -O`); this variant shows how much of its time that validation is.
    """
    with _distribution_validation(False):
        return bundle.get_action(case.features, case.hidden, **case.old_masks)


def new_get_action(bundle: PolicyBundle, case: Case) -> object:
    """One `get_action` of a new bundle on `case`."""
    return bundle.get_action(case.features, case.masks, case.hidden, extras=case.extras)


def network_step(
    bundle: LSTMPolicyBundle, features: torch.Tensor, case: Case
) -> tuple[torch.Tensor, torch.Tensor, HiddenState, torch.Tensor | None]:
    """The network of `bundle` alone, without gradients: the eager floor under `get_action`.

    Args:
        bundle: Whose network runs.
        features: `case.features` as the network takes them, `[B, T, F]` (a step is
            `T = 1`), shaped once by the caller so no reshape is timed.
        case: Gives the hidden state.

    Returns:
        What the network returns: logits `[B, T, H, A_max]`, value `[B, T]`, the new
        hidden state and the per-op logits or `None`.
    """
    with torch.no_grad():
        out: tuple[torch.Tensor, torch.Tensor, HiddenState, torch.Tensor | None]
        out = bundle.network(features, case.hidden)
    return out


def ppo_loss(
    log_prob: Mapping[str, torch.Tensor],
    entropy: Mapping[str, torch.Tensor],
    value: torch.Tensor,
) -> torch.Tensor:
    """`-sum(log_prob means) - 0.01 * sum(entropy means) + mean(value^2)`: a PPO-like loss."""
    loss = value.square().mean()
    for head in HEAD_NAMES:
        loss = loss - log_prob[head].mean() - ENTROPY_COEF * entropy[head].mean()
    return loss


def old_training_step(bundle: SeedLSTMBundle, case: Case, *, validate: bool = True) -> None:
    """Zero the gradients, then `evaluate_actions` and backward, seed design.

    `validate` sets `torch.distributions` argument validation: on as the seed design
    ran, off for the strongest baseline it could have run as.
    """
    assert case.actions is not None
    bundle.network.zero_grad(set_to_none=True)
    with _distribution_validation(validate):
        out = bundle.evaluate_actions(case.features, case.actions, case.hidden, **case.old_masks)
    torch.autograd.backward(ppo_loss(out.log_prob, out.entropy, out.value))


def new_training_step(bundle: PolicyBundle, case: Case) -> None:
    """Zero the gradients, then `evaluate_actions` and backward, new bundle."""
    assert case.actions is not None
    bundle.network.zero_grad(set_to_none=True)
    out = bundle.evaluate_actions(case.features, case.actions, case.masks, case.hidden)
    torch.autograd.backward(ppo_loss(out.log_prob, out.entropy, out.value))


def network_training_step(bundle: LSTMPolicyBundle, case: Case) -> None:
    """The network of `bundle` forward and backward alone: the eager floor under a training step.

    The backward starts from the sum of every logit and the value, so it reaches every
    weight a PPO loss reaches, through the same kernels.
    """
    bundle.network.zero_grad(set_to_none=True)
    logits, value, _, _ = bundle.network(case.features, case.hidden)
    torch.autograd.backward(logits.sum() + value.sum())


# ------------------------------------------------------------------ the sections


@dataclass(frozen=True, slots=True)
class Context:
    """What every section needs.

    Attributes:
        bundles: The designs compared.
        settings: Timing settings.
        options: The run's options.
        device: Where everything computes.
        sync: Waits for the device.
        generator: Source of every random input.
    """

    bundles: Bundles
    settings: Settings
    options: BenchOptions
    device: torch.device
    sync: Callable[[], None]
    generator: torch.Generator


def _timed_row(key: str, section: str, name: str, old: Timing, new: Timing) -> Comparison:
    return Comparison(key, section, name, "us", old.median_us, new.median_us, None, old, new)


def describe_error(error: BaseException, lines: int = 2, limit: int = 400) -> str:
    """`Type: message`, its first non-empty `lines` lines joined, at most `limit` characters."""
    kept: list[str] = []
    for line in str(error).splitlines():
        if line.strip() and len(kept) < lines:
            kept.append(line.strip())
    return f"{type(error).__name__}: {' | '.join(kept)}"[:limit]


def _failed_row(key: str, section: str, name: str, error: str, detail: str = "") -> Comparison:
    return Comparison(key, section, name, "us", None, None, error, error_detail=detail or error)


_NORMALIZE_FORMS = (("2d", "2-D", (1,)), ("3d", "3-D", (1, 1)))
_NORMALIZE_OPTIONS = (
    ("helper", "module-level _expand_mask helper"),
    ("normalize", "_normalize_inputs (checks, mask packing)"),
    ("checked", "_normalize_inputs + value checks"),
)


def measure_normalization(ctx: Context) -> list[Comparison]:
    """Section 1: each normalization against the closure, 2-D and 3-D inputs, B=1."""
    rows: list[Comparison] = []
    new = ctx.bundles.new
    for form, label_form, lead in _NORMALIZE_FORMS:
        case = make_case(new, lead, ctx.options.feature_dim, ctx.generator)
        calls: dict[str, Callable[[], object]] = {
            "closure": functools.partial(normalize_closure, case.features, **case.old_masks),
            "helper": functools.partial(normalize_module_helper, case.features, **case.old_masks),
            "normalize": functools.partial(
                new._normalize_inputs, case.features, case.masks, case.hidden
            ),
            "checked": functools.partial(new._prepare, case.features, case.masks, case.hidden),
        }
        timings = time_interleaved(calls, ctx.settings, ctx.sync)
        for option, label in _NORMALIZE_OPTIONS:
            name = f"{label_form}: {label}"
            key = f"normalize/{form}/{option}"
            rows.append(_timed_row(key, "normalize", name, timings["closure"], timings[option]))
    return rows


def measure_get_action(ctx: Context) -> list[Comparison]:
    """Section 2: `get_action` at T=1 for each batch size, new with checks on and off.

    Also against the seed design with `torch.distributions` validation off, the
    strongest baseline it could have run as, and the new network alone, the floor.
    """
    rows: list[Comparison] = []
    bundles = ctx.bundles
    for batch in ctx.options.batch_sizes:
        case = make_case(bundles.new, (batch,), ctx.options.feature_dim, ctx.generator)
        step_features = case.features.unsqueeze(1)  # [B, 1, F]
        calls: dict[str, Callable[[], object]] = {
            "old": functools.partial(old_get_action, bundles.old, case),
            "old_lax": functools.partial(old_get_action_unvalidated, bundles.old, case),
            "new": functools.partial(new_get_action, bundles.new, case),
            "unchecked": functools.partial(new_get_action, bundles.new_unchecked, case),
            "network": functools.partial(network_step, bundles.new, step_features, case),
        }
        timings = time_interleaved(calls, ctx.settings, ctx.sync)
        key = f"get_action/B={batch}"
        old = timings["old"]
        rows.append(_timed_row(key, "get_action", f"B={batch}", old, timings["new"]))
        name = f"B={batch}, check_values=False"
        rows.append(_timed_row(f"{key}/unchecked", "get_action", name, old, timings["unchecked"]))
        name = f"B={batch}, old without torch.distributions validation"
        rows.append(
            _timed_row(
                f"{key}/old_unvalidated", "get_action", name, timings["old_lax"], timings["new"]
            )
        )
        rows.append(_network_row(key, "get_action", f"B={batch}", old, timings["network"]))
    return rows


def _network_row(key: str, section: str, name: str, old: Timing, network: Timing) -> Comparison:
    """The row of the new network alone against the old design's whole call."""
    return _timed_row(
        f"{key}/network", section, f"{name}, the new network alone (the floor)", old, network
    )


HIERARCHY_LIMIT = 1.10
"""The most a hierarchical call may cost against the flat one (issue 13)."""


def hierarchical_case(case: Case, generator: torch.Generator) -> Case:
    """`case` under Tamiyo's hierarchy: the same inputs plus random per-op slot masks.

    Every row of `slot_by_op` shares a slot with the flat slot mask, so no (op, row) is
    void; sampled actions, when `case` has them, are resampled by the caller.
    """
    masks = case.masks
    assert masks.slot is not None  # random_masks masks every head
    lead = masks.slot.shape[:-1]
    space = ActionSpace.tamiyo()
    per_op = torch.rand(*lead, space.op, space.slot, generator=generator) < 0.5
    per_op = per_op.to(masks.slot.device) | masks.slot.unsqueeze(-2)  # [*lead, N_op, S]
    return replace(case, masks=replace(masks, slot_by_op=per_op))


def rebuilt(bundle: LSTMPolicyBundle, **changes: Any) -> LSTMPolicyBundle:
    """A bundle built from `bundle.config` with `changes`, holding `bundle`'s weights."""
    twin = LSTMPolicyBundle(**{**bundle.config, **changes}).to(bundle.device)
    twin.load_state_dict(bundle.state_dict())
    return twin


def hierarchical_bundle(flat: LSTMPolicyBundle) -> LSTMPolicyBundle:
    """`flat`'s weights on `ActionSpace.tamiyo()` (the layouts are the same)."""
    return rebuilt(flat, action_space=ActionSpace.tamiyo())


def measure_hierarchy(ctx: Context, cases: Mapping[tuple[int, int], Case]) -> list[Comparison]:
    """Section 4: the hierarchical paths against the flat ones, same weights and inputs.

    `get_action` at B=1 and B=32, and the training step at the first training shape,
    each with the flat masks of the other sections plus per-op slot masks; `get_action`
    also with the flat masks alone, which times the two stages and the hierarchy's rule
    apart from the per-op masks' own checking, packing and gathering.
    """
    rows: list[Comparison] = []
    flat = ctx.bundles.new
    tiered = hierarchical_bundle(flat)
    for batch in (1, 32):
        case = make_case(flat, (batch,), ctx.options.feature_dim, ctx.generator)
        calls = {
            "flat": functools.partial(new_get_action, flat, case),
            "tiered": functools.partial(
                new_get_action, tiered, hierarchical_case(case, ctx.generator)
            ),
            "tiered_flat_masks": functools.partial(new_get_action, tiered, case),
        }
        timings = time_interleaved(calls, ctx.settings, ctx.sync)
        name = f"get_action, B={batch}"
        key = f"hierarchy/get_action/B={batch}"
        rows.append(_timed_row(key, "hierarchy", name, timings["flat"], timings["tiered"]))
        rows.append(
            _timed_row(
                f"{key}/flat_masks",
                "hierarchy",
                f"{name}, flat masks alone",
                timings["flat"],
                timings["tiered_flat_masks"],
            )
        )
    (batch, steps), case = next(iter(cases.items()))
    tiered_case = hierarchical_case(case, ctx.generator)
    actions = tiered.get_action(tiered_case.features, tiered_case.masks, case.hidden).action
    tiered_case = replace(tiered_case, actions=actions)
    steps_calls: dict[str, Callable[[], object]] = {
        "flat": functools.partial(new_training_step, flat, case),
        "tiered": functools.partial(new_training_step, tiered, tiered_case),
    }
    timings = time_interleaved(steps_calls, ctx.settings, ctx.sync)
    name = f"evaluate_actions fwd+bwd, B={batch}, T={steps}"
    key = f"hierarchy/evaluate/B={batch},T={steps}"
    rows.append(_timed_row(key, "hierarchy", name, timings["flat"], timings["tiered"]))
    return rows


FLOORS_LIMIT = 1.05
"""The most floors on two heads may cost against none (issue 15)."""

BENCH_FLOORS = {"op": 0.15, "blueprint": 0.12}
"""The floors of section 7: the defaults of the system Tamiyo comes from, on two heads."""


def floored_bundle(bundle: LSTMPolicyBundle) -> LSTMPolicyBundle:
    """`bundle`'s weights and space, with `BENCH_FLOORS`."""
    return rebuilt(bundle, probability_floor=BENCH_FLOORS)


def measure_floors(ctx: Context) -> list[Comparison]:
    """Section 7: `get_action` at B=1 and B=32 with floors on two heads against none.

    Flat (the bundle of section 2) and hierarchical (section 4's, per-op slot masks),
    where a floor on the op also changes the op's own stage.
    """
    rows: list[Comparison] = []
    flat = ctx.bundles.new
    tiered = hierarchical_bundle(flat)
    bundles = {"flat": (flat, floored_bundle(flat)), "tamiyo": (tiered, floored_bundle(tiered))}
    for batch in (1, 32):
        case = make_case(flat, (batch,), ctx.options.feature_dim, ctx.generator)
        cases = {"flat": case, "tamiyo": hierarchical_case(case, ctx.generator)}
        calls: dict[str, Callable[[], object]] = {}
        for space, (plain, floored) in bundles.items():
            calls[f"{space}/plain"] = functools.partial(new_get_action, plain, cases[space])
            calls[f"{space}/floored"] = functools.partial(new_get_action, floored, cases[space])
        timings = time_interleaved(calls, ctx.settings, ctx.sync)
        for space in bundles:
            key = f"floors/get_action/B={batch}" + ("" if space == "flat" else "/tamiyo")
            name = f"get_action, B={batch}" + ("" if space == "flat" else ", ActionSpace.tamiyo()")
            old, new = timings[f"{space}/plain"], timings[f"{space}/floored"]
            rows.append(_timed_row(key, "floors", name, old, new))
    return rows


BENCH_BLUEPRINT_EMBED_DIM = 4
"""Section 8's embedding width per slot: the host system's."""


def measure_blueprints(ctx: Context) -> list[Comparison]:
    """Section 8: `get_action` at B=1 and B=32 with the blueprint embedding against none.

    The same sizes (section 2's bundle, and its twin with `blueprint_embed_dim`), the
    same features and masks; the twin also takes each slot's blueprint, random in
    `[-1, 13)`, as its extra input: the embedding, its join to the features, and the
    input's checks (with the value check, one more reduction in the same sync).
    """
    rows: list[Comparison] = []
    plain = ctx.bundles.new
    embedding = LSTMPolicyBundle(
        **{**plain.config, "blueprint_embed_dim": BENCH_BLUEPRINT_EMBED_DIM}
    ).to(ctx.device)
    slots, blueprints = plain.action_space.slot, plain.action_space.blueprint
    for batch in (1, 32):
        case = make_case(plain, (batch,), ctx.options.feature_dim, ctx.generator)
        indices = torch.randint(-1, blueprints, (batch, slots), generator=ctx.generator)
        with_blueprints = replace(case, extras={"blueprint_indices": indices.to(ctx.device)})
        calls: dict[str, Callable[[], object]] = {
            "plain": functools.partial(new_get_action, plain, case),
            "embedding": functools.partial(new_get_action, embedding, with_blueprints),
        }
        timings = time_interleaved(calls, ctx.settings, ctx.sync)
        name = f"get_action, B={batch}"
        key = f"blueprints/get_action/B={batch}"
        rows.append(_timed_row(key, "blueprints", name, timings["plain"], timings["embedding"]))
    return rows


def training_cases(ctx: Context) -> dict[tuple[int, int], Case]:
    """One case per `(B, T)` of the training sections, with sampled valid actions."""
    cases: dict[tuple[int, int], Case] = {}
    for batch, steps in ctx.options.train_shapes:
        cases[batch, steps] = make_case(
            ctx.bundles.new,
            (batch, steps),
            ctx.options.feature_dim,
            ctx.generator,
            with_actions=True,
        )
    return cases


def measure_training(ctx: Context, cases: Mapping[tuple[int, int], Case]) -> list[Comparison]:
    """Section 3: `evaluate_actions` forward and backward for each `(B, T)`.

    Also against the seed design with `torch.distributions` validation off, and the
    new network alone forward and backward, the floor.
    """
    rows: list[Comparison] = []
    bundles = ctx.bundles
    for (batch, steps), case in cases.items():
        calls = {
            "old": functools.partial(old_training_step, bundles.old, case),
            "old_lax": functools.partial(old_training_step, bundles.old, case, validate=False),
            "new": functools.partial(new_training_step, bundles.new, case),
            "network": functools.partial(network_training_step, bundles.new, case),
        }
        timings = time_interleaved(calls, ctx.settings, ctx.sync)
        name = f"B={batch}, T={steps}"
        key = f"evaluate/B={batch},T={steps}"
        old = timings["old"]
        rows.append(_timed_row(key, "evaluate", name, old, timings["new"]))
        lax = f"{name}, old without torch.distributions validation"
        rows.append(
            _timed_row(
                f"{key}/old_unvalidated", "evaluate", lax, timings["old_lax"], timings["new"]
            )
        )
        rows.append(_network_row(key, "evaluate", name, old, timings["network"]))
    return rows


_SHARE_PARTS = (
    ("step", "whole get_action step"),
    ("normalize", "_normalize_inputs (with mask packing)"),
    ("values", "value checks (one sync)"),
    ("shape", "shaping the results"),
)


def measure_shares(ctx: Context) -> list[Share]:
    """Section 5: a B=1 step and what it spends before and after the compute path.

    `_normalize_inputs` (with the mask packing) and the value checks are what
    `_prepare` runs before the compute path; the checks are timed as the difference
    `_prepare` (checks on) - `_normalize_inputs`.
    """
    new, unchecked = ctx.bundles.new, ctx.bundles.new_unchecked
    case = make_case(new, (1,), ctx.options.feature_dim, ctx.generator)
    heads = len(HEAD_NAMES)
    actions = torch.zeros(1, 1, heads, dtype=torch.int64, device=ctx.device)
    chosen = torch.zeros(1, 1, heads, device=ctx.device)
    value = torch.zeros(1, 1, device=ctx.device)
    calls: dict[str, Callable[[], object]] = {
        "step/on": functools.partial(new_get_action, new, case),
        "step/off": functools.partial(new_get_action, unchecked, case),
        "normalize": functools.partial(
            new._normalize_inputs, case.features, case.masks, case.hidden
        ),
        "prepare/on": functools.partial(new._prepare, case.features, case.masks, case.hidden),
        "shape": functools.partial(
            ActionResult.from_packed, actions, chosen, value, case.hidden, True
        ),
    }
    timings = time_interleaved(calls, ctx.settings, ctx.sync)
    normalize = timings["normalize"].median_us
    shares: list[Share] = []
    for checks, flag in (("on", True), ("off", False)):
        step = timings[f"step/{checks}"].median_us
        parts = {
            "step": step,
            "normalize": normalize,
            "values": max(timings["prepare/on"].median_us - normalize, 0.0) if flag else 0.0,
            "shape": timings["shape"].median_us,
        }
        for part, name in _SHARE_PARTS:
            shares.append(Share(f"{part}/checks_{checks}", name, flag, parts[part], step))
        both = parts["normalize"] + parts["shape"]
        name = "_normalize_inputs + shaping"
        shares.append(Share(f"overhead/checks_{checks}", name, flag, both, step))
    return shares


def measure_memory(ctx: Context, cases: Mapping[tuple[int, int], Case]) -> list[Comparison]:
    """Section 6: peak bytes of one training step, above what existed before it."""
    rows: list[Comparison] = []
    old, new = ctx.bundles.old, ctx.bundles.new
    for (batch, steps), case in cases.items():
        old_step = functools.partial(old_training_step, old, case)
        new_step = functools.partial(new_training_step, new, case)
        old_step()  # warm, then drop the gradients: new ones count, as in a real step
        new_step()
        old.network.zero_grad(set_to_none=True)
        new.network.zero_grad(set_to_none=True)
        old_bytes = peak_bytes(old_step, ctx.device)
        new_bytes = peak_bytes(new_step, ctx.device)
        name = f"B={batch}, T={steps}"
        key = f"memory/B={batch},T={steps}"
        rows.append(Comparison(key, "memory", name, "bytes", old_bytes, new_bytes))
    return rows


def compile_new_bundle(
    old: SeedLSTMBundle, device: torch.device, kwargs: Mapping[str, Any]
) -> PolicyBundle | str:
    """A new bundle with `old`'s weights, compiled; or why it could not be.

    Args:
        old: Whose sizes and weights to use.
        device: Where it computes.
        kwargs: For `PolicyBundle.compile`.

    Returns:
        The compiled bundle (what `compile` returns, or the bundle itself if that is
        not a bundle), or the error message.
    """
    bundle = matching_bundle(old).to(device)
    try:
        compiled = bundle.compile(**kwargs)
    except Exception as error:  # any failure of torch.compile is a result to report
        return describe_error(error)
    return compiled if isinstance(compiled, PolicyBundle) else bundle


def measure_compiled(ctx: Context, cases: Mapping[tuple[int, int], Case]) -> list[Comparison]:
    """Section 9: old, new eager and new compiled, interleaved; a failure is a failed row."""
    bundles = ctx.bundles
    compiled = compile_new_bundle(bundles.old, ctx.device, ctx.options.compile_kwargs)
    specs: list[tuple[str, str, Callable[[], object], Callable[[], object], Case]] = []
    for batch in (1, 32):
        case = make_case(bundles.new, (batch,), ctx.options.feature_dim, ctx.generator)
        old_call: Callable[[], object] = functools.partial(old_get_action, bundles.old, case)
        eager: Callable[[], object] = functools.partial(new_get_action, bundles.new, case)
        specs.append(
            (f"compile/get_action/B={batch}", f"get_action B={batch}", old_call, eager, case)
        )
    batch, steps = ctx.options.train_shapes[0]
    case = cases[batch, steps]
    old_call = functools.partial(old_training_step, bundles.old, case)
    eager = functools.partial(new_training_step, bundles.new, case)
    name = f"evaluate_actions fwd+bwd B={batch}, T={steps}"
    specs.append((f"compile/evaluate/B={batch},T={steps}", name, old_call, eager, case))
    rows: list[Comparison] = []
    for key, name, old, eager, spec_case in specs:
        if isinstance(compiled, str):
            rows.append(_failed_row(key, "compile", f"{name}, compiled", compiled))
            continue
        step = new_training_step if key.startswith("compile/evaluate") else new_get_action
        calls: dict[str, Callable[[], object]] = {
            "old": old,
            "eager": eager,
            "new": functools.partial(step, compiled, spec_case),
        }
        try:
            timings = time_interleaved(calls, ctx.settings, ctx.sync)
        except Exception as error:  # compilation happens at the first calls
            detail = describe_error(error, lines=40, limit=4000)
            rows.append(
                _failed_row(key, "compile", f"{name}, compiled", describe_error(error), detail)
            )
            continue
        rows.append(
            _timed_row(
                f"{key}/eager", "compile", f"{name}, eager", timings["old"], timings["eager"]
            )
        )
        rows.append(_timed_row(key, "compile", f"{name}, compiled", timings["old"], timings["new"]))
    return rows + measure_compiled_floors(ctx)


def measure_compiled_floors(ctx: Context) -> list[Comparison]:
    """Section 9, continued: section 7's floors, each bundle compiled; a failure is a row.

    Old: the compiled bundle without floors; new: compiled with `BENCH_FLOORS`. The
    floors' kernels fuse with the masking around them, so this is what floors cost a
    bundle that runs compiled.
    """
    rows: list[Comparison] = []
    flat = ctx.bundles.new
    spaces = {"flat": flat, "tamiyo": hierarchical_bundle(flat)}
    for batch in (1, 32):
        case = make_case(flat, (batch,), ctx.options.feature_dim, ctx.generator)
        cases = {"flat": case, "tamiyo": hierarchical_case(case, ctx.generator)}
        for space, bundle in spaces.items():
            key = f"compile/floors/get_action/B={batch}" + ("" if space == "flat" else "/tamiyo")
            name = f"floors on two heads, get_action B={batch}" + (
                "" if space == "flat" else ", ActionSpace.tamiyo()"
            )
            try:
                plain = rebuilt(bundle).compile(**ctx.options.compile_kwargs)
                floored = floored_bundle(bundle).compile(**ctx.options.compile_kwargs)
                calls: dict[str, Callable[[], object]] = {
                    "plain": functools.partial(new_get_action, plain, cases[space]),
                    "floored": functools.partial(new_get_action, floored, cases[space]),
                }
                timings = time_interleaved(calls, ctx.settings, ctx.sync)
            except Exception as error:  # compilation happens at the first calls
                detail = describe_error(error, lines=40, limit=4000)
                rows.append(
                    _failed_row(key, "compile", f"{name}, compiled", describe_error(error), detail)
                )
                continue
            rows.append(
                _timed_row(
                    key,
                    "compile",
                    f"{name}, compiled; old: no floors",
                    timings["plain"],
                    timings["floored"],
                )
            )
    return rows


# ------------------------------------------------------------------ targets


def _ratio_of(rows: list[Comparison], key: str) -> float | None:
    for row in rows:
        if row.key == key:
            return row.ratio
    return None


def _ratio_target(rows: list[Comparison], key: str, name: str, limit: float) -> Target:
    ratio = _ratio_of(rows, key)
    met = ratio is not None and ratio <= limit
    shown = "not measured" if ratio is None else f"new/old = {ratio:.3f}"
    floor = _ratio_of(rows, f"{key}/network")
    if floor is not None:
        shown += f"; the new network alone {floor:.3f}"
    return Target(key, name, f"new/old <= {limit:.2f}", ratio, limit, met, shown)


def _normalization_target(rows: list[Comparison]) -> Target:
    worst: float | None = None
    details: list[str] = []
    for option, label in (("normalize", "alone"), ("checked", "with value checks")):
        for form in ("2d", "3d"):
            ratio = _ratio_of(rows, f"normalize/{form}/{option}")
            details.append(f"{label} {form}: {'-' if ratio is None else f'{ratio:.2f}'}")
            if option == "normalize" and ratio is not None:
                worst = ratio if worst is None else max(worst, ratio)
    met = worst is not None and worst <= 1.0
    detail = (
        "new/old (closure = 1), " + ", ".join(details) + "; the target is _normalize_inputs alone"
    )
    name = "_normalize_inputs no slower than the closure (2-D and 3-D, B=1)"
    return Target("normalize", name, "new/old <= 1.00", worst, 1.0, met, detail)


def _share_target(shares: list[Share]) -> Target:
    found: dict[str, float] = {}
    details: list[str] = []
    for share in shares:
        if share.key.startswith("overhead/"):
            found[share.key] = share.share
            label = "checks on" if share.check_values else "checks off"
            details.append(
                f"{label}: {share.part_us:.1f} of {share.step_us:.1f} µs = {share.share:.1%}"
            )
    value = found.get("overhead/checks_on")
    met = value is not None and value <= 0.10
    name = "_normalize_inputs + shaping, share of a B=1 get_action step"
    detail = "; ".join(details) + "; the target uses checks on (the default)"
    return Target("overhead_share", name, "<= 10%", value, 0.10, met, detail, percent=True)


RATIO_TARGETS: tuple[tuple[str, str, float], ...] = (
    ("get_action/B=1", "get_action B=1", 0.12),
    ("get_action/B=32", "get_action B=32", 0.22),
    ("evaluate/B=8,T=16", "evaluate_actions fwd+bwd B=8, T=16", 0.50),
    ("evaluate/B=32,T=32", "evaluate_actions fwd+bwd B=32, T=32 (full run)", 0.60),
    ("memory/B=32,T=32", "peak memory of the training step B=32, T=32 (full run)", 1.00),
)
"""The second round's targets (issue 14), speed and memory: row key, name, largest new/old."""


def evaluate_targets(rows: list[Comparison], shares: list[Share]) -> list[Target]:
    """Where the performance targets stand: speed and memory, normalization, hierarchy."""
    return [
        *(_ratio_target(rows, key, name, limit) for key, name, limit in RATIO_TARGETS),
        _normalization_target(rows),
        _share_target(shares),
        *_section_targets(rows, "hierarchy", "hierarchical ", "hierarchical/flat", HIERARCHY_LIMIT),
        *_section_targets(
            rows, "floors", "floors on two heads, ", "floored/unfloored", FLOORS_LIMIT
        ),
    ]


def _section_targets(
    rows: list[Comparison], section: str, prefix: str, ratio: str, limit: float
) -> list[Target]:
    """Each row of `section` within `limit` of its baseline, `ratio` naming new/old."""
    targets: list[Target] = []
    for row in rows:
        if row.section == section:
            target = _ratio_target(rows, row.key, f"{prefix}{row.name}", limit)
            targets.append(
                replace(
                    target,
                    goal=f"{ratio} <= {limit:.2f}",
                    detail=target.detail.replace("new/old", ratio),
                )
            )
    return targets


# ------------------------------------------------------------------ the run


def _settings_json(options: BenchOptions, bundles: Bundles) -> dict[str, Any]:
    settings = options.settings
    old = bundles.old
    return {
        "mode": settings.mode,
        "repeats": settings.repeats,
        "target_block_s": settings.target_block_s,
        "warmup_calls": settings.warmup_calls,
        "device": options.device,
        "compile": options.compile,
        "compile_kwargs": {key: repr(value) for key, value in options.compile_kwargs.items()},
        "feature_dim": options.feature_dim,
        "hidden_dim": old.hidden_dim,
        "embed_dim": old.embed_dim,
        "num_layers": old.num_layers,
        "head_sizes": dict(zip(HEAD_NAMES, ActionSpace().sizes, strict=True)),
        "batch_sizes": list(options.batch_sizes),
        "train_shapes": [list(shape) for shape in options.train_shapes],
        "old": "SeedLSTMBundle (bench.seed_design replica)",
        "new": "LSTMPolicyBundle",
        "statistic": "median over interleaved repeats, µs per call",
    }


def run_suite(options: BenchOptions) -> Report:
    """Measure every section with one torch thread; restore the thread count and RNG.

    Args:
        options: What to measure.

    Returns:
        The report, targets included.
    """
    device = torch.device(options.device)
    sync: Callable[[], None] = no_sync
    if device.type == "cuda":
        sync = functools.partial(torch.cuda.synchronize, device)
    timestamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    fork_devices: list[int] | None = [] if device.type != "cuda" else None
    with single_thread(), torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(0)
        bundles = build_bundles(options.feature_dim, device)
        generator = torch.Generator().manual_seed(0)
        ctx = Context(bundles, options.settings, options, device, sync, generator)
        report = Report(
            machine_info(device),
            git_commit(),
            timestamp,
            _settings_json(options, bundles),
            dict(SECTIONS),
        )
        report.rows += measure_normalization(ctx)
        report.rows += measure_get_action(ctx)
        cases = training_cases(ctx)
        report.rows += measure_training(ctx, cases)
        report.rows += measure_hierarchy(ctx, cases)
        report.shares += measure_shares(ctx)
        report.rows += measure_memory(ctx, cases)
        report.rows += measure_floors(ctx)
        report.rows += measure_blueprints(ctx)
        if options.compile:
            report.rows += measure_compiled(ctx, cases)
    report.targets = evaluate_targets(report.rows, report.shares)
    return report


def run_bench(options: BenchOptions) -> int:
    """`esper-policy bench`: measure, print the tables, write the JSON if asked.

    Returns:
        The exit status, 0.
    """
    report = run_suite(options)
    print(format_report(report))
    if options.json_path is not None:
        write_json(report, options.json_path)
        print(f"\nWrote {options.json_path}")
    return 0
