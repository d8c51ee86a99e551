"""The conformance kit: run the whole `PolicyBundle` contract on a bundle in one call.

What Gymnasium's `check_env` is for environments, `check_bundle` is for policy
bundles. Give it a factory, `factory(feature_dim) -> bundle`, and it checks every
clause below on fresh bundles, then raises one `AssertionError` listing each clause
that failed, in a sentence that says what to fix:

* **builds**: the factory returns a fresh `PolicyBundle` for the width it is given;
  when it fails, the later clauses are not run;
* **shapes**: the hook returns logits, values and hidden state in the declared layout,
  and `[B, F]` inputs give `[B]` results and `[B, T, F]` give `[B, T]`, for every
  public method and every head; when the hook's output breaks the layout (a
  batch-first hidden state, say), the later clauses are not run, so the report says
  it once;
* **deterministic**: the same inputs give the same outputs (no dropout in training
  mode); when it fails, the later clauses are not run;
* **masks as mapping or dataclass**: `ActionMasks` and a mapping give the same outputs;
* **masks respected**: no masked action is ever sampled or taken as the mode, and a
  masked action has probability 0;
* **reproducible under a seed**: `torch.manual_seed` fixes the sampled actions;
* **rollout and update agree**: the log-probs and values `get_action` returned step by
  step are what `evaluate_actions` computes over the whole sequence, so PPO's ratio
  starts at 1;
* **rows independent**: each batch row's outputs do not depend on the other rows;
* **gradients**: `evaluate_actions` gives a finite gradient to every trainable
  parameter, and `get_action` builds no autograd graph;
* **network called as a module**: the hook calls `self.network(...)`, so module hooks
  (and `DistributedDataParallel`'s) fire;
* **hidden state round trip**: a recurrent bundle's state has the declared shapes,
  feeds back in, and matters; a stateless one refuses a state;
* **state_dict round trip**: weights saved and loaded with `weights_only=True` give
  identical outputs;
* **float64**: after `to(torch.float64)` the bundle computes in float64;
* **bad inputs refused**: bad features, masks, actions and hidden states raise
  `ValueError` or `TypeError` before the network runs, and change nothing;
* **no per-call closures**: no nested function or `lambda` is created on each call in
  the bundle's code (the finding this project started from); comprehensions and
  generator expressions are fine.

A bundle that declares extra per-step inputs (`extra_inputs`, such as the blueprint in
each slot) gets them in every clause, made from the features' values (each row and
step alone, valid for the declaration), and, with some, the bad-input clause refuses
bad ones too (missing, undeclared, wrong dtype, another batch size, out of range, NaN);
then:

* **extra inputs**: the hook gets each one as `[B, T, *shape]` from one step and from
  a sequence, and the outputs depend on each (but an integer input with one allowed
  value). For a bundle that declares none it passes, and says so.

When the factory takes a `probability_floor` keyword, with floors on three heads
(`factory(feature_dim, probability_floor={"op": 0.15, "blueprint": 0.12, "tempo":
0.12})`, plus the flat `action_space` when it takes one):

* **probability floors**: the bundle passed the floors on to the base (its
  `probability_floor` is what the factory was given); every valid action of a floored
  head has at least its effective floor `min(floor, 0.99 / n)` in `forward`, masked
  ones 0; and `get_action`'s log-probs are what `evaluate_actions` scores. A factory
  without that keyword has this clause reported as not run, with how to enable it.

Then the same bundle under Tamiyo's hierarchy (`ActionSpace.tamiyo()`: the op is
sampled first and decides which other heads matter), with per-op masks
(`<head>_by_op`) on every head:

* **hierarchy: shapes**: the factory builds the bundle for the hierarchical space it
  is given, and every public method returns the documented shapes, with `relevance`,
  `availability` and `joint_entropy`; when the hook's output breaks the contract there
  (`logits_by_op` of the wrong shape, say), or the bundle does not build, the later
  hierarchy clauses are not run;
* **hierarchy: masks respected**: no sampled (or deterministic) action violates its
  masks at the op taken: the flat mask AND the head's per-op mask at that op, for
  every head the op uses. The masks are drawn by Hypothesis (`derandomize=True`, so a
  run is reproducible; the failure names the smallest draw it found), or, where
  Hypothesis is not installed, by a seeded torch generator, and the clause says so;
* **hierarchy: ignored heads canonical**: a head the taken op does not use takes its
  canonical action with log-prob exactly 0 in `get_action`, log-prob and entropy
  exactly 0 in `evaluate_actions`, where `relevance` and `availability` follow the
  table; `evaluate_actions` refuses any other action for such a head;
* **hierarchy: rollout and update agree**: step-by-step `get_action` log-probs and
  values, with per-op masks and an episode starting inside the sequence, are what
  `evaluate_actions` computes over the sequence from the stored ops.

Flat and hierarchical: the kit builds `factory(feature_dim)` first. When the factory
also takes an `action_space` keyword (a bundle class whose `__init__` has one, a
`functools.partial` of it, any callable with `action_space` or `**kwargs`), the
hierarchy clauses run on `factory(feature_dim, action_space=ActionSpace.tamiyo(...))`
with the head sizes of the first bundle, and the other clauses on the flat space
(`factory(feature_dim)`, or with the hierarchy removed when that one is
hierarchical). A factory that takes no `action_space` and builds a flat bundle is not
failed: its hierarchy clauses are reported as not run (`SKIP`, `ran=False` with
`passed=True`), with the way to enable them, so factories written before the
hierarchy keep passing. One that builds a hierarchical bundle has every clause run
on that bundle.

Example:
    >>> from functools import partial
    >>> from esper.tamiyo.policy import MLPPolicyBundle
    >>> from esper.tamiyo.policy.testing import check_bundle
    >>> report = check_bundle(lambda dim: MLPPolicyBundle(dim, hidden_dim=16))
    >>> report.passed, len(report.results), len(report.not_run)  # no keywords
    (True, 21, 5)
    >>> report = check_bundle(partial(MLPPolicyBundle, hidden_dim=16))  # takes one
    >>> report.passed, len(report.not_run)
    (True, 0)
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import io
import math
import sys
import textwrap
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import CodeType, FrameType
from typing import Any, NamedTuple

import torch
from torch import nn

from esper.tamiyo.policy.action_space import (
    CONDITIONED_HEADS,
    HEAD_NAMES,
    PRIMARY_HEAD,
    TAMIYO_HIERARCHY,
    ActionHierarchy,
    ActionSpace,
)
from esper.tamiyo.policy.base import PolicyBundle
from esper.tamiyo.policy.extra_inputs import ExtraInput
from esper.tamiyo.policy.inputs import HiddenState, PolicyInputs
from esper.tamiyo.policy.layout import MASKED_LOGIT
from esper.tamiyo.policy.masks import ActionMasks, by_op_name
from esper.tamiyo.policy.outputs import (
    ActionResult,
    EvalResult,
    NetworkOutput,
    OpConditionedOutput,
)
from esper.tamiyo.policy.validation import HookContractError

__all__ = [
    "BundleFactory",
    "ClauseResult",
    "ConformanceReport",
    "check_bundle",
    "closures_built_per_call",
    "function_objects_built_per_call",
    "random_masks",
    "run_checks",
]

BundleFactory = Callable[[int], PolicyBundle]
"""Builds a fresh bundle for a feature width: `factory(feature_dim) -> bundle`."""

_BATCH = 3
_STEPS = 4
_SAMPLED_ROWS = 256
# (rtol, atol) per dtype, as torch.testing.assert_close uses them.
_TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


@dataclass(frozen=True, slots=True)
class ClauseResult:
    """The outcome of one clause of the contract.

    Attributes:
        clause: The clause's name, e.g. `"masks respected"`.
        passed: Whether the bundle satisfied it. False when an earlier clause's
            failure kept it from running; True for a clause that does not apply to the
            factory (the hierarchy clauses, for a factory that takes no
            `action_space` and builds a flat bundle), which fails nothing.
        detail: For a failure, what went wrong and what to fix; for a pass, a note
            (such as `"no trainable parameters"`) or `""`; for a clause not run, why.
        ran: False when the clause was not run: an earlier failure kept it from
            running (`passed` False), or it does not apply (`passed` True).
    """

    clause: str
    passed: bool
    detail: str = ""
    ran: bool = True


@dataclass(frozen=True, slots=True)
class ConformanceReport:
    """Every clause's outcome for one bundle.

    Attributes:
        subject: The bundle's class name (or the factory's, if it built nothing).
        results: One `ClauseResult` per clause, in the order they ran.
    """

    subject: str
    results: tuple[ClauseResult, ...]

    @property
    def passed(self) -> bool:
        """Whether every clause passed."""
        return not self.failures

    @property
    def failures(self) -> tuple[ClauseResult, ...]:
        """The clauses that did not pass: those that failed, then those blocked."""
        return (*self.failed, *self.blocked)

    @property
    def failed(self) -> tuple[ClauseResult, ...]:
        """The clauses that ran and failed."""
        return tuple(result for result in self.results if result.ran and not result.passed)

    @property
    def not_run(self) -> tuple[ClauseResult, ...]:
        """The clauses that did not run: blocked ones, then those that do not apply."""
        return (*self.blocked, *self.skipped)

    @property
    def blocked(self) -> tuple[ClauseResult, ...]:
        """The clauses an earlier failure kept from running."""
        return tuple(r for r in self.results if not r.ran and not r.passed)

    @property
    def skipped(self) -> tuple[ClauseResult, ...]:
        """The clauses that do not apply to the factory: they fail nothing.

        The hierarchy clauses, for a factory that takes no `action_space` and builds a
        flat bundle; each one's `detail` says how to enable them.
        """
        return tuple(r for r in self.results if not r.ran and r.passed)

    def format(self) -> str:
        """One line per clause, `PASS`, `FAIL` or `SKIP`, with the detail after a colon."""
        lines = [f"Conformance of {self.subject}:"]
        for result in self.results:
            status = "SKIP" if not result.ran else "PASS" if result.passed else "FAIL"
            detail = f": {result.detail}" if result.detail else ""
            lines.append(f"  {status}  {result.clause}{detail}")
        lines.append(f"{len(self.results)} clauses, {self.verdict}.")
        return "\n".join(lines)

    @property
    def verdict(self) -> str:
        """`all clauses pass`, `N pass, M not run`, or `N failed, M not run`.

        `N pass` when the clauses that ran passed and some did not apply.
        """
        not_run = f", {len(self.not_run)} not run" if self.not_run else ""
        if not self.passed:
            return f"{len(self.failed)} failed{not_run}"
        if self.skipped:
            return f"{len(self.results) - len(self.skipped)} pass{not_run}"
        return "all clauses pass"


def check_bundle(
    factory: BundleFactory, *, feature_dim: int = 7, seed: int = 0
) -> ConformanceReport:
    """Run the whole contract on bundles from `factory`; raise if any clause fails.

    Args:
        factory: `factory(feature_dim)` returns a fresh bundle, e.g. the class itself
            or `lambda dim: MyBundle(dim, hidden_dim=32)`. When it also takes an
            `action_space` keyword (`factory(feature_dim, action_space=space)`), the
            bundle is checked under Tamiyo's hierarchy as well; see the module's
            documentation.
        feature_dim: The feature width to build bundles with.
        seed: Seeds weights, inputs and sampling, so a run is reproducible. The
            caller's global random state is restored afterwards.

    Returns:
        The report, when no clause failed (the clauses that do not apply to the
        factory are in `report.skipped`).

    Raises:
        AssertionError: One or more clauses failed; the message lists each of them.
    """
    report = run_checks(factory, feature_dim=feature_dim, seed=seed)
    if not report.passed:
        skipped = f" ({len(report.not_run)} not run)" if report.not_run else ""
        heading = (
            f"{report.subject} fails {len(report.failed)} of {len(report.results)} "
            f"conformance clauses{skipped}:"
        )
        lines = [f"- {failure.clause}: {failure.detail}" for failure in report.failed]
        reasons: dict[str, list[str]] = {}  # why, in order, to the clauses not run for it
        for result in (*report.blocked, *report.skipped):
            reasons.setdefault(result.detail.removeprefix(_NOT_RUN), []).append(result.clause)
        lines += [f"- not run: {', '.join(names)} ({why})" for why, names in reasons.items()]
        raise AssertionError("\n".join([heading, *lines]))
    return report


def run_checks(factory: BundleFactory, *, feature_dim: int = 7, seed: int = 0) -> ConformanceReport:
    """Run every clause and report each outcome, without raising on failures.

    Args:
        factory: As for `check_bundle`.
        feature_dim: As for `check_bundle`.
        seed: As for `check_bundle`.

    Returns:
        One result per clause. When the factory does not build a bundle, every later
        clause fails as not run.

    Raises:
        TypeError: `factory` is not callable or `feature_dim` is not a positive int.
    """
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
        raise TypeError(f"feature_dim must be a positive int, got {feature_dim!r}")
    plain = _Subject(factory, feature_dim, seed)
    results: list[ClauseResult] = []
    name = getattr(factory, "__qualname__", type(factory).__name__)
    with torch.random.fork_rng():
        blocked = ""
        plan: _Plan | None = None
        for clause, check in _CLAUSES:
            if blocked:
                results.append(ClauseResult(clause, False, f"{_NOT_RUN}{blocked}", ran=False))
                continue
            subject = plain if plan is None else plan.subject_for(clause)
            if subject is None:
                assert plan is not None  # the plan says why the clause does not apply
                why = plan.why_not(clause)
                results.append(ClauseResult(clause, True, f"{_NOT_RUN}{why}", ran=False))
                continue
            result = _run_clause(clause, check, subject)
            results.append(result)
            if not result.passed and clause in _BLOCKED_BY and _blocks(clause, result):
                blocked = _BLOCKED_BY[clause]
            elif plan is None:  # "builds" passed: plan the spaces the others run under
                name = type(plain.build()).__name__
                plan = _plan(plain)
    return ConformanceReport(name, tuple(results))


def _blocks(gate: str, result: ClauseResult) -> bool:
    """Whether a failed gate stops the later clauses (see `_GATES`)."""
    if gate in ("builds", _HIERARCHY_GATE):
        return True
    if gate == "shapes":
        return result.detail.startswith(_BROKE_CONTRACT)
    return not result.detail.startswith(_CRASHED)  # a crash elsewhere blocks nothing


def random_masks(
    lead: tuple[int, ...],
    *,
    space: ActionSpace | None = None,
    keep: float = 0.5,
    generator: torch.Generator | None = None,
    unmasked: Sequence[str] = (),
    by_op: Sequence[str] = (),
) -> ActionMasks:
    """Random masks `[*lead, A_h]` with at least one valid action in every row.

    Args:
        lead: Leading shape, `(B,)` for one step or `(B, T)` for a sequence.
        space: Head sizes; `ActionSpace()` by default.
        keep: Probability that each action is valid.
        generator: Random source; the global one by default.
        unmasked: Heads that get `None` (every action valid).
        by_op: Heads that also get a per-op mask `[*lead, N_op, A_h]` (a hierarchical
            `space` only), random too, whose every row shares an action with the
            head's flat mask: no (op, row) is ever void.

    Returns:
        The masks, on the CPU.
    """
    space = space or ActionSpace()
    masks: dict[str, torch.Tensor | None] = {}
    for name, size in zip(HEAD_NAMES, space.sizes, strict=True):
        mask = None if name in unmasked else torch.rand(*lead, size, generator=generator) < keep
        masks[name] = mask
        if mask is None and name not in by_op:
            continue
        forced = torch.randint(size, lead, generator=generator).unsqueeze(-1)  # [*lead, 1]
        if mask is not None:
            mask.scatter_(-1, forced, True)  # never a void row
        if name in by_op:
            per_op = torch.rand(*lead, space.op, size, generator=generator) < keep
            per_op.scatter_(-1, forced.unsqueeze(-2).expand(*lead, space.op, 1), True)
            masks[f"{name}_by_op"] = per_op
    return ActionMasks.from_mapping(masks)


def closures_built_per_call(cls: type, methods: Sequence[str] | None = None) -> list[str]:
    """Nested functions and lambdas inside a class's methods.

    Each `def`, `async def` or `lambda` inside a method creates a new function object
    every time the method runs. Comprehensions and generator expressions are not
    reported: they are loops, not closures a contributor should hoist. Read from the
    source, so a nested function that is defined but never called is found as well.

    Args:
        cls: A class whose source `inspect` can read.
        methods: Only these methods; every method when `None`.

    Returns:
        `"Class.method: NodeType"` for each one found, the node type being
        `FunctionDef`, `AsyncFunctionDef` or `Lambda`.

    Raises:
        OSError: The source of `cls` is not available.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    class_def = tree.body[0]
    if not isinstance(class_def, ast.ClassDef):
        raise OSError(f"the source of {cls.__qualname__} does not start with its class")
    found: list[str] = []
    for method in class_def.body:
        if not isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if methods is not None and method.name not in methods:
            continue
        for node in ast.walk(method):
            if node is not method and isinstance(node, _CLOSURE_NODES):
                found.append(f"{cls.__name__}.{method.name}: {type(node).__name__}")
    return found


