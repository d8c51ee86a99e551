"""Every bad argument is refused before the network runs, with a message naming it.

The whole matrix is the `CASES` table: one row per kind of bad input, giving the
public method, how to break its arguments, the exception and what the message must
say. Each row runs on every bundle it applies to (`BUNDLES`), and also checks that the
network never ran and that the bundle gives the same answers after the refusal as
before it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from conftest import FEATURE_DIM, TinyStatelessBundle, small_lstm
from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionMasks,
    MLPPolicyBundle,
    NetworkOutput,
    OpConditionedOutput,
    PolicyBundle,
    PolicyInputs,
    UniformPolicyBundle,
)
from esper.tamiyo.policy.testing import random_masks

B, T = 3, 4


def _masks2() -> dict[str, torch.Tensor | None]:
    return random_masks((B,)).as_dict()


def _masks3() -> dict[str, torch.Tensor | None]:
    return random_masks((B, T)).as_dict()


def _actions(lead: tuple[int, ...] = (B,)) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(*lead, dtype=torch.long) for name in HEAD_NAMES}


def _all_valid(lead: tuple[int, ...] = (B,)) -> dict[str, torch.Tensor | None]:
    return dict.fromkeys(HEAD_NAMES, None)


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(base)
    out.update(changes)
    return out


def _without(base: dict[str, Any], key: str) -> dict[str, Any]:
    out = dict(base)
    del out[key]
    return out


def _void_row(masks: dict[str, torch.Tensor | None], head: str, row: int) -> dict[str, Any]:
    mask = masks[head]
    assert mask is not None
    mask = mask.clone()
    mask[row] = False
    return _with(masks, **{head: mask})


def _nan_features(row: int) -> torch.Tensor:
    x = torch.randn(B, FEATURE_DIM)
    x[row, 2] = float("nan")
    return x


def _masked_action() -> tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor]]:
    masks = _all_valid()
    op = torch.ones(B, 6, dtype=torch.bool)
    op[1, 0] = False  # row 1 may not take op 0, which the actions take
    masks["op"] = op
    return masks, _actions()


def _mutated_masks(head: str, value: object) -> ActionMasks:
    """Masks changed after construction, past the dataclass's own check."""
    masks = ActionMasks()
    object.__setattr__(masks, head, value)
    return masks


def _nan_hidden(row: int) -> tuple[torch.Tensor, torch.Tensor]:
    h, c = torch.zeros(1, B, 16), torch.zeros(1, B, 16)
    c[0, row, 3] = float("nan")
    return h, c


