"""Checkpoint files: round trips, safe loading, refusals naming the file, atomic writes."""

from __future__ import annotations

import errno
import inspect
import os
import random
import shlex
import stat
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn

from conftest import FEATURE_DIM, TinyNetwork, TinyStatelessBundle
from esper.tamiyo import policy
from esper.tamiyo.policy import (
    ActionSpace,
    MLPPolicyBundle,
    PolicyBundle,
    register_policy,
    registry,
)
from esper.tamiyo.policy.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    UnregisteredPolicyError,
    load_policy,
    save_policy,
)
from esper.tamiyo.policy.testing import random_masks

# Non-default values for whichever of these a bundle's constructor takes.
NON_DEFAULTS: dict[str, Any] = {
    "feature_dim": FEATURE_DIM,
    "hidden_dim": 8,
    "embed_dim": 6,
    "num_layers": 2,
    "action_space": ActionSpace(slot=5),
}


@pytest.fixture(autouse=True)
def _restore_registry_and_dynamo() -> Iterator[None]:
    saved = dict(registry._REGISTRY)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def build(name: str) -> PolicyBundle:
    """The registered policy `name`, built with every non-default value it accepts."""
    cls = registry.get_policy(name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{key: value for key, value in NON_DEFAULTS.items() if key in accepted})


def outputs(bundle: PolicyBundle) -> list[torch.Tensor]:
    """Masked logits and values of a sequence, and a deterministic step's actions."""
    generator = torch.Generator().manual_seed(7)
    space = bundle.action_space
    features = torch.randn(3, 4, FEATURE_DIM, generator=generator).to(bundle.dtype)
    seq = bundle.forward(features, random_masks((3, 4), space=space, generator=generator))
    step = bundle.get_action(
        features[:, 0], random_masks((3,), space=space, generator=generator), deterministic=True
    )
    return [*seq.logits.values(), seq.value, *step.action.values(), step.value]


def assert_same_outputs(got: PolicyBundle, want: PolicyBundle) -> None:
    for index, (a, b) in enumerate(zip(outputs(got), outputs(want), strict=True)):
        assert torch.equal(a, b), f"output {index} differs"


