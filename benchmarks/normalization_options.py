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

For context it also times the bare cost of creating the closure (`define_closure`: a
function whose body is only the closure's `def`, capturing a variable as in option
1), to show whether creating the closure is what costs.

Every option runs with 2-D inputs (features `[B, 64]`, masks `[B, A_h]`) and with
already-3-D inputs (features `[B, 1, 64]`, masks `[B, 1, A_h]`), at B=1 and B=32.
Masks are random bool with at least one True per row; head sizes are
`ActionSpace().sizes` in `HEAD_NAMES` order. Inputs are built once, outside the
timed loops, as a caller would hold them.

Method: the bench harness, `esper.tamiyo.policy.bench.harness`, the same as
`esper-policy bench`; one torch thread (`single_thread`), CPU tensors. Each option is
a call with its arguments bound (`functools.partial`), so every figure includes the
same small cost of that call. For each input form and batch size, every option is
warmed up and calibrated so that one block of calls takes about the target time; then
the options are interleaved round-robin (each repeat times one block of every option,
the starting option rotating), so that drift in the machine's speed hits all options
alike. The garbage collector is off during a block, as in `timeit`. The reported
figure is the median over repeats of microseconds per call, with its ratio to option
1. Before timing, the script checks that every option produces the same features and
masks (`check_equivalence`). The run time is set by the calibration, not by the
machine's speed: about 20 s in full mode and a few seconds with `--quick`, mostly
importing torch.

Run it with `make bench-adr` (`python benchmarks/normalization_options.py`), or::

    .venv/bin/python benchmarks/normalization_options.py [--quick] [--json PATH]

`--json PATH` writes every figure with the machine's description (the harness's
`machine_info`: platform, processor, Python, torch, thread count, device; and the git
commit) so that a reader can tell which machine produced the ADR's numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
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
from esper.tamiyo.policy.bench.harness import (
    Settings,
    git_commit,
    machine_info,
    single_thread,
    time_interleaved,
)
from esper.tamiyo.policy.bench.seed_design import MaskKwargs, mask_kwargs
from esper.tamiyo.policy.bench.suite import (
    MaskTuple,
    normalize_closure,
    normalize_module_helper,
)
from esper.tamiyo.policy.testing import random_masks

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
    "'(context) def of the closure only' calls a function whose body is only the closure's "
    "`def` (capturing a variable, as option 1's does) and calls nothing else: the cost of "
    "creating the closure, which option 1 pays every call.",
    "'(context) whole get_action step' is a complete LSTMPolicyBundle.get_action call "
    "(check_values=True) on the same inputs: normalization, network, masking, sampling.",
    "CPU tensors, one torch thread; median over round-robin repeats of microseconds per call.",
)
"""Caveats printed under the table and stored in the JSON."""

FULL = Settings(mode="full", repeats=31, target_block_s=0.02, warmup_calls=500, max_calls=1_000_000)
"""Settings of a full run (the ADR's numbers); `max_calls` lets blocks of ~0.1 µs calls last 0.02 s."""

QUICK = Settings(mode="quick", repeats=3, target_block_s=0.001, warmup_calls=20)
"""Settings of a `--quick` run: a smoke test of seconds."""


# ---------------------------------------------------------------------------- the options


