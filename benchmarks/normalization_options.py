"""Time per call of four ways to normalize a policy bundle's inputs (the numbers of ADR 0002).

A code review found that the old LSTM policy bundle's `forward()` defined a helper
closure, `expand_mask`, on every call, to turn `[B, F]` features and eight `[B, A]`
action masks into `[B, 1, ...]`. This script measures what each candidate design
costs per call, so that the ADR compares the options by measurement, not by guess:

1. **per-call closure** (the old design): `expand_mask` is defined inside the
   function on every call and applied to the eight masks, given as keywords.
2. **module-level helper** (the review's suggested fix): the same, with
   `_expand_mask(mask, need_expand)` defined once at module level.
3. **Protocol + shared free function**: bundles satisfy a `typing.Protocol` (no
   runtime cost) and call a free function `normalize_inputs(features, masks)` that
   loops over the head names of a mask dict.
4. **abstract base (chosen)**: `PolicyBundle._prepare(features, masks, hidden)`
   (`_normalize_inputs`, then the mask packing and the value checks, which ADR 0002's
   `_normalize_inputs` did itself; ADR 0003 split them) on a real
   `LSTMPolicyBundle(feature_dim=64)`, with the masks as an
   `ActionMasks` and the hidden state from `initial_hidden(B)`. Measured twice: with
   `check_values=True` (the default: NaN/Inf features and void mask rows, checks that
   need a device sync) and with `check_values=False` (shape, dtype, key and device
   checks only). Option 4 does more work than 1-3: it validates shapes, dtypes, keys,
   devices and the hidden state, and packs the masks into one `[B, T, H, A_max]`
   tensor. Options 1-3 only unsqueeze.

For context it also times the bare cost of creating the closure (a `def` statement
in a loop, with a captured variable as in option 1), to show whether creating the
closure is what costs.

Every option runs with 2-D inputs (features `[B, 64]`, masks `[B, A_h]`) and with
already-3-D inputs (features `[B, 1, 64]`, masks `[B, 1, A_h]`), at B=1 and B=32.
Masks are random bool with at least one True per row; head sizes are
`ActionSpace().sizes` in `HEAD_NAMES` order. Inputs are built once, outside the
timed loops, as a caller would hold them.

Method: one torch thread (`torch.set_num_threads(1)`), CPU tensors. For each input
form and batch size, every option is warmed up and calibrated so that one block of
calls takes about the target time; then the options are interleaved round-robin
(each repeat times one block of every option, the starting option rotating), so
that drift in the machine's speed hits all options alike. The garbage collector is
off during a block, as in `timeit`. The reported figure is the median over repeats
of microseconds per call, with its ratio to option 1. Before timing, the script
checks that every option produces the same features and masks
(`check_equivalence`). The run time is set by the calibration, not by the machine's
speed: about 20-25 s in full mode and a few seconds with `--quick`, mostly importing torch.

Run it with `make bench-adr` (`python benchmarks/normalization_options.py`), or::

    .venv/bin/python benchmarks/normalization_options.py [--quick] [--json PATH]

`--json PATH` writes every figure with the machine's description (platform,
processor, Python, torch, thread count, git commit) so that a reader can tell which
machine produced the ADR's numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionMasks,
    ActionSpace,
    HiddenState,
    LSTMPolicyBundle,
    PolicyInputs,
)
from esper.tamiyo.policy.bench.harness import git_commit
from esper.tamiyo.policy.bench.harness import machine_info as harness_machine_info
from esper.tamiyo.policy.bench.suite import (
    MaskTuple,
    normalize_closure,
    normalize_module_helper,
)

FEATURE_DIM = 64
"""`F` of the benchmark's features."""

BATCH_SIZES: tuple[int, ...] = (1, 32)
"""Batch sizes measured."""

INPUT_FORMS: tuple[str, ...] = ("2d", "3d")
"""`2d`: features `[B, F]`, masks `[B, A_h]`; `3d`: features `[B, 1, F]`, masks `[B, 1, A_h]`."""

BASELINE = "closure"
"""The option every ratio is relative to: the old design."""

