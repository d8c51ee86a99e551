"""Checkpoint files of whole policy bundles: `save_policy`, and `load_policy`, safe to load.

`save_policy` (or `bundle.save`) writes what it takes to rebuild a bundle: its
registered name, its constructor config, its dtype, its weights and a SHA-256 digest of
them all, atomically (the file format and the writing are in `checkpoint_writer`).
`load_policy` rebuilds the class from the registry and restores the weights, and reads
the file with `torch.load(..., weights_only=True)`, so a checkpoint, whoever made it,
can never run code: a file holding anything but tensors and plain containers is
refused. A damaged file either loads exactly what was saved or is refused, and what a
file claims (its config) is checked against what it holds (its weights) on the meta
device before anything is allocated.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from esper.tamiyo.policy import MLPPolicyBundle
    >>> bundle = MLPPolicyBundle(feature_dim=8, hidden_dim=16)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = save_policy(bundle, Path(folder) / "policy.pt")
    ...     restored = load_policy(path)
    >>> type(restored).__name__, restored.config == bundle.config
    ('MLPPolicyBundle', True)
"""

from __future__ import annotations

import errno
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, Final

import torch

from esper.tamiyo.policy import registry
from esper.tamiyo.policy.action_space import ActionHierarchy, ActionSpace
from esper.tamiyo.policy.base import PolicyBundle
from esper.tamiyo.policy.checkpoint_writer import (
    DIGEST_KEY,
    FORMAT,
    FORMAT_VERSION,
    LOADABLE_DTYPES,
    MAX_CONFIG_ITEMS,
    MAX_NESTING,
    PLAIN_CONTAINERS,
    PLAIN_SCALARS,
    TYPE_TAG,
    non_finite_key,
    payload_digest,
)
from esper.tamiyo.policy.validation import check_state_dict

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "UnregisteredPolicyError",
    "load_policy",
    "save_policy",
]

_REQUIRED_KEYS: Final = ("policy", "config", "dtype", "state_dict")
_MAX_STATE_ITEMS: Final = 1_000_000  # values in a state_dict, all levels: far more than any
_PARAMETER_DTYPES: Final = tuple(dtype for dtype in LOADABLE_DTYPES if dtype.is_floating_point)


class CheckpointError(ValueError):
    """A file cannot be loaded as a policy checkpoint; the message names it and says why."""


class UnregisteredPolicyError(CheckpointError):
    """The checkpoint names a policy no imported module has registered.

    Import the module that registers it, then load again (`esper-policy demo
    --import`).
    """


# ---------------------------------------------------------------------- saving


def save_policy(bundle: PolicyBundle, path: str | os.PathLike[str]) -> Path:
    """Write `bundle` to `path` as a checkpoint `load_policy` can rebuild it from.

    Everything is checked before the file is touched, so that `load_policy` never
    refuses a file `save_policy` wrote: the config and state hold only plain data and
    tensors of the dtypes a checkpoint holds, nested at most 32 deep, and the weights
    are finite. The file holds a SHA-256 digest of its content, which `load_policy`
    verifies.

    The write is atomic: a crash or an error leaves the previous file at `path` (if
    any) as it was. It goes through a temporary file beside the target, named
    `.<16 hex digits>.<8 hex digits>.tmp` (30 characters, whatever the target's name,
    so a name as long as the file system allows saves too). An error removes it; a
    killed process cannot, and the next save of the same path removes the
    temporaries of that path no process is writing (unlocked and a minute old). A
    symbolic link at `path` is replaced by the file, which gets fresh permissions
    (from the umask). A compiled bundle saves the same keys as an uncompiled one
    (compile the loaded bundle again if you want it compiled). A network wrapped in
    `DataParallel` or `DistributedDataParallel` is saved without the wrapper's
    `module.` prefix, so it loads into a plain bundle.

    Args:
        bundle: A bundle whose class is registered (`@register_policy`).
        path: The file to write; its folder must exist. Replaced if it exists.

    Returns:
        `path`, as a `Path`.

    Raises:
        TypeError: `bundle` is not a `PolicyBundle`, or its config or state holds a
            value a safe checkpoint cannot store (the message names it).
        ValueError: The bundle's class is not registered, a weight holds NaN or
            infinite values (the message names it), or `path` is empty.
        IsADirectoryError: `path` is a folder (an `OSError`).
        FileNotFoundError: The folder of `path` does not exist.
        OSError: Writing failed (disk full, no permission, ...): the message names the
            file and the cause, the errno is kept (`ENOSPC` for a full disk), and the
            previous file is unchanged.
    """
    if not isinstance(bundle, PolicyBundle):
        raise TypeError(f"save_policy saves a PolicyBundle, got {type(bundle).__name__}")
    return bundle.save(path)