def define_closure(need_expand: bool) -> None:
    """Context: create option 1's closure and drop it, without calling it.

    Args:
        need_expand: Captured by the closure, as option 1's closure captures it.
    """

    # ON PURPOSE: the closure's creation is what is measured; it is never called.
    def expand_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None:
            return None
        if need_expand and mask.dim() == 2:
            return mask.unsqueeze(1)
        return mask


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
        masks: The eight masks as `ActionMasks` (for option 4).
        keywords: The same masks as keyword arguments (for options 1 and 2).
        mask_dict: The same masks by head name (for option 3).
        hidden: `bundle.initial_hidden(B)` (for option 4).
    """

    form: str
    batch: int
    features: torch.Tensor
    masks: ActionMasks
    keywords: MaskKwargs
    mask_dict: dict[str, torch.Tensor | None]
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
    masks = random_masks(lead, generator=generator, unmasked=unmasked)
    return Case(
        form=form,
        batch=batch,
        features=features,
        masks=masks,
        keywords=mask_kwargs(masks),
        mask_dict=masks.as_dict(),
        hidden=bundle.initial_hidden(batch),
    )


def option_calls(
    checked: LSTMPolicyBundle, unchecked: LSTMPolicyBundle, case: Case
) -> dict[str, Callable[[], object]]:
    """Option key to one call of it on `case`, arguments bound, in `OPTION_LABELS` order."""
    features, masks, hidden = case.features, case.masks, case.hidden
    return {
        "closure_def": functools.partial(define_closure, features.dim() == 2),
        "closure": functools.partial(normalize_closure, features, **case.keywords),
        "module_helper": functools.partial(normalize_module_helper, features, **case.keywords),
        "protocol_free_fn": functools.partial(normalize_inputs, features, case.mask_dict),
        # _prepare is what ADR 0002's _normalize_inputs did (ADR 0003 split it).
        "abstract_base_checked": functools.partial(checked._prepare, features, masks, hidden),
        "abstract_base_unchecked": functools.partial(unchecked._prepare, features, masks, hidden),
        "get_action_step": functools.partial(checked.get_action, features, masks, hidden),
    }


# ---------------------------------------------------------------------------- equivalence


def _outputs(
    case: Case, checked: LSTMPolicyBundle, unchecked: LSTMPolicyBundle
) -> dict[str, tuple[torch.Tensor, MaskTuple]]:
    """Option key to the features and masks (in `HEAD_NAMES` order) it produces on `case`."""
    results = {
        "closure": normalize_closure(case.features, **case.keywords),
        "module_helper": normalize_module_helper(case.features, **case.keywords),
    }
    features, mask_dict = normalize_inputs(case.features, case.mask_dict)
    results["protocol_free_fn"] = (features, tuple(mask_dict[name] for name in HEAD_NAMES))
    for key, bundle in (("abstract_base_checked", checked), ("abstract_base_unchecked", unchecked)):
        inputs: PolicyInputs = bundle._normalize_inputs(case.features, case.masks, case.hidden)
        # PolicyInputs gives every head a mask: all True where the caller gave none,
        # which options 1-3 write as None.
        shaped = inputs.masks.as_dict()
        results[key] = (
            inputs.features,
            tuple(
                None
                if case.masks.as_dict()[name] is None and mask is not None and bool(mask.all())
                else mask
                for name, mask in shaped.items()
            ),
        )
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


# ---------------------------------------------------------------------------- timing and report


def measure_case(
    checked: LSTMPolicyBundle, unchecked: LSTMPolicyBundle, case: Case, settings: Settings
) -> list[dict[str, Any]]:
    """Time every option on one case with `time_interleaved`.

    Args:
        checked: Option-4 bundle with `check_values=True`.
        unchecked: Option-4 bundle with `check_values=False`.
        case: The inputs.
        settings: Warm-up, block duration and repeats.

    Returns:
        One result record per option, in `OPTION_LABELS` order.
    """
    timings = time_interleaved(option_calls(checked, unchecked, case), settings)
    baseline = timings[BASELINE].median_us
    return [
        {
            "option": key,
            "label": OPTION_LABELS[key],
            "input_form": case.form,
            "batch": case.batch,
            "median_us": timing.median_us,
            "min_us": timing.min_us,
            "max_us": timing.max_us,
            "ratio_vs_closure": timing.median_us / baseline,
            "calls_per_block": timing.calls_per_repeat,
            "repeats": settings.repeats,
        }
        for key, timing in timings.items()
    ]


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

    with single_thread():
        check_equivalence()
        info = {**machine_info(torch.device("cpu")), "git_commit": git_commit()}
        records = run_benchmark(settings)

    print(
        f"Input normalization, {settings.mode} mode: {info['platform']}, Python "
        f"{info['python']}, torch {info['torch']}, {info['threads']} thread, "
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
                "max_calls": settings.max_calls,
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