OPTION_LABELS: dict[str, str] = {
    "closure_def": "(context) `def` of the closure only",
    "closure": "1. per-call closure (old)",
    "module_helper": "2. module-level helper",
    "protocol_free_fn": "3. Protocol + shared free function",
    "abstract_base_checked": "4. abstract base, check_values=True (chosen)",
    "abstract_base_unchecked": "4. abstract base, check_values=False",
    "get_action_step": "(context) whole LSTMPolicyBundle.get_action step",
}
"""Option key to the label printed in the table, in table order."""

NOTES: tuple[str, ...] = (
    "Option 4 does more than options 1-3: it also validates the shapes, dtypes, keys and "
    "devices of features, masks and hidden state, and packs the eight masks into one "
    "[B, T, H, A_max] tensor. Options 1-3 only unsqueeze; they check nothing.",
    "check_values=True adds the NaN/Inf-feature and void-mask-row checks, which need a "
    "device sync (one on a GPU); check_values=False keeps the shape/dtype/key/device checks.",
    "'(context) def of the closure only' is a bare `def` statement run in a loop, without "
    "calling anything: the cost of creating the closure, which option 1 pays every call.",
    "'(context) whole get_action step' is a complete LSTMPolicyBundle.get_action call "
    "(check_values=True) on the same inputs: normalization, network, masking, sampling.",
    "CPU tensors, one torch thread; median over round-robin repeats of microseconds per call.",
)
"""Caveats printed under the table and stored in the JSON."""

Runner = Callable[[int], None]
"""Runs `n` calls of one option on one input case."""


# ---------------------------------------------------------------------------- the options