# ---------------------------------------------------------------------- loading


def load_policy(
    path: str | os.PathLike[str], *, map_location: str | torch.device | None = None
) -> PolicyBundle:
    """Rebuild the bundle saved at `path` by `save_policy`, weights included.

    The file is read with `torch.load(..., weights_only=True)`: nothing in it can run
    code. Then, before any weight is allocated: its content is checked to be the plain
    data and dense tensors `save_policy` writes (lists nested at most 32 deep, a
    config of at most 100,000 values, tensors of a parameter dtype or an integer or
    bool one), its SHA-256 digest is verified, its weights are checked finite, and the
    class is built from the config on the meta device (no memory, no work) to check
    that the weights' keys, shapes and dtypes are those the config builds. Only then
    is the bundle built for real, converted to the saved dtype, moved to
    `map_location` and given the saved weights. It is not compiled, whether the saved
    one was or not. The class is looked up by its registered name, so the module that
    registers it must be imported first (the built-in bundles always are).

    A class whose constructor cannot run on the meta device is built for real
    without that check; its weights are still checked before they are loaded.

    A checkpoint of format version 1 (written before digests) loads as before, with a
    `UserWarning` that it carries no digest: save it again to add one.

    Args:
        path: A file written by `save_policy`.
        map_location: The device to put the bundle on (`"cpu"`, `"cuda:0"`, ...);
            the CPU when `None`, whatever device the weights were saved from.

    Returns:
        The bundle, of the saved class.

    Raises:
        FileNotFoundError: There is no file at `path`.
        PermissionError: The file cannot be opened (an `OSError`, as for any file).
        CheckpointError: The file is truncated or damaged (its zip checksums or its
            digest do not match), holds objects other than tensors and plain data, is
            not a checkpoint of this library, was written by a newer version of it,
            holds a config nested too deep or too big, or a config or weights that do
            not build the policy (keys, shapes, a sparse tensor, a dtype that is not
            the weights', NaN or infinite values). The message names the file, and
            the tensor or config entry where there is one.
        UnregisteredPolicyError: The file names a policy no imported module has
            registered (a `CheckpointError`): import the module that registers it.
        RuntimeError: `map_location` is not a device torch can use here (torch's own
            error, raised before the file is read).
    """
    file = Path(path)
    # Resolved first, so an unavailable device is torch's own error, not a "corrupt file".
    device = torch.empty(0, device="cpu" if map_location is None else map_location).device
    payload = _read(file, device)
    _check_format(file, payload)
    _check_content(file, payload)
    _check_digest(file, payload)
    bad = non_finite_key(payload["state_dict"])
    if bad is not None:
        raise CheckpointError(
            f"{file}: state_dict[{bad!r}] holds NaN or infinite values; the policy was "
            "saved after its training diverged, or the file was altered. Inspect the "
            "weights with torch.load(path, weights_only=True)"
        )
    return _rebuild(file, payload, device)


def _rebuild(file: Path, payload: dict[str, Any], device: torch.device) -> PolicyBundle:
    """Check the weights against a meta build, then build for real and load them."""
    cls = _policy_class(file, payload["policy"])
    config = _decode_config(file, payload["config"])
    dtype = _dtype(file, payload["dtype"])
    state = payload["state_dict"]
    with torch.random.fork_rng():  # building draws initial weights: keep the caller's RNG
        _check_against_meta_build(file, cls, config, state)
        try:
            bundle = cls(**config)
        except Exception as error:  # a crafted config can make a constructor raise anything
            raise _does_not_build(file, cls, error) from error
    bundle.to(device, dtype)
    try:
        bundle.load_state_dict(state)
    except Exception as error:  # set_extra_state of a contributed class may raise anything
        raise CheckpointError(f"{file}: its weights do not fit its config: {error}") from error
    return bundle


