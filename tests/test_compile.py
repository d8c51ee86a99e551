"""`PolicyBundle.compile()`: same numbers, same keys, checks still eager, no graph breaks."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable, Iterator

import pytest
import torch
import torch._dynamo

from conftest import FEATURE_DIM, small_lstm
from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionSpace,
    MLPPolicyBundle,
    PolicyBundle,
    UniformPolicyBundle,
    compute,
)
from esper.tamiyo.policy.testing import random_masks

# Dynamo reads `.grad` of non-leaf tensors while tracing; the project turns warnings
# into errors, and this one is torch's own business.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"
)

FACTORIES: dict[str, Callable[[], PolicyBundle]] = {
    "lstm": small_lstm,
    "lstm-2-layers": lambda: small_lstm(num_layers=2),
    "mlp": lambda: MLPPolicyBundle(FEATURE_DIM, hidden_dim=16),
    "uniform": lambda: UniformPolicyBundle(FEATURE_DIM),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", FACTORIES)
def test_compiled_bundle_gives_the_same_numbers(name: str) -> None:
    eager = FACTORIES[name]()
    compiled = FACTORIES[name]()
    compiled.network.load_state_dict(eager.network.state_dict())
    assert compiled.compile(backend="eager") is compiled
    assert compiled.is_compiled
    assert not eager.is_compiled
    for lead in ((3,), (3, 4)):
        x = torch.randn(*lead, FEATURE_DIM)
        masks = random_masks(lead)
        torch.manual_seed(7)
        want = eager.get_action(x, masks)
        torch.manual_seed(7)
        got = compiled.get_action(x, masks)
        ev_want = eager.evaluate_actions(x, want.action, masks)
        ev_got = compiled.evaluate_actions(x, want.action, masks)
        for head in HEAD_NAMES:
            assert torch.equal(got.action[head], want.action[head])
            torch.testing.assert_close(got.log_prob[head], want.log_prob[head])
            torch.testing.assert_close(ev_got.log_prob[head], ev_want.log_prob[head])
            torch.testing.assert_close(ev_got.entropy[head], ev_want.entropy[head])
        torch.testing.assert_close(ev_got.value, ev_want.value)


@pytest.mark.parametrize("name", FACTORIES)
def test_compiling_keeps_the_state_dict_keys(name: str) -> None:
    bundle = FACTORIES[name]()
    keys = list(bundle.state_dict())
    bundle.compile(backend="eager")
    assert list(bundle.state_dict()) == keys
    FACTORIES[name]().load_state_dict(bundle.state_dict())


@pytest.mark.parametrize("name", FACTORIES)
def test_the_step_path_has_no_graph_break(name: str) -> None:
    bundle = FACTORIES[name]()
    call = bundle._prepare(torch.randn(4, FEATURE_DIM), random_masks((4,)), None)
    with torch.no_grad():
        act = torch._dynamo.explain(compute.act)(bundle, call, False)
    assert act.graph_break_count == 0, act.break_reasons
    assert act.graph_count == 1
    actions = bundle.get_action(torch.randn(4, FEATURE_DIM), None).action
    scored = bundle._prepare(torch.randn(4, FEATURE_DIM), None, None, actions)
    evaluate = torch._dynamo.explain(compute.evaluate)(bundle, scored)
    assert evaluate.graph_break_count == 0, evaluate.break_reasons


def test_lstm_sequences_trace_whole_with_allow_rnn() -> None:
    bundle = small_lstm()
    x = torch.randn(2, 5, FEATURE_DIM)
    actions = bundle.get_action(x, None).action
    call = bundle._prepare(x, None, None, actions)
    with torch._dynamo.config.patch(allow_rnn=True):
        explained = torch._dynamo.explain(compute.evaluate)(bundle, call)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_a_copy_of_a_compiled_bundle_runs_its_own_network() -> None:
    """Deepcopy (PPO's old policy) and pickle give a compiled bundle with its own weights."""
    bundle = small_lstm().compile(backend="eager")
    x = torch.randn(3, FEATURE_DIM)
    twin = copy.deepcopy(bundle)
    pickled = pickle.loads(pickle.dumps(bundle))
    assert twin.is_compiled
    assert pickled.is_compiled
    with torch.no_grad():
        for param in twin.network.parameters():
            param.add_(1.0)
    before = bundle.get_action(x, None, deterministic=True)
    moved = twin.get_action(x, None, deterministic=True)
    assert not torch.allclose(moved.value, before.value)
    reference = small_lstm()
    reference.load_state_dict(twin.state_dict())
    torch.testing.assert_close(moved.value, reference.get_action(x, None, deterministic=True).value)
    torch.testing.assert_close(pickled.get_action(x, None, deterministic=True).value, before.value)


def test_a_refused_input_never_reaches_the_compiled_code() -> None:
    """The checks run before the compiled paths: a refusal compiles nothing."""
    bundle = small_lstm().compile(backend="eager")
    frames = torch._dynamo.utils.counters["frames"]
    before = frames["total"]
    nan = torch.full((2, FEATURE_DIM), float("nan"))
    with pytest.raises(ValueError, match="features contain NaN or Inf"):
        bundle.get_action(nan, None)
    assert frames["total"] == before
    bundle.get_action(torch.randn(2, FEATURE_DIM), None)
    assert frames["total"] > before


def test_a_compiled_lstm_step_uses_weights_loaded_with_assign() -> None:
    """The compiled step cannot read `nn.LSTM`; its weight references follow every load."""
    bundle, other = small_lstm().compile(backend="eager"), small_lstm()
    x = torch.randn(2, FEATURE_DIM)
    before = bundle.get_action(x, None, deterministic=True).value
    copied = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in other.state_dict().items()
    }
    bundle.load_state_dict(copied, assign=True)
    after = bundle.get_action(x, None, deterministic=True).value
    torch.testing.assert_close(after, other.get_action(x, None, deterministic=True).value)
    assert not torch.allclose(after, before)


