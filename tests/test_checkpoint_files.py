"""Checkpoint files: round trips, safe loading, refusals naming the file, atomic writes."""

from __future__ import annotations

import errno
import inspect
import io
import os
import random
import shlex
import stat
import sys
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import IO, Any, cast

import pytest
import torch
import torch._dynamo
from torch import nn

from conftest import FEATURE_DIM, TinyNetwork, TinyStatelessBundle
from esper.tamiyo import policy
from esper.tamiyo.policy import (
    HEAD_NAMES,
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
from esper.tamiyo.policy.checkpoint_writer import DIGEST_KEY, payload_digest
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


def edit_payload(path: Path, edit: Callable[[dict[str, Any]], None], *, sign: bool = True) -> None:
    """Load the checkpoint at `path`, apply `edit` to its dict, save it back.

    With a new digest unless `sign` is false: as a crafted file would have, so that the
    checks after the digest's are what refuses it.
    """
    payload = torch.load(path, weights_only=True)
    edit(payload)
    if sign:
        payload[DIGEST_KEY] = payload_digest(payload)
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
    assert payload["format_version"] == FORMAT_VERSION == 2
    assert type(payload["torch_version"]) is str
    assert payload["torch_version"] == str(torch.__version__)
    assert payload["policy"] == "lstm"
    assert payload["dtype"] == "float32"
    assert payload["config"]["action_space"]["sizes"]["slot"] == 5
    assert payload["state_dict"]["heads._extra_state"] == {
        "action_sizes": (5, 13, 4, 3, 3, 4, 3, 6)
    }
    assert len(payload["sha256"]) == 64
    assert payload["sha256"] == payload_digest(payload)


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


def _nested(depth: int) -> object:
    value: object = 0.5
    for _ in range(depth):
        value = {"k": value}
    return value


def _saves(value: object, path: Path) -> bool:
    try:
        save_policy(_ConfiguredBundle(scale=value), path)
    except TypeError:
        return False
    return True


def test_every_dict_nesting_that_saves_loads_and_the_deeper_ones_are_refused(
    tmp_path: Path,
) -> None:
    """A dict is stored two levels deep (its tag, then its items): the writer counts both."""
    register_policy("test_configured")(_ConfiguredBundle)
    depth = 1
    while _saves(_nested(depth), tmp_path / f"p{depth}.pt"):
        loaded = load_policy(tmp_path / f"p{depth}.pt")
        assert isinstance(loaded, _ConfiguredBundle)
        assert loaded.scale == _nested(depth)
        depth += 1
    assert depth > 10  # the deepest that saved, and loaded, was depth - 1
    with pytest.raises(TypeError, match=r"\(a dict counts twice\)"):
        save_policy(_ConfiguredBundle(scale=_nested(depth)), tmp_path / "deep.pt")
    assert not (tmp_path / "deep.pt").exists()


def test_keyword_extras_and_nested_values_round_trip(tmp_path: Path) -> None:
    """`**extra` arguments, tuples, lists, str-keyed dicts and ActionSpace come back as given."""
    register_policy("test_configured")(_ConfiguredBundle)
    table = {"op": 0.15, "nested": {"x": (1, None)}, "__esper_type__": "not a tag here"}
    bundle = _ConfiguredBundle(
        scale=(1, 2.5, None, [True, "x"]), spaces=[ActionSpace(op=3)], note="n", table=table
    )
    loaded = load_policy(save_policy(bundle, tmp_path / "p.pt"))
    assert isinstance(loaded, _ConfiguredBundle)
    assert loaded.scale == (1, 2.5, None, [True, "x"])
    assert loaded.extra == {"spaces": [ActionSpace(op=3)], "note": "n", "table": table}
    assert loaded.config == bundle.config


@pytest.mark.parametrize(
    ("scale", "where"),
    [
        (torch.float16, r"config\['scale'\] = torch\.float16 \(dtype\)"),
        ({1: "a"}, r"config\['scale'\] = \{1: 'a'\} \(dict\)"),
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
        match=r"test_checkpoint_files\..*Unregistered is not a registered policy "
        r"\(registered: .*mlp.*\); decorate it with @register_policy",
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
    edit_payload(path, lambda payload: payload.pop("state_dict"), sign=False)


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


def central_records(data: bytes) -> list[int]:
    """Offsets of the zip's central-directory records, read from its end record."""
    end = data.rfind(b"PK\x05\x06")
    count = int.from_bytes(data[end + 10 : end + 12], "little")
    offset = int.from_bytes(data[end + 16 : end + 20], "little")
    records = []
    for _ in range(count):
        assert data[offset : offset + 4] == b"PK\x01\x02"
        records.append(offset)
        name, extra, comment = (
            int.from_bytes(data[offset + at : offset + at + 2], "little") for at in (28, 30, 32)
        )
        offset += 46 + name + extra + comment
    return records


def flip_in_central_record(path: Path, record: int, field: int, mask: int) -> None:
    """XOR `mask` into byte `field` of the `record`-th central-directory record."""
    data = bytearray(path.read_bytes())
    data[central_records(bytes(data))[record] + field] ^= mask
    path.write_bytes(bytes(data))


def _unknown_compression_method(path: Path) -> None:
    flip_in_central_record(path, 0, 10, 99)  # method 0 (stored) becomes 99


def _deflate_method(path: Path) -> None:
    flip_in_central_record(path, 0, 10, 8)  # stored bytes now claim to be deflated


def _encrypted_flag(path: Path) -> None:
    flip_in_central_record(path, 0, 8, 0x01)


def _name_not_utf8(path: Path) -> None:
    flip_in_central_record(path, 0, 46, 0x80)  # the name is flagged UTF-8: 'a' becomes 0xE1


def _changed_weights_kept_digest(path: Path) -> None:
    def edit(payload: dict[str, Any]) -> None:
        payload["state_dict"]["embed.weight"][0, 0] += 1.0

    edit_payload(path, edit, sign=False)


def _changed_config_kept_digest(path: Path) -> None:
    edit_payload(path, lambda payload: payload["config"].update(num_layers=1), sign=False)


def _missing_digest(path: Path) -> None:
    edit_payload(path, lambda payload: payload.pop("sha256"), sign=False)


def _weight(
    name: str, make: Callable[[torch.Tensor], torch.Tensor], *, sign: bool = True
) -> Callable[[Path], None]:
    """A damage that replaces weight `name` with `make(weight)`."""

    def damage(path: Path) -> None:
        def edit(payload: dict[str, Any]) -> None:
            payload["state_dict"][name] = make(payload["state_dict"][name])

        edit_payload(path, edit, sign=sign)

    return damage


def _with_nan(weight: torch.Tensor) -> torch.Tensor:
    weight = weight.clone()
    weight.view(-1)[3] = float("nan")
    return weight


def _with_inf(weight: torch.Tensor) -> torch.Tensor:
    weight = weight.clone()
    weight.view(-1)[0] = -float("inf")
    return weight


def _float8_dtype(path: Path) -> None:
    edit_payload(path, lambda payload: payload.update(dtype="float8_e4m3fn"))


def _huge_hidden_dim(path: Path) -> None:
    edit_payload(path, lambda payload: payload["config"].update(hidden_dim=2**20))


def _deep_config(path: Path) -> None:
    nested: list[object] = [8]
    for _ in range(3000):
        nested = [nested]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # torch.save pickles it recursively
    try:
        edit_payload(path, lambda payload: payload["config"].update(hidden_dim=nested), sign=False)
    finally:
        sys.setrecursionlimit(limit)


def _cyclic_config(path: Path) -> None:
    cycle: list[object] = [8]
    cycle.append(cycle)
    edit_payload(path, lambda payload: payload["config"].update(hidden_dim=cycle), sign=False)


def _object_in_the_state(path: Path) -> None:
    edit_payload(path, lambda payload: payload["state_dict"].update(extra=torch.float16))


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
    # zipfile's own errors, all named as a damaged file
    "unknown-compression-method": (
        _unknown_compression_method,
        r"truncated or corrupt \(NotImplementedError: That compression method",
    ),
    "deflate-method": (_deflate_method, r"truncated or corrupt \(error: Error -3"),
    "encrypted-flag": (_encrypted_flag, r"truncated or corrupt \(RuntimeError: File .* encrypted"),
    "name-not-utf8": (_name_not_utf8, r"truncated or corrupt \(UnicodeDecodeError: 'utf-8'"),
    # the digest
    "changed-weights-kept-digest": (
        _changed_weights_kept_digest,
        r"is damaged: its content does not match the SHA-256 digest saved with it",
    ),
    "changed-config-kept-digest": (_changed_config_kept_digest, r"is damaged: .*SHA-256 digest"),
    "missing-digest": (_missing_digest, r"incomplete policy checkpoint: missing keys \['sha256'\]"),
    # crafted content
    "sparse-weights": (
        _weight("embed.weight", torch.Tensor.to_sparse, sign=False),
        r"state_dict\['embed\.weight'\] is a sparse_coo tensor, not a dense one",
    ),
    "float8-weights": (
        _weight("embed.weight", lambda weight: weight.to(torch.float8_e4m3fn)),
        r"state_dict\['embed\.weight'\] is a float8_e4m3fn tensor; policy weights are "
        r"float16, bfloat16, float32, float64",
    ),
    "complex-weights": (
        _weight("lstm.weight_hh_l1", lambda weight: weight.to(torch.complex64)),
        r"state_dict\['lstm\.weight_hh_l1'\] is a complex64 tensor",
    ),
    "integer-weights": (
        _weight("embed.weight", lambda weight: weight.to(torch.int64)),
        r"state_dict\['embed\.weight'\] is a torch\.int64 tensor, but LSTMPolicyBundle holds "
        r"a floating dtype there",
    ),
    "bool-weights": (
        _weight("heads.out_bias", lambda weight: weight.to(torch.bool)),
        r"state_dict\['heads\.out_bias'\] is a torch\.bool tensor, but LSTMPolicyBundle",
    ),
    "nan-weights": (
        _weight("lstm.weight_ih_l0", _with_nan),
        r"state_dict\['lstm\.weight_ih_l0'\] holds NaN or infinite values",
    ),
    "infinite-weights": (
        _weight("heads.out_weight", _with_inf),
        r"state_dict\['heads\.out_weight'\] holds NaN or infinite values",
    ),
    "float8-dtype": (
        _float8_dtype,
        r"its dtype 'float8_e4m3fn' is not one of float16, bfloat16, float32, float64",
    ),
    "huge-hidden-dim": (
        _huge_hidden_dim,
        r"weights do not fit its config: .*state_dict\['lstm\.weight_ih_l0'\] has shape "
        r"\(32, 6\) but this bundle's has \(4194304, 6\)",
    ),
    "deep-config": (_deep_config, r"its config nests lists, tuples or dicts more than 32 deep"),
    "cyclic-config": (_cyclic_config, r"its config nests lists, tuples or dicts more than 32"),
    "object-in-the-state": (
        _object_in_the_state,
        r"state_dict\['extra'\] is a dtype, which save_policy never writes there",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_bad_file_is_refused_naming_the_file_and_the_cause(tmp_path: Path, case: str) -> None:
    damage, cause = CORRUPTIONS[case]
    path = save_policy(build("lstm"), tmp_path / "p.pt")
    damage(path)
    with pytest.raises(CheckpointError, match=cause) as caught:
        load_policy(path)
    assert str(caught.value).startswith(f"{path}")


def test_flipping_the_folder_attribute_of_any_zip_record_never_loads_other_weights(
    tmp_path: Path,
) -> None:
    """The digest refuses the file, or it loads intact.

    Bit 0x10 of a record's external attributes passes the CRC check, and torch then
    reads other bytes for that record (zeros, or values such as 1e36).
    """
    bundle = build("lstm")
    path = save_policy(bundle, tmp_path / "p.pt")
    original = path.read_bytes()
    refusals: list[str] = []
    for record in range(len(central_records(original))):
        path.write_bytes(original)
        flip_in_central_record(path, record, 38, 0x10)
        try:
            loaded = load_policy(path)
        except CheckpointError as error:
            refusals.append(str(error))
            continue
        assert_same_state(loaded, bundle)
    assert all(message.startswith(str(path)) for message in refusals)
    # Flipped on a tensor's record, it gave other weights: the digest is what refuses it.
    assert any(message.startswith(f"{path} is damaged: its content") for message in refusals)


def assert_same_state(got: PolicyBundle, want: PolicyBundle) -> None:
    """Same keys, and every tensor the same in dtype and value; other entries equal."""
    got_state, want_state = got.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state)
    for key, value in want_state.items():
        if isinstance(value, torch.Tensor):
            assert got_state[key].dtype == value.dtype, key
            assert torch.equal(got_state[key], value), key
        else:
            assert got_state[key] == value, key


def test_a_version_1_checkpoint_still_loads_with_a_note_that_it_has_no_digest(
    tmp_path: Path,
) -> None:
    """The dict the version-1 writer saved, built by hand: it loads, with a UserWarning."""
    bundle = MLPPolicyBundle(FEATURE_DIM, hidden_dim=8)
    sizes = dict(zip(HEAD_NAMES, ActionSpace().sizes, strict=True))
    version_1 = {
        "format": "esper.tamiyo.policy",
        "format_version": 1,
        "torch_version": str(torch.__version__),
        "policy": "mlp",
        "config": {
            "feature_dim": FEATURE_DIM,
            "hidden_dim": 8,
            "action_space": {"__esper_type__": "ActionSpace", "sizes": sizes},
        },
        "dtype": "float32",
        "state_dict": bundle.state_dict(),
    }
    path = tmp_path / "v1.pt"
    torch.save(version_1, path)
    with pytest.warns(
        UserWarning, match=r"v1\.pt is a version-1 policy checkpoint: it carries no "
    ):
        loaded = load_policy(path)
    assert loaded.config == bundle.config
    assert_same_outputs(loaded, bundle)


def _record_devices(devices: list[str]) -> Callable[..., torch.Tensor]:
    """`nn.init.orthogonal_`, recording the device type of every tensor it initializes."""
    orthogonal = nn.init.orthogonal_

    def spy(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        devices.append(tensor.device.type)
        return orthogonal(tensor, *args, **kwargs)

    return spy


def test_a_config_claiming_a_big_network_is_refused_before_anything_is_allocated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a meta-device build runs, whose tensors have no memory.

    A 12 KB file whose config says hidden_dim=6000 built a 2.4 GB network before it
    was refused.
    """
    path = save_policy(build("lstm"), tmp_path / "p.pt")
    edit_payload(path, lambda payload: payload["config"].update(hidden_dim=6000))
    devices: list[str] = []
    monkeypatch.setattr(nn.init, "orthogonal_", _record_devices(devices))
    with pytest.raises(
        CheckpointError,
        match=r"weights do not fit its config: .*state_dict\['lstm\.weight_ih_l0'\] has shape "
        r"\(32, 6\) but this bundle's has \(24000, 6\)",
    ):
        load_policy(path)
    assert devices
    assert set(devices) == {"meta"}


def test_a_config_holding_too_many_values_is_refused(tmp_path: Path) -> None:
    """Bounded before anything walks it: at most 100,000 values in all."""
    register_policy("test_configured")(_ConfiguredBundle)
    path = save_policy(_ConfiguredBundle(scale=[0]), tmp_path / "p.pt")
    edit_payload(path, lambda payload: payload["config"].update(scale=[0] * 100_001))
    with pytest.raises(
        CheckpointError, match=r"its config holds more than 100000 values"
    ) as caught:
        load_policy(path)
    assert str(caught.value).startswith(str(path))


class _ReadsItsWeights(TinyStatelessBundle):
    """A constructor that reads a tensor's value, which no meta tensor has."""

    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__(feature_dim)
        self.scale = float(next(self.network.parameters()).abs().sum())


def test_a_class_that_cannot_be_built_on_the_meta_device_still_loads(tmp_path: Path) -> None:
    """It is built for real without the meta check; its weights are still checked."""
    register_policy("test_reads_weights")(_ReadsItsWeights)
    with pytest.raises(RuntimeError, match="meta"), torch.device("meta"):
        _ReadsItsWeights()
    bundle = _ReadsItsWeights()
    path = save_policy(bundle, tmp_path / "p.pt")
    assert_same_outputs(load_policy(path), bundle)
    edit_payload(path, lambda payload: payload["state_dict"].update(extra=torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"do not fit .*unexpected keys \['extra'\]"):
        load_policy(path)


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


class _FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails the way a full disk does."""

    def __init__(self, file: Any, room: int) -> None:
        super().__init__()
        self.file = file
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        written: int = self.file.write(data)
        return written


_TORCH_SAVE = torch.save


def _save_onto_a_full_disk(payload: object, file: Any, *args: Any, **kwargs: Any) -> None:
    """torch.save itself, writing through a disk that fills after 4 KB: torch's own error."""
    _TORCH_SAVE(payload, cast("IO[bytes]", _FullDisk(file, 4096)), *args, **kwargs)


def _torch_fails(*args: object, **kwargs: object) -> None:
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize(
    ("failing_save", "cause"),
    [
        (
            _save_onto_a_full_disk,
            r"\[Errno 28\] cannot save the checkpoint \(No space left on device\)",
        ),
        (_torch_fails, r"torch\.save failed \(RuntimeError: \[enforce fail at inline_container"),
    ],
    ids=["disk-full", "torch-error"],
)
def test_a_failed_write_is_an_oserror_naming_the_file_and_the_cause(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failing_save: Callable[..., None],
    cause: str,
) -> None:
    """Not torch's RuntimeError: the OSError the docs promise; the old file stays."""
    old = build("mlp")
    path = save_policy(old, tmp_path / "p.pt")
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match=cause) as caught:
        save_policy(build("mlp"), path)
    monkeypatch.undo()
    assert str(path) in str(caught.value)
    if failing_save is _save_onto_a_full_disk:
        assert caught.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ["p.pt"]
    assert path.read_bytes() == before


@pytest.mark.skipif(os.name != "posix", reason="os.pathconf")
def test_a_file_name_as_long_as_the_file_system_allows_saves(tmp_path: Path) -> None:
    """The temporary file's name is short whatever the target's (it was 18 longer)."""
    longest = os.pathconf(tmp_path, "PC_NAME_MAX")
    bundle = build("mlp")
    path = save_policy(bundle, tmp_path / ("p" * (longest - 3) + ".pt"))
    assert len(path.name) == longest
    assert_same_outputs(load_policy(path), bundle)
    assert os.listdir(tmp_path) == [path.name]


def test_an_empty_path_or_a_folder_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"cannot save the checkpoint: path '' is empty; give "):
        save_policy(build("mlp"), "")
    with pytest.raises(
        IsADirectoryError,
        match=r"this path is a folder; give the path of a file in it, such as .*policy\.pt",
    ) as caught:
        save_policy(build("mlp"), tmp_path)
    assert caught.value.filename == str(tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_a_save_removes_the_temporaries_killed_saves_of_its_path_left_and_no_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Abandoned: unlocked and a minute old.

    A live save's file (locked), one just made (not locked yet) and another target's
    are kept.
    """
    import fcntl  # noqa: PLC0415  # POSIX only

    path, other = tmp_path / "p.pt", tmp_path / "other.pt"
    monkeypatch.setattr(os, "unlink", lambda *args, **kwargs: None)  # as if killed
    monkeypatch.setattr(torch, "save", _interrupt)
    left: list[str] = []
    for target in (other, path, path, path):
        with pytest.raises(KeyboardInterrupt):
            save_policy(build("mlp"), target)
        left.append(next(name for name in os.listdir(tmp_path) if name not in left))
    monkeypatch.undo()
    other_temporary, abandoned, fresh, live = left
    an_hour_ago = time.time() - 3600
    for name in (other_temporary, abandoned, live):
        os.utime(tmp_path / name, (an_hour_ago, an_hour_ago))
    with (tmp_path / live).open("rb+") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)
        save_policy(build("mlp"), path)
        assert sorted(os.listdir(tmp_path)) == sorted([other_temporary, fresh, live, "p.pt"])
    os.utime(tmp_path / fresh, (an_hour_ago, an_hour_ago))
    save_policy(build("mlp"), path)
    assert sorted(os.listdir(tmp_path)) == sorted([other_temporary, "p.pt"])


class _Float8Bias(TinyStatelessBundle):
    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__(feature_dim)
        self.network.register_buffer("scale", torch.zeros(3, dtype=torch.float8_e4m3fn))


def _deeply_nested_config() -> PolicyBundle:
    nested: object = 1
    for _ in range(40):
        nested = [nested]
    return _ConfiguredBundle(scale=nested)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda: _ConfiguredBundle(scale=[0] * 100_001),
            TypeError,
            r"cannot save _ConfiguredBundle: its config holds 100003 values, more than the 100000",
        ),
        (
            _deeply_nested_config,
            TypeError,
            r"config\['scale'\](\[0\]){31}: lists and tuples nest more than 32 deep",
        ),
        (
            _Float8Bias,
            TypeError,
            r"state_dict\['scale'\]: its dtype is torch\.float8_e4m3fn; a checkpoint holds",
        ),
    ],
    ids=["too-many-config-values", "deep-config", "float8-buffer"],
)
def test_what_load_policy_would_refuse_is_refused_before_writing(
    tmp_path: Path, make: Callable[[], PolicyBundle], error: type[Exception], message: str
) -> None:
    register_policy("test_configured")(_ConfiguredBundle)
    register_policy("test_float8")(_Float8Bias)
    with pytest.raises(error, match=message):
        save_policy(make(), tmp_path / "p.pt")
    assert os.listdir(tmp_path) == []


def test_weights_holding_nan_are_refused_before_writing(tmp_path: Path) -> None:
    bundle = build("mlp")
    with torch.no_grad():
        next(bundle.network.parameters())[1, 2] = float("nan")  # torso.0.weight
    with pytest.raises(ValueError, match=r"state_dict\['torso\.0\.weight'\] holds NaN or infinite"):
        save_policy(bundle, tmp_path / "p.pt")
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


@pytest.mark.parametrize(
    ("tagged", "says"),
    [
        ({"__esper_type__": "dict", "items": {1: 0.1}}, "a dict whose keys are not all strs"),
        (
            {"__esper_type__": "dict", "items": {"op": 0.1}, "extra": 1},
            "a dict this version cannot decode",
        ),
        ({"__esper_type__": "dict", "items": [("op", 0.1)]}, "a dict this version cannot decode"),
    ],
)
def test_a_crafted_floor_dict_is_refused_naming_the_config_key(
    tmp_path: Path, tagged: dict[str, Any], says: str
) -> None:
    """A signed file whose tagged dict is not what save_policy writes: a CheckpointError."""
    path = save_policy(build("lstm"), tmp_path / "p.pt")

    def craft(payload: dict[str, Any]) -> None:
        payload["config"]["probability_floor"] = tagged

    edit_payload(path, craft)
    with pytest.raises(CheckpointError, match=rf"config\['probability_floor'\].*{says}|{says}"):
        load_policy(path)


def test_floors_round_trip_as_a_plain_dict_in_the_file(tmp_path: Path) -> None:
    """The file holds the floors as a tagged dict of plain floats; they load as a dict."""
    bundle = MLPPolicyBundle(FEATURE_DIM, hidden_dim=8, probability_floor={"op": 0.1})
    path = save_policy(bundle, tmp_path / "p.pt")
    stored = torch.load(path, weights_only=True)["config"]["probability_floor"]
    assert stored == {"__esper_type__": "dict", "items": {"op": 0.1}}
    assert load_policy(path).probability_floor == {"op": 0.1}
