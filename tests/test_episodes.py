"""Episode resets (`episode_start`) and `generator=`: rollouts and updates agree."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo

from conftest import FEATURE_DIM, TinyStatelessBundle, load_guide_example, small_lstm
from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionMasks,
    HiddenState,
    NetworkOutput,
    PolicyBundle,
    PolicyInputs,
)
from esper.tamiyo.policy.testing import random_masks

B, T = 4, 7


def _gru() -> PolicyBundle:
    bundle: PolicyBundle = load_guide_example().GRUPolicyBundle(FEATURE_DIM, hidden_dim=12)
    return bundle


RECURRENT: dict[str, Callable[[], PolicyBundle]] = {
    "lstm": small_lstm,
    "lstm-2-layers": lambda: small_lstm(num_layers=2),
    "gru (the guide's example)": _gru,
}


def _zeroed(hidden: HiddenState, rows: torch.Tensor) -> HiddenState:
    """The manual reset: a copy with the rows' state set to zero."""
    out: list[torch.Tensor] = []
    for tensor in hidden:
        copy = tensor.clone()
        copy[:, rows] = 0.0
        out.append(copy)
    return tuple(out)


def _some_state(bundle: PolicyBundle) -> HiddenState:
    state = bundle.get_action(torch.randn(B, FEATURE_DIM), None).hidden
    assert state is not None
    return bundle.get_action(torch.randn(B, FEATURE_DIM), None, state).hidden or ()


@pytest.mark.parametrize("make", RECURRENT.values(), ids=RECURRENT.keys())
def test_a_step_with_episode_start_equals_a_manual_reset(
    make: Callable[[], PolicyBundle],
) -> None:
    bundle = make()
    hidden = _some_state(bundle)
    x = torch.randn(B, FEATURE_DIM)
    masks = random_masks((B,))
    starts = torch.tensor([True, False, True, False])
    got = bundle.get_action(x, masks, hidden, deterministic=True, episode_start=starts)
    want = bundle.get_action(x, masks, _zeroed(hidden, starts), deterministic=True)
    for head in HEAD_NAMES:
        assert torch.equal(got.action[head], want.action[head])
        torch.testing.assert_close(got.log_prob[head], want.log_prob[head])
    torch.testing.assert_close(got.value, want.value)
    assert got.hidden is not None
    assert want.hidden is not None
    for a, b in zip(got.hidden, want.hidden, strict=True):
        torch.testing.assert_close(a, b)
    untouched = bundle.get_action(x, masks, hidden, deterministic=True)
    assert not torch.allclose(untouched.value[0], got.value[0])  # the reset mattered


@pytest.mark.parametrize("make", RECURRENT.values(), ids=RECURRENT.keys())
def test_the_update_replays_a_rollout_with_resets_inside_the_sequence(
    make: Callable[[], PolicyBundle],
) -> None:
    """PPO's contract: evaluate_actions replays a rollout whose rows reset anywhere.

    Over [B, T] with the stored flags it gives the rollout's log-probs, values and
    final state.
    """
    bundle = make()
    gen = torch.Generator().manual_seed(3)
    start_hidden = _some_state(bundle)
    flags = torch.rand(B, T, generator=gen) < 0.3  # [B, T]
    flags[1, 0] = True
    flags[2, 4] = True
    hidden: HiddenState | None = start_hidden
    features: list[torch.Tensor] = []
    step_masks: list[ActionMasks] = []
    results = []
    for t in range(T):
        x = torch.randn(B, FEATURE_DIM, generator=gen)
        masks = random_masks((B,), generator=gen)
        out = bundle.get_action(x, masks, hidden, episode_start=flags[:, t])
        features.append(x)
        step_masks.append(masks)
        results.append(out)
        hidden = out.hidden
    actions = {h: torch.stack([r.action[h] for r in results], dim=1) for h in HEAD_NAMES}
    replay = bundle.evaluate_actions(
        torch.stack(features, dim=1),
        actions,
        ActionMasks.stack(step_masks),
        start_hidden,
        episode_start=flags,
    )
    for head in HEAD_NAMES:
        rollout = torch.stack([r.log_prob[head] for r in results], dim=1)
        torch.testing.assert_close(replay.log_prob[head], rollout)
    torch.testing.assert_close(replay.value, torch.stack([r.value for r in results], dim=1))
    assert replay.hidden is not None
    assert hidden is not None
    for a, b in zip(replay.hidden, hidden, strict=True):
        torch.testing.assert_close(a, b)
    ignored = bundle.evaluate_actions(
        torch.stack(features, dim=1), actions, ActionMasks.stack(step_masks), start_hidden
    )
    assert not torch.allclose(ignored.value, replay.value)  # the resets mattered
    loss = replay.value.sum()
    for head in HEAD_NAMES:
        loss = loss + replay.log_prob[head].sum()
    torch.autograd.backward(loss)
    for param in bundle.network.parameters():
        assert param.grad is not None
        assert bool(torch.isfinite(param.grad).all())