def test_a_functional_call_does_not_leave_its_weights_in_the_compiled_step() -> None:
    """`functional_call` lends tensors for one call; the compiled step keeps the real ones."""
    bundle = small_lstm().compile(backend="eager")
    x = torch.randn(2, FEATURE_DIM)
    want = bundle.get_action(x, None, deterministic=True).value
    zeros = {name: torch.zeros_like(p) for name, p in bundle.network.named_parameters()}
    x3, hidden = x.unsqueeze(1), bundle.initial_hidden(2)
    with torch.no_grad():
        lent = torch.func.functional_call(bundle.network, zeros, (x3, hidden))
    assert torch.equal(lent[1], torch.zeros_like(lent[1]))  # the lent weights were used
    torch.testing.assert_close(bundle.get_action(x, None, deterministic=True).value, want)


HIERARCHICAL: dict[str, Callable[[], PolicyBundle]] = {
    "lstm": lambda: small_lstm(action_space=ActionSpace.tamiyo()),
    "lstm-op-logits": lambda: small_lstm(
        action_space=ActionSpace.tamiyo(), op_conditioned_logits=True
    ),
    "mlp": lambda: MLPPolicyBundle(FEATURE_DIM, hidden_dim=16, action_space=ActionSpace.tamiyo()),
}


@pytest.mark.parametrize("name", HIERARCHICAL)
def test_a_compiled_hierarchical_bundle_gives_the_same_numbers_with_no_graph_break(
    name: str,
) -> None:
    """Both stages and the gather at the op trace whole, and sample what eager samples."""
    eager, compiled = HIERARCHICAL[name](), HIERARCHICAL[name]()
    compiled.network.load_state_dict(eager.network.state_dict())
    compiled.compile(backend="eager")
    x = torch.randn(3, FEATURE_DIM)
    masks = random_masks((3,), space=ActionSpace.tamiyo(), by_op=("slot", "alpha_speed"))
    want = eager.get_action(x, masks, generator=torch.Generator().manual_seed(7))
    got = compiled.get_action(x, masks, generator=torch.Generator().manual_seed(7))
    ev_want = eager.evaluate_actions(x, want.action, masks)
    ev_got = compiled.evaluate_actions(x, want.action, masks)
    for head in HEAD_NAMES:
        assert torch.equal(got.action[head], want.action[head])
        torch.testing.assert_close(got.log_prob[head], want.log_prob[head])
        torch.testing.assert_close(ev_got.log_prob[head], ev_want.log_prob[head])
        assert torch.equal(ev_got.relevance[head], ev_want.relevance[head])
    call = eager._prepare(x, masks, None)
    with torch.no_grad():
        act = torch._dynamo.explain(compute.act)(eager, call, False)
    assert act.graph_break_count == 0, act.break_reasons
    scored = eager._prepare(x, masks, None, want.action)
    evaluate = torch._dynamo.explain(compute.evaluate)(eager, scored)
    assert evaluate.graph_break_count == 0, evaluate.break_reasons