def _check_against_meta_build(
    file: Path, cls: type[PolicyBundle], config: dict[str, Any], state: Mapping[str, Any]
) -> None:
    """Refuse weights whose keys, shapes or dtypes are not those `config` builds.

    The class is built on the meta device, where tensors have shapes but no memory
    and initialization costs nothing, so a config that claims a huge network is
    refused at no cost. If the constructor or `state_dict` fails there (a bad config,
    or a class that reads a tensor's values), nothing is checked here: the real build
    that follows raises the config's error, or builds a class the meta device cannot.
    """
    try:
        with torch.device("meta"):
            own = cls(**config).state_dict()
    except Exception:  # the real build says what is wrong, if anything is
        return
    try:
        check_state_dict(own, state, cls.__name__, strict=True)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{file}: its weights do not fit its config: {error}") from error
    for key, mine in own.items():
        theirs = state[key]
        if not isinstance(mine, torch.Tensor) or not isinstance(theirs, torch.Tensor):
            continue
        floating = mine.is_floating_point()
        fits = theirs.is_floating_point() if floating else theirs.dtype == mine.dtype
        if not fits:
            want = "a floating dtype" if floating else str(mine.dtype)
            raise CheckpointError(
                f"{file}: state_dict[{key!r}] is a {theirs.dtype} tensor, but "
                f"{cls.__name__} holds {want} there; the file was not written by "
                "save_policy, or it was altered"
            )


def _does_not_build(file: Path, cls: type[PolicyBundle], error: Exception) -> CheckpointError:
    return CheckpointError(
        f"{file}: its config does not build {cls.__name__} ({type(error).__name__}: "
        f"{error}); was it saved by another version of the class?"
    )


def _read(file: Path, device: torch.device) -> dict[str, Any]:
    """`torch.load` with `weights_only=True`; what fails once the file is open is named.

    The file is opened here, so a missing or unreadable file raises the usual
    `OSError`; past that, any error (torch raises `OSError` too on some damaged zip
    archives) means the content is bad.
    """
    if not file.exists():
        raise FileNotFoundError(errno.ENOENT, "no policy checkpoint at this path", str(file))
    if not file.is_file():
        raise CheckpointError(f"{file} is not a file; give the path of a checkpoint file")
    _check_archive_signature(file)
    _check_crcs(file)
    with file.open("rb") as stream:
        payload = _load_stream(file, stream, device)
    if not isinstance(payload, dict):
        raise _not_ours(file, f"it holds a {type(payload).__name__}, not a dict")
    return payload


_ZIP_SIGNATURE = b"PK\x03\x04"
_PICKLE_PROTOCOL = b"\x80"  # torch.save(..., _use_new_zipfile_serialization=False)


def _check_archive_signature(file: Path) -> None:
    """Refuse a file that begins like neither format `torch.load` reads.

    `torch.save` writes a zip archive (or, with its legacy option, a pickle stream): a
    JSON file, a picture or a log given by mistake is named as such rather than as a
    damaged checkpoint. An empty file, or one cut inside the zip signature, goes on to
    be reported as truncated.
    """
    with file.open("rb") as stream:
        head = stream.read(16)
    cut_short = _ZIP_SIGNATURE.startswith(head)  # also true of an empty file
    if not (cut_short or head.startswith((_ZIP_SIGNATURE, _PICKLE_PROTOCOL))):
        raise CheckpointError(
            f"{file} is not a policy checkpoint: save_policy writes a zip archive, as "
            f"torch.save does, and this file is not one (it begins with {head!r}); "
            "give the path of a file that save_policy wrote"
        )


def _check_crcs(file: Path) -> None:
    """Refuse a file whose stored data fails its zip checksums.

    `torch.save` writes a zip archive with a CRC-32 per record, and `torch.load` does
    not check them: a bit flipped in the weights would load silently. A damaged
    archive makes `zipfile` raise many kinds of error (`BadZipFile`, `zlib.error`,
    `UnicodeDecodeError`, `NotImplementedError` for an unknown compression method,
    `RuntimeError` for a record it takes as encrypted, ...): each is reported as a
    damaged file.
    """
    try:
        if not zipfile.is_zipfile(file):
            return  # empty, cut short, or legacy pickle: torch.load says what is wrong
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except Exception as error:  # every way a damaged archive fails
        raise _corrupt(file, error) from error
    if bad is not None:
        raise CheckpointError(
            f"{file} is corrupt: the checksum of its record {bad!r} does not match its "
            "data (a damaged copy?); load an intact copy"
        )