class _CountingLSTM(PolicyBundle):
    """Counts hook calls, delegating to a small LSTM bundle's network."""

    is_recurrent = True

    def __init__(self) -> None:
        inner = small_lstm()
        super().__init__(
            inner.network,
            feature_dim=FEATURE_DIM,
            action_space=inner.action_space,
            hidden_shapes=((1, 16), (1, 16)),
        )
        self.calls: list[int] = []

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        assert inputs.hidden is not None
        self.calls.append(inputs.seq_len)
        logits, value, hidden, _ = self.network(inputs.features, inputs.hidden)  # no per-op logits
        return NetworkOutput(logits, value, hidden)


def test_the_hook_runs_once_per_stretch_between_resets() -> None:
    bundle = _CountingLSTM()
    x = torch.randn(2, T, FEATURE_DIM)
    flags = torch.zeros(2, T, dtype=torch.bool)
    flags[0, 0] = True  # at the first step: handled before the hook, no split
    bundle.forward(x, None, episode_start=flags)
    assert bundle.calls == [T]
    flags[0, 2] = True
    flags[1, 5] = True
    bundle.calls.clear()
    bundle.forward(x, None, episode_start=flags)
    assert bundle.calls == [2, 3, 2]


def test_episode_start_is_a_no_op_for_a_stateless_bundle() -> None:
    bundle = TinyStatelessBundle()
    x = torch.randn(B, T, FEATURE_DIM)
    flags = torch.ones(B, T, dtype=torch.bool)
    with_flags = bundle.forward(x, None, episode_start=flags)
    assert torch.equal(with_flags.value, bundle.forward(x, None).value)
    with pytest.raises(TypeError, match=r"episode_start must have dtype torch\.bool"):
        bundle.forward(x, None, episode_start=flags.int())


@pytest.mark.parametrize(
    ("lead", "flags", "error", "says"),
    [
        ((B,), torch.zeros(B, dtype=torch.int64), TypeError, "must have dtype torch.bool"),
        ((B,), [True] * B, TypeError, "must be a bool torch.Tensor, got list"),
        ((B,), torch.zeros(B + 1, dtype=torch.bool), ValueError, r"expected \[B\] = \(4,\)"),
        ((B, T), torch.zeros(B, dtype=torch.bool), ValueError, r"expected \[B, T\] = \(4, 7\)"),
        ((B, T), torch.zeros(B, T, 1, dtype=torch.bool), ValueError, r"has shape \(4, 7, 1\)"),
        ((B,), torch.zeros(B, dtype=torch.bool, device="meta"), ValueError, "is on meta"),
    ],
)
def test_bad_episode_starts_are_refused(
    lead: tuple[int, ...], flags: object, error: type[Exception], says: str
) -> None:
    bundle = small_lstm()
    x = torch.randn(*lead, FEATURE_DIM)
    with pytest.raises(error, match=says):
        bundle.get_action(x, None, episode_start=flags)  # type: ignore[arg-type]
    assert bundle.get_action(x, None).value.shape == lead  # still works