function_objects_built_per_call = closures_built_per_call
"""The name `closures_built_per_call` had before ADR 0006 narrowed the rule to nested
functions and lambdas (comprehensions no longer count); kept so callers keep working."""


# ---------------------------------------------------------------------- machinery


_CLOSURE_NODES: tuple[type[ast.AST], ...] = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
"""The source nodes that build a function object each time the enclosing method runs."""

_LOOP_CODE_NAMES = frozenset({"<listcomp>", "<setcomp>", "<dictcomp>", "<genexpr>"})
"""Code objects of comprehensions and generator expressions (3.12 inlines the first three)."""


class _ClauseError(AssertionError):
    """A clause's finding: its message is the sentence reported to the contributor."""


@dataclass(frozen=True, slots=True)
class _Subject:
    """The factory under test, with the width and seed to build bundles with.

    `action_space`, when set, is passed to the factory as a keyword, and the bundle
    built must carry it.
    """

    factory: BundleFactory
    feature_dim: int
    seed: int
    action_space: ActionSpace | None = None
    probability_floor: dict[str, float] | None = None

    @property
    def keywords(self) -> dict[str, object]:
        """The keyword arguments the factory is called with."""
        keywords: dict[str, object] = {}
        if self.action_space is not None:
            keywords["action_space"] = self.action_space
        if self.probability_floor is not None:
            keywords["probability_floor"] = self.probability_floor
        return keywords

    @property
    def call(self) -> str:
        """How the factory is called, for messages: `factory(7)`, or with its keywords."""
        shown = [str(self.feature_dim)]
        if self.action_space is not None:
            shown.append(f"action_space={_space_name(self.action_space)}")
        if self.probability_floor is not None:
            shown.append(f"probability_floor={self.probability_floor}")
        return f"factory({', '.join(shown)})"

    def build(self, offset: int = 0) -> PolicyBundle:
        """A fresh bundle, its weights seeded by `seed + offset`."""
        torch.manual_seed(self.seed + offset)
        factory: Callable[..., object] = self.factory
        bundle = factory(self.feature_dim, **self.keywords)
        if not isinstance(bundle, PolicyBundle):
            raise _ClauseError(
                f"{self.call} returned {type(bundle).__name__}, not a "
                "PolicyBundle; return an instance of your PolicyBundle subclass"
            )
        if self.action_space is not None and bundle.action_space != self.action_space:
            raise _ClauseError(
                f"{self.call} built a bundle whose action_space is "
                f"{_space_name(bundle.action_space)}; pass the action_space the factory "
                "is given on to PolicyBundle.__init__ (and to PolicyHeads)"
            )
        return bundle

    def generator(self) -> torch.Generator:
        """A random source for inputs, seeded like the bundles."""
        return torch.Generator().manual_seed(self.seed)


@dataclass(frozen=True, slots=True)
class _Plan:
    """Which subject each clause runs on, decided once "builds" has passed.

    Attributes:
        flat: The subject of the clauses before the hierarchy's.
        hierarchy: The subject of the hierarchy clauses, or `None` when they do not
            apply (see `skipped`).
        skipped: Why the hierarchy clauses do not apply, and how to make them.
    """

    flat: _Subject
    hierarchy: _Subject | None
    skipped: str = ""
    floors: _Subject | None = None
    floors_skipped: str = ""

    def subject_for(self, clause: str) -> _Subject | None:
        """The subject `clause` runs on; `None` when it does not apply."""
        if clause == _FLOORS_CLAUSE:
            return self.floors
        return self.hierarchy if clause in _HIERARCHY_NAMES else self.flat

    def why_not(self, clause: str) -> str:
        """Why `clause` does not apply, and how to make it."""
        return self.floors_skipped if clause == _FLOORS_CLAUSE else self.skipped


def _plan(plain: _Subject) -> _Plan:
    """`_spaces_plan(plain)`, with the subject of the floors clause (see `_floors_plan`)."""
    spaces = _spaces_plan(plain)
    return _floors_plan(spaces)