def _load_stream(file: Path, stream: BinaryIO, device: torch.device) -> object:
    try:
        return torch.load(stream, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _weights_only_detail(error)
        if "GLOBAL" in detail:
            raise CheckpointError(
                f"{file} was refused: it holds an object other than tensors and plain data "
                f"({detail}). Unpickling it could run code, so load_policy does not: the "
                "file was not written by save_policy, or it was altered"
            ) from None
        raise _corrupt(file, error, detail) from None
    except Exception as error:  # torch and pickle raise many kinds on damaged files
        raise _corrupt(file, error) from error


def _corrupt(file: Path, error: Exception, detail: str | None = None) -> CheckpointError:
    if detail is None:
        detail = str(error).split("\n", 1)[0] or "unexpected end of data"
    return CheckpointError(
        f"{file} cannot be read: it is truncated or corrupt ({type(error).__name__}: {detail}); "
        "save the policy again or restore the file from a copy"
    )


def _weights_only_detail(error: pickle.UnpicklingError) -> str:
    """The line of torch's `weights_only` refusal that names what it refused.

    Without torch's advice around it, which suggests loading with
    `weights_only=False`: exactly what must not be done with an untrusted file.
    """
    lines = [line.strip() for line in str(error).splitlines()]
    for line in lines:
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line
    return next((line for line in lines if line), "refused by weights_only")


def _not_ours(file: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{file} is not a policy checkpoint of esper.tamiyo.policy ({why}); write one with "
        "save_policy. A bare state_dict loads with "
        "bundle.load_state_dict(torch.load(path, weights_only=True))"
    )


def _check_format(file: Path, payload: dict[str, Any]) -> None:
    """The marker first, then the version (a newer layout may differ), then the keys."""
    if payload.get("format") != FORMAT:
        raise _not_ours(
            file, f"no 'format': {FORMAT!r} entry; keys: {sorted(map(str, payload))[:5]}"
        )
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _not_ours(file, f"format_version is {version!r}, not a positive int")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has checkpoint format version {version}, written by a newer "
            f"esper-tamiyo-policy (under torch {payload.get('torch_version', '?')}); this version "
            f"reads up to {FORMAT_VERSION}: upgrade esper-tamiyo-policy to load it"
        )
    required = _REQUIRED_KEYS if version == 1 else (*_REQUIRED_KEYS, DIGEST_KEY)
    missing = [key for key in required if key not in payload]
    if missing:
        raise CheckpointError(
            f"{file} is an incomplete policy checkpoint: missing keys {missing}; "
            "save the policy again"
        )


def _check_content(file: Path, payload: dict[str, Any]) -> None:
    """Refuse content `save_policy` never writes, before anything walks it deeper.

    The digest, the config's decoding and the comparison with the class all walk the
    content: it is first bounded (no nesting deeper than `MAX_NESTING`, a cycle
    included; no more values than `MAX_CONFIG_ITEMS` in the config) and checked to
    hold plain data and dense tensors of `LOADABLE_DTYPES` only.
    """
    for key in ("policy", "dtype", *((DIGEST_KEY,) if DIGEST_KEY in payload else ())):
        if not isinstance(payload[key], str):
            raise _not_ours(file, f"its {key} is a {type(payload[key]).__name__}, not a str")
    config, state = payload["config"], payload["state_dict"]
    if not isinstance(config, dict) or not all(isinstance(key, str) for key in config):
        raise _not_ours(file, "its config is not a dict of argument names")
    if not isinstance(state, Mapping) or not all(isinstance(key, str) for key in state):
        raise _not_ours(file, "its state_dict is not a dict of tensor names")
    _check_data(file, config, "config", MAX_CONFIG_ITEMS, tensors=False)
    _check_data(file, state, "state_dict", _MAX_STATE_ITEMS, tensors=True)


def _check_data(file: Path, value: object, where: str, max_items: int, *, tensors: bool) -> None:
    """Walk `value` without recursion; refuse what is too deep, too big or not plain data.

    Values are counted as the writer counts them: the lengths of all the lists, tuples
    and dicts, summed (a value reached twice counts twice, so shared lists cannot make
    the walk long).
    """
    pending: list[tuple[object, str, int]] = [(value, where, 0)]
    seen = 0
    while pending:
        item, here, depth = pending.pop()
        if type(item) in PLAIN_SCALARS:
            continue
        if isinstance(item, torch.Tensor) and tensors:
            _check_tensor(file, item, here)
            continue
        if type(item) not in PLAIN_CONTAINERS:
            raise CheckpointError(
                f"{file}: {here} is a {type(item).__name__}, which save_policy never writes "
                "there; the file was not written by save_policy, or it was altered"
            )
        assert isinstance(item, Mapping | list | tuple)
        seen += len(item)
        if seen > max_items:
            raise CheckpointError(
                f"{file}: its {where} holds more than {max_items} values, more than "
                "save_policy writes; the file was not written by save_policy, or it was altered"
            )
        if depth >= MAX_NESTING:
            raise CheckpointError(
                f"{file}: its {where} nests lists, tuples or dicts more than {MAX_NESTING} "
                "deep, which save_policy never writes; the file was not written by "
                "save_policy, or it was altered"
            )
        if isinstance(item, Mapping):
            for key, child in item.items():
                pending.append((key, f"{here} key", depth + 1))
                pending.append((child, f"{here}[{key!r}]", depth + 1))
        else:
            pending.extend((child, f"{here}[{i}]", depth + 1) for i, child in enumerate(item))


