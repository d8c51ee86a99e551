"""LSTMPolicyBundle: the network the issue specifies, its initialization, and its step path."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from conftest import FEATURE_DIM, small_lstm
from esper.tamiyo.policy import HEAD_NAMES, ActionMasks, ActionSpace, LSTMPolicyBundle
from esper.tamiyo.policy.lstm import LSTMPolicyNetwork
from esper.tamiyo.policy.testing import random_masks


def test_default_architecture() -> None:
    bundle = LSTMPolicyBundle(feature_dim=20)
    net = bundle.network
    assert isinstance(net.embed, nn.Linear)
    assert (net.embed.in_features, net.embed.out_features) == (20, 128)
    assert isinstance(net.embed_norm, nn.LayerNorm)
    assert net.lstm.batch_first
    assert (net.lstm.input_size, net.lstm.hidden_size, net.lstm.num_layers) == (128, 128, 1)
    assert isinstance(net.lstm_norm, nn.LayerNorm)
    assert net.heads.head_hidden_dim == 64
    assert bundle.is_recurrent
    assert LSTMPolicyBundle.is_recurrent


def test_hidden_state_is_h_and_c_of_layers_batch_width() -> None:
    bundle = LSTMPolicyBundle(FEATURE_DIM, hidden_dim=24, num_layers=2)
    hidden = bundle.initial_hidden(5)
    assert hidden is not None
    assert len(hidden) == 2
    for tensor in hidden:
        assert tensor.shape == (2, 5, 24)
        assert tensor.dtype == torch.float32
        assert torch.all(tensor == 0)


def test_linear_layers_are_orthogonal_with_gain_sqrt2_and_zero_bias() -> None:
    net = LSTMPolicyBundle(FEATURE_DIM, hidden_dim=32, embed_dim=16).network
    w = net.embed.weight  # [16, 6]: orthonormal columns scaled by sqrt(2)
    torch.testing.assert_close(w.T @ w, 2.0 * torch.eye(FEATURE_DIM))
    assert torch.all(net.embed.bias == 0)
    k = net.heads.head_hidden_dim
    for block in range(len(HEAD_NAMES) + 1):
        first = net.heads.hidden.weight[block * k : (block + 1) * k]  # [16, 32]
        torch.testing.assert_close(first @ first.T, 2.0 * torch.eye(k))
    assert torch.all(net.heads.hidden.bias == 0)


def test_output_layers_have_gain_001_for_policy_and_1_for_value() -> None:
    net = LSTMPolicyBundle(FEATURE_DIM, hidden_dim=32).network
    heads = net.heads
    for head, size in enumerate(ActionSpace().sizes):
        w = heads.out_weight[head, :, :size].T  # [A_h, K] as nn.Linear stores it
        torch.testing.assert_close(w @ w.T, 1e-4 * torch.eye(size))
        assert torch.all(heads.out_weight[head, :, size:] == 0)
    value = heads.out_weight[len(HEAD_NAMES), :, 0]
    torch.testing.assert_close(value.norm(), torch.tensor(1.0))
    assert torch.all(heads.out_bias == 0)


def test_lstm_weights_orthogonal_and_forget_bias_one() -> None:
    d = 16
    net = LSTMPolicyBundle(FEATURE_DIM, hidden_dim=d, embed_dim=8, num_layers=2).network
    for name, param in net.lstm.named_parameters():
        if name.startswith("weight"):
            rows, cols = param.shape
            gram = param.T @ param if rows >= cols else param @ param.T
            torch.testing.assert_close(gram, torch.eye(min(rows, cols)), atol=1e-5, rtol=0)
        else:
            expected = torch.zeros(4 * d)
            expected[d : 2 * d] = 1.0
            assert torch.equal(param, expected), name


def _moved_to_float64(bundle: LSTMPolicyBundle) -> LSTMPolicyNetwork:
    return bundle.to(torch.float64).network


def _moved_with_swapped_tensors(bundle: LSTMPolicyBundle) -> LSTMPolicyNetwork:
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        return bundle.to(torch.float64).network
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def _deep_copied(bundle: LSTMPolicyBundle) -> LSTMPolicyNetwork:
    return copy.deepcopy(bundle.network)


def _loaded(bundle: LSTMPolicyBundle) -> LSTMPolicyNetwork:
    bundle.load_state_dict(small_lstm(num_layers=bundle.num_layers).state_dict())
    return bundle.network


NETWORKS: dict[str, Callable[[LSTMPolicyBundle], LSTMPolicyNetwork]] = {
    "as built": lambda bundle: bundle.network,
    "to float64": _moved_to_float64,
    "to float64, swapping tensors": _moved_with_swapped_tensors,
    "deep copy": _deep_copied,
    "after load_state_dict": _loaded,
}


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("prepare", NETWORKS.values(), ids=NETWORKS.keys())
def test_single_step_path_equals_nn_lstm(
    num_layers: int, prepare: Callable[[LSTMPolicyBundle], LSTMPolicyNetwork]
) -> None:
    """The lstm_cell step path gives nn.LSTM's outputs, hidden state and gradients.

    Also after the network is moved, copied or loaded: the step path reads the LSTM's
    parameters through references taken at construction.
    """
    net = prepare(small_lstm(num_layers=num_layers))
    dtype = net.embed.weight.dtype
    batch = 4
    x = torch.randn(batch, 1, FEATURE_DIM, dtype=dtype)
    h0 = torch.randn(num_layers, batch, 16, dtype=dtype)
    c0 = torch.randn(num_layers, batch, 16, dtype=dtype)
    logits, value, (h, c), by_op = net(x, (h0, c0))
    assert by_op is None  # not op-conditioned
    loss = logits.square().sum() + value.sum() + h.sum() + c.sum()
    step_grads = torch.autograd.grad(loss, list(net.parameters()))

    embedded = torch.relu(net.embed_norm(net.embed(x)))
    out, (h_ref, c_ref) = net.lstm(embedded, (h0, c0))  # the general path
    logits_ref, value_ref = net.heads(net.lstm_norm(out))
    torch.testing.assert_close(logits, logits_ref)
    torch.testing.assert_close(value, value_ref)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(c, c_ref)
    loss_ref = logits_ref.square().sum() + value_ref.sum() + h_ref.sum() + c_ref.sum()
    ref_grads = torch.autograd.grad(loss_ref, list(net.parameters()))
    for got, want in zip(step_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_rollout_steps_equal_the_update_sequence() -> None:
    """What PPO sees: a rollout of single steps is replayed exactly as one sequence."""
    bundle = small_lstm(num_layers=2)
    batch, steps = 3, 6
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, steps, FEATURE_DIM)
    start = bundle.initial_hidden(batch)
    hidden = start
    log_probs = []
    actions = []
    step_masks = []
    for t in range(steps):
        # Masks change per step; some steps leave some heads unmasked.
        unmasked = ("style", "tempo") if t % 2 else ()
        step_masks.append(random_masks((batch,), generator=gen, unmasked=unmasked))
        out = bundle.get_action(x[:, t], step_masks[-1], hidden)
        hidden = out.hidden
        log_probs.append(out.log_prob)
        actions.append(out.action)
    stacked = {n: torch.stack([a[n] for a in actions], 1) for n in HEAD_NAMES}
    masks = ActionMasks.stack(step_masks)  # [B, T, A_h]
    ev = bundle.evaluate_actions(x, stacked, masks, start)
    for name in HEAD_NAMES:
        expected = torch.stack([lp[name] for lp in log_probs], 1)
        torch.testing.assert_close(ev.log_prob[name], expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"hidden_dim": 0}, ValueError, "hidden_dim must be at least 2"),
        ({"hidden_dim": 1}, ValueError, "hidden_dim must be at least 2"),
        ({"embed_dim": -1}, ValueError, "embed_dim must be at least 1"),
        ({"num_layers": 0}, ValueError, "num_layers must be at least 1"),
        ({"num_layers": 1.5}, TypeError, "num_layers must be an int"),
    ],
)
def test_bad_constructor_arguments_are_refused(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=f"LSTMPolicyBundle: {match}"):
        LSTMPolicyBundle(FEATURE_DIM, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_feature_dim_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="LSTMPolicyBundle: feature_dim must be at least 1"):
        LSTMPolicyBundle(bad)


def test_custom_action_space_sizes_the_heads() -> None:
    space = ActionSpace(slot=5, blueprint=20)
    bundle = LSTMPolicyBundle(FEATURE_DIM, hidden_dim=8, embed_dim=8, action_space=space)
    out = bundle.forward(torch.randn(2, FEATURE_DIM), None)
    assert out.logits["slot"].shape == (2, 5)
    assert out.logits["blueprint"].shape == (2, 20)
    assert bundle.network.heads.out_weight.shape[-1] == 24


def test_state_dict_round_trip_gives_identical_outputs() -> None:
    source = small_lstm()
    target = small_lstm()
    x = torch.randn(3, 2, FEATURE_DIM)
    assert not torch.equal(source.get_value(x), target.get_value(x))
    target.load_state_dict(source.state_dict())
    assert torch.equal(source.get_value(x), target.get_value(x))
    assert set(source.state_dict()) == set(source.network.state_dict())


def test_parameter_count_matches_the_separate_heads_it_replaces() -> None:
    """Fused heads hold each head's weights plus zero padding, nothing else learnable."""
    bundle = LSTMPolicyBundle(FEATURE_DIM)
    heads = bundle.network.heads
    k, d = 64, 128
    separate = 0
    for size in (*ActionSpace().sizes, 1):
        separate += (d * k + k) + (k * size + size)
    padding = sum(heads.out_weight.shape[-1] - s for s in (*ActionSpace().sizes, 1)) * (k + 1)
    fused = sum(p.numel() for p in heads.parameters())
    assert fused == separate + padding


