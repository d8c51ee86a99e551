"""Data-parallel training of a bundle: two gloo processes on CPU, `bundle.network` in DDP.

The recipe is docs/distributed-training.md. One module-scoped run spawns two ranks that
each build a bundle, wrap `bundle.network` in `DistributedDataParallel`, collect a
rollout with `get_action` on their own data and take PPO steps with `evaluate_actions`.
The ranks only record (tensors, error messages, state_dict keys) into one file each;
the tests below compare the two records, so every failure names what differed. Then
each rank runs the guide's own script, with the environment `torchrun` would give it.
A last test runs that script with a 5-second timeout and stops one rank (SIGSTOP): the
other must fail within the timeout, not hang.
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib.util
import io
import multiprocessing
import os
import re
import runpy
import signal
import socket
import time
import warnings
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing.spawn import ProcessContext, start_processes
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.nn.parallel import DistributedDataParallel

from esper.tamiyo.policy import (
    HEAD_NAMES,
    ActionMasks,
    ActionSpace,
    LSTMPolicyBundle,
    NetworkOutput,
    OpConditionedOutput,
    PolicyInputs,
    UniformPolicyBundle,
    load_policy,
)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this build",
)

WORLD_SIZE = 2
FEATURE_DIM = 6
BATCH = 4
LEARNING_RATE = 0.1
DEADLINE_S = 120.0  # both ranks together; a healthy run takes a few seconds

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "distributed-training.md"

Record = dict[str, Any]


# ---------------------------------------------------------------------- the ranks


def _small_bundle() -> LSTMPolicyBundle:
    return LSTMPolicyBundle(FEATURE_DIM, hidden_dim=16, embed_dim=12)


def _flat(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """All tensors as one detached 1-D copy (a missing gradient is an error)."""
    parts: list[torch.Tensor] = []
    for tensor in tensors:
        assert tensor is not None, "a parameter has no gradient"
        parts.append(tensor.detach().reshape(-1).clone())
    return torch.cat(parts)


def _grads(network: nn.Module) -> torch.Tensor:
    return _flat(p.grad for p in network.parameters())


def _params(network: nn.Module) -> torch.Tensor:
    return _flat(network.parameters())


def _random_masks(batch: int, generator: torch.Generator) -> ActionMasks:
    """Random masks on every head, each row keeping at least one valid action."""
    masks: dict[str, torch.Tensor | None] = {}
    for name, size in zip(HEAD_NAMES, ActionSpace().sizes, strict=True):
        mask = torch.rand(batch, size, generator=generator) < 0.7
        mask[torch.arange(batch), torch.randint(size, (batch,), generator=generator)] = True
        masks[name] = mask
    return ActionMasks.from_mapping(masks)


def _error(call: Any) -> str:
    """Run `call()`; `'<ExceptionType>: message'` if it raises, `''` if it does not."""
    try:
        call()
    except Exception as exc:  # recorded for the parent to assert on
        return f"{type(exc).__name__}: {exc}"
    return ""


def _train(rank: int, out_dir: Path) -> Record:
    """Everything one rank does; returns what the parent checks."""
    record: Record = {}
    # Different initial weights on each rank: wrapping must copy rank 0's to the others.
    torch.manual_seed(100 + rank)
    bundle = _small_bundle()
    record["params_built"] = _params(bundle.network)
    ddp = DistributedDataParallel(bundle.network)
    # LSTMPolicyBundle declares `network: LSTMPolicyNetwork`; the wrapper is what runs.
    bundle.network = ddp  # type: ignore[assignment]
    record["params_wrapped"] = _params(bundle.network)
    record["device"] = str(bundle.device)
    record["dtype"] = str(bundle.dtype)

    # A plain bundle with the same (broadcast) weights computes each rank's local result.
    plain = _small_bundle()
    plain.load_state_dict(ddp.module.state_dict())

    # Rollout on this rank's own data, of a different length on each rank: get_action runs
    # without autograd, so DDP communicates nothing and the ranks need not be in lockstep.
    data = torch.Generator().manual_seed(1000 + rank)
    steps = 5 + 2 * rank
    start = bundle.initial_hidden(BATCH)
    hidden = start
    features: list[torch.Tensor] = []
    masks: list[ActionMasks] = []
    actions: list[dict[str, torch.Tensor]] = []
    log_probs: list[torch.Tensor] = []
    rollout_gap = 0.0  # DDP-wrapped against plain bundle, same RNG state
    for t in range(steps):
        step_features = torch.randn(BATCH, FEATURE_DIM, generator=data)
        step_masks = _random_masks(BATCH, data)
        torch.manual_seed(rank * 100 + t)
        out = bundle.get_action(step_features, step_masks, hidden)
        torch.manual_seed(rank * 100 + t)
        ref = plain.get_action(step_features, step_masks, hidden)
        assert all(torch.equal(out.action[h], ref.action[h]) for h in HEAD_NAMES)
        assert out.hidden is not None
        assert ref.hidden is not None
        for mine, theirs in [(out.value, ref.value), *zip(out.hidden, ref.hidden, strict=True)]:
            rollout_gap = max(rollout_gap, (mine - theirs).abs().max().item())
        features.append(step_features)
        masks.append(step_masks)
        actions.append(out.action)
        log_probs.append(torch.stack([out.log_prob[h] for h in HEAD_NAMES]).sum(0))
        hidden = out.hidden
    record["rollout_gap"] = rollout_gap
    if rank == 1:  # a bootstrap value on one rank only: still no collective
        bundle.get_value(torch.randn(BATCH, FEATURE_DIM, generator=data), hidden)

    seq_features = torch.stack(features, 1)  # [B, T, F]
    seq_masks = ActionMasks.stack(masks)
    seq_actions = {h: torch.stack([a[h] for a in actions], 1) for h in HEAD_NAMES}
    old_log_prob = torch.stack(log_probs, 1)  # [B, T]
    advantages = torch.randn(BATCH, steps, generator=data)
    returns = torch.randn(BATCH, steps, generator=data)

    def ppo_loss(on: LSTMPolicyBundle, resets: torch.Tensor | None = None) -> torch.Tensor:
        ev = on.evaluate_actions(seq_features, seq_actions, seq_masks, start, episode_start=resets)
        log_prob = torch.stack([ev.log_prob[h] for h in HEAD_NAMES]).sum(0)  # [B, T]
        entropy = torch.stack([ev.entropy[h] for h in HEAD_NAMES]).mean(0)
        ratio = torch.exp(log_prob - old_log_prob)
        clipped = torch.clamp(ratio, 0.8, 1.2)
        policy = -torch.min(ratio * advantages, clipped * advantages).mean()
        value = (ev.value - returns).pow(2).mean()
        return policy + 0.5 * value - 0.01 * entropy.mean()

    with torch.no_grad():
        ev = bundle.evaluate_actions(seq_features, seq_actions, seq_masks, start)
        replayed = torch.stack([ev.log_prob[h] for h in HEAD_NAMES]).sum(0)
    record["replay_gap"] = (replayed - old_log_prob).abs().max().item()

    # This rank's own gradient: through a plain bundle, and through DDP under no_sync().
    torch.autograd.backward(ppo_loss(plain))
    record["grad_plain"] = _grads(plain.network)
    with ddp.no_sync():
        torch.autograd.backward(ppo_loss(bundle))
    record["grad_no_sync"] = _grads(bundle.network)

    # The synchronized step.
    optimizer = torch.optim.SGD(bundle.network.parameters(), lr=LEARNING_RATE)
    optimizer.zero_grad()
    torch.autograd.backward(ppo_loss(bundle))
    record["grad_ddp"] = _grads(bundle.network)
    optimizer.step()
    record["params_step1"] = _params(bundle.network)

    # The single-step fast path (torch.lstm_cell on the LSTM's own parameters) sees the
    # updated weights: the same probe on both ranks must give the same numbers.
    probe = torch.Generator().manual_seed(7)
    probe_features = torch.randn(BATCH, FEATURE_DIM, generator=probe)
    probe_masks = _random_masks(BATCH, probe)
    greedy = bundle.get_action(probe_features, probe_masks, deterministic=True)
    record["probe"] = torch.cat([greedy.value, *(greedy.log_prob[h] for h in HEAD_NAMES)]).detach()

    # Bad inputs are refused before the network (and so DDP) runs.
    nan_step = probe_features.clone()
    nan_step[1, 2] = float("nan")
    nan_sequence = seq_features.clone()
    nan_sequence[0, 1, 0] = float("nan")
    record["nan_get_action"] = _error(lambda: bundle.get_action(nan_step, probe_masks))
    if rank == 1:  # refused on one rank only; the next synchronized step must still work
        record["nan_evaluate"] = _error(
            lambda: bundle.evaluate_actions(nan_sequence, seq_actions, seq_masks, start)
        )

    # Step 2: episode resets inside rank 1's sequence make the bundle run the network once
    # per stretch, three times there and once on rank 0, before one backward.
    resets = torch.zeros(BATCH, steps, dtype=torch.bool)
    if rank == 1:
        resets[1, 2] = resets[2, 4] = True
    plain.load_state_dict(ddp.module.state_dict())
    plain.network.zero_grad()
    torch.autograd.backward(ppo_loss(plain, resets))
    record["grad_plain_step2"] = _grads(plain.network)
    optimizer.zero_grad()
    torch.autograd.backward(ppo_loss(bundle, resets))
    record["grad_step2"] = _grads(bundle.network)
    optimizer.step()
    record["params_step2"] = _params(bundle.network)

    # A network with a buffer: DDP would broadcast it at every training forward, a
    # collective the ranks' different numbers of stretches would mismatch. Without that
    # sync the step works as above.
    buffered = _small_bundle()
    buffered.network.register_buffer("running_scale", torch.ones(1))
    wrapped = DistributedDataParallel(buffered.network, forward_sync_buffers=False)
    buffered.network = wrapped  # type: ignore[assignment]
    torch.autograd.backward(ppo_loss(buffered, resets))
    record["grad_buffered"] = _grads(buffered.network)

    # Checkpoints.
    wrapped_state = bundle.state_dict()
    record["wrapped_keys"] = list(wrapped_state)
    record["plain_keys"] = list(plain.state_dict())
    fresh = _small_bundle()
    record["load_wrapped_into_plain"] = _error(lambda: fresh.load_state_dict(wrapped_state))
    record["load_plain_into_wrapped"] = _error(lambda: bundle.load_state_dict(plain.state_dict()))
    buffer = io.BytesIO()
    torch.save(ddp.module.state_dict(), buffer)  # the recipe: unwrap, then save
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    record["params_unwrapped_load"] = _params(fresh.network)
    stripped = dict(wrapped_state)
    consume_prefix_in_state_dict_if_present(stripped, "module.")
    other = _small_bundle()
    other.load_state_dict(stripped)
    record["params_prefix_stripped_load"] = _params(other.network)
    loaded = load_policy(bundle.save(out_dir / f"bundle{rank}.pt"))  # strips the prefix
    record["params_save_load"] = _params(loaded.network)
    record["loaded_network"] = type(loaded.network).__name__
    bundle.network = ddp.module  # unwrapped for good
    record["unwrapped_keys"] = list(bundle.state_dict())
    record["wrap_uniform"] = _error(lambda: DistributedDataParallel(UniformPolicyBundle().network))
    return record


def _set_torchrun_environment(rank: int, port: int) -> None:
    """The env:// variables torchrun gives each rank's process."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
    )