def _check_tensor(file: Path, tensor: torch.Tensor, where: str) -> None:
    """A dense tensor with data, of a dtype a checkpoint holds."""
    problem = None
    if tensor.layout != torch.strided:
        problem = f"a {str(tensor.layout).removeprefix('torch.')} tensor, not a dense one"
    elif tensor.is_meta:
        problem = "a meta tensor, without data"
    elif tensor.dtype not in LOADABLE_DTYPES:
        problem = (
            f"a {str(tensor.dtype).removeprefix('torch.')} tensor; policy weights are "
            f"{', '.join(str(dtype).removeprefix('torch.') for dtype in _PARAMETER_DTYPES)} "
            "(and integer or bool buffers)"
        )
    if problem is not None:
        raise CheckpointError(
            f"{file}: {where} is {problem}; the file was not written by save_policy, or "
            "it was altered"
        )


def _check_digest(file: Path, payload: dict[str, Any]) -> None:
    """Verify the digest; a version-1 file, which has none, loads with a warning."""
    if payload["format_version"] == 1:
        warnings.warn(
            f"{file} is a version-1 policy checkpoint: it carries no digest, so damage to "
            "its weights can go unnoticed; save it again to add one "
            "(load_policy(path).save(path))",
            UserWarning,
            stacklevel=3,
        )
        return
    if payload[DIGEST_KEY] != payload_digest(payload):
        raise CheckpointError(
            f"{file} is damaged: its content does not match the SHA-256 digest saved with "
            "it (bits changed after it was written, on disk or in a copy); load an "
            "intact copy"
        )


def _policy_class(file: Path, name: object) -> type[PolicyBundle]:
    if not isinstance(name, str):
        raise _not_ours(file, f"its policy name is a {type(name).__name__}, not a str")
    if name not in registry.list_policies():
        known = ", ".join(registry.list_policies()) or "(none)"
        raise UnregisteredPolicyError(
            f"{file} holds policy {name!r}, which is not registered (registered: {known}); "
            f'import the module that registers it with @register_policy("{name}") before '
            "loading"
        )
    return registry.get_policy(name)


def _decode_config(file: Path, config: dict[str, Any]) -> dict[str, Any]:
    return {key: _decode(file, value, f"config[{key!r}]") for key, value in config.items()}


def _decode(file: Path, value: object, where: str) -> object:
    """The inverse of `_encode`."""
    if isinstance(value, list):
        return [_decode(file, item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_decode(file, item, f"{where}[{i}]") for i, item in enumerate(value))
    if not isinstance(value, dict):
        return value
    items = value.get("items")
    if value.get(TYPE_TAG) == "dict" and isinstance(items, dict) and len(value) == 2:
        if not all(isinstance(key, str) for key in items):
            raise CheckpointError(f"{file}: {where} is a dict whose keys are not all strs")
        return {key: _decode(file, item, f"{where}[{key!r}]") for key, item in items.items()}
    if value.get(TYPE_TAG) != "ActionSpace" or not isinstance(value.get("sizes"), dict):
        raise CheckpointError(
            f"{file}: {where} is a dict this version cannot decode ({repr(value)[:200]}); "
            "was it written by a newer esper-tamiyo-policy?"
        )
    try:
        return ActionSpace(**value["sizes"], hierarchy=_decode_hierarchy(value.get("hierarchy")))
    except (TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{file}: {where} is not a valid ActionSpace: {error}") from None


def _decode_hierarchy(table: object) -> ActionHierarchy | None:
    """The `ActionHierarchy` of an encoded `ActionSpace`; `None` for a flat one.

    Raises:
        TypeError, ValueError: The table is malformed (the caller names the file).
    """
    if table is None:
        return None
    if not isinstance(table, dict) or set(table) != {"ops", "used", "canonical"}:
        raise ValueError(f"its hierarchy is not a table of ops, used and canonical: {table!r}")
    used, canonical = table["used"], table["canonical"]
    if not isinstance(used, list) or not isinstance(canonical, dict):
        raise TypeError(f"its hierarchy's used and canonical are malformed: {table!r}")
    return ActionHierarchy.from_table(
        dict(zip(table["ops"], used, strict=True)), canonical=canonical
    )


def _dtype(file: Path, name: object) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if dtype not in _PARAMETER_DTYPES:
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in _PARAMETER_DTYPES)
        raise _not_ours(file, f"its dtype {name!r} is not one of {names}")
    assert isinstance(dtype, torch.dtype)
    return dtype
