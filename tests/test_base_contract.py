"""The PolicyBundle contract: one normalization per call, one hook, checked layout."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from conftest import FEATURE_DIM, TinyNetwork, TinyStatelessBundle, small_lstm
from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionSpace,
    MaskArg,
    NetworkOutput,
    PolicyBundle,
    PolicyInputs,
)
from esper.tamiyo.policy.inputs import HiddenState
from esper.tamiyo.policy.lstm import LSTMPolicyBundle
from esper.tamiyo.policy.testing import random_masks
from esper.tamiyo.policy.validation import HookContractError


class CountingBundle(TinyStatelessBundle):
    """Counts `_normalize_inputs` and `_forward` calls; extends normalization via super().

    Its override has the signature from before extra inputs (no `extras`), as a bundle
    written then would: declaring none, it is called as before.
    """

    def __init__(self) -> None:
        super().__init__()
        self.normalized = 0
        self.forwarded = 0
        self.seen: list[PolicyInputs] = []

    def _normalize_inputs(  # type: ignore[override]  # no extras: the signature before them
        self,
        features: torch.Tensor,
        masks: MaskArg,
        hidden: HiddenState | None,
        actions: Mapping[str, torch.Tensor] | None = None,
    ) -> PolicyInputs:
        self.normalized += 1
        return super()._normalize_inputs(features, masks, hidden, actions)

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        self.forwarded += 1
        self.seen.append(inputs)
        return super()._forward(inputs)


def _call(bundle: PolicyBundle, method: str, lead: tuple[int, ...]) -> Any:
    x = torch.randn(*lead, FEATURE_DIM)
    masks = random_masks(lead, generator=torch.Generator().manual_seed(0))
    actions = {}  # the first valid action of each head
    for name, mask in masks.as_dict().items():
        assert mask is not None
        actions[name] = mask.long().argmax(-1)
    if method == "evaluate_actions":
        return bundle.evaluate_actions(x, actions, masks)
    if method == "get_value":
        return bundle.get_value(x)
    return getattr(bundle, method)(x, masks)


@pytest.mark.parametrize("method", ["get_action", "forward", "evaluate_actions", "get_value"])
@pytest.mark.parametrize("lead", [(2,), (2, 3)])
def test_each_public_method_normalizes_once_then_calls_the_hook_once(
    method: str, lead: tuple[int, ...]
) -> None:
    bundle = CountingBundle()
    _call(bundle, method, lead)
    assert bundle.normalized == 1
    assert bundle.forwarded == 1
    inputs = bundle.seen[0]
    batch, steps = lead[0], lead[1] if len(lead) == 2 else 1
    assert inputs.features.shape == (batch, steps, FEATURE_DIM)
    assert inputs.single_step == (len(lead) == 1)
    assert inputs.valid.shape == (batch, steps, 8, 16)
    given = random_masks(lead, generator=torch.Generator().manual_seed(0))
    for name, size in zip(HEAD_NAMES, ActionSpace().sizes, strict=True):
        mask = inputs.masks.as_dict()[name]
        assert mask is not None
        assert mask.shape == (batch, steps, size)
        if method == "get_value":  # no masks given: every action valid
            assert bool(mask.all())
        else:
            expected = given.as_dict()[name]
            assert expected is not None
            assert torch.equal(mask, expected.view(batch, steps, size))
    if method == "evaluate_actions":
        assert inputs.action_index is not None
        assert inputs.action_index.shape == (batch, steps, 8)
        assert inputs.actions is not None
        assert inputs.actions["op"].shape == (batch, steps)
    else:
        assert inputs.actions is None


def test_policy_inputs_is_a_frozen_dataclass() -> None:
    bundle = CountingBundle()
    _call(bundle, "forward", (2,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.seen[0].single_step = False  # type: ignore[misc]


def test_the_hook_sees_the_recurrent_state_filled_in() -> None:
    bundle = small_lstm()
    inputs = bundle._normalize_inputs(torch.randn(3, FEATURE_DIM), None, None)
    assert inputs.hidden is not None
    assert inputs.hidden[0].shape == (1, 3, 16)
    assert torch.all(inputs.hidden[0] == 0)


def test_a_bundle_without_the_hook_cannot_be_built_and_the_error_names_it() -> None:
    class NoHook(PolicyBundle):
        pass

    with pytest.raises(TypeError, match=r"Can't instantiate abstract class NoHook.*_forward"):
        NoHook(TinyNetwork(3, ActionSpace()), feature_dim=3, action_space=ActionSpace())  # type: ignore[abstract]


@pytest.mark.parametrize("method", ["get_action", "forward", "evaluate_actions", "initial_hidden"])
def test_overriding_a_public_method_is_refused_at_class_creation(method: str) -> None:
    with pytest.raises(TypeError, match=f"Sneaky overrides PolicyBundle.{method}"):
        type("Sneaky", (TinyStatelessBundle,), {method: lambda self: None})


def test_recurrent_flag_and_hidden_shapes_must_agree() -> None:
    class Confused(TinyStatelessBundle):
        is_recurrent = True

    with pytest.raises(TypeError, match="Confused: is_recurrent is True but hidden_shapes is None"):
        Confused()


def test_a_hook_returning_the_wrong_layout_is_reported_with_the_expected_shape() -> None:
    class Flat(TinyStatelessBundle):
        def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
            logits, value, _ = super()._forward(inputs)
            return NetworkOutput(logits.flatten(-2), value, None)

    with pytest.raises(RuntimeError, match=r"Flat._forward returned logits of shape \(2, 1, 128\)"):
        Flat().get_action(torch.randn(2, FEATURE_DIM), None)

    class BadValue(TinyStatelessBundle):
        def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
            logits, value, _ = super()._forward(inputs)
            return NetworkOutput(logits, value.unsqueeze(-1), None)

    with pytest.raises(
        RuntimeError, match=r"BadValue._forward returned value of shape \(2, 1, 1\)"
    ):
        BadValue().get_value(torch.randn(2, FEATURE_DIM))


def test_a_hook_returning_a_batch_first_hidden_state_is_named_before_any_result() -> None:
    """The declared layout is [d0, B, ...]; a hook that returns [B, d0, ...] is told so."""

    class BatchFirst(LSTMPolicyBundle):
        def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
            out = super()._forward(inputs)
            assert out.hidden is not None
            return NetworkOutput(
                out.logits, out.value, tuple(h.transpose(0, 1) for h in out.hidden)
            )

    bundle = BatchFirst(FEATURE_DIM, hidden_dim=16, embed_dim=8)
    with pytest.raises(HookContractError) as caught:
        bundle.get_action(torch.randn(2, FEATURE_DIM), None)
    message = str(caught.value)
    assert isinstance(caught.value, RuntimeError)
    assert "BatchFirst._forward returned hidden[0] of shape (2, 1, 16)" in message
    assert "hidden_shapes[0] = (1, 16) declares [d0, B, ...] = (1, 2, 16)" in message
    assert "the batch goes in dimension 1" in message
    assert "batch-first: return it as .transpose(0, 1)" in message


def test_a_recurrent_hook_must_return_its_state_and_a_stateless_one_none() -> None:
    class Forgets(LSTMPolicyBundle):
        def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
            out = super()._forward(inputs)
            return NetworkOutput(out.logits, out.value, None)

    with pytest.raises(HookContractError, match=r"as a tuple of 2 tensor\(s\).*got NoneType"):
        Forgets(FEATURE_DIM, hidden_dim=16, embed_dim=8).get_value(torch.randn(2, FEATURE_DIM))

    class Remembers(TinyStatelessBundle):
        def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
            logits, value, _ = super()._forward(inputs)
            return NetworkOutput(logits, value, (value.unsqueeze(0),))

    with pytest.raises(HookContractError, match=r"Remembers is stateless \(is_recurrent=False\)"):
        Remembers().get_value(torch.randn(2, FEATURE_DIM))


def test_a_hook_returning_a_pair_is_reported() -> None:
    class Pair(TinyStatelessBundle):
        def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
            logits, value, _ = super()._forward(inputs)
            return (logits, value)  # type: ignore[return-value]

    with pytest.raises(
        TypeError,
        match=r"Pair\._forward must return NetworkOutput\(logits, value, hidden\), got tuple",
    ):
        Pair().forward(torch.randn(2, FEATURE_DIM), None)


def test_constructor_arguments_are_checked() -> None:
    space = ActionSpace()
    with pytest.raises(TypeError, match=r"network must be a torch\.nn\.Module"):
        PolicyBundle.__init__(
            object.__new__(TinyStatelessBundle),
            "net",  # type: ignore[arg-type]
            feature_dim=3,
            action_space=space,
        )
    with pytest.raises(TypeError, match="action_space must be an ActionSpace"):
        PolicyBundle.__init__(
            object.__new__(TinyStatelessBundle),
            TinyNetwork(3, space),
            feature_dim=3,
            action_space=(3, 13),  # type: ignore[arg-type]
        )


def test_stateless_bundle_has_no_hidden_state() -> None:
    bundle = TinyStatelessBundle()
    assert not bundle.is_recurrent
    assert bundle.initial_hidden(4) is None
    assert bundle.get_action(torch.randn(4, FEATURE_DIM), None).hidden is None


def test_to_moves_tables_and_dtype() -> None:
    bundle = small_lstm().to("cpu", dtype=torch.float64)
    assert bundle.device == torch.device("cpu")
    hidden = bundle.initial_hidden(2)
    assert hidden is not None
    assert hidden[0].dtype == torch.float64
    out = bundle.get_action(torch.randn(2, FEATURE_DIM, dtype=torch.float64), None, hidden)
    assert out.value.dtype == torch.float64
    with pytest.raises(TypeError, match=r"dtype must be a floating torch\.dtype, got torch\.int32"):
        bundle.to(dtype=torch.int32)


def test_repr_names_the_class_and_sizes() -> None:
    assert repr(small_lstm()).startswith(
        "LSTMPolicyBundle(feature_dim=6, action_space=ActionSpace("
    )


def test_config_records_the_constructor_arguments_of_any_bundle() -> None:
    """`config` rebuilds a bundle: recorded by the base, whatever the subclass."""
    space = ActionSpace(slot=5)
    bundle = small_lstm(num_layers=2, action_space=space)
    assert bundle.config == {
        "feature_dim": FEATURE_DIM,
        "hidden_dim": 16,
        "embed_dim": 12,
        "num_layers": 2,
        "action_space": space,
        "op_conditioned_logits": False,
        "probability_floor": None,
        "blueprint_embed_dim": 0,
    }
    twin = type(bundle)(**bundle.config)
    assert twin.config == bundle.config
    assert [p.shape for p in twin.network.parameters()] == [
        p.shape for p in bundle.network.parameters()
    ]
    tiny = TinyStatelessBundle(4)
    assert tiny.config == {"feature_dim": 4, "action_space": None}
    assert copy.deepcopy(bundle).config == bundle.config


class _ListConfigured(TinyStatelessBundle):
    def __init__(self, feature_dim: int, widths: list[int]) -> None:
        super().__init__(feature_dim)
        self.widths = widths


def test_config_is_a_snapshot_of_the_arguments() -> None:
    """Mutating a list after passing it changes neither config nor later checkpoints."""
    widths = [1, 2]
    bundle = _ListConfigured(4, widths)
    widths.append(99)
    assert bundle.config == {"feature_dim": 4, "widths": [1, 2]}


def test_a_value_that_is_a_view_of_a_parameter_comes_back_without_a_graph() -> None:
    """Under no_grad a view of a parameter still requires grad; results must not."""

    class ParameterValue(TinyStatelessBundle):
        def __init__(self) -> None:
            super().__init__()
            self.network.register_parameter("bias", torch.nn.Parameter(torch.zeros(())))

        def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
            out = super()._forward(inputs)
            bias = self.network.get_parameter("bias")
            return NetworkOutput(out.logits, bias.expand(inputs.batch_size, inputs.seq_len), None)

    bundle = ParameterValue()
    assert not bundle.get_action(torch.randn(2, FEATURE_DIM), None).value.requires_grad
    assert not bundle.get_value(torch.randn(2, FEATURE_DIM)).requires_grad


def test_an_override_without_extras_is_called_as_before_and_extras_are_refused() -> None:
    bundle = CountingBundle()
    x = torch.randn(2, FEATURE_DIM)
    bundle.get_action(x, None, extras={})
    bundle.get_action(x, None, extras=None)
    assert bundle.normalized == 2
    with pytest.raises(ValueError, match="CountingBundle declares no extra inputs"):
        bundle.get_action(x, None, extras={"blueprint_indices": torch.zeros(2, 3)})
    assert bundle.normalized == 2  # refused before the override ran