def edit_payload(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Load the checkpoint at `path`, apply `edit` to its dict, save it back."""
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


# ---------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", registry.list_policies())
def test_every_registered_policy_round_trips(tmp_path: Path, name: str) -> None:
    """Same class, config, keys and outputs after save and load, with a non-default config."""
    bundle = build(name)
    path = save_policy(bundle, tmp_path / f"{name}.pt")
    assert path == tmp_path / f"{name}.pt"
    loaded = load_policy(path)
    assert type(loaded) is type(bundle)
    assert loaded.config == bundle.config
    assert loaded.action_space == ActionSpace(slot=5)
    assert list(loaded.state_dict()) == list(bundle.state_dict())
    assert_same_outputs(loaded, bundle)


def test_the_file_records_name_config_versions_and_weights(tmp_path: Path) -> None:
    """The payload is the documented dict, with the torch version as a plain str."""
    bundle = build("lstm")
    payload = torch.load(save_policy(bundle, tmp_path / "p.pt"), weights_only=True)
    assert payload["format"] == "esper.tamiyo.policy"
    assert payload["format_version"] == FORMAT_VERSION == 1
    assert type(payload["torch_version"]) is str
    assert payload["torch_version"] == str(torch.__version__)
    assert payload["policy"] == "lstm"
    assert payload["dtype"] == "float32"
    assert payload["config"]["action_space"]["sizes"]["slot"] == 5
    assert payload["state_dict"]["heads._extra_state"] == {
        "action_sizes": (5, 13, 4, 3, 3, 4, 3, 6)
    }


def test_a_float64_bundle_loads_as_float64(tmp_path: Path) -> None:
    """The dtype is restored, so the outputs are bit for bit the saved bundle's."""
    bundle = build("mlp").to(torch.float64)
    loaded = load_policy(save_policy(bundle, tmp_path / "p.pt"), map_location="cpu")
    assert loaded.dtype == torch.float64
    assert loaded.device == torch.device("cpu")
    assert_same_outputs(loaded, bundle)


def test_saving_again_replaces_the_checkpoint(tmp_path: Path) -> None:
    """A second save onto the same path leaves the new weights and nothing else."""
    path = save_policy(build("mlp"), tmp_path / "p.pt")
    newer = build("mlp")
    save_policy(newer, str(path))
    assert_same_outputs(load_policy(str(path)), newer)
    assert os.listdir(tmp_path) == ["p.pt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_the_file_gets_the_permissions_of_any_new_file(tmp_path: Path) -> None:
    """Not mkstemp's private 0600: the process umask decides, as for torch.save."""
    umask = os.umask(0)
    os.umask(umask)
    path = save_policy(build("mlp"), tmp_path / "p.pt")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("name", ["lstm", "mlp"])
def test_a_compiled_bundle_saves_the_same_keys_and_loads_uncompiled(
    tmp_path: Path, name: str
) -> None:
    """compile() leaves the state_dict keys alone; the loaded bundle is a plain one."""
    bundle = build(name).compile(backend="eager")
    outputs(bundle)  # the compiled paths have run
    path = save_policy(bundle, tmp_path / "p.pt")
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert list(saved) == list(build(name).state_dict())
    loaded = load_policy(path)
    assert not loaded.is_compiled
    assert_same_outputs(loaded, bundle)


class _TinyRegistered(TinyStatelessBundle):
    """Registered by the test that uses it; the shared `TinyStatelessBundle` stays not."""


def test_a_data_parallel_network_saves_without_the_wrapper_prefix(tmp_path: Path) -> None:
    """Keys lose DataParallel's `module.`, so the file loads into a plain bundle."""
    register_policy("test_tiny")(_TinyRegistered)
    bundle = _TinyRegistered(action_space=ActionSpace(op=2))
    plain_keys = list(bundle.state_dict())
    bundle.network = nn.DataParallel(bundle.network)
    assert all(key.startswith("module.") for key in bundle.state_dict())
    path = save_policy(bundle, tmp_path / "p.pt")
    assert list(torch.load(path, weights_only=True)["state_dict"]) == plain_keys
    loaded = load_policy(path)
    assert not isinstance(loaded.network, nn.DataParallel)
    assert_same_outputs(loaded, bundle)


# ---------------------------------------------------------------------- configs


class _ConfiguredBundle(TinyStatelessBundle):
    """A test bundle whose constructor takes an arbitrary value and extra keywords."""

    def __init__(
        self, feature_dim: int = FEATURE_DIM, *, scale: object = 1.0, **extra: object
    ) -> None:
        super().__init__(feature_dim)
        self.scale = scale
        self.extra = extra


class _PositionalBundle(TinyStatelessBundle):
    """A test bundle with `*args`, which keyword arguments cannot rebuild."""

    def __init__(self, *sizes: int) -> None:
        super().__init__(FEATURE_DIM)
        self.sizes = sizes


def test_keyword_extras_and_nested_values_round_trip(tmp_path: Path) -> None:
    """`**extra` arguments, tuples, lists and ActionSpace inside them come back as given."""
    register_policy("test_configured")(_ConfiguredBundle)
    bundle = _ConfiguredBundle(
        scale=(1, 2.5, None, [True, "x"]), spaces=[ActionSpace(op=3)], note="n"
    )
    loaded = load_policy(save_policy(bundle, tmp_path / "p.pt"))
    assert isinstance(loaded, _ConfiguredBundle)
    assert loaded.scale == (1, 2.5, None, [True, "x"])
    assert loaded.extra == {"spaces": [ActionSpace(op=3)], "note": "n"}
    assert loaded.config == bundle.config


@pytest.mark.parametrize(
    ("scale", "where"),
    [
        (torch.float16, r"config\['scale'\] = torch\.float16 \(dtype\)"),
        ({"a": 1}, r"config\['scale'\] = \{'a': 1\} \(dict\)"),
        ((1, date(2024, 1, 1)), r"config\['scale'\]\[1\] = datetime\.date.* \(date\)"),
    ],
)
def test_a_config_value_a_checkpoint_cannot_hold_is_refused_before_writing(
    tmp_path: Path, scale: object, where: str
) -> None:
    """TypeError naming the config key; no file is created."""
    register_policy("test_configured")(_ConfiguredBundle)
    with pytest.raises(TypeError, match=rf"cannot save _ConfiguredBundle: {where}.*ActionSpace"):
        save_policy(_ConfiguredBundle(scale=scale), tmp_path / "p.pt")
    assert os.listdir(tmp_path) == []


def test_a_constructor_with_var_positional_arguments_is_refused(tmp_path: Path) -> None:
    """load_policy rebuilds from keywords: `*sizes` cannot be passed that way."""
    register_policy("test_positional")(_PositionalBundle)
    with pytest.raises(TypeError, match=r"takes \*sizes positionally only"):
        save_policy(_PositionalBundle(3, 4), tmp_path / "p.pt")
    assert os.listdir(tmp_path) == []


class _DatedNetwork(TinyNetwork):
    """Extra state holding a `date`: it pickles, but weights_only would refuse to read it."""

    def get_extra_state(self) -> dict[str, date]:
        return {"trained_on": date(2024, 1, 1)}

    def set_extra_state(self, state: object) -> None:
        del state


class _DatedBundle(TinyStatelessBundle):
    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__(feature_dim)
        self.network = _DatedNetwork(feature_dim, ActionSpace())


def test_state_a_safe_load_could_not_read_is_refused_before_writing(tmp_path: Path) -> None:
    """Never write a checkpoint load_policy would refuse: the key is named."""
    register_policy("test_dated")(_DatedBundle)
    with pytest.raises(
        TypeError, match=r"state_dict\['_extra_state'\]\['trained_on'\]: it is a date"
    ):
        save_policy(_DatedBundle(), tmp_path / "p.pt")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- registry


def test_name_of_is_the_reverse_of_get_policy() -> None:
    for name in registry.list_policies():
        assert registry.name_of(registry.get_policy(name)) == name


def test_name_of_an_unregistered_class_says_how_to_register_it() -> None:
    """A subclass of a registered class is not registered by inheritance."""

    class Unregistered(MLPPolicyBundle):
        pass

    with pytest.raises(
        ValueError,
        match=r"test_checkpoint_files\..*Unregistered is not a registered policy; "
        r"decorate it with @register_policy.*list_policies\(\)",
    ):
        registry.name_of(Unregistered)


def test_an_unregistered_bundle_is_not_saved(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TinyStatelessBundle is not a registered policy"):
        save_policy(TinyStatelessBundle(), tmp_path / "p.pt")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- refusals


def _touch(path: str) -> None:
    """The side effect a malicious payload would have: create `path`."""
    Path(path).touch()


class _RunsCodeWhenUnpickled:
    """Unpickling this calls `reducer[0](*reducer[1])`: what a malicious file does."""

    def __init__(self, reducer: tuple[Callable[..., object], tuple[str]]) -> None:
        self.reducer = reducer

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return self.reducer


def _reducers(marker: Path) -> dict[str, tuple[Callable[..., object], tuple[str]]]:
    return {
        "custom-function": (_touch, (str(marker),)),
        "os.system": (os.system, (f"touch {shlex.quote(str(marker))}",)),
    }


@pytest.mark.skipif(os.name != "posix", reason="the os.system payload uses touch")
@pytest.mark.parametrize("kind", ["custom-function", "os.system"])
def test_a_file_that_would_run_code_is_refused_and_the_code_never_runs(
    tmp_path: Path, kind: str
) -> None:
    """weights_only refuses the object; the side effect does not happen."""
    marker = tmp_path / "code-ran"
    path = save_policy(build("mlp"), tmp_path / "p.pt")
    evil = _RunsCodeWhenUnpickled(_reducers(marker)[kind])
    edit_payload(path, lambda payload: payload.update(extra=evil))
    with pytest.raises(CheckpointError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert str(path) in message
    assert "was refused: it holds an object other than tensors and plain data" in message
    assert "GLOBAL" in message
    assert "weights_only=False" not in message  # torch's advice to load unsafely is cut
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file is live: an unsafe load runs it
    assert marker.exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _cut_in_the_signature(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(4096))


def _json(path: Path) -> None:
    path.write_text('{\n  "scores": [1, 2]\n}\n')


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _plain_dict(path: Path) -> None:
    torch.save({"x": 1}, path)


def _bare_state_dict(path: Path) -> None:
    torch.save(build("mlp").state_dict(), path)


def _unknown_name(path: Path) -> None:
    edit_payload(path, lambda payload: payload.update(policy="transformer"))


def _newer_version(path: Path) -> None:
    edit_payload(path, lambda payload: payload.update(format_version=FORMAT_VERSION + 1))


def _missing_weights(path: Path) -> None:
    edit_payload(path, lambda payload: payload.pop("state_dict"))


def _misfit_weights(path: Path) -> None:
    def edit(payload: dict[str, Any]) -> None:
        payload["state_dict"]["heads.out_bias"] = torch.zeros(9, 1, 3)

    edit_payload(path, edit)


def _other_head_sizes(path: Path) -> None:
    def edit(payload: dict[str, Any]) -> None:
        payload["config"]["action_space"]["sizes"]["slot"] = 3  # same padded shapes

    edit_payload(path, edit)


def _bad_config(path: Path) -> None:
    edit_payload(path, lambda payload: payload["config"].update(hidden_dim=-1))


def _unknown_tag(path: Path) -> None:
    edit_payload(path, lambda payload: payload["config"].update(action_space={"t": 1}))


def _flip_bits_in_the_weights(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    for index in range(start, start + 200):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "bit-flips": (
        _flip_bits_in_the_weights,
        r"is corrupt: the checksum of its record 'archive/data/\d+' does not match",
    ),
    "truncated": (
        _truncate,
        r"cannot be read: it is truncated or corrupt \((OSError|RuntimeError)",
    ),
    "random-bytes": (_random_bytes, r"is not a policy checkpoint: save_policy writes a zip"),
    "json": (
        _json,
        r"this file is not one \(it begins with b'\{\\n  \"scores\": \[1'\)",
    ),
    "cut-in-the-signature": (_cut_in_the_signature, "cannot be read: it is truncated or corrupt"),
    "empty": (_empty, r"truncated or corrupt \(EOFError: unexpected end of data\)"),
    "not-ours": (_plain_dict, r"not a policy checkpoint of esper\.tamiyo\.policy.*\['x'\]"),
    "bare-state-dict": (_bare_state_dict, r"not a policy checkpoint.*bundle\.load_state_dict"),
    "unknown-name": (
        _unknown_name,
        r"holds policy 'transformer', which is not registered \(registered: .*lstm.*\); "
        r"import the module that registers it",
    ),
    "newer-version": (
        _newer_version,
        rf"format version {FORMAT_VERSION + 1}.*reads up to {FORMAT_VERSION}: upgrade",
    ),
    "missing-weights": (
        _missing_weights,
        r"incomplete policy checkpoint: missing keys \['state_dict'\]",
    ),
    "misfit-weights": (
        _misfit_weights,
        r"weights do not fit its config: .*state_dict\['heads\.out_bias'\] has shape \(9, 1, 3\)",
    ),
    "other-head-sizes": (_other_head_sizes, r"weights do not fit.*heads\._extra_state"),
    "bad-config": (_bad_config, r"config does not build LSTMPolicyBundle.*hidden_dim"),
    "unknown-tag": (_unknown_tag, r"config\['action_space'\] is a dict this version cannot"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_bad_file_is_refused_naming_the_file_and_the_cause(tmp_path: Path, case: str) -> None:
    damage, cause = CORRUPTIONS[case]
    path = save_policy(build("lstm"), tmp_path / "p.pt")
    damage(path)
    with pytest.raises(CheckpointError, match=cause) as caught:
        load_policy(path)
    assert str(caught.value).startswith(f"{path}")


def test_an_unregistered_policy_has_its_own_error_class(tmp_path: Path) -> None:
    """Callers (the demo's --load) can tell "import its module" from a damaged file."""
    path = save_policy(build("lstm"), tmp_path / "p.pt")
    _unknown_name(path)
    with pytest.raises(UnregisteredPolicyError, match="'transformer', which is not registered"):
        load_policy(path)


def test_a_checkpoint_in_torchs_legacy_format_loads(tmp_path: Path) -> None:
    """torch.save's pre-zip format (a pickle stream) is still read, as torch.load reads it."""
    bundle = build("mlp")
    payload = torch.load(save_policy(bundle, tmp_path / "zip.pt"), weights_only=True)
    legacy = tmp_path / "legacy.pt"
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:1] == b"\x80"
    same = load_policy(legacy)
    for key, value in bundle.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(same.state_dict()[key], value), key


def test_a_missing_file_is_named() -> None:
    with pytest.raises(FileNotFoundError, match="no policy checkpoint at this path") as caught:
        load_policy("/nonexistent/p.pt")
    assert caught.value.filename == "/nonexistent/p.pt"


def test_a_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=rf"{tmp_path} is not a file"):
        load_policy(tmp_path)


def test_saving_into_a_missing_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"folder .*nowhere does not exist"):
        save_policy(build("mlp"), tmp_path / "nowhere" / "p.pt")


# ---------------------------------------------------------------------- atomicity


def _write_half_then_fail(payload: object, file: Any, *args: object, **kwargs: object) -> None:
    file.write(b"PK\x03\x04 half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def _fail(*args: object, **kwargs: object) -> None:
    raise OSError(errno.EIO, "Input/output error")


def _interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("target", "replacement", "error"),
    [
        (torch, _write_half_then_fail, OSError),
        (os, _fail, OSError),
        (torch, _interrupt, KeyboardInterrupt),
    ],
    ids=["torch.save-half-written", "os.replace", "interrupted"],
)
def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temporary_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: object,
    replacement: Callable[..., None],
    error: type[BaseException],
) -> None:
    """The old file is byte for byte as it was, loads, and gives the old outputs."""
    old = build("lstm")
    path = save_policy(old, tmp_path / "p.pt")
    before = path.read_bytes()
    monkeypatch.setattr(target, "save" if target is torch else "replace", replacement)
    with pytest.raises(error):
        save_policy(build("lstm"), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["p.pt"]
    assert path.read_bytes() == before
    assert_same_outputs(load_policy(path), old)


def test_a_failed_first_save_leaves_no_file_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", _fail)
    with pytest.raises(OSError, match="Input/output error"):
        save_policy(build("mlp"), tmp_path / "p.pt")
    assert os.listdir(tmp_path) == []


def test_bundle_save_is_save_policy(tmp_path: Path) -> None:
    """`bundle.save(path)` writes what `load_policy` reads back, from the top-level API."""
    bundle = MLPPolicyBundle(5, hidden_dim=8)
    path = bundle.save(tmp_path / "mlp.pt")
    restored = policy.load_policy(path)
    x = torch.randn(3, 5)
    assert torch.equal(restored.get_value(x), bundle.get_value(x))
    assert restored.config == bundle.config


def test_loading_leaves_the_callers_random_state_alone(tmp_path: Path) -> None:
    """Rebuilding draws initial weights; the caller's next samples must not change."""
    path = save_policy(build("lstm"), tmp_path / "p.pt")
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    load_policy(path)
    assert torch.equal(torch.rand(4), expected)