def _floors_plan(plan: _Plan) -> _Plan:
    """Run the floors clause on the flat subject with `_KIT_FLOORS`, if the factory takes them."""
    flat = plan.flat
    if _takes_keyword(flat.factory, "probability_floor"):
        return replace(plan, floors=replace(flat, probability_floor=dict(_KIT_FLOORS)))
    return replace(
        plan,
        floors_skipped=(
            "the factory takes no probability_floor keyword; to check that floors reach "
            "the base, let it take probability_floor (factory(feature_dim, "
            "probability_floor={...})) and pass it on to PolicyBundle.__init__"
        ),
    )


def _spaces_plan(plain: _Subject) -> _Plan:
    """The flat and hierarchical subjects, from the space `factory(feature_dim)` builds.

    With an `action_space` keyword: the hierarchy clauses run under Tamiyo's table over
    the first bundle's head sizes (or under its own table, if it has one), and the
    others under the flat space (the first bundle's, or its sizes with no table).
    Without one: every clause runs on `factory(feature_dim)`; the hierarchy clauses
    only if that bundle is hierarchical.
    """
    space = plain.build().action_space
    takes_space = _takes_keyword(plain.factory, "action_space")
    if space.is_hierarchical:
        flat = replace(space, hierarchy=None)
        return _Plan(replace(plain, action_space=flat) if takes_space else plain, plain)
    if takes_space:
        sizes = {head: getattr(space, head) for head in CONDITIONED_HEADS}
        tamiyo = ActionSpace.tamiyo(**sizes)
        return _Plan(plain, replace(plain, action_space=tamiyo))
    return _Plan(
        plain,
        None,
        f"{plain.call} builds a flat bundle and the factory takes no action_space "
        "keyword; to check the bundle under Tamiyo's hierarchy too, let the factory "
        "take action_space (factory(feature_dim, action_space=space)) and pass it on "
        "to PolicyBundle.__init__",
    )


def _takes_keyword(factory: BundleFactory, keyword: str) -> bool:
    """Whether `factory` can be called with `keyword` (`action_space`, `probability_floor`).

    A class is read through its `__init__` (`PolicyBundle.__new__` takes anything); a
    callable whose signature cannot be read (a builtin) is taken not to.
    """
    target: Callable[..., object] = factory
    if isinstance(factory, type):
        target = factory.__init__  # type: ignore[misc]  # read, not called
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    given = parameters.get(keyword)
    if given is not None:
        return given.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        )
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _space_name(space: ActionSpace) -> str:
    """`ActionSpace()`, `ActionSpace.tamiyo(slot=5)` and the like: how to build `space`."""
    default = ActionSpace()
    sizes = ", ".join(
        f"{head}={getattr(space, head)}"
        for head in HEAD_NAMES
        if getattr(space, head) != getattr(default, head)
    )
    if space.hierarchy is None:
        return f"ActionSpace({sizes})"
    if space.hierarchy == TAMIYO_HIERARCHY:
        return f"ActionSpace.tamiyo({sizes})"
    return repr(space)


class _Inputs(NamedTuple):
    features: torch.Tensor  # [B, F] or [B, T, F]
    masks: ActionMasks  # [B, A_h] or [B, T, A_h]


_Check = Callable[[_Subject], str]


def _run_clause(name: str, check: _Check, subject: _Subject) -> ClauseResult:
    try:
        note = check(subject)
    except _ClauseError as failure:
        return ClauseResult(name, False, str(failure))
    except HookContractError as error:  # a bug in the hook, whichever clause meets it
        return ClauseResult(name, False, f"{_BROKE_CONTRACT}{error}")
    except Exception as error:  # any crash is a failed clause, reported
        return ClauseResult(name, False, f"{_CRASHED}{_describe(error)}")
    return ClauseResult(name, True, note)


def _describe(error: BaseException) -> str:
    """`Type: message (file:line)`, the line being where the error was raised."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = str(error) or "(no message)"
    return f"{type(error).__name__}: {message}{where}"


def _inputs(
    bundle: PolicyBundle, generator: torch.Generator, lead: tuple[int, ...], width: int
) -> _Inputs:
    features = torch.randn(*lead, width, generator=generator).to(bundle.device, bundle.dtype)
    masks = random_masks(lead, space=bundle.action_space, generator=generator)
    return _Inputs(features, masks.to(bundle.device))


def _outside(spec: ExtraInput) -> int | None:
    """An int64 just outside `spec`'s range and sentinels; `None` when there is none."""
    low, high, _ = spec.span()
    if high is not None:
        return high
    if low is not None and low > -(2**63):
        return low - 1
    return None


def _extras(bundle: PolicyBundle, features: object) -> dict[str, torch.Tensor] | None:
    """Valid extra inputs for `features`, made from their values alone; `None` without any.

    Each value is a function of its own row and step of the features, so a sequence
    gets step by step what it gets whole, and a row alone what it gets in a batch: the
    clauses that compare calls need no bookkeeping. Integer inputs take values from
    their range (the first 8 of it) and sentinels; floating ones lie in (-1, 1).
    Not a tensor of rank 2 or 3 (a bad-input call): `None`, left for the base to refuse.
    """
    specs = bundle.extra_inputs
    if not specs or not isinstance(features, torch.Tensor) or features.dim() not in (2, 3):
        return None
    if features.layout != torch.strided or features.shape[-1] == 0:
        return None
    values = features.detach().double().abs()  # [B, (T), F]
    dtype = features.dtype if features.is_floating_point() else bundle.dtype
    extras: dict[str, torch.Tensor] = {}
    for k, spec in enumerate(specs):
        count = math.prod(spec.shape)
        columns = (torch.arange(count, device=values.device) + k) % values.shape[-1]
        raw = values.index_select(-1, columns).reshape(*values.shape[:-1], *spec.shape)
        if spec.kind == "floating":
            extras[spec.name] = torch.tanh(raw).to(dtype)
            continue
        choices = torch.tensor(_integer_choices(spec), device=values.device)
        code = (raw * 1000).floor().long() % choices.numel()
        extras[spec.name] = choices[code]
    return extras


def _integer_choices(spec: ExtraInput) -> list[int]:
    """Up to 8 values of an integer input's range, then its sentinels."""
    if spec.low is not None:
        start = spec.low
        top = min(spec.low + 8, 2**63 if spec.high is None else spec.high)
    elif spec.high is not None:
        start, top = max(spec.high - 8, -(2**63)), spec.high
    else:
        start, top = 0, 8
    return [*range(start, top), *spec.sentinels]


def _rows(masks: ActionMasks, rows: slice) -> ActionMasks:
    return ActionMasks.from_mapping(
        {name: None if mask is None else mask[rows] for name, mask in masks.as_dict().items()}
    )


def _expect_shape(what: str, tensor: object, shape: tuple[int, ...]) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise _ClauseError(f"{what} is {type(tensor).__name__}, not a tensor")
    if tuple(tensor.shape) != shape:
        raise _ClauseError(f"{what} has shape {tuple(tensor.shape)}; expected {shape}")


def _max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def _expect_close(what: str, got: torch.Tensor, want: torch.Tensor, why: str) -> None:
    """`got` equals `want` up to rounding for their dtype (`torch.testing`'s tolerances)."""
    rtol, atol = _TOLERANCES.get(got.dtype, _TOLERANCES[torch.float32])
    close = torch.isclose(got.detach(), want.detach().to(got.dtype), rtol=rtol, atol=atol)
    if not bool(close.all()):  # NaN is never close
        gap = _max_gap(got, want)
        raise _ClauseError(
            f"{what} differ by up to {gap:.3g} (tolerance {atol:g} + {rtol:g} x value): {why}"
        )


def _expect_replay(
    replay: EvalResult, rollout: Sequence[ActionResult], hidden: HiddenState | None, why: str
) -> None:
    """The update's log-probs, values and final hidden state are the rollout's, step by step.

    Args:
        replay: `evaluate_actions` over the `[B, T, F]` sequence.
        rollout: The `get_action` result of each step, in order.
        hidden: The state the last step returned (`None` when stateless); the layout
            is checked by the shapes clauses.
        why: Why it matters, for the message.
    """
    for name in HEAD_NAMES:
        stored = torch.stack([step.log_prob[name] for step in rollout], dim=1)  # [B, T]
        _expect_close(
            f"evaluate_actions log-probs of head {name!r} and get_action's",
            replay.log_prob[name],
            stored,
            why,
        )
    stored_value = torch.stack([step.value for step in rollout], dim=1)  # [B, T]
    _expect_close("evaluate_actions values and get_action's", replay.value, stored_value, why)
    if hidden is not None:
        assert replay.hidden is not None
        for index, (got, want) in enumerate(zip(replay.hidden, hidden, strict=True)):
            _expect_close(
                f"the final hidden[{index}] of the sequence and of the steps", got, want, why
            )


def _expect_hidden(bundle: PolicyBundle, hidden: object, batch: int, where: str) -> None:
    """The hidden state a method returned has the layout `initial_hidden` declares."""
    reference = bundle.initial_hidden(batch)
    if reference is None:
        if hidden is not None:
            raise _ClauseError(
                f"{where} returned a hidden state from a stateless bundle; return None "
                "from _forward, or declare hidden_shapes and is_recurrent = True"
            )
        return
    if not isinstance(hidden, tuple) or len(hidden) != len(reference):
        raise _ClauseError(
            f"{where} returned hidden state {type(hidden).__name__} of "
            f"{len(hidden) if isinstance(hidden, tuple) else '?'} tensors; initial_hidden "
            f"gives a tuple of {len(reference)}: return the state in the declared layout"
        )
    for index, (got, want) in enumerate(zip(hidden, reference, strict=True)):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise _ClauseError(
                f"{where} returned hidden[{index}] of shape {shape}; initial_hidden({batch}) "
                f"has {tuple(want.shape)}: keep the batch in dimension 1, as declared"
            )
        if got.dtype != want.dtype or got.device != want.device:
            raise _ClauseError(
                f"{where} returned hidden[{index}] as {got.dtype} on {got.device}; the "
                f"bundle's state is {want.dtype} on {want.device}"
            )


def _network_calls(network: nn.Module) -> tuple[list[int], Any]:
    """Count calls of `network` through a forward pre-hook: `(counter, handle)`."""
    counter = [0]
    handle = network.register_forward_pre_hook(_CallCounter(counter))
    return counter, handle


class _CallCounter:
    """A forward pre-hook that counts the calls of its module."""

    def __init__(self, counter: list[int]) -> None:
        self.counter = counter

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.counter[0] += 1


class _GraphWatcher:
    """A forward hook noting each call of its module whose output requires grad.

    The network's own output, not only what `get_action` returns: the base may detach
    its results, which hides the graph a hook built without freeing its cost.
    """

    def __init__(self, found: list[str]) -> None:
        self.found = found

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: object) -> None:
        parts = output if isinstance(output, tuple | list) else (output,)
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in parts):
            self.found.append("the network's output in get_action")