def _run_guide_script(rank: int, port: int, out_dir: str) -> None:
    """Run the guide's script as torchrun would: env:// variables, its own process group."""
    _set_torchrun_environment(rank, port)
    os.chdir(out_dir)  # this process only; the script saves policy.pt in its directory
    runpy.run_path(str(Path(out_dir) / "train_policy.py"), run_name="__main__")


def _rank_main(rank: int, init_file: str, out_dir: str, port: int) -> None:
    """Entry point of a spawned rank: join the group, train, run the guide, save a record."""
    # If the parent's deadline passes, it sends SIGUSR1 first: each rank then writes
    # where it is stuck to its own file, which the failure message shows.
    stacks = (Path(out_dir) / f"rank{rank}.stacks").open("w")
    if hasattr(signal, "SIGUSR1"):  # POSIX only
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    torch.set_num_threads(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=WORLD_SIZE,
            timeout=timedelta(seconds=60),
        )
        try:
            record = _train(rank, Path(out_dir))
            dist.barrier()  # as the guide's script does before shutting down
        finally:
            dist.destroy_process_group()
        _run_guide_script(rank, port, out_dir)
    record["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")


# ---------------------------------------------------------------------- the parent


def _stop(processes: Iterable[Any]) -> None:
    """Ask each live rank for its stacks (POSIX), then kill it."""
    processes = list(processes)
    if hasattr(signal, "SIGUSR1"):
        for process in processes:
            with contextlib.suppress(ProcessLookupError):  # it may have just exited
                if process.pid is not None and process.is_alive():
                    os.kill(process.pid, signal.SIGUSR1)
        time.sleep(2.0)
    for process in processes:
        process.kill()


