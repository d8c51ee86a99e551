"""Moving bundles between devices and dtypes, and running under autocast."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from conftest import FEATURE_DIM, small_lstm
from esper.tamiyo.policy import HEAD_NAMES, ActionMasks, LSTMPolicyBundle, UniformPolicyBundle
from esper.tamiyo.policy.testing import random_masks


def test_to_meta_moves_the_network_and_the_base_tables() -> None:
    """The meta device stands in for a GPU: everything the base computes with must move."""
    bundle = small_lstm().to("meta")
    assert bundle.device == torch.device("meta")
    assert all(p.device.type == "meta" for p in bundle.network.parameters())
    hidden = bundle.initial_hidden(2)
    assert hidden is not None
    assert hidden[0].device.type == "meta"
    with pytest.raises(ValueError, match="features is on cpu but the bundle is on meta"):
        bundle.get_value(torch.randn(2, FEATURE_DIM))
    bundle.check_values = False  # a meta tensor has no values to check
    x = torch.randn(2, FEATURE_DIM, device="meta")
    masks = random_masks((2,))
    meta_masks = ActionMasks(
        **{k: None if m is None else m.to("meta") for k, m in masks.as_dict().items()}
    )
    out = bundle.get_action(x, meta_masks, hidden)  # mask tables on the CPU would fail here
    assert out.action["op"].device.type == "meta"


# Each way the network's tensors can move, done to a float32 CPU bundle.
def _network_to(bundle: LSTMPolicyBundle) -> None:
    bundle.network.to(torch.float64)


def _bundle_to(bundle: LSTMPolicyBundle) -> None:
    bundle.to(torch.float64)


def _float64_copy(state: dict[str, object]) -> dict[str, object]:
    """The state with every floating tensor copied to float64 (extra state as it is)."""
    return {
        k: v.double().clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in state.items()
    }


def _assigned(bundle: LSTMPolicyBundle) -> None:
    bundle.load_state_dict(_float64_copy(bundle.state_dict()), assign=True)


def _assigned_through_the_network(bundle: LSTMPolicyBundle) -> None:
    bundle.network.load_state_dict(_float64_copy(bundle.state_dict()), assign=True)


MOVES = {
    "bundle.to": _bundle_to,
    "bundle.network.to": _network_to,
    "load_state_dict(assign=True)": _assigned,
    "network.load_state_dict(assign=True)": _assigned_through_the_network,
}


@pytest.mark.parametrize("move", MOVES)
def test_every_way_of_moving_the_network_moves_the_checks_with_it(move: str) -> None:
    """The dtype is read from the network: the checks never describe a stale one."""
    bundle = small_lstm()
    reference = small_lstm().to(torch.float64)
    reference.load_state_dict(bundle.state_dict())
    MOVES[move](bundle)
    assert bundle.dtype == torch.float64
    hidden = bundle.initial_hidden(3)
    assert hidden is not None
    assert hidden[0].dtype == torch.float64
    x = torch.randn(3, FEATURE_DIM, dtype=torch.float64)
    masks = random_masks((3,))
    out = bundle.get_action(x, masks, hidden, deterministic=True)
    want = reference.get_action(x, masks, hidden, deterministic=True)
    assert out.value.dtype == torch.float64
    torch.testing.assert_close(out.value, want.value)
    seq = torch.randn(3, 4, FEATURE_DIM, dtype=torch.float64)
    torch.testing.assert_close(bundle.get_value(seq), reference.get_value(seq))
    with pytest.raises(
        TypeError,
        match=r"features has dtype torch\.float32 but the bundle's parameters are torch\.float64",
    ):
        bundle.get_action(x.float(), masks)
    assert bundle.get_action(x, masks).value.dtype == torch.float64  # still works after


def test_a_single_step_uses_weights_loaded_with_assign() -> None:
    """The LSTM's single-step path reads the parameters the network holds now."""
    bundle, other = small_lstm(), small_lstm()
    x = torch.randn(2, FEATURE_DIM)
    before = bundle.get_value(x)
    copied = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in other.state_dict().items()
    }
    bundle.load_state_dict(copied, assign=True)
    torch.testing.assert_close(bundle.get_value(x), other.get_value(x))
    assert not torch.allclose(bundle.get_value(x), before)