def _trainable(bundle: PolicyBundle) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in bundle.network.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------- clauses


def _check_builds(subject: _Subject) -> str:
    first = subject.build()
    second = subject.build(offset=1)
    if first is second:
        raise _ClauseError("the factory returned the same bundle twice; build a new one")
    if first.feature_dim not in (subject.feature_dim, None):
        raise _ClauseError(
            f"factory({subject.feature_dim}) built a bundle with feature_dim="
            f"{first.feature_dim}; pass the width the factory is given to the bundle"
        )
    shared = {id(p) for p in first.network.parameters()} & {
        id(p) for p in second.network.parameters()
    }
    if shared:
        raise _ClauseError(
            f"two bundles from the factory share {len(shared)} parameter tensor(s); "
            "each call must build a fresh network"
        )
    if first.is_recurrent != (first.initial_hidden(1) is not None):
        raise _ClauseError(
            f"is_recurrent is {first.is_recurrent} but initial_hidden(1) returns "
            f"{first.initial_hidden(1)!r}"
        )
    return ""


def _check_shapes(subject: _Subject) -> str:
    bundle = subject.build()
    gen = subject.generator()
    for lead in ((_BATCH,), (_BATCH, _STEPS)):
        x, masks = _inputs(bundle, gen, lead, subject.feature_dim)
        _expect_result_shapes(bundle, x, masks, lead)
    return ""


def _expect_result_shapes(
    bundle: PolicyBundle, x: torch.Tensor, masks: ActionMasks, lead: tuple[int, ...]
) -> tuple[ActionResult, EvalResult]:
    """Every public method's results on `x` have the shapes the contract documents."""
    call = "[B, F]" if len(lead) == 1 else "[B, T, F]"
    act = bundle.get_action(x, masks, extras=_extras(bundle, x))
    fwd = bundle.forward(x, masks, extras=_extras(bundle, x))
    ev = bundle.evaluate_actions(x, act.action, masks, extras=_extras(bundle, x))
    value = bundle.get_value(x, extras=_extras(bundle, x))
    for name, size in zip(HEAD_NAMES, bundle.action_space.sizes, strict=True):
        _expect_shape(f"get_action({call}).action[{name!r}]", act.action[name], lead)
        if act.action[name].dtype != torch.int64:
            raise _ClauseError(f"get_action({call}).action[{name!r}] is not int64")
        _expect_shape(f"get_action({call}).log_prob[{name!r}]", act.log_prob[name], lead)
        _expect_shape(f"forward({call}).logits[{name!r}]", fwd.logits[name], (*lead, size))
        _expect_shape(f"evaluate_actions({call}).log_prob[{name!r}]", ev.log_prob[name], lead)
        _expect_shape(f"evaluate_actions({call}).entropy[{name!r}]", ev.entropy[name], lead)
    for where, tensor in (
        ("get_action", act.value),
        ("forward", fwd.value),
        ("evaluate_actions", ev.value),
        ("get_value", value),
    ):
        _expect_shape(f"{where}({call}).value", tensor, lead)
    for where, hidden in (
        ("get_action", act.hidden),
        ("forward", fwd.hidden),
        ("evaluate_actions", ev.hidden),
    ):
        _expect_hidden(bundle, hidden, lead[0], f"{where}({call})")
    return act, ev


def _check_mask_forms(subject: _Subject) -> str:
    bundle = subject.build()
    x, masks = _inputs(bundle, subject.generator(), (_BATCH, _STEPS), subject.feature_dim)
    partial = ActionMasks.from_mapping({**masks.as_dict(), "style": None, "op": None})
    for label, given in (("all heads", masks), ("some heads None", partial)):
        from_dataclass = bundle.forward(x, given, extras=_extras(bundle, x))
        from_mapping = bundle.forward(x, given.as_dict(), extras=_extras(bundle, x))
        for name in HEAD_NAMES:
            if not torch.equal(from_dataclass.logits[name], from_mapping.logits[name]):
                raise _ClauseError(
                    f"masks given as ActionMasks and as a mapping ({label}) give different "
                    f"logits for head {name!r}; do not read the caller's masks, read "
                    "inputs.masks"
                )
    return ""


def _check_masks_respected(subject: _Subject) -> str:
    bundle = subject.build()
    gen = subject.generator()
    x, masks = _inputs(bundle, gen, (_SAMPLED_ROWS,), subject.feature_dim)
    sampled = bundle.get_action(x, masks, deterministic=False, extras=_extras(bundle, x))
    mode = bundle.get_action(x, masks, deterministic=True, extras=_extras(bundle, x))
    logits = bundle.forward(x, masks, extras=_extras(bundle, x)).logits
    table = bundle.action_space.hierarchy  # a factory's own hierarchical space
    for name in HEAD_NAMES:
        mask = getattr(masks, name)
        assert mask is not None  # random_masks masks every head
        for label, result in (("sampled", sampled), ("deterministic", mode)):
            taken = result.action[name]
            allowed = mask.gather(-1, taken.unsqueeze(-1)).squeeze(-1)
            if table is not None and name != PRIMARY_HEAD:  # ignored heads are canonical
                used = _relevance(table).to(allowed.device)[result.action["op"]]
                allowed |= ~used[..., HEAD_NAMES.index(name)]
            if not bool(allowed.all()):
                row = int((~allowed).nonzero()[0, 0])
                raise _ClauseError(
                    f"get_action ({label}) took masked action {int(taken[row])} of head "
                    f"{name!r} in row {row}; leave masking to the base"
                )
        if not bool((logits[name][~mask] == MASKED_LOGIT).all()):
            raise _ClauseError(
                f"forward gives masked actions of head {name!r} a logit other than {MASKED_LOGIT:g}"
            )
        best = logits[name].argmax(dim=-1)
        if (table is None or name == PRIMARY_HEAD) and not torch.equal(best, mode.action[name]):
            raise _ClauseError(
                f"get_action(deterministic=True) for head {name!r} is not the argmax of "
                "forward's logits on the same inputs"
            )
    return ""


def _check_reproducible(subject: _Subject) -> str:
    bundle = subject.build()
    x, masks = _inputs(bundle, subject.generator(), (_SAMPLED_ROWS,), subject.feature_dim)
    runs: list[Any] = []
    for _ in range(2):
        torch.manual_seed(subject.seed + 17)
        runs.append(bundle.get_action(x, masks, extras=_extras(bundle, x)))
    first, second = runs
    hint = "draw randomness from torch's global generator (or a generator= you are given)"
    for name in HEAD_NAMES:
        if not torch.equal(first.action[name], second.action[name]):
            raise _ClauseError(
                f"two get_action calls after torch.manual_seed({subject.seed + 17}) sampled "
                f"different {name!r} actions; {hint}"
            )
        if not torch.equal(first.log_prob[name], second.log_prob[name]):
            raise _ClauseError(
                f"two get_action calls after torch.manual_seed({subject.seed + 17}) gave "
                f"different {name!r} log-probs; {hint}"
            )
    if not torch.equal(first.value, second.value):
        raise _ClauseError(
            f"two get_action calls after torch.manual_seed({subject.seed + 17}) gave "
            f"different values; {hint}"
        )
    return ""


def _check_deterministic(subject: _Subject) -> str:
    bundle = subject.build()
    x, masks = _inputs(bundle, subject.generator(), (_BATCH, _STEPS), subject.feature_dim)
    first = bundle.forward(x, masks, extras=_extras(bundle, x))
    second = bundle.forward(x, masks, extras=_extras(bundle, x))
    same = torch.equal(first.value, second.value) and all(
        torch.equal(first.logits[name], second.logits[name]) for name in HEAD_NAMES
    )
    if not same:
        mode = "training" if bundle.network.training else "eval"
        raise _ClauseError(
            "forward gives different outputs for the same inputs (the network is in "
            f"{mode} mode: dropout or other randomness?). Rollouts and PPO updates must "
            "compute the same function: remove the randomness, or call "
            "bundle.network.eval() in the factory to check the other clauses"
        )
    return ""


def _check_rollout_matches_update(subject: _Subject) -> str:
    bundle = subject.build()
    gen = subject.generator()
    start = bundle.initial_hidden(_BATCH)
    hidden = start
    steps: list[tuple[_Inputs, Any]] = []
    for _ in range(_STEPS):
        step_inputs = _inputs(bundle, gen, (_BATCH,), subject.feature_dim)
        result = bundle.get_action(
            step_inputs.features,
            step_inputs.masks,
            hidden,
            extras=_extras(bundle, step_inputs.features),
        )
        steps.append((step_inputs, result))
        hidden = result.hidden
    features = torch.stack([s[0].features for s in steps], dim=1)  # [B, T, F]
    masks = ActionMasks.stack([s[0].masks for s in steps])  # [B, T, A_h]
    actions = {h: torch.stack([s[1].action[h] for s in steps], dim=1) for h in HEAD_NAMES}
    replay = bundle.evaluate_actions(
        features, actions, masks, start, extras=_extras(bundle, features)
    )
    why = (
        "the rollout's log-probs must be reproduced by the PPO update, so a [B, T, F] "
        "sequence must give what T single steps threading the hidden state gave"
    )
    _expect_replay(replay, [out for _, out in steps], hidden, why)
    first = steps[0][1]
    one = bundle.evaluate_actions(
        steps[0][0].features,
        first.action,
        steps[0][0].masks,
        start,
        extras=_extras(bundle, steps[0][0].features),
    )
    for name in HEAD_NAMES:
        _expect_close(
            f"single-step evaluate_actions log-probs of head {name!r} and get_action's",
            one.log_prob[name],
            first.log_prob[name],
            "evaluate_actions must score what get_action sampled",
        )
    return ""


def _check_rows_independent(subject: _Subject) -> str:
    bundle = subject.build()
    x, masks = _inputs(bundle, subject.generator(), (_BATCH, _STEPS), subject.feature_dim)
    together = bundle.forward(x, masks, extras=_extras(bundle, x))
    why = "one environment's decision must not depend on the others in the batch"
    for row in range(_BATCH):
        alone = bundle.forward(
            x[row : row + 1],
            _rows(masks, slice(row, row + 1)),
            extras=_extras(bundle, x[row : row + 1]),
        )
        _expect_close(
            f"row {row}'s values alone and in the batch",
            alone.value,
            together.value[row : row + 1],
            why,
        )
        for name in HEAD_NAMES:
            _expect_close(
                f"row {row}'s {name!r} logits alone and in the batch",
                alone.logits[name],
                together.logits[name][row : row + 1],
                why,
            )
    return ""