def _stacks_of(out_dir: Path, rank: int) -> str:
    file = out_dir / f"rank{rank}.stacks"
    text = file.read_text() if file.exists() else ""
    return f"--- rank {rank} ---\n" + (text or "(no stacks: it had not reached _rank_main)")


def _write_guide_script(out_dir: Path) -> None:
    """The guide's script, as `train_policy.py` in `out_dir`."""
    (script,) = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    (out_dir / "train_policy.py").write_text(script)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the two ranks once; the directory holding their records and the checkpoint."""
    out_dir = tmp_path_factory.mktemp("ddp")
    _write_guide_script(out_dir)
    context: ProcessContext = start_processes(  # type: ignore[no-untyped-call]
        _rank_main,
        args=(str(out_dir / "init"), str(out_dir), _free_port()),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1.0):  # raises with the rank's traceback if one failed
        if time.monotonic() > deadline:
            _stop(context.processes)
            stacks = "\n".join(_stacks_of(out_dir, rank) for rank in range(WORLD_SIZE))
            pytest.fail(
                f"the two ranks did not finish within {DEADLINE_S} s (deadlock?); "
                f"where they were:\n{stacks}"
            )
    return out_dir


@pytest.fixture(scope="module")
def ranks(run_dir: Path) -> list[Record]:
    """The ranks' records, rank 0 first."""
    return [torch.load(run_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_wrapping_broadcasts_rank_0s_weights(ranks: list[Record]) -> None:
    """Built with different seeds, both ranks hold rank 0's weights once wrapped."""
    zero, one = ranks
    assert not torch.equal(zero["params_built"], one["params_built"]), "seeds gave equal weights"
    assert torch.equal(zero["params_wrapped"], zero["params_built"])
    assert torch.equal(one["params_wrapped"], zero["params_built"]), "rank 1 kept its own weights"
    for record in ranks:
        assert (record["device"], record["dtype"]) == ("cpu", "torch.float32")


def test_rollout_through_ddp_matches_a_plain_bundle(ranks: list[Record]) -> None:
    """get_action through DDP gives the plain network's actions, values and hidden state."""
    for rank, record in enumerate(ranks):
        gap = record["rollout_gap"]
        assert gap == 0.0, f"rank {rank}: get_action through DDP differs by {gap}"
        assert record["replay_gap"] < 1e-5, f"rank {rank}: replay differs from rollout"


def test_gradients_are_averaged_across_ranks(ranks: list[Record]) -> None:
    """Each rank's gradient after backward is the mean of the ranks' local gradients."""
    zero, one = ranks
    for rank, record in enumerate(ranks):
        gap = _gap(record["grad_no_sync"], record["grad_plain"])
        assert gap < 1e-6, f"rank {rank}: no_sync() gradient differs from the plain one by {gap}"
    assert _gap(zero["grad_plain"], one["grad_plain"]) > 1e-3, "ranks' data gave equal grads"
    mean = (zero["grad_plain"] + one["grad_plain"]) / 2
    for rank, record in enumerate(ranks):
        gap = _gap(record["grad_ddp"], mean)
        assert gap < 1e-6, f"rank {rank}: DDP gradient is {gap} from the mean of local ones"
    assert torch.equal(zero["grad_ddp"], one["grad_ddp"])


def test_parameters_are_identical_after_optimizer_steps(ranks: list[Record]) -> None:
    """After SGD steps both ranks hold the same, moved, weights; the fast path sees them."""
    zero, one = ranks
    expected = zero["params_wrapped"] - LEARNING_RATE * zero["grad_ddp"]
    assert _gap(zero["params_step1"], expected) < 1e-6
    for key in ("params_step1", "params_step2", "probe"):
        assert torch.equal(zero[key], one[key]), f"{key} differs across ranks"
    assert _gap(zero["params_step1"], zero["params_wrapped"]) > 1e-4, "step 1 moved nothing"
    assert _gap(zero["params_step2"], zero["params_step1"]) > 1e-4, "step 2 moved nothing"


def test_a_wrapped_bundle_still_refuses_bad_inputs(ranks: list[Record]) -> None:
    """NaN features raise ValueError through DDP; one rank's refusal does not break sync."""
    for record in ranks:
        assert record["nan_get_action"].startswith("ValueError: "), record["nan_get_action"]
        assert "batch row 1" in record["nan_get_action"], record["nan_get_action"]
    assert ranks[1]["nan_evaluate"].startswith("ValueError: "), ranks[1]["nan_evaluate"]
    assert "nan_evaluate" not in ranks[0]
    # The step after rank 1's refused call was synchronized (test above: equal params).
    assert torch.equal(ranks[0]["grad_step2"], ranks[1]["grad_step2"])


def test_several_network_calls_in_one_update_are_averaged(ranks: list[Record]) -> None:
    """With episode resets the network runs per stretch; one backward still averages."""
    zero, one = ranks
    mean = (zero["grad_plain_step2"] + one["grad_plain_step2"]) / 2
    for rank, record in enumerate(ranks):
        gap = _gap(record["grad_step2"], mean)
        assert gap < 1e-6, f"rank {rank}: step-2 gradient is {gap} from the mean of local ones"
    assert torch.equal(zero["grad_buffered"], one["grad_buffered"]), "buffered network"


def test_checkpoints_of_a_wrapped_bundle(ranks: list[Record]) -> None:
    """state_dict() gains DDP's 'module.' prefix; unwrap, strip it, or use bundle.save."""
    record = ranks[0]
    assert record["wrapped_keys"] == [f"module.{key}" for key in record["plain_keys"]]
    assert record["load_wrapped_into_plain"].startswith("ValueError: "), record
    assert record["load_plain_into_wrapped"].startswith("ValueError: "), record
    for key in ("params_unwrapped_load", "params_prefix_stripped_load", "params_save_load"):
        assert torch.equal(record[key], record["params_step2"]), key
    assert record["loaded_network"] == "LSTMPolicyNetwork"
    assert record["unwrapped_keys"] == record["plain_keys"]


def test_a_network_without_parameters_is_not_wrapped(ranks: list[Record]) -> None:
    """DDP refuses UniformPolicyBundle's network: there is nothing to synchronize."""
    for record in ranks:
        assert record["wrap_uniform"].startswith("RuntimeError: "), record["wrap_uniform"]
        assert "doesn't have any parameter" in record["wrap_uniform"], record["wrap_uniform"]


def test_ranks_raised_no_warnings(ranks: list[Record]) -> None:
    """The suite runs with warnings as errors; the ranks must not warn either."""
    for rank, record in enumerate(ranks):
        assert record["warnings"] == [], f"rank {rank} warned: {record['warnings']}"


def test_the_guides_script_trains_and_saves_a_plain_checkpoint(run_dir: Path) -> None:
    """The script in docs/distributed-training.md runs on both ranks; policy.pt loads."""
    state = torch.load(run_dir / "policy.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in state), list(state)
    LSTMPolicyBundle(32).load_state_dict(state)


# ---------------------------------------------------------------------- a stalled rank

STALL_TIMEOUT_S = 5  # the guide script's TIMEOUT in the stalled-rank test
STALL_MARGIN_S = 10.0  # rank 0 must fail by STALL_TIMEOUT_S + this, not in 30 minutes
STALL_DEADLINE_S = 60.0  # start-up included; the test takes about 15 s


class _StoppingBundle(LSTMPolicyBundle):
    """Stops its own process (SIGSTOP) at its first network call with autograd: an update.

    It writes the time it stops to `stopped_at` in the current directory first.
    """

    def _forward(self, inputs: PolicyInputs) -> NetworkOutput | OpConditionedOutput:
        if torch.is_grad_enabled():
            Path("stopped_at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP)  # the parent kills it
        return super()._forward(inputs)


def _stalling_rank_main(rank: int, port: int, out_dir: str) -> None:
    """Run the guide's `main()` with a short TIMEOUT; rank 1 stops at its first update.

    Rank 0 records what `main()` raised, and when.
    """
    stacks = (Path(out_dir) / f"rank{rank}.stacks").open("w")
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)  # as _rank_main
    torch.set_num_threads(1)
    _set_torchrun_environment(rank, port)
    os.chdir(out_dir)  # this process only
    spec = importlib.util.spec_from_file_location("train_policy", f"{out_dir}/train_policy.py")
    assert spec is not None
    assert spec.loader is not None
    script: Any = importlib.util.module_from_spec(spec)  # its globals are set below
    spec.loader.exec_module(script)  # defines main(); runs nothing
    script.TIMEOUT = timedelta(seconds=STALL_TIMEOUT_S)  # the user's choice, short here
    if rank == 1:
        script.LSTMPolicyBundle = _StoppingBundle
    error = _error(script.main)
    record = {"error": error, "failed_at": time.time()}
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")  # rank 1 never gets here
    stacks.close()
    # No teardown: with its peer stopped, gloo's destroy_process_group (or its threads
    # at interpreter exit) can abort the process ("terminate called without an active
    # exception"), which is gloo's doing, not the script's. Leave at once instead.
    os._exit(0)


@pytest.mark.skipif(
    not hasattr(signal, "SIGSTOP"), reason="stalling a rank needs POSIX signals (SIGSTOP)"
)
def test_a_stalled_rank_makes_the_other_fail_within_the_timeout(tmp_path: Path) -> None:
    """The guide's script: a rank stopped with SIGSTOP fails the other after TIMEOUT.

    Without `timeout=` in `init_process_group`, rank 0 would wait for torch's default, 30
    minutes, and the test would fail at its deadline. The stopped rank is killed at the
    end, whatever happened.
    """
    _write_guide_script(tmp_path)
    spawn = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [
        spawn.Process(target=_stalling_rank_main, args=(rank, port, str(tmp_path)))
        for rank in range(WORLD_SIZE)
    ]
    for process in processes:
        process.start()
    survivor, stalled = processes
    try:
        survivor.join(timeout=STALL_DEADLINE_S)
        if survivor.exitcode is None:
            _stop(processes)
            pytest.fail(
                f"rank 0 did not finish within {STALL_DEADLINE_S} s: it waits on the "
                f"stopped rank; where it was:\n{_stacks_of(tmp_path, 0)}"
            )
        assert survivor.exitcode == 0, f"rank 0 exited with {survivor.exitcode}"
        assert stalled.is_alive(), f"rank 1 exited ({stalled.exitcode}) instead of stopping"
    finally:
        for process in processes:
            process.kill()  # SIGKILL ends a stopped process too
            process.join(timeout=10.0)
    assert not stalled.is_alive(), "the stopped rank survived SIGKILL"
    record = torch.load(tmp_path / "rank0.pt", weights_only=True)
    expected = f"Timed out waiting {STALL_TIMEOUT_S * 1000}ms for recv operation to complete"
    assert record["error"].startswith("RuntimeError: "), record["error"]
    assert expected in record["error"], record["error"]
    waited = record["failed_at"] - float((tmp_path / "stopped_at").read_text())
    assert waited < STALL_TIMEOUT_S + STALL_MARGIN_S, (
        f"rank 0 failed {waited:.1f} s after rank 1 stopped, with a {STALL_TIMEOUT_S} s timeout"
    )
