"""Checkpoint files of whole policy bundles: `save_policy`, and `load_policy`, safe to load.

`save_policy` (or `bundle.save`) writes what it takes to rebuild a bundle: its
registered name, its constructor config, its dtype and its weights, atomically (the
file format and the writing are in `checkpoint_writer`). `load_policy` rebuilds the
class from the registry and restores the weights, and reads the file with
`torch.load(..., weights_only=True)`, so a checkpoint, whoever made it, can never run
code: a file holding anything but tensors and plain containers is refused.

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
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Final

import torch

from esper.tamiyo.policy import registry
from esper.tamiyo.policy.action_space import ActionSpace
from esper.tamiyo.policy.base import PolicyBundle
from esper.tamiyo.policy.checkpoint_writer import FORMAT, FORMAT_VERSION, TYPE_TAG

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "UnregisteredPolicyError",
    "load_policy",
    "save_policy",
]

_REQUIRED_KEYS: Final = ("policy", "config", "dtype", "state_dict")


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

    Everything is checked before the file is touched. The write is atomic: a crash or
    an error leaves the previous file at `path` (if any) as it was. An error removes
    the temporary file; a killed process or a power loss can leave one, named
    `.<name>.<random>.tmp`, beside the target. A symbolic link at `path` is replaced by
    the file, which gets fresh permissions (from the umask). A compiled bundle saves
    the same keys as an uncompiled one (compile the loaded bundle again if you want it
    compiled). A network wrapped in
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
        ValueError: The bundle's class is not registered.
        FileNotFoundError: The folder of `path` does not exist.
        OSError: Writing failed (disk full, no permission, ...); nothing changed.
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
    code. The class is looked up by its registered name, so the module that registers
    it must be imported first (the built-in bundles always are). The bundle is built
    from its saved config, converted to the saved dtype, moved to `map_location` and
    given the saved weights. It is not compiled, whether the saved one was or not.

    Args:
        path: A file written by `save_policy`.
        map_location: The device to put the bundle on (`"cpu"`, `"cuda:0"`, ...);
            the CPU when `None`, whatever device the weights were saved from.

    Returns:
        The bundle, of the saved class.

    Raises:
        FileNotFoundError: There is no file at `path`.
        CheckpointError: The file is truncated or corrupt, holds objects other than
            tensors and plain data, is not a checkpoint of this library, was written
            by a newer version of it, or holds a config or weights that do not build
            the policy. The message names the file. A zip archive's checksums are
            verified; a file in torch's legacy (pre-zip) format has none to verify.
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
    return _rebuild(file, payload, device)


def _rebuild(file: Path, payload: dict[str, Any], device: torch.device) -> PolicyBundle:
    """Build the class from its config, in the saved dtype on `device`; load the weights."""
    cls = _policy_class(file, payload["policy"])
    config = _decode_config(file, payload["config"])
    dtype = _dtype(file, payload["dtype"])
    try:
        with torch.random.fork_rng():  # building draws initial weights: keep the caller's RNG
            bundle = cls(**config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"{file}: its config does not build {cls.__name__} ({error}); was it saved "
            "by another version of the class?"
        ) from error
    bundle.to(device, dtype)
    try:
        bundle.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{file}: its weights do not fit its config: {error}") from error
    return bundle


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
    not check them: a bit flipped in the weights would load silently.
    """
    if not zipfile.is_zipfile(file):
        return  # empty, cut short, or legacy pickle: torch.load says what is wrong
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
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
    missing = [key for key in _REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(
            f"{file} is an incomplete policy checkpoint: missing keys {missing}; "
            "save the policy again"
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


def _decode_config(file: Path, config: object) -> dict[str, Any]:
    if not isinstance(config, dict) or not all(isinstance(key, str) for key in config):
        raise _not_ours(file, "its config is not a dict of argument names")
    return {key: _decode(file, value, f"config[{key!r}]") for key, value in config.items()}


def _decode(file: Path, value: object, where: str) -> object:
    """The inverse of `_encode`."""
    if isinstance(value, list):
        return [_decode(file, item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_decode(file, item, f"{where}[{i}]") for i, item in enumerate(value))
    if not isinstance(value, dict):
        return value
    if value.get(TYPE_TAG) != "ActionSpace" or not isinstance(value.get("sizes"), dict):
        raise CheckpointError(
            f"{file}: {where} is a dict this version cannot decode ({value!r}); was it "
            "written by a newer esper-tamiyo-policy?"
        )
    try:
        return ActionSpace(**value["sizes"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{file}: {where} is not a valid ActionSpace: {error}") from None


def _dtype(file: Path, name: object) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise _not_ours(file, f"its dtype {name!r} is not a floating torch dtype")
    return dtype