def _check_gradients(subject: _Subject) -> str:
    bundle = subject.build()
    x, masks = _inputs(bundle, subject.generator(), (_BATCH, _STEPS), subject.feature_dim)
    graphs: list[str] = []
    handle = bundle.network.register_forward_hook(_GraphWatcher(graphs))
    try:
        act = bundle.get_action(x, masks, extras=_extras(bundle, x))
    finally:
        handle.remove()
    for label, tensor in (("value", act.value), ("log_prob['op']", act.log_prob["op"])):
        if tensor.requires_grad:
            graphs.append(f"get_action's {label}")
    if graphs:
        raise _ClauseError(
            f"{graphs[0]} requires grad: rollouts must not build an autograd graph; do not "
            "switch autograd on in _forward (the base calls it under torch.no_grad)"
        )
    params = _trainable(bundle)
    if not params:
        return "no trainable parameters"
    ev = bundle.evaluate_actions(x, act.action, masks, extras=_extras(bundle, x))
    loss = ev.value.square().mean()
    for name in HEAD_NAMES:
        loss = loss - ev.log_prob[name].mean() - 0.01 * ev.entropy[name].mean()
    if not loss.requires_grad:
        raise _ClauseError("evaluate_actions' outputs do not require grad: keep autograd on")
    bundle.network.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)
    for name, param in params:
        if param.grad is None:
            raise _ClauseError(
                f"parameter {name!r} gets no gradient from evaluate_actions; use it in "
                "_forward or set requires_grad=False"
            )
        if not bool(torch.isfinite(param.grad).all()):
            raise _ClauseError(f"parameter {name!r} gets a non-finite gradient")
    bundle.network.zero_grad(set_to_none=True)
    return ""


def _check_network_called(subject: _Subject) -> str:
    bundle = subject.build()
    if not _trainable(bundle):
        return "no trainable parameters: nothing to synchronize"
    x, masks = _inputs(bundle, subject.generator(), (_BATCH,), subject.feature_dim)
    act = bundle.get_action(x, masks, extras=_extras(bundle, x))
    counter, handle = _network_calls(bundle.network)
    try:
        bundle.evaluate_actions(x, act.action, masks, extras=_extras(bundle, x))
    finally:
        handle.remove()
    if counter[0] == 0:
        raise _ClauseError(
            "evaluate_actions never called bundle.network(...); call the network as a "
            "module from _forward so its hooks, and DistributedDataParallel's, fire"
        )
    return ""


def _check_hidden_round_trip(subject: _Subject) -> str:
    bundle = subject.build()
    gen = subject.generator()
    x, masks = _inputs(bundle, gen, (_BATCH,), subject.feature_dim)
    start = bundle.initial_hidden(_BATCH)
    if start is None:
        refused = False
        try:
            bundle.get_action(
                x,
                masks,
                (torch.zeros(1, _BATCH, 4, dtype=bundle.dtype),),
                extras=_extras(bundle, x),
            )
        except ValueError:
            refused = True
        if not refused:
            raise _ClauseError("a stateless bundle accepted a hidden state; it must refuse it")
        return "stateless: refuses a hidden state"
    for index, tensor in enumerate(start):
        if tensor.shape[1] != _BATCH or bool(tensor.ne(0).any()):
            raise _ClauseError(
                f"initial_hidden({_BATCH})[{index}] is not zeros with the batch in dimension 1"
            )
    with_none = bundle.forward(x, masks, None, extras=_extras(bundle, x))
    with_zeros = bundle.forward(x, masks, start, extras=_extras(bundle, x))
    _expect_close(
        "outputs from hidden=None and from initial_hidden",
        with_none.value,
        with_zeros.value,
        "hidden=None must mean initial_hidden",
    )
    hidden: HiddenState | None = start
    for _ in range(3):
        step = _inputs(bundle, gen, (_BATCH,), subject.feature_dim)
        result = bundle.get_action(
            step.features, step.masks, hidden, extras=_extras(bundle, step.features)
        )
        _expect_hidden(bundle, result.hidden, _BATCH, "get_action")
        assert result.hidden is not None
        for index, tensor in enumerate(result.hidden):
            if tensor.requires_grad:
                raise _ClauseError(f"get_action returned hidden[{index}] requiring grad")
        hidden = result.hidden
    carried = bundle.forward(x, masks, hidden, extras=_extras(bundle, x))
    changed = _max_gap(carried.value, with_zeros.value) > 0.0 or any(
        _max_gap(carried.logits[name], with_zeros.logits[name]) > 0.0 for name in HEAD_NAMES
    )
    if not changed:
        raise _ClauseError(
            "outputs are the same from a carried hidden state as from zeros: the hook "
            "ignores inputs.hidden"
        )
    bundle.evaluate_actions(
        x,
        bundle.get_action(x, masks, hidden, extras=_extras(bundle, x)).action,
        masks,
        hidden,
        extras=_extras(bundle, x),
    )
    return ""


def _check_state_dict(subject: _Subject) -> str:
    source = subject.build()
    target = subject.build(offset=1)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    target.load_state_dict(state)
    if list(target.state_dict()) != list(source.state_dict()):
        raise _ClauseError("state_dict keys change after a load")
    x, masks = _inputs(source, subject.generator(), (_BATCH, _STEPS), subject.feature_dim)
    want = source.forward(x, masks, extras=_extras(source, x))
    got = target.forward(x, masks, extras=_extras(target, x))
    if not torch.equal(got.value, want.value):
        raise _ClauseError(
            "a bundle loaded from another's state_dict gives different values; keep all "
            "state in the network's parameters and buffers"
        )
    for name in HEAD_NAMES:
        if not torch.equal(got.logits[name], want.logits[name]):
            raise _ClauseError(
                f"a bundle loaded from another's state_dict gives different {name!r} logits"
            )
    return "" if state else "empty state_dict"


def _check_float64(subject: _Subject) -> str:
    bundle = subject.build().to(torch.float64)
    if bundle.dtype != torch.float64:
        raise _ClauseError(f"after to(torch.float64) the bundle's dtype is {bundle.dtype}")
    x, masks = _inputs(bundle, subject.generator(), (_BATCH, _STEPS), subject.feature_dim)
    out = bundle.forward(x, masks, extras=_extras(bundle, x))
    if out.value.dtype != torch.float64:
        raise _ClauseError(
            f"after to(torch.float64) forward returns {out.value.dtype} values; create "
            "tensors in _forward with the features' dtype, not a fixed one"
        )
    _expect_hidden(bundle, out.hidden, _BATCH, "forward in float64")
    act = bundle.get_action(x, masks, extras=_extras(bundle, x))
    bundle.evaluate_actions(x, act.action, masks, extras=_extras(bundle, x))
    return ""


class _BadCall(NamedTuple):
    what: str
    method: str
    args: tuple[Any, ...]
    extras: dict[str, torch.Tensor] | None = None  # None: `_extras` of the features


def _bad_calls(bundle: PolicyBundle, subject: _Subject) -> list[_BadCall]:
    x, masks = _inputs(bundle, subject.generator(), (_BATCH,), subject.feature_dim)
    m = masks.as_dict()
    actions = bundle.get_action(x, masks, extras=_extras(bundle, x)).action
    slot = m["slot"]
    assert slot is not None
    void = slot.clone()
    void[1] = False
    nan = x.clone()
    nan[2, 0] = math.nan
    masked_slot = (~slot).int().argmax(dim=-1)  # a masked slot where the row has one
    has_masked = (~slot).any(dim=-1)
    calls = [
        _BadCall("integer features", "get_action", (x.long(), masks)),
        _BadCall("features of rank 4", "get_action", (x[None, None], masks)),
        _BadCall("NaN in the features", "get_action", (nan, masks)),
        _BadCall("an unknown mask key", "get_action", (x, {**m, "slots": slot})),
        _BadCall("a missing mask key", "forward", (x, {k: v for k, v in m.items() if k != "op"})),
        _BadCall(
            "a mask one action too wide",
            "get_action",
            (x, {**m, "slot": slot[:, [0, *range(slot.shape[1])]]}),
        ),
        _BadCall("a float mask", "get_action", (x, {**m, "slot": slot.float()})),
        _BadCall("a mask for another batch size", "forward", (x, {**m, "slot": slot[:-1]})),
        _BadCall("a mask row with no valid action", "get_action", (x, {**m, "slot": void})),
        _BadCall(
            "a missing action head",
            "evaluate_actions",
            (x, {k: v for k, v in actions.items() if k != "op"}, masks),
        ),
        _BadCall(
            "an action out of range",
            "evaluate_actions",
            (x, {**actions, "op": actions["op"] + 100}, masks),
        ),
        _BadCall(
            "float actions",
            "evaluate_actions",
            (x, {**actions, "op": actions["op"].float()}, masks),
        ),
        _BadCall("get_value of integer features", "get_value", (x.long(),)),
        _BadCall("sparse features", "get_action", (x.to_sparse(), masks)),
        _BadCall("a batch size of 0 for initial_hidden", "initial_hidden", (0,)),
    ]
    if bool(has_masked.any()):
        row = int(has_masked.int().argmax())
        bad = actions["slot"].clone()
        bad[row] = masked_slot[row]
        calls.append(
            _BadCall("a masked action", "evaluate_actions", (x, {**actions, "slot": bad}, masks))
        )
    if bundle.feature_dim is not None:
        wide = torch.cat([x, x[:, :1]], dim=-1)
        calls.append(_BadCall("features one column too wide", "get_action", (wide, masks)))
    start = bundle.initial_hidden(_BATCH)
    if start is None:
        state = (torch.zeros(1, _BATCH, 4, dtype=bundle.dtype),)
        calls.append(
            _BadCall("a hidden state for a stateless bundle", "get_action", (x, masks, state))
        )
    else:
        calls.append(
            _BadCall(
                "a hidden state for another batch size",
                "get_action",
                (x, masks, bundle.initial_hidden(_BATCH + 1)),
            )
        )
        if len(start) > 1:
            calls.append(
                _BadCall("a hidden state missing a tensor", "forward", (x, masks, start[:-1]))
            )
        wrong = tuple(
            t.to(torch.float16 if bundle.dtype != torch.float16 else torch.float32) for t in start
        )
        calls.append(_BadCall("a hidden state of another dtype", "get_action", (x, masks, wrong)))
        poisoned = tuple(t.clone() for t in start)
        poisoned[0].view(-1)[0] = math.nan
        calls.append(_BadCall("NaN in the hidden state", "get_action", (x, masks, poisoned)))
    return calls + _bad_extras(bundle, x, masks)