def test_a_network_wrapped_in_ddp_is_read_through_the_wrapper() -> None:
    """`bundle.network = DistributedDataParallel(...)`: device, dtype and calls follow it."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not in this build")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        bundle = small_lstm()
        plain = small_lstm().to(torch.float64)
        plain.load_state_dict(bundle.state_dict())
        bundle.network = DistributedDataParallel(bundle.network)  # type: ignore[assignment]
        bundle.network.to(torch.float64)  # moved through the wrapper, not through the bundle
        assert bundle.dtype == torch.float64
        assert bundle.device == torch.device("cpu")
        x = torch.randn(2, 3, FEATURE_DIM, dtype=torch.float64)
        torch.testing.assert_close(bundle.get_value(x), plain.get_value(x))
        with pytest.raises(TypeError, match=r"the bundle's parameters are torch\.float64"):
            bundle.get_value(x.float())
    finally:
        dist.destroy_process_group()


def test_a_network_replaced_by_another_is_read_as_it_is() -> None:
    """`bundle.network = ...` with a network in another dtype: the checks follow."""
    bundle = small_lstm()
    bundle.network = small_lstm().network.to(torch.float64)
    assert bundle.dtype == torch.float64
    assert bundle.get_value(torch.randn(2, FEATURE_DIM, dtype=torch.float64)).dtype == torch.float64


def test_a_tensorless_network_records_its_move() -> None:
    """A bundle with no tensors at all (uniform) has nothing to read: `to` records it."""
    bundle = UniformPolicyBundle(FEATURE_DIM)
    assert bundle.dtype == torch.get_default_dtype()
    bundle.to(torch.float64)
    assert bundle.dtype == torch.float64
    out = bundle.get_action(torch.randn(2, FEATURE_DIM, dtype=torch.float64), None)
    assert out.value.dtype == torch.float64
    bundle.to("meta")
    assert bundle.device == torch.device("meta")
    assert bundle.dtype == torch.float64


def test_to_accepts_a_dtype_positionally() -> None:
    bundle = small_lstm().to(torch.float64)
    assert bundle.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in bundle.network.parameters())
    out = bundle.get_action(torch.randn(2, FEATURE_DIM, dtype=torch.float64), None)
    assert out.value.dtype == torch.float64


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("meta", torch.int64), TypeError, r"dtype must be a floating torch\.dtype"),
        ((torch.float16, torch.float32), TypeError, "to\\(\\) got two dtypes"),
        (("not-a-device",), RuntimeError, "not-a-device"),
    ],
)
def test_a_refused_move_moves_nothing(
    args: tuple[object, ...], error: type[Exception], match: str
) -> None:
    bundle = small_lstm()
    with pytest.raises(error, match=match):
        bundle.to(*args)  # type: ignore[arg-type]
    assert bundle.device == torch.device("cpu")
    assert bundle.dtype == torch.float32
    assert all(p.device.type == "cpu" for p in bundle.network.parameters())
    assert bundle.get_value(torch.randn(2, FEATURE_DIM)).shape == (2,)


def test_bfloat16_autocast_replays_the_rollout() -> None:
    """Under CPU bf16 autocast: finite scores, masked actions at probability 0, parity."""
    bundle = small_lstm()
    batch, steps = 4, 5
    x = torch.randn(batch, steps, FEATURE_DIM)
    masks = random_masks((batch, steps), keep=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        acted = bundle.get_action(x, masks)
        ev = bundle.evaluate_actions(x, acted.action, masks)
        fwd = bundle.forward(x, masks)
    loss = torch.stack([lp.sum() for lp in ev.log_prob.values()]).sum()
    torch.autograd.backward(loss)
    for name in HEAD_NAMES:
        mask = masks.as_dict()[name]
        assert mask is not None
        assert bool(mask.gather(-1, acted.action[name].unsqueeze(-1)).all())
        assert bool(torch.isfinite(ev.log_prob[name]).all())
        assert bool(torch.isfinite(ev.entropy[name]).all())
        torch.testing.assert_close(ev.log_prob[name], acted.log_prob[name], atol=1e-3, rtol=0)
        probs = torch.softmax(fwd.logits[name].float(), -1)
        assert bool((probs[~mask] == 0).all())
    assert all(p.grad is not None for p in bundle.network.parameters())


def test_bfloat16_bundle_runs_end_to_end() -> None:
    bundle = small_lstm().to(torch.bfloat16)
    x = torch.randn(3, 2, FEATURE_DIM, dtype=torch.bfloat16)
    masks = random_masks((3, 2))
    acted = bundle.get_action(x, masks, bundle.initial_hidden(3))
    ev = bundle.evaluate_actions(x, acted.action, masks, bundle.initial_hidden(3))
    for name in HEAD_NAMES:
        assert bool(torch.isfinite(ev.log_prob[name]).all())
        torch.testing.assert_close(ev.log_prob[name], acted.log_prob[name])


def test_under_autocast_float64_is_still_refused_before_the_network_runs() -> None:
    """Autocast mixes float32 and bfloat16; it never casts float64, so that stays an error."""
    bundle = small_lstm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bundle.get_action(torch.randn(2, FEATURE_DIM, dtype=torch.bfloat16), None)
        with pytest.raises(
            TypeError, match=r"under autocast the bundle takes torch\.float32, torch\.bfloat16"
        ):
            bundle.get_action(torch.randn(2, FEATURE_DIM, dtype=torch.float64), None)


def test_outputs_keep_the_bundles_dtype_when_the_default_dtype_changes() -> None:
    """The base's tables are built on a device's first call, not in the default dtype."""
    before = torch.get_default_dtype()
    bundle = small_lstm()
    torch.set_default_dtype(torch.float64)
    try:
        x = torch.randn(2, 3, FEATURE_DIM, dtype=torch.float32)
        masks = random_masks((2, 3))
        out = bundle.get_action(x, masks)
        ev = bundle.evaluate_actions(x, out.action, masks)
        logits = bundle.forward(x, None).logits
    finally:
        torch.set_default_dtype(before)
    assert out.log_prob["op"].dtype == torch.float32
    assert ev.entropy["op"].dtype == torch.float32
    assert logits["slot"].dtype == torch.float32