def normalize_inputs(
    features: torch.Tensor, masks: dict[str, torch.Tensor | None]
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Option 3: the free function a `NormalizingBundle` shares with the others.

    Args:
        features: `[B, F]` or `[B, 1, F]`.
        masks: Head name to a mask `[B, A]` or `[B, 1, A]`, or `None`.

    Returns:
        Features `[B, 1, F]` and head name to mask `[B, 1, A]`.
    """
    need_expand = features.dim() == 2
    if need_expand:
        features = features.unsqueeze(1)
    out: dict[str, torch.Tensor | None] = {}
    for name in HEAD_NAMES:
        mask = masks[name]
        if need_expand and mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(1)
        out[name] = mask
    return features, out


# ---------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Case:
    """One input form and batch size, with the inputs in the form each option takes.

    Attributes:
        form: `2d` or `3d` (see `INPUT_FORMS`).
        batch: `B`.
        features: `[B, F]` or `[B, 1, F]`.
        masks: The eight masks in `HEAD_NAMES` order (for options 1 and 2).
        mask_dict: The same masks by head name (for option 3).
        action_masks: The same masks as `ActionMasks` (for option 4).
        hidden: `bundle.initial_hidden(B)` (for option 4).
    """

    form: str
    batch: int
    features: torch.Tensor
    masks: MaskTuple
    mask_dict: dict[str, torch.Tensor | None]
    action_masks: ActionMasks
    hidden: HiddenState | None


def make_bundle() -> LSTMPolicyBundle:
    """The real bundle option 4 runs on, with default sizes and `feature_dim=64`."""
    return LSTMPolicyBundle(feature_dim=FEATURE_DIM)


def make_case(
    bundle: LSTMPolicyBundle,
    form: str,
    batch: int,
    generator: torch.Generator,
    unmasked: Sequence[str] = (),
) -> Case:
    """Random inputs for one input form and batch size.

    Args:
        bundle: The option-4 bundle, for the hidden state.
        form: `2d` or `3d`.
        batch: `B`.
        generator: Source of the random features and masks.
        unmasked: Heads given no mask (`None`), to check that path too.

    Returns:
        The case, every mask row with at least one True.
    """
    if form not in INPUT_FORMS:
        raise ValueError(f"form must be one of {INPUT_FORMS}, got {form!r}")
    lead = (batch,) if form == "2d" else (batch, 1)
    features = torch.randn(*lead, FEATURE_DIM, generator=generator)
    masks: list[torch.Tensor | None] = []
    for name, size in zip(HEAD_NAMES, ActionSpace().sizes, strict=True):
        if name in unmasked:
            masks.append(None)
            continue
        mask = torch.rand(*lead, size, generator=generator) < 0.5
        forced = torch.randint(size, lead, generator=generator)
        mask.scatter_(-1, forced.unsqueeze(-1), True)  # at least one valid action per row
        masks.append(mask)
    mask_dict = dict(zip(HEAD_NAMES, masks, strict=True))
    return Case(
        form=form,
        batch=batch,
        features=features,
        masks=tuple(masks),
        mask_dict=mask_dict,
        action_masks=ActionMasks.from_mapping(mask_dict),
        hidden=bundle.initial_hidden(batch),
    )


# ---------------------------------------------------------------------------- runners
# Each runner holds the inputs in local variables and calls the option directly in its
# loop, so that no wrapper call (lambda, partial) is added to the measured cost.


def _run_closure_def(case: Case) -> Runner:
    need_expand = case.features.dim() == 2

    def run(n: int) -> None:
        for _ in range(n):

            def expand_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
                if mask is None:
                    return None
                if need_expand and mask.dim() == 2:
                    return mask.unsqueeze(1)
                return mask

    return run


def _run_keyword_masks(normalize: Callable[..., object], case: Case) -> Runner:
    """Runner for options 1 and 2, which take the eight masks as keyword arguments."""
    features = case.features
    slot, blueprint, style, tempo, alpha_target, alpha_speed, alpha_curve, op = case.masks

    def run(n: int) -> None:
        for _ in range(n):
            normalize(
                features,
                slot_mask=slot,
                blueprint_mask=blueprint,
                style_mask=style,
                tempo_mask=tempo,
                alpha_target_mask=alpha_target,
                alpha_speed_mask=alpha_speed,
                alpha_curve_mask=alpha_curve,
                op_mask=op,
            )

    return run


def _run_protocol_free_fn(case: Case) -> Runner:
    features, masks = case.features, case.mask_dict

    def run(n: int) -> None:
        for _ in range(n):
            normalize_inputs(features, masks)

    return run


def _run_abstract_base(bundle: LSTMPolicyBundle, case: Case) -> Runner:
    features, masks, hidden = case.features, case.action_masks, case.hidden
    normalize = bundle._prepare  # what ADR 0002's _normalize_inputs did (see ADR 0003)

    def run(n: int) -> None:
        for _ in range(n):
            normalize(features, masks, hidden)

    return run


def _run_get_action(bundle: LSTMPolicyBundle, case: Case) -> Runner:
    features, masks, hidden = case.features, case.action_masks, case.hidden
    get_action = bundle.get_action

    def run(n: int) -> None:
        for _ in range(n):
            get_action(features, masks, hidden)

    return run


def _make_runners(
    checked: LSTMPolicyBundle, unchecked: LSTMPolicyBundle, case: Case
) -> dict[str, Runner]:
    """Option key to its runner on `case`, in `OPTION_LABELS` order."""
    return {
        "closure_def": _run_closure_def(case),
        "closure": _run_keyword_masks(normalize_closure, case),
        "module_helper": _run_keyword_masks(normalize_module_helper, case),
        "protocol_free_fn": _run_protocol_free_fn(case),
        "abstract_base_checked": _run_abstract_base(checked, case),
        "abstract_base_unchecked": _run_abstract_base(unchecked, case),
        "get_action_step": _run_get_action(checked, case),
    }


# ---------------------------------------------------------------------------- equivalence


def _outputs(
    case: Case, checked: LSTMPolicyBundle, unchecked: LSTMPolicyBundle
) -> dict[str, tuple[torch.Tensor, MaskTuple]]:
    """Option key to the features and masks (in `HEAD_NAMES` order) it produces on `case`."""
    slot, blueprint, style, tempo, alpha_target, alpha_speed, alpha_curve, op = case.masks
    keywords: dict[str, torch.Tensor | None] = {
        "slot_mask": slot,
        "blueprint_mask": blueprint,
        "style_mask": style,
        "tempo_mask": tempo,
        "alpha_target_mask": alpha_target,
        "alpha_speed_mask": alpha_speed,
        "alpha_curve_mask": alpha_curve,
        "op_mask": op,
    }
    results = {
        "closure": normalize_closure(case.features, **keywords),
        "module_helper": normalize_module_helper(case.features, **keywords),
    }
    features, mask_dict = normalize_inputs(case.features, case.mask_dict)
    results["protocol_free_fn"] = (features, tuple(mask_dict[name] for name in HEAD_NAMES))
    for key, bundle in (("abstract_base_checked", checked), ("abstract_base_unchecked", unchecked)):
        inputs: PolicyInputs = bundle._normalize_inputs(
            case.features, case.action_masks, case.hidden
        )
        given = inputs.masks
        results[key] = (inputs.features, tuple(getattr(given, name) for name in HEAD_NAMES))
    return results


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def check_equivalence() -> None:
    """Check every option turns the same inputs into the same `[B, 1, ...]` features and masks.

    Runs every input form and batch size of the benchmark, with all heads masked and
    with some heads unmasked (`None`). Option 4's `PolicyInputs.features` and
    `PolicyInputs.masks` are compared with the outputs of options 1-3.

    Raises:
        AssertionError: An option's output differs from option 1's, or is not
            `[B, 1, ...]`.
    """
    checked, unchecked = make_bundle(), make_bundle()
    unchecked.check_values = False
    generator = torch.Generator().manual_seed(0)
    for form in INPUT_FORMS:
        for batch in BATCH_SIZES:
            for unmasked in ((), ("style", "op")):
                case = make_case(checked, form, batch, generator, unmasked)
                where = f"{form} inputs, B={batch}, unmasked={unmasked}"
                results = _outputs(case, checked, unchecked)
                ref_features, ref_masks = results[BASELINE]
                if ref_features.shape != (batch, 1, FEATURE_DIM):
                    raise AssertionError(f"{where}: closure features {tuple(ref_features.shape)}")
                for name, size, mask in zip(
                    HEAD_NAMES, ActionSpace().sizes, ref_masks, strict=True
                ):
                    expected_none = name in unmasked
                    if (mask is None) != expected_none or (
                        mask is not None and mask.shape != (batch, 1, size)
                    ):
                        raise AssertionError(f"{where}: closure mask {name!r} is wrong")
                for key, (features, masks) in results.items():
                    if not _same(features, ref_features):
                        raise AssertionError(f"{where}: {key} features differ from the closure's")
                    for name, mask, ref in zip(HEAD_NAMES, masks, ref_masks, strict=True):
                        if not _same(mask, ref):
                            raise AssertionError(
                                f"{where}: {key} mask {name!r} differs from the closure's"
                            )


# ---------------------------------------------------------------------------- timing


@dataclass(frozen=True, slots=True)
class Settings:
    """How long to measure.

    Attributes:
        mode: `full` or `quick`.
        repeats: Round-robin repeats per input case (the median is over these).
        target_block_s: Calibrated duration of one timed block of calls.
        warmup_calls: Calls run before calibrating.
        min_calls: Fewest calls in a block.
    """

    mode: str
    repeats: int
    target_block_s: float
    warmup_calls: int
    min_calls: int


FULL = Settings(mode="full", repeats=31, target_block_s=0.02, warmup_calls=500, min_calls=50)
QUICK = Settings(mode="quick", repeats=3, target_block_s=0.001, warmup_calls=20, min_calls=5)


def _time_block(run: Runner, calls: int) -> float:
    """Seconds `calls` calls of `run` take, with the garbage collector off."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        run(calls)
        return time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()


def _calibrate(run: Runner, settings: Settings) -> int:
    """Warm `run` up; return the number of calls that takes about one target block."""
    run(settings.warmup_calls)
    probe = max(settings.min_calls, 10)
    per_call = max(_time_block(run, probe) / probe, 1e-9)
    return max(settings.min_calls, math.ceil(settings.target_block_s / per_call))


def measure_case(
    checked: LSTMPolicyBundle, unchecked: LSTMPolicyBundle, case: Case, settings: Settings
) -> list[dict[str, Any]]:
    """Time every option on one case, interleaved round-robin.

    Args:
        checked: Option-4 bundle with `check_values=True`.
        unchecked: Option-4 bundle with `check_values=False`.
        case: The inputs.
        settings: Repeats and block duration.

    Returns:
        One result record per option, in `OPTION_LABELS` order.
    """
    runners = _make_runners(checked, unchecked, case)
    keys = list(runners)
    calls = {key: _calibrate(runners[key], settings) for key in keys}
    samples: dict[str, list[float]] = {key: [] for key in keys}
    for repeat in range(settings.repeats):
        start = repeat % len(keys)  # rotate who goes first, so no option always follows another
        for key in keys[start:] + keys[:start]:
            samples[key].append(_time_block(runners[key], calls[key]) / calls[key] * 1e6)
    medians = {key: statistics.median(samples[key]) for key in keys}
    records: list[dict[str, Any]] = []
    for key in keys:
        records.append(
            {
                "option": key,
                "label": OPTION_LABELS[key],
                "input_form": case.form,
                "batch": case.batch,
                "median_us": medians[key],
                "min_us": min(samples[key]),
                "max_us": max(samples[key]),
                "ratio_vs_closure": medians[key] / medians[BASELINE],
                "calls_per_block": calls[key],
                "repeats": settings.repeats,
            }
        )
    return records


# ---------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, Any]:
    """What produced the numbers: the bench harness's record, with the commit."""
    info = harness_machine_info(torch.device("cpu"))
    info["torch_threads"] = info.pop("threads")
    info["git_commit"] = git_commit()
    return info


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """Render result records as a markdown table."""
    lines = [
        "| Option | Input | B | µs/call (median) | ratio vs closure |",
        "|---|---|---:|---:|---:|",
    ]
    for record in records:
        form = "[B, F] / [B, A]" if record["input_form"] == "2d" else "[B, 1, F] / [B, 1, A]"
        lines.append(
            f"| {record['label']} | {form} | {record['batch']} | "
            f"{record['median_us']:.3f} | {record['ratio_vs_closure']:.2f} |"
        )
    return "\n".join(lines)


def run_benchmark(settings: Settings) -> list[dict[str, Any]]:
    """Measure every option on every input form and batch size."""
    checked, unchecked = make_bundle(), make_bundle()
    unchecked.check_values = False
    generator = torch.Generator().manual_seed(0)
    records: list[dict[str, Any]] = []
    for form in INPUT_FORMS:
        for batch in BATCH_SIZES:
            case = make_case(checked, form, batch, generator)
            records.extend(measure_case(checked, unchecked, case, settings))
    return records


def main(argv: list[str] | None = None) -> int:
    """Check the options agree, time them, print a table, optionally write JSON.

    Args:
        argv: Command-line arguments (without the program name); `None` reads `sys.argv`.

    Returns:
        The exit status, 0.
    """
    parser = argparse.ArgumentParser(
        description="Time the input-normalization options compared in ADR 0002."
    )
    parser.add_argument(
        "--quick", action="store_true", help="few repeats and calls: a smoke run of seconds"
    )
    parser.add_argument(
        "--json", metavar="PATH", type=Path, help="also write results and machine info here"
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_equivalence()
        info = machine_info()
        records = run_benchmark(settings)
    finally:
        torch.set_num_threads(threads_before)

    print(
        f"Input normalization, {settings.mode} mode: {info['platform']}, Python "
        f"{info['python']}, torch {info['torch']}, {info['torch_threads']} thread, "
        f"commit {info['git_commit']}"
    )
    print()
    print(format_table(records))
    print()
    for note in NOTES:
        print(f"- {note}")

    if args.json is not None:
        payload = {
            "machine": info,
            "settings": {
                "mode": settings.mode,
                "repeats": settings.repeats,
                "target_block_s": settings.target_block_s,
                "warmup_calls": settings.warmup_calls,
                "feature_dim": FEATURE_DIM,
                "batch_sizes": list(BATCH_SIZES),
                "input_forms": list(INPUT_FORMS),
                "head_sizes": dict(zip(HEAD_NAMES, ActionSpace().sizes, strict=True)),
                "device": "cpu",
            },
            "baseline": BASELINE,
            "notes": list(NOTES),
            "results": records,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"\nWrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