def _bad_extras(bundle: PolicyBundle, x: torch.Tensor, masks: ActionMasks) -> list[_BadCall]:
    """Bad extra inputs, when the bundle declares some: each refused by the base."""
    good = _extras(bundle, x)
    if good is None:
        return []
    first = bundle.extra_inputs[0]
    value = good[first.name]
    retyped = value.long() if first.kind == "floating" else value.to(bundle.dtype)
    calls = [
        _BadCall(
            f"no {first.name!r}",
            "get_action",
            (x, masks),
            {name: tensor for name, tensor in good.items() if name != first.name},
        ),
        _BadCall(
            "an undeclared extra input", "get_action", (x, masks), {**good, "undeclared": value}
        ),
        _BadCall(
            f"{first.name!r} of dtype {retyped.dtype}",
            "forward",
            (x, masks),
            {**good, first.name: retyped},
        ),
        _BadCall(
            f"{first.name!r} for another batch size",
            "get_action",
            (x, masks),
            {**good, first.name: value[:-1]},
        ),
    ]
    for spec in bundle.extra_inputs:
        bad = good[spec.name].clone()
        if spec.kind == "floating":
            bad.view(-1)[0] = math.nan
            calls.append(
                _BadCall(
                    f"NaN in {spec.name!r}", "get_action", (x, masks), {**good, spec.name: bad}
                )
            )
        else:
            outside = _outside(spec)
            if outside is not None:
                bad.view(-1)[0] = outside
                calls.append(
                    _BadCall(
                        f"{spec.name!r} of {outside}, out of range",
                        "get_action",
                        (x, masks),
                        {**good, spec.name: bad},
                    )
                )
    return calls


def _check_bad_inputs(subject: _Subject) -> str:
    bundle = subject.build()
    calls = _bad_calls(bundle, subject)
    x, masks = _inputs(bundle, subject.generator(), (_BATCH,), subject.feature_dim)
    before = bundle.forward(x, masks, extras=_extras(bundle, x))
    counter, handle = _network_calls(bundle.network)
    try:
        for call in calls:
            counter[0] = 0
            keywords: dict[str, object] = {}
            if call.method != "initial_hidden":
                keywords["extras"] = (
                    _extras(bundle, call.args[0]) if call.extras is None else call.extras
                )
            try:
                getattr(bundle, call.method)(*call.args, **keywords)
            except (ValueError, TypeError):
                pass
            except Exception as error:  # the wrong kind of refusal, reported
                raise _ClauseError(
                    f"{call.method} refused {call.what} with {type(error).__name__} "
                    f"({error}); it must raise ValueError or TypeError naming the argument"
                ) from None
            else:
                hint = "" if bundle.check_values else " (the factory set check_values=False)"
                raise _ClauseError(f"{call.method} accepted {call.what}; it must refuse it{hint}")
            if counter[0]:
                raise _ClauseError(
                    f"{call.method} ran the network before refusing {call.what}; check in "
                    "_normalize_inputs, before the hook"
                )
    finally:
        handle.remove()
    after = bundle.forward(x, masks, extras=_extras(bundle, x))
    if not torch.equal(before.value, after.value):
        raise _ClauseError("the bundle gives different outputs after refusing bad inputs")
    return f"{len(calls)} bad inputs refused"


def _check_no_closures(subject: _Subject) -> str:
    bundle = subject.build()
    x, masks = _inputs(bundle, subject.generator(), (_BATCH, _STEPS), subject.feature_dim)
    act = bundle.get_action(x, masks, extras=_extras(bundle, x))
    classes = _subject_classes(bundle)
    found = _hot_path_source_findings(classes)
    note = ""
    if sys.getprofile() is None:
        with _code_calls() as ran:
            bundle.get_action(
                x[:, 0],
                _rows_step(masks),
                bundle.initial_hidden(_BATCH),
                extras=_extras(bundle, x[:, 0]),
            )
            bundle.evaluate_actions(x, act.action, masks, extras=_extras(bundle, x))
        found += _per_call_closures(ran, _code_files(classes))
    else:
        note = "a profiler is active: only the source of the hook methods was read"
    if found:
        listed = "; ".join(dict.fromkeys(found))
        raise _ClauseError(
            f"a nested function or lambda is created on every call: {listed}. Define it "
            "once, at module level (or as a method), and pass what it captured as arguments"
        )
    return note


def _rows_step(masks: ActionMasks) -> ActionMasks:
    return ActionMasks.from_mapping(
        {name: None if mask is None else mask[:, 0] for name, mask in masks.as_dict().items()}
    )


@contextmanager
def _code_calls() -> Iterator[list[CodeType]]:
    """Record the code object of every Python function called inside the block.

    Uses `sys.setprofile`, so the caller must check that no profiler is installed.
    """
    ran: list[CodeType] = []
    sys.setprofile(_Recorder(ran))
    try:
        yield ran
    finally:
        sys.setprofile(None)


class _Recorder:
    """A `sys.setprofile` callback keeping the code of each Python call."""

    def __init__(self, ran: list[CodeType]) -> None:
        self.ran = ran

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            self.ran.append(frame.f_code)


def _subject_classes(bundle: PolicyBundle) -> list[type]:
    """The bundle's own classes, and the network's module classes from the same packages.

    Third-party and torch modules are left out: a contributor cannot fix them.
    """
    classes: list[type] = [
        cls
        for cls in type(bundle).__mro__
        if cls is not PolicyBundle and issubclass(cls, PolicyBundle)
    ]
    packages = {_package_of(cls) for cls in classes} | {_package_of(PolicyBundle)}
    for module in bundle.network.modules():
        cls = type(module)
        if _package_of(cls) in packages and cls not in classes:
            classes.append(cls)
    return classes


def _package_of(cls: type) -> str:
    return cls.__module__.partition(".")[0]


def _code_files(classes: Sequence[type]) -> set[str]:
    """The files the classes' methods were compiled from (`<stdin>` and the like too)."""
    files: set[str] = set()
    for cls in classes:
        for value in vars(cls).values():
            function = getattr(value, "__func__", value)  # staticmethod, classmethod
            code = getattr(function, "__code__", None)
            if isinstance(code, CodeType):
                files.add(code.co_filename)
    return files


def _per_call_closures(ran: list[CodeType], files: set[str]) -> list[str]:
    """Nested functions and lambdas of `files` both created and called in the block.

    A nested function or lambda is a code object stored in the constants of the
    function that defines it; when both ran in the block, the function object was
    built there, on that call. Comprehensions and generator expressions (code objects
    of their own on Python 3.11) and class bodies are not reported, though a closure
    inside one is. Decorator wrappers built at import time are not flagged: their
    defining function did not run in the block. (A function built once, cached, and
    called from the function that built it is flagged too: build it at module level
    instead.)
    """
    ran_set = set(ran)
    found: list[str] = []
    for parent in dict.fromkeys(ran):
        if parent.co_filename not in files:
            continue
        for const in parent.co_consts:
            if isinstance(const, CodeType) and const in ran_set and _is_closure(const):
                found.append(f"{const.co_qualname} ({const.co_filename}:{const.co_firstlineno})")
    return found


def _is_closure(code: CodeType) -> bool:
    """Whether `code` is a function's or a lambda's, not a comprehension's or a class body's."""
    is_function = bool(code.co_flags & inspect.CO_NEWLOCALS)
    return is_function and code.co_name not in _LOOP_CODE_NAMES


def _hot_path_source_findings(classes: Sequence[type]) -> list[str]:
    """Nested functions in the source of the methods that run on every call."""
    found: list[str] = []
    for cls in classes:
        if issubclass(cls, PolicyBundle):
            found.extend(_source_findings(cls, ("_forward", "_normalize_inputs")))
        else:
            found.extend(_source_findings(cls, ("forward",)))
    return found


def _source_findings(cls: type, methods: Sequence[str]) -> list[str]:
    try:
        return closures_built_per_call(cls, methods)
    except (OSError, TypeError, SyntaxError):
        return []  # no readable source (a REPL, exec): the run-time check still applies


# ---------------------------------------------------------------------- hierarchy


_HIERARCHY_EXAMPLES = 25
"""Mask draws of "hierarchy: masks respected" (Hypothesis's, or the seeded fallback's)."""

_DRAW_ROWS = 32
"""Rows of each mask draw."""

_SEED_BITS = (1 << 63) - 1


class _MaskDraw(NamedTuple):
    """One draw of per-op masks for "hierarchy: masks respected", as Hypothesis shrinks it.

    Attributes:
        seed: Seeds the masks, the features and the sampling.
        steps: 0 for one step (`[B, F]`), else `T` of a sequence (`[B, T, F]`).
        keep: The probability that each action is valid.
        by_op: The heads that get a per-op mask.
        void: Blank the per-op mask rows the base allows to be void: those of ops that
            are masked or do not use the head.
    """

    seed: int
    steps: int
    keep: float
    by_op: tuple[str, ...]
    void: bool

    def __str__(self) -> str:
        shape = "[B, F]" if self.steps == 0 else f"[B, T={self.steps}, F]"
        heads = ", ".join(self.by_op) or "no head"
        return (
            f"{shape} features, per-op masks on {heads}, keep={self.keep:.3g}, "
            f"void rows {'allowed' if self.void else 'none'}, seed={self.seed}"
        )


def _relevance(table: ActionHierarchy) -> torch.Tensor:
    """`[N_op, H]` bool: whether op `n` uses head `h` (`op` itself always)."""
    return torch.tensor(table.relevance_table(), dtype=torch.bool)