def test_a_generator_makes_sampling_reproducible_without_touching_the_global_one() -> None:
    bundle = small_lstm()
    x = torch.randn(64, FEATURE_DIM)
    masks = random_masks((64,))
    torch.manual_seed(0)
    global_state = torch.random.get_rng_state()
    first = bundle.get_action(x, masks, generator=torch.Generator().manual_seed(5))
    second = bundle.get_action(x, masks, generator=torch.Generator().manual_seed(5))
    other = bundle.get_action(x, masks, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.random.get_rng_state(), global_state)
    for head in HEAD_NAMES:
        assert torch.equal(first.action[head], second.action[head])
    assert any(not torch.equal(first.action[h], other.action[h]) for h in HEAD_NAMES)


def test_a_bad_generator_is_refused() -> None:
    bundle = small_lstm()
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None, got int"):
        bundle.get_action(torch.randn(2, FEATURE_DIM), None, generator=3)  # type: ignore[arg-type]


class _RecordingLSTM(_CountingLSTM):
    """Records what each hook call was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[PolicyInputs] = []

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput:
        self.seen.append(inputs)
        return super()._forward(inputs)


def test_each_stretch_gets_its_own_slice_of_masks_flags_and_actions() -> None:
    bundle = _RecordingLSTM()
    x = torch.randn(2, T, FEATURE_DIM)
    masks = random_masks((2, T))
    flags = torch.zeros(2, T, dtype=torch.bool)
    flags[1, 3] = True
    actions = bundle.get_action(x, masks).action
    bundle.seen.clear()
    bundle.evaluate_actions(x, actions, masks, episode_start=flags)
    assert [inputs.seq_len for inputs in bundle.seen] == [3, T - 3]
    for inputs, (begin, end) in zip(bundle.seen, [(0, 3), (3, T)], strict=True):
        assert torch.equal(inputs.features, x[:, begin:end])
        assert inputs.episode_start is not None
        assert torch.equal(inputs.episode_start, flags[:, begin:end])
        assert inputs.actions is not None
        for head in HEAD_NAMES:
            mask = getattr(masks, head)
            assert mask is not None
            assert torch.equal(getattr(inputs.masks, head), mask[:, begin:end])
            assert torch.equal(inputs.actions[head], actions[head][:, begin:end])


def test_flags_of_b_fit_a_b_1_f_step() -> None:
    """Like masks and actions, [B] flags fit features [B, 1, F] as well as [B, F]."""
    bundle = small_lstm()
    hidden = _some_state(bundle)
    starts = torch.tensor([True, False, False, True])
    x = torch.randn(B, FEATURE_DIM)
    flat = bundle.forward(x, None, hidden, episode_start=starts)
    sequenced = bundle.forward(x.unsqueeze(1), None, hidden, episode_start=starts)
    torch.testing.assert_close(sequenced.value[:, 0], flat.value)


@pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"
)
def test_a_compiled_bundle_runs_resets_inside_a_sequence_eagerly() -> None:
    """Reset patterns change every batch: they must not recompile the update path."""
    torch._dynamo.reset()
    bundle = small_lstm().compile(backend="eager")
    x = torch.randn(2, T, FEATURE_DIM)
    actions = bundle.get_action(x, None).action
    frames = torch._dynamo.utils.counters["frames"]
    bundle.evaluate_actions(x, actions, None)  # compiles once
    compiled = frames["total"]
    eager = small_lstm()
    eager.load_state_dict(bundle.state_dict())
    for step in range(1, T):
        flags = torch.zeros(2, T, dtype=torch.bool)
        flags[0, step] = True
        got = bundle.evaluate_actions(x, actions, None, episode_start=flags)
        want = eager.evaluate_actions(x, actions, None, episode_start=flags)
        torch.testing.assert_close(got.value, want.value)
    assert frames["total"] == compiled
    torch._dynamo.reset()