def _step_and_reference(
    net: LSTMPolicyNetwork, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the step path, and of the general path (nn.LSTM) on the same input."""
    logits, _, _, _ = net(x, state)
    embedded = torch.relu(net.embed_norm(net.embed(x)))
    out, _ = net.lstm(embedded, state)
    reference, _ = net.heads(net.lstm_norm(out))
    return logits, reference


def test_the_step_path_follows_lstm_parameters_replaced_under_it() -> None:
    """assign=True loads, reassigned parameters and functional_call reach the step path."""
    net = small_lstm().network
    other = small_lstm().network
    x = torch.randn(3, 1, FEATURE_DIM)
    state = (torch.randn(1, 3, 16), torch.randn(1, 3, 16))
    net.load_state_dict(other.state_dict(), assign=True)
    torch.testing.assert_close(*_step_and_reference(net, x, state))
    net.lstm.weight_hh_l0 = nn.Parameter(torch.randn(4 * 16, 16))
    torch.testing.assert_close(*_step_and_reference(net, x, state))
    params = {name: torch.randn_like(p) for name, p in other.named_parameters()}
    got = torch.func.functional_call(net, params, (x, state))[0]
    want = torch.func.functional_call(other, params, (torch.cat([x, x], dim=1), state))[0]
    torch.testing.assert_close(got[:, 0], want[:, 0])


def test_hooks_on_leaf_layers_run_on_the_step_path() -> None:
    """A hooked layer is called as a module: forward hooks fire and pruning applies."""
    net = small_lstm().network
    fired: list[str] = []
    for name in ("embed", "embed_norm", "lstm_norm"):
        getattr(net, name).register_forward_hook(
            lambda module, args, out, name=name: fired.append(name)
        )
    net.heads.hidden.register_forward_hook(lambda module, args, out: fired.append("heads"))
    x = torch.randn(3, 1, FEATURE_DIM)
    state = (torch.randn(1, 3, 16), torch.randn(1, 3, 16))
    net(x, state)
    assert fired == ["embed", "embed_norm", "lstm_norm", "heads"]
    pruned = small_lstm().network
    prune.l1_unstructured(pruned.embed, "weight", amount=0.5)  # type: ignore[no-untyped-call]
    torch.testing.assert_close(*_step_and_reference(pruned, x, state))