def _hierarchy_masks(
    space: ActionSpace,
    lead: tuple[int, ...],
    generator: torch.Generator,
    *,
    keep: float = 0.5,
    by_op: Sequence[str] = CONDITIONED_HEADS,
    void: bool = True,
    each_op: bool = False,
) -> ActionMasks:
    """Random flat and per-op masks for a hierarchical space, on the CPU.

    Every op the op mask allows has, for every head it uses, an action valid under the
    flat mask AND the per-op mask at that op (`random_masks`). With `void`, the per-op
    rows the base lets be void are blanked: those of an op that is masked or does not
    use the head. With `each_op`, even rows allow a single op, row `2k` op `k mod
    N_op`, so every op is taken.
    """
    table = space.hierarchy
    assert table is not None  # a hierarchical space
    masks = random_masks(lead, space=space, keep=keep, generator=generator, by_op=by_op).as_dict()
    if each_op:
        op_mask = masks["op"]
        assert op_mask is not None  # random_masks masks every head
        rows = torch.arange(0, lead[0], 2)
        chosen = torch.nn.functional.one_hot((rows // 2) % space.op, space.op).bool()
        op_mask[rows] = chosen.view(len(rows), *([1] * (len(lead) - 1)), space.op)
    if void:
        op_mask = masks["op"]
        assert op_mask is not None
        relevance = _relevance(table)
        for head in CONDITIONED_HEADS:
            needed = op_mask & relevance[:, HEAD_NAMES.index(head)]  # [*lead, N_op]
            per_op = masks.get(by_op_name(head))
            if per_op is not None:
                masks[by_op_name(head)] = per_op & needed.unsqueeze(-1)
    return ActionMasks.from_mapping(masks)


def _hierarchy_inputs(
    bundle: PolicyBundle,
    generator: torch.Generator,
    lead: tuple[int, ...],
    width: int,
    **options: Any,
) -> _Inputs:
    """Features and `_hierarchy_masks` for `bundle`, on its device."""
    features = torch.randn(*lead, width, generator=generator).to(bundle.device, bundle.dtype)
    masks = _hierarchy_masks(bundle.action_space, lead, generator, **options)
    return _Inputs(features, masks.to(bundle.device))


def _at(index: Sequence[int]) -> str:
    """`in row 3`, or `in row 3, step 1`."""
    step = f", step {index[1]}" if len(index) > 1 else ""
    return f"in row {index[0]}{step}"


def _first_violation(
    space: ActionSpace, masks: ActionMasks, actions: dict[str, torch.Tensor]
) -> str:
    """The first action its masks at the taken op forbid, in words; `""` if none.

    Only the heads the taken op uses are read: the others are canonical, whatever
    their masks (see "hierarchy: ignored heads canonical").
    """
    table = space.hierarchy
    assert table is not None
    op = actions[PRIMARY_HEAD].cpu()
    used = _relevance(table)[op]  # [*lead, H]
    fields = {name: mask.cpu() for name, mask in masks.as_dict().items() if mask is not None}
    for head in HEAD_NAMES:
        taken = actions[head].cpu()
        for field in (head, by_op_name(head)):
            mask = fields.get(field)
            if mask is None or field == by_op_name(PRIMARY_HEAD):
                continue
            if field != head:  # [*lead, N_op, A_h] at each row's op
                index = op[..., None, None].expand(*op.shape, 1, mask.shape[-1])
                mask = mask.gather(-2, index).squeeze(-2)
            allowed = mask.gather(-1, taken.unsqueeze(-1)).squeeze(-1)
            bad = used[..., HEAD_NAMES.index(head)] & ~allowed
            if bool(bad.any()):
                where = [int(i) for i in bad.nonzero()[0]]
                name = table.ops[int(op[tuple(where)])]
                return (
                    f"{head} = {int(taken[tuple(where)])} {_at(where)} under op {name}, "
                    f"which masks[{field!r}] forbids" + (" at that op" if field != head else "")
                )
    return ""


def _check_hierarchy_shapes(subject: _Subject) -> str:
    bundle = subject.build()
    space = bundle.action_space
    if space.hierarchy is None:
        raise _ClauseError(f"{subject.call} built a bundle with a flat action space")
    gen = subject.generator()
    for lead in ((_BATCH,), (_BATCH, _STEPS)):
        call = "[B, F]" if len(lead) == 1 else "[B, T, F]"
        x, masks = _hierarchy_inputs(bundle, gen, lead, subject.feature_dim)
        act, ev = _expect_result_shapes(bundle, x, masks, lead)
        joint = bundle.evaluate_actions(
            x, act.action, masks, joint_entropy=True, extras=_extras(bundle, x)
        ).joint_entropy
        _expect_shape(f"evaluate_actions({call}, joint_entropy=True).joint_entropy", joint, lead)
        for name in HEAD_NAMES:
            for what, flags in (("relevance", ev.relevance), ("availability", ev.availability)):
                _expect_shape(f"evaluate_actions({call}).{what}[{name!r}]", flags[name], lead)
                if flags[name].dtype != torch.bool:
                    raise _ClauseError(f"evaluate_actions({call}).{what}[{name!r}] is not bool")
    return f"under {_space_name(space)}"


def _check_hierarchy_masks(subject: _Subject) -> str:
    bundle = subject.build()
    if importlib.util.find_spec("hypothesis") is None:  # a test dependency, not the library's
        gen = subject.generator()
        for _ in range(_HIERARCHY_EXAMPLES):
            _expect_masks_held(bundle, subject, _random_draw(gen))
        return (
            f"Hypothesis is not installed: {_HIERARCHY_EXAMPLES} mask draws from a seeded "
            "torch generator instead"
        )
    _with_hypothesis(bundle, subject)
    return f"{_HIERARCHY_EXAMPLES} mask draws by Hypothesis"


def _with_hypothesis(bundle: PolicyBundle, subject: _Subject) -> None:
    """`_expect_masks_held` on masks Hypothesis draws; it raises the smallest failure."""
    from hypothesis import (  # noqa: PLC0415 - optional: a test dependency
        HealthCheck,
        Phase,
        Verbosity,
        given,
        settings,
    )
    from hypothesis import strategies as st  # noqa: PLC0415

    draws = st.builds(
        _MaskDraw,
        seed=st.integers(0, 2**32 - 1),
        steps=st.sampled_from((0, 3)),
        keep=st.floats(0.05, 0.95),
        by_op=st.sets(st.sampled_from(CONDITIONED_HEADS)).map(_in_head_order),
        void=st.booleans(),
    )

    @settings(
        max_examples=_HIERARCHY_EXAMPLES,
        derandomize=True,  # the same draws on every run: a check must not pass by luck
        database=None,
        deadline=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        print_blob=False,
    )
    @given(draws)
    def masks_held(draw: _MaskDraw) -> None:
        _expect_masks_held(bundle, subject, draw)

    masks_held()


def _in_head_order(heads: set[str]) -> tuple[str, ...]:
    return tuple(head for head in CONDITIONED_HEADS if head in heads)


def _random_draw(generator: torch.Generator) -> _MaskDraw:
    """A `_MaskDraw` from a torch generator, for when Hypothesis is not installed."""
    picked = (torch.rand(len(CONDITIONED_HEADS), generator=generator) < 0.5).tolist()
    return _MaskDraw(
        seed=int(torch.randint(2**31, (), generator=generator)),
        steps=3 * int(torch.randint(2, (), generator=generator)),
        keep=0.05 + 0.9 * float(torch.rand((), generator=generator)),
        by_op=tuple(head for head, pick in zip(CONDITIONED_HEADS, picked, strict=True) if pick),
        void=bool(torch.rand((), generator=generator) < 0.5),
    )


def _expect_masks_held(bundle: PolicyBundle, subject: _Subject, draw: _MaskDraw) -> None:
    """Sampled and deterministic actions of one draw break none of its masks."""
    gen = torch.Generator().manual_seed(hash((subject.seed, draw.seed)) & _SEED_BITS)
    lead = (_DRAW_ROWS,) if draw.steps == 0 else (_DRAW_ROWS, draw.steps)
    x, masks = _hierarchy_inputs(
        bundle, gen, lead, subject.feature_dim, keep=draw.keep, by_op=draw.by_op, void=draw.void
    )
    torch.manual_seed(draw.seed)
    for label, deterministic in (("sampled", False), ("deterministic", True)):
        taken = bundle.get_action(
            x, masks, deterministic=deterministic, extras=_extras(bundle, x)
        ).action
        found = _first_violation(bundle.action_space, masks, taken)
        if found:
            raise _ClauseError(
                f"get_action ({label}) took {found} (masks drawn with {draw}); leave "
                "masking to the base, and pass every mask, the per-op <head>_by_op ones "
                "too, on to super()._normalize_inputs"
            )


def _check_hierarchy_canonical(subject: _Subject) -> str:
    bundle = subject.build()
    space = bundle.action_space
    table = space.hierarchy
    assert table is not None  # "hierarchy: shapes" passed
    relevance = _relevance(table)
    gen = subject.generator()
    for lead in ((4 * space.op,), (4 * space.op, _STEPS)):
        x, masks = _hierarchy_inputs(bundle, gen, lead, subject.feature_dim, each_op=True)
        sampled = bundle.get_action(x, masks, extras=_extras(bundle, x))
        for label, result in (
            ("sampled", sampled),
            (
                "deterministic",
                bundle.get_action(x, masks, deterministic=True, extras=_extras(bundle, x)),
            ),
        ):
            _expect_canonical(table, result.action, f"get_action ({label})", result.log_prob)
        ev = bundle.evaluate_actions(x, sampled.action, masks, extras=_extras(bundle, x))
        _expect_canonical(table, sampled.action, "evaluate_actions", ev.log_prob, ev.entropy)
        op = sampled.action[PRIMARY_HEAD].cpu()
        op_mask = masks.op
        assert op_mask is not None  # _hierarchy_masks masks every head
        for head in HEAD_NAMES:
            column = relevance[:, HEAD_NAMES.index(head)]
            for what, got, want in (
                ("relevance", ev.relevance[head], column[op]),
                ("availability", ev.availability[head], (op_mask.cpu() & column).any(dim=-1)),
            ):
                if not torch.equal(got.cpu(), want):
                    where = [int(i) for i in (got.cpu() != want).nonzero()[0]]
                    raise _ClauseError(
                        f"evaluate_actions gives {what}[{head!r}] = {bool(got.cpu()[tuple(where)])} "
                        f"{_at(where)}, where the hierarchy says {bool(want[tuple(where)])}"
                    )
        _expect_non_canonical_refused(bundle, x, sampled.action, masks, relevance)
    return ""


def _expect_canonical(
    table: ActionHierarchy,
    actions: dict[str, torch.Tensor],
    where: str,
    log_prob: dict[str, torch.Tensor],
    entropy: dict[str, torch.Tensor] | None = None,
) -> None:
    """Every head the taken op ignores has its canonical action, log-prob (entropy) 0."""
    op = actions[PRIMARY_HEAD].cpu()
    used = _relevance(table)[op]  # [*lead, H]
    for index, head in enumerate(HEAD_NAMES):
        ignored = ~used[..., index]
        canonical = table.canonical[index]
        checks = [
            ("action", actions[head].cpu(), float(canonical)),
            ("log-prob", log_prob[head].detach().cpu(), 0.0),
        ]
        if entropy is not None:
            checks.append(("entropy", entropy[head].detach().cpu(), 0.0))
        for what, got, want in checks:
            bad = ignored & (got != want)
            if bool(bad.any()):
                at = [int(i) for i in bad.nonzero()[0]]
                name = table.ops[int(op[tuple(at)])]
                value = got[tuple(at)].item()
                raise _ClauseError(
                    f"{where} gives {head!r} {what} {value:.4g} {_at(at)} under op {name}, "
                    f"which does not use {head!r}: it must be {want:g} (the canonical action "
                    f"{canonical}, log-prob and entropy exactly 0), so the head adds nothing "
                    "to PPO's ratio or entropy bonus; leave sampling and scoring to the base"
                )


def _expect_non_canonical_refused(
    bundle: PolicyBundle,
    x: torch.Tensor,
    actions: dict[str, torch.Tensor],
    masks: ActionMasks,
    relevance: torch.Tensor,
) -> None:
    """`evaluate_actions` refuses another action than the canonical for an ignored head.

    Tried on the first head, in `HEAD_NAMES` order, that some row's op ignores and that
    has another action to take; a table whose ops use every head has none.
    """
    table = bundle.action_space.hierarchy
    assert table is not None
    op = actions[PRIMARY_HEAD].cpu()
    for index, head in enumerate(HEAD_NAMES):
        size = bundle.action_space.size_of(head)
        ignored = ~relevance[op][..., index]
        if size < 2 or not bool(ignored.any()):
            continue
        at = tuple(int(i) for i in ignored.nonzero()[0])
        wrong = actions[head].clone()
        other = (table.canonical[index] + 1) % size
        wrong[at] = other
        try:
            bundle.evaluate_actions(x, {**actions, head: wrong}, masks, extras=_extras(bundle, x))
        except (ValueError, TypeError):
            return
        hint = "" if bundle.check_values else " (the factory set check_values=False)"
        raise _ClauseError(
            f"evaluate_actions accepted {head} = {other} {_at(at)} under op "
            f"{table.ops[int(op[at])]}, which does not use {head!r}; it must refuse any "
            f"action but the canonical {table.canonical[index]} there, as the base does"
            f"{hint}: do not rewrite the actions in _normalize_inputs"
        )


def _check_hierarchy_rollout(subject: _Subject) -> str:
    bundle = subject.build()
    gen = subject.generator()
    batch = 2 * _BATCH
    starts = torch.zeros(batch, _STEPS, dtype=torch.bool)
    starts[::2, _STEPS // 2] = True  # an episode starts inside the sequence
    starts[1, 0] = True
    starts = starts.to(bundle.device)
    start = bundle.initial_hidden(batch)
    hidden = start
    steps: list[tuple[_Inputs, ActionResult]] = []
    for step in range(_STEPS):
        step_inputs = _hierarchy_inputs(
            bundle, gen, (batch,), subject.feature_dim, each_op=step % 2 == 0
        )
        result = bundle.get_action(
            step_inputs.features,
            step_inputs.masks,
            hidden,
            episode_start=starts[:, step],
            extras=_extras(bundle, step_inputs.features),
        )
        steps.append((step_inputs, result))
        hidden = result.hidden
    features = torch.stack([s[0].features for s in steps], dim=1)  # [B, T, F]
    masks = ActionMasks.stack([s[0].masks for s in steps])  # [B, T, (N_op,) A_h]
    actions = {h: torch.stack([s[1].action[h] for s in steps], dim=1) for h in HEAD_NAMES}
    replay = bundle.evaluate_actions(
        features, actions, masks, start, episode_start=starts, extras=_extras(bundle, features)
    )
    why = (
        "under the hierarchy the update scores each step at the op the rollout took, so "
        "the hook must give a step the same logits alone and inside a sequence, "
        "whatever the per-op masks; condition on the op only through "
        "OpConditionedOutput.logits_by_op (every op at once), never by reading "
        "inputs.action_index or inputs.actions, which get_action does not have"
    )
    _expect_replay(replay, [out for _, out in steps], hidden, why)
    first_inputs, first = steps[0]
    one = bundle.evaluate_actions(
        first_inputs.features,
        first.action,
        first_inputs.masks,
        start,
        episode_start=starts[:, 0],
        extras=_extras(bundle, first_inputs.features),
    )
    for name in HEAD_NAMES:
        _expect_close(
            f"single-step evaluate_actions log-probs of head {name!r} and get_action's",
            one.log_prob[name],
            first.log_prob[name],
            "evaluate_actions must score what get_action sampled, at the op it sampled",
        )
    return ""


_KIT_FLOORS = {"op": 0.15, "blueprint": 0.12, "tempo": 0.12}
"""The floors the kit builds with: the defaults of the system Tamiyo comes from."""


def _check_floors(subject: _Subject) -> str:
    bundle = subject.build()
    given = subject.probability_floor
    assert given is not None  # the plan gives this clause floors
    if bundle.probability_floor != given:
        raise _ClauseError(
            f"{subject.call} built a bundle whose probability_floor is "
            f"{bundle.probability_floor}; pass the probability_floor the factory is given "
            "on to PolicyBundle.__init__"
        )
    x, masks = _inputs(bundle, subject.generator(), (_SAMPLED_ROWS,), subject.feature_dim)
    logits = bundle.forward(x, masks, extras=_extras(bundle, x)).logits
    for name, floor in given.items():
        mask = getattr(masks, name)
        assert mask is not None  # random_masks masks every head
        probs = logits[name].double().softmax(dim=-1)  # [B, A_h]
        count = mask.sum(dim=-1, keepdim=True).double()
        effective = torch.where(count > 1, (0.99 / count).clamp(max=floor), 0.0)
        short = mask & (probs < effective * (1 - 1e-5))
        if bool(short.any()):
            row, action = (int(i) for i in short.nonzero()[0])
            raise _ClauseError(
                f"forward gives valid action {action} of head {name!r} (row {row}) probability "
                f"{float(probs[row, action]):.4g}, under its floor "
                f"{float(effective[row, 0]):.4g}; leave masking and normalization to the base"
            )
        if bool((probs[~mask] != 0).any()):
            raise _ClauseError(
                f"forward gives a masked action of head {name!r} a probability above 0"
            )
    step = bundle.get_action(x, masks, extras=_extras(bundle, x))
    scored = bundle.evaluate_actions(x, step.action, masks, extras=_extras(bundle, x))
    for name in HEAD_NAMES:
        _expect_close(
            f"evaluate_actions log-probs of head {name!r} under floors and get_action's",
            scored.log_prob[name].detach(),
            step.log_prob[name],
            "both must score the floored distribution",
        )
    return ""


class _ExtrasSeen:
    """Wraps a bundle's hook for one call: records the extras it was given, then runs it."""

    def __init__(self, hook: Callable[[PolicyInputs], NetworkOutput | OpConditionedOutput]) -> None:
        self.hook = hook
        self.seen: list[Mapping[str, torch.Tensor]] = []

    def __call__(self, inputs: PolicyInputs) -> NetworkOutput | OpConditionedOutput:
        self.seen.append(inputs.extras)
        return self.hook(inputs)


def _check_extra_inputs(subject: _Subject) -> str:
    bundle = subject.build()
    specs = bundle.extra_inputs
    if not specs:
        return "the bundle declares no extra inputs"
    gen = subject.generator()
    for lead in ((_BATCH,), (_BATCH, _STEPS)):
        x, masks = _inputs(bundle, gen, lead, subject.feature_dim)
        extras = _extras(bundle, x)
        assert extras is not None  # the bundle declares some
        spy = _ExtrasSeen(bundle._forward)
        bundle._forward = spy  # type: ignore[method-assign]  # this bundle, this call only
        try:
            bundle.forward(x, masks, extras=extras)
        finally:
            del bundle._forward
        steps = 1 if len(lead) == 1 else _STEPS
        for spec in specs:
            got = spy.seen[-1].get(spec.name) if spy.seen else None
            want = (_BATCH, steps, *spec.shape)
            if got is None or tuple(got.shape) != want:
                shown = "nothing" if got is None else f"shape {tuple(got.shape)}"
                raise _ClauseError(
                    f"_forward got {shown} for extra input {spec.name!r} from {lead}-shaped "
                    f"features; expected {want}: pass extras on to super()._normalize_inputs"
                )
    x, masks = _inputs(bundle, gen, (_BATCH, _STEPS), subject.feature_dim)
    extras = _extras(bundle, x)
    shifted = _extras(bundle, x + 0.371)
    assert extras is not None  # the bundle declares some
    assert shifted is not None
    before = bundle.forward(x, masks, extras=extras)
    for spec in specs:
        if spec.kind == "integer" and len(_integer_choices(spec)) == 1:
            continue  # one allowed value: nothing to vary
        after = bundle.forward(x, masks, extras={**extras, spec.name: shifted[spec.name]})
        same = torch.equal(before.value, after.value) and all(
            torch.equal(before.logits[name], after.logits[name]) for name in HEAD_NAMES
        )
        if same:
            raise _ClauseError(
                f"the outputs do not depend on extra input {spec.name!r}: read "
                f"inputs.extras[{spec.name!r}] in _forward, or do not declare it"
            )
    return ", ".join(spec.name for spec in specs)


_GATES: tuple[tuple[str, _Check], ...] = (
    ("builds", _check_builds),
    ("shapes", _check_shapes),
    ("deterministic", _check_deterministic),
)
"""Clauses the others depend on: when one fails, the later ones are not run.

"shapes" blocks the rest only when the hook broke its output contract
(`HookContractError`): every later clause would fail with the same message.
"""

_CRASHED = "raised "
_BROKE_CONTRACT = "the hook's output breaks the contract: "

_HIERARCHY_GATE = "hierarchy: shapes"

_BLOCKED_BY = {
    "builds": "the factory built no bundle",
    "shapes": "the hook's output breaks the contract (see 'shapes')",
    "deterministic": "the outputs are random (see 'deterministic')",
    _HIERARCHY_GATE: f"the bundle fails under the hierarchy (see {_HIERARCHY_GATE!r})",
}
"""Why the later clauses were not run, for each gate. "hierarchy: shapes" blocks the
other hierarchy clauses whatever made it fail: they build and call the bundle the same
way."""

_NOT_RUN = "not run: "

_CLAUSES: tuple[tuple[str, _Check], ...] = (
    *_GATES,
    ("masks as mapping or dataclass", _check_mask_forms),
    ("masks respected", _check_masks_respected),
    ("reproducible under a seed", _check_reproducible),
    ("rollout and update agree", _check_rollout_matches_update),
    ("rows independent", _check_rows_independent),
    ("gradients", _check_gradients),
    ("network called as a module", _check_network_called),
    ("hidden state round trip", _check_hidden_round_trip),
    ("state_dict round trip", _check_state_dict),
    ("float64", _check_float64),
    ("bad inputs refused", _check_bad_inputs),
    ("no per-call closures", _check_no_closures),
    ("probability floors", _check_floors),
    ("extra inputs", _check_extra_inputs),
    (_HIERARCHY_GATE, _check_hierarchy_shapes),
    ("hierarchy: masks respected", _check_hierarchy_masks),
    ("hierarchy: ignored heads canonical", _check_hierarchy_canonical),
    ("hierarchy: rollout and update agree", _check_hierarchy_rollout),
)

_FLOORS_CLAUSE = "probability floors"

_HIERARCHY_NAMES = frozenset(name for name, _ in _CLAUSES if name.startswith("hierarchy: "))
"""The clauses run under a hierarchical space (see `_plan`)."""