def _csr(tensor: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # torch warns that its CSR support is in beta
        warnings.simplefilter("ignore", UserWarning)
        return tensor.to_sparse_csr()


def _inference(tensor_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return tensor_fn()


@dataclass
class Case:
    """One row of the matrix: call `method(**kwargs())`, expect `error` matching `match`."""

    id: str
    method: str
    kwargs: Callable[[], dict[str, Any]]
    error: type[Exception]
    match: str
    bundles: str = "all"  # "all", "recurrent" (the small LSTM), "stateless" or "extras"
    extra: dict[str, Any] = field(default_factory=dict)


def _x2() -> torch.Tensor:
    return torch.randn(B, FEATURE_DIM)


def _x3() -> torch.Tensor:
    return torch.randn(B, T, FEATURE_DIM)


def _bp2() -> torch.Tensor:
    """`[B, 3]` blueprint indices, some slots empty (-1)."""
    return torch.tensor([[0, -1, 12], [3, 3, -1], [-1, -1, -1]])


CASES = [
    # features
    Case("features not a tensor", "get_action",
         lambda: {"features": [[0.0] * FEATURE_DIM], "masks": None},
         TypeError, r"features must be a torch.Tensor.*got list"),
    Case("features integer", "get_action",
         lambda: {"features": torch.zeros(B, FEATURE_DIM, dtype=torch.long), "masks": None},
         TypeError, r"features must be a floating-point tensor, got dtype torch.int64"),
    Case("features rank 1", "forward",
         lambda: {"features": torch.randn(FEATURE_DIM), "masks": None},
         ValueError, r"features must be \[B, F\].*got rank 1"),
    Case("features rank 4", "get_value",
         lambda: {"features": torch.randn(B, T, 1, FEATURE_DIM)},
         ValueError, r"features must be \[B, F\].*got rank 4"),
    Case("features wrong width", "get_action",
         lambda: {"features": torch.randn(B, FEATURE_DIM + 1), "masks": None},
         ValueError, rf"features have width {FEATURE_DIM + 1}.*feature_dim={FEATURE_DIM}"),
    Case("features empty batch", "get_action",
         lambda: {"features": torch.randn(0, FEATURE_DIM), "masks": None},
         ValueError, r"features have an empty batch"),
    Case("features float64 on a float32 bundle", "get_action",
         lambda: {"features": torch.randn(B, FEATURE_DIM, dtype=torch.float64), "masks": None},
         TypeError, r"features has dtype torch.float64 but the bundle's parameters are torch.float32"),
    Case("features NaN", "get_action",
         lambda: {"features": _nan_features(2), "masks": None},
         ValueError, r"features contain NaN or Inf at batch row 2"),
    Case("features Inf in a sequence", "evaluate_actions",
         lambda: {"features": torch.full((B, T, FEATURE_DIM), float("inf")),
                  "actions": _actions((B, T)), "masks": None},
         ValueError, r"features contain NaN or Inf at batch row 0, step 0"),
    # masks
    Case("masks not a mapping", "get_action",
         lambda: {"features": _x2(), "masks": [None] * 8},
         TypeError, r"masks must be an ActionMasks, a mapping of head name to mask, or None"),
    Case("masks unknown key", "forward",
         lambda: {"features": _x2(), "masks": _with(_masks2(), slots=None)},
         ValueError, r"unknown head 'slots'; valid heads: slot, blueprint"),
    Case("masks missing key", "get_action",
         lambda: {"features": _x2(), "masks": _without(_masks2(), "alpha_curve")},
         ValueError, r"missing head 'alpha_curve'"),
    Case("mask not bool", "get_action",
         lambda: {"features": _x2(), "masks": _with(_masks2(), op=torch.ones(B, 6))},
         TypeError, r"masks\['op'\] must have dtype torch.bool"),
    Case("mask wrong head width", "evaluate_actions",
         lambda: {"features": _x2(), "actions": _actions(),
                  "masks": _with(_masks2(), blueprint=torch.ones(B, 12, dtype=torch.bool))},
         ValueError, r"masks\['blueprint'\] has 12 actions.*head 'blueprint' has 13"),
    Case("mask wrong batch", "get_action",
         lambda: {"features": _x2(),
                  "masks": _with(_masks2(), style=torch.ones(B + 1, 4, dtype=torch.bool))},
         ValueError, rf"masks\['style'\] has batch {B + 1} but the features have batch {B}"),
    Case("mask wrong length", "forward",
         lambda: {"features": _x3(),
                  "masks": _with(_masks3(), tempo=torch.ones(B, T - 1, 3, dtype=torch.bool))},
         ValueError, rf"masks\['tempo'\] has {T - 1} steps.*T={T}"),
    Case("2-D mask with a sequence", "forward",
         lambda: {"features": _x3(),
                  "masks": _with(_masks3(), slot=torch.ones(B, 3, dtype=torch.bool))},
         ValueError, rf"masks\['slot'\] has shape \({B}, 3\) \(\[B, A\]\) but the features are a sequence of T={T}"),
    Case("mask rank 4", "get_action",
         lambda: {"features": _x2(),
                  "masks": _with(_masks2(), op=torch.ones(B, 1, 1, 6, dtype=torch.bool))},
         ValueError, r"masks\['op'\] must be \[B, A\] or \[B, 1, A\], got rank 4"),
    Case("mask row with no valid action", "get_action",
         lambda: {"features": _x2(), "masks": _void_row(_masks2(), "alpha_target", 1)},
         ValueError, r"masks\['alpha_target'\] has no valid action at batch row 1"),
    Case("mask void row in a sequence", "evaluate_actions",
         lambda: {"features": _x3(), "actions": _actions((B, T)),
                  "masks": _with(_all_valid(), op=torch.ones(B, T, 6, dtype=torch.bool).index_fill(1, torch.tensor([2]), False))},
         ValueError, r"masks\['op'\] has no valid action at batch row 0, step 2"),
    # hidden
    Case("hidden not a tuple", "get_action",
         lambda: {"features": _x2(), "masks": None, "hidden": torch.zeros(1, B, 16)},
         TypeError, r"hidden must be a tuple of 2 tensor\(s\).*got Tensor", bundles="recurrent"),
    Case("hidden wrong count", "get_action",
         lambda: {"features": _x2(), "masks": None, "hidden": (torch.zeros(1, B, 16),)},
         ValueError, r"hidden must hold 2 tensor\(s\), got 1", bundles="recurrent"),
    Case("hidden element not a tensor", "forward",
         lambda: {"features": _x2(), "masks": None, "hidden": (torch.zeros(1, B, 16), None)},
         TypeError, r"hidden\[1\] must be a torch.Tensor, got NoneType", bundles="recurrent"),
    Case("hidden wrong batch", "evaluate_actions",
         lambda: {"features": _x2(), "actions": _actions(), "masks": None,
                  "hidden": (torch.zeros(1, B + 2, 16), torch.zeros(1, B + 2, 16))},
         ValueError, rf"hidden\[0\] has batch {B + 2} in dimension 1 but the features have batch {B}", bundles="recurrent"),
    Case("hidden wrong width", "get_value",
         lambda: {"features": _x2(), "hidden": (torch.zeros(1, B, 16), torch.zeros(1, B, 15))},
         ValueError, rf"hidden\[1\] has shape \(1, {B}, 15\); expected \(1, {B}, 16\)", bundles="recurrent"),
    Case("hidden wrong layer count", "get_action",
         lambda: {"features": _x2(), "masks": None,
                  "hidden": (torch.zeros(2, B, 16), torch.zeros(2, B, 16))},
         ValueError, rf"hidden\[0\] has shape \(2, {B}, 16\); expected \(1, {B}, 16\)", bundles="recurrent"),
    Case("hidden integer", "get_action",
         lambda: {"features": _x2(), "masks": None,
                  "hidden": (torch.zeros(1, B, 16, dtype=torch.long), torch.zeros(1, B, 16))},
         TypeError, r"hidden\[0\] must be floating point", bundles="recurrent"),
    Case("hidden float64 on a float32 bundle", "evaluate_actions",
         lambda: {"features": _x3(), "actions": _actions((B, T)), "masks": None,
                  "hidden": (torch.zeros(1, B, 16), torch.zeros(1, B, 16, dtype=torch.float64))},
         TypeError, r"hidden\[1\] has dtype torch.float64 but the bundle's parameters are torch.float32", bundles="recurrent"),
    Case("hidden given to a stateless bundle", "get_action",
         lambda: {"features": _x2(), "masks": None,
                  "hidden": (torch.zeros(1, B, 16), torch.zeros(1, B, 16))},
         ValueError, r"hidden must be None: \w+ is stateless \(is_recurrent=False\)", bundles="stateless"),
    Case("mask on another device", "get_action",
         lambda: {"features": _x2(),
                  "masks": _with(_masks2(), op=torch.ones(B, 6, dtype=torch.bool, device="meta"))},
         ValueError, r"masks\['op'\] is on meta but the bundle is on cpu"),
    Case("ActionMasks with a float mask", "forward",
         lambda: {"features": _x2(), "masks": ActionMasks(style=torch.ones(B, 4))},
         TypeError, r"masks\['style'\] must have dtype torch.bool"),
    # episodes and sampling
    Case("episode_start not bool", "get_action",
         lambda: {"features": _x2(), "masks": None, "episode_start": torch.zeros(B)},
         TypeError, r"episode_start must have dtype torch.bool"),
    Case("episode_start [B] with a sequence", "evaluate_actions",
         lambda: {"features": _x3(), "actions": _actions((B, T)), "masks": None,
                  "episode_start": torch.zeros(B, dtype=torch.bool)},
         ValueError, rf"episode_start has shape \({B},\); expected \[B, T\] = \({B}, {T}\)"),
    Case("generator not a Generator", "get_action",
         lambda: {"features": _x2(), "masks": None, "generator": 0},
         TypeError, r"generator must be a torch.Generator or None, got int"),
    Case("initial_hidden of 0 rows", "initial_hidden",
         lambda: {"batch_size": 0},
         ValueError, r"batch_size must be a positive int, got 0"),
    # actions
    Case("actions not a mapping", "evaluate_actions",
         lambda: {"features": _x2(), "actions": torch.zeros(B, 8, dtype=torch.long), "masks": None},
         TypeError, r"actions must be a mapping of head name to tensor"),
    Case("actions missing head", "evaluate_actions",
         lambda: {"features": _x2(), "actions": _without(_actions(), "tempo"), "masks": None},
         ValueError, r"actions is missing head 'tempo'"),
    Case("actions unknown head", "evaluate_actions",
         lambda: {"features": _x2(), "actions": _with(_actions(), opp=torch.zeros(B)), "masks": None},
         ValueError, r"actions has unknown head 'opp'; valid heads"),
    Case("actions float", "evaluate_actions",
         lambda: {"features": _x2(), "actions": _with(_actions(), style=torch.zeros(B)), "masks": None},
         TypeError, r"actions\['style'\] must be an integer tensor \(int64, as get_action returns\), got dtype torch.float32"),
    Case("actions bool", "evaluate_actions",
         lambda: {"features": _x2(), "masks": None,
                  "actions": _with(_actions(), style=torch.zeros(B, dtype=torch.bool))},
         TypeError, r"actions\['style'\] must be an integer tensor"),
    Case("actions wrong batch", "evaluate_actions",
         lambda: {"features": _x2(), "masks": None,
                  "actions": _with(_actions(), slot=torch.zeros(B + 1, dtype=torch.long))},
         ValueError, rf"actions\['slot'\] has batch {B + 1} but the features have batch {B}"),
    Case("actions [B] with a sequence", "evaluate_actions",
         lambda: {"features": _x3(), "masks": None,
                  "actions": _with(_actions((B, T)), op=torch.zeros(B, dtype=torch.long))},
         ValueError, rf"actions\['op'\] has shape \({B},\) \(\[B\]\) but the features are a sequence of T={T}"),
    Case("actions wrong length", "evaluate_actions",
         lambda: {"features": _x3(), "masks": None,
                  "actions": _with(_actions((B, T)), op=torch.zeros(B, T + 1, dtype=torch.long))},
         ValueError, rf"actions\['op'\] has {T + 1} steps in dimension 1 but the features have T={T}"),
    Case("actions rank 3", "evaluate_actions",
         lambda: {"features": _x2(), "masks": None,
                  "actions": _with(_actions(), op=torch.zeros(B, 1, 1, dtype=torch.long))},
         ValueError, r"actions\['op'\] must be \[B\] or \[B, 1\], got rank 3"),
    Case("action out of range", "evaluate_actions",
         lambda: {"features": _x2(), "masks": None,
                  "actions": _with(_actions(), blueprint=torch.tensor([0, 13, 2]))},
         ValueError, r"actions\['blueprint'\] = 13 at batch row 1 is out of range: head 'blueprint' has 13 actions"),
    Case("action negative", "evaluate_actions",
         lambda: {"features": _x3(), "masks": None,
                  "actions": _with(_actions((B, T)), slot=torch.full((B, T), -1))},
         ValueError, r"actions\['slot'\] = -1 at batch row 0, step 0 is out of range"),
    Case("action masked", "evaluate_actions",
         lambda: dict(zip(("masks", "actions"), _masked_action(), strict=True), features=_x2()),
         ValueError, r"actions\['op'\] = 0 at batch row 1 is masked: masks\['op'\] marks it invalid"),
    # exotic tensors and flags
    Case("features sparse COO", "get_action",
         lambda: {"features": _x2().to_sparse(), "masks": None},
         TypeError, r"features must be a dense tensor, got layout torch.sparse_coo; convert it with .to_dense\(\)"),
    Case("features sparse CSR", "get_value",
         lambda: {"features": _csr(_x2())},
         TypeError, r"features must be a dense tensor, got layout torch.sparse_csr"),
    Case("mask sparse", "get_action",
         lambda: {"features": _x2(), "masks": _mutated_masks("op", torch.ones(B, 6, dtype=torch.bool).to_sparse())},
         TypeError, r"masks\['op'\] must be a dense tensor, got layout torch.sparse_coo"),
    Case("mask sparse in a mapping", "forward",
         lambda: {"features": _x2(), "masks": _with(_masks2(), op=torch.ones(B, 6, dtype=torch.bool).to_sparse())},
         TypeError, r"masks\['op'\] must be a dense tensor"),
    Case("ActionMasks mutated to a float mask", "get_action",
         lambda: {"features": _x2(), "masks": _mutated_masks("slot", torch.ones(B, 3))},
         TypeError, r"masks\['slot'\] must have dtype torch.bool"),
    Case("ActionMasks mutated to a list", "forward",
         lambda: {"features": _x2(), "masks": _mutated_masks("tempo", [[True] * 3] * B)},
         TypeError, r"masks\['tempo'\] must be a torch.bool tensor or None, got list"),
    Case("ActionMasks mutated to a numpy array", "get_action",
         lambda: {"features": _x2(), "masks": _mutated_masks("op", np.ones((B, 6), dtype=bool))},
         TypeError, r"masks\['op'\] must be a torch.bool tensor or None, got ndarray"),
    Case("actions sparse", "evaluate_actions",
         lambda: {"features": _x2(), "masks": None,
                  "actions": _with(_actions(), op=torch.zeros(B, dtype=torch.long).to_sparse())},
         TypeError, r"actions\['op'\] must be a dense tensor"),
    Case("episode_start sparse", "get_action",
         lambda: {"features": _x2(), "masks": None,
                  "episode_start": torch.zeros(B, dtype=torch.bool).to_sparse()},
         TypeError, r"episode_start must be a dense tensor"),
    Case("hidden sparse", "get_action",
         lambda: {"features": _x2(), "masks": None,
                  "hidden": (torch.zeros(1, B, 16).to_sparse(), torch.zeros(1, B, 16))},
         TypeError, r"hidden\[0\] must be a dense tensor", bundles="recurrent"),
    Case("deterministic a string", "get_action",
         lambda: {"features": _x2(), "masks": None, "deterministic": "no"},
         TypeError, r"deterministic must be a bool, got str \('no'\)"),
    Case("deterministic an int", "get_action",
         lambda: {"features": _x2(), "masks": None, "deterministic": 1},
         TypeError, r"deterministic must be a bool, got int"),
    # values of the hidden state, and tensors autograd cannot use
    Case("hidden NaN", "get_action",
         lambda: {"features": _x2(), "masks": None, "hidden": _nan_hidden(2)},
         ValueError, r"hidden\[1\] contains NaN or Inf at batch row 2; start that row over", bundles="recurrent"),
    Case("hidden Inf in an update", "evaluate_actions",
         lambda: {"features": _x3(), "actions": _actions((B, T)), "masks": None,
                  "hidden": (torch.full((1, B, 16), float("inf")), torch.zeros(1, B, 16))},
         ValueError, r"hidden\[0\] contains NaN or Inf at batch row 0", bundles="recurrent"),
    Case("features made under inference_mode in an update", "evaluate_actions",
         lambda: {"features": _inference(_x3), "actions": _actions((B, T)), "masks": None},
         ValueError, r"features was made under torch.inference_mode, and autograd cannot record"),
    # extra inputs: none declared
    Case("extras not a mapping", "get_action",
         lambda: {"features": _x2(), "masks": None, "extras": [torch.zeros(B, 3)]},
         TypeError, r"extras must be a mapping of input name to tensor, or None; got list"),
    Case("extras given to a bundle that declares none", "forward",
         lambda: {"features": _x2(), "masks": None, "extras": {"blueprint_indices": _bp2()}},
         ValueError, r"extras has 'blueprint_indices', but \w+ declares no extra inputs"),
    # extra inputs: the LSTM's blueprint_indices [B, (T), 3] in [0, 13) or -1
    Case("extra input missing", "get_action",
         lambda: {"features": _x2(), "masks": None, "extras": {}},
         ValueError, r"missing extra input 'blueprint_indices': LSTMPolicyBundle needs it at every call, \[B, \(T\), 3\] integer in \[0, 13\) or -1", bundles="extras"),
    Case("extra input misspelt", "forward",
         lambda: {"features": _x2(), "masks": None, "extras": {"blueprint_index": _bp2()}},
         ValueError, r"unknown input 'blueprint_index'; LSTMPolicyBundle declares: blueprint_indices; did you mean 'blueprint_indices'\?", bundles="extras"),
    Case("extra input unknown beside the declared one", "get_value",
         lambda: {"features": _x2(), "extras": {"blueprint_indices": _bp2(), "stage": _bp2()}},
         ValueError, r"unknown input 'stage'", bundles="extras"),
    Case("extra input float", "get_action",
         lambda: {"features": _x2(), "masks": None, "extras": {"blueprint_indices": _bp2().float()}},
         TypeError, r"extra input 'blueprint_indices' must be an integer tensor \(int64\)", bundles="extras"),
    Case("extra input wrong batch", "evaluate_actions",
         lambda: {"features": _x2(), "actions": _actions(), "masks": None,
                  "extras": {"blueprint_indices": _bp2()[:-1]}},
         ValueError, rf"'blueprint_indices' has batch {B - 1} but the features have batch {B}", bundles="extras"),
    Case("extra input wrong slot count", "get_action",
         lambda: {"features": _x2(), "masks": None, "extras": {"blueprint_indices": _bp2()[:, :2]}},
         ValueError, r"'blueprint_indices' has shape \(3, 2\); its trailing dimensions must be \(3,\)", bundles="extras"),
    Case("extra input one step for a sequence", "evaluate_actions",
         lambda: {"features": _x3(), "actions": _actions((B, T)), "masks": None,
                  "extras": {"blueprint_indices": _bp2()}},
         ValueError, rf"'blueprint_indices' has shape \({B}, 3\) \(\[B, 3\]\) but the features are a sequence of T={T}", bundles="extras"),
    Case("extra input rank 4", "forward",
         lambda: {"features": _x3(), "masks": None, "extras": {"blueprint_indices": _bp2()[:, None, None]}},
         ValueError, r"'blueprint_indices' must be \[B, T, 3\]", bundles="extras"),
    Case("extra input out of range", "get_action",
         lambda: {"features": _x2(), "masks": None,
                  "extras": {"blueprint_indices": torch.tensor([[0, 1, 2], [-1, 13, 5], [-2, 0, 0]])}},
         ValueError, r"'blueprint_indices' has values outside \[0, 13\) or -1: -2, 13 \(first at batch row 1\)", bundles="extras"),
    Case("hidden made under inference_mode in forward", "forward",
         lambda: {"features": _x2(), "masks": None,
                  "hidden": (_inference(lambda: torch.zeros(1, B, 16)), torch.zeros(1, B, 16))},
         ValueError, r"hidden\[0\] was made under torch.inference_mode", bundles="recurrent"),
]  # fmt: skip


def _reference(bundle: PolicyBundle) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(B, FEATURE_DIM, generator=torch.Generator().manual_seed(0))
    extras = {"blueprint_indices": _bp2()} if bundle.extra_inputs else None
    return bundle.forward(x, None, extras=extras).value.detach()


def _call_with(bundle: PolicyBundle, case: Case, rng: list[torch.Tensor]) -> None:
    """Build the row's arguments (which may refuse already), note the RNG, call."""
    kwargs = case.kwargs()
    rng.append(torch.random.get_rng_state())
    getattr(bundle, case.method)(**kwargs)


BUNDLES: dict[str, Callable[[], PolicyBundle]] = {
    "lstm": small_lstm,
    "mlp": lambda: MLPPolicyBundle(FEATURE_DIM, hidden_dim=8),
    "uniform": lambda: UniformPolicyBundle(FEATURE_DIM),
    "tiny stateless": TinyStatelessBundle,
    "lstm with blueprints": lambda: small_lstm(blueprint_embed_dim=2),
}
_KINDS = {
    "all": ("lstm", "mlp", "uniform", "tiny stateless"),
    "recurrent": ("lstm",),
    "stateless": ("mlp", "uniform", "tiny stateless"),
    "extras": ("lstm with blueprints",),
}
ROWS = [(case, name) for case in CASES for name in _KINDS[case.bundles]]


@pytest.mark.parametrize(
    ("case", "bundle_name"), ROWS, ids=[f"{c.id} [{name}]" for c, name in ROWS]
)
def test_bad_input_is_refused_clearly_and_the_bundle_keeps_working(
    case: Case, bundle_name: str
) -> None:
    bundle = BUNDLES[bundle_name]()
    calls: list[str] = []
    bundle.network.register_forward_pre_hook(lambda *_: calls.append("network"))
    hook = bundle._forward

    def counted_hook(inputs: PolicyInputs) -> NetworkOutput | OpConditionedOutput:
        calls.append("hook")
        return hook(inputs)

    bundle._forward = counted_hook  # type: ignore[method-assign]
    before = _reference(bundle)
    calls.clear()
    rng: list[torch.Tensor] = []
    with pytest.raises(case.error, match=case.match):
        _call_with(bundle, case, rng)
    assert not calls, "the hook or the network ran before the bad input was refused"
    if rng:
        assert torch.equal(torch.random.get_rng_state(), rng[0]), "the refusal drew randomness"
    torch.testing.assert_close(_reference(bundle), before, rtol=0, atol=0)


def test_matrix_covers_every_public_method() -> None:
    assert {c.method for c in CASES} == {
        "get_action",
        "forward",
        "evaluate_actions",
        "get_value",
        "initial_hidden",
    }


@pytest.mark.parametrize("bad", [0, -2])
def test_initial_hidden_refuses_a_non_positive_batch(bad: int) -> None:
    bundle = small_lstm()
    with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bad}"):
        bundle.initial_hidden(bad)
    assert bundle.initial_hidden(2) is not None


def test_initial_hidden_refuses_a_non_int_batch() -> None:
    with pytest.raises(TypeError, match="batch_size must be an int, got float"):
        small_lstm().initial_hidden(2.0)  # type: ignore[arg-type]


def test_value_checks_can_be_switched_off_for_a_hot_loop() -> None:
    """With check_values off a NaN passes through (the caller vouched for its inputs)."""
    bundle = small_lstm()
    bundle.check_values = False
    out = bundle.get_action(_nan_features(0), None)
    assert torch.isnan(out.value[0])
    bundle.check_values = True
    with pytest.raises(ValueError, match="NaN or Inf"):
        bundle.get_action(_nan_features(0), None)


def test_void_row_with_checks_off_still_samples_a_real_action() -> None:
    """Padding columns sit below masked ones, so no out-of-range index ever comes out."""
    bundle = small_lstm()
    bundle.check_values = False
    masks = ActionMasks(slot=torch.zeros(64, 3, dtype=torch.bool))
    out = bundle.get_action(torch.randn(64, FEATURE_DIM), masks)
    assert bool((out.action["slot"] < 3).all())


@pytest.mark.parametrize("signs", [(1.0, 1.0), (1.0, -1.0)], ids=["same sign", "cancelling"])
def test_finite_features_whose_sum_overflows_are_accepted(signs: tuple[float, float]) -> None:
    """The value check sums the features; an overflowing sum alone is not an error.

    Cancelling rows overflow on the way to a small total: accepted too.
    """
    bundle = UniformPolicyBundle(FEATURE_DIM)  # its outputs do not depend on the features
    huge = torch.full((2, FEATURE_DIM), 3e38) * torch.tensor(signs).unsqueeze(1)
    assert not torch.isfinite(huge.sum())
    step = bundle.get_action(huge, random_masks((2,)))
    assert step.value.shape == (2,)
    bundle.evaluate_actions(huge, step.action, None)
