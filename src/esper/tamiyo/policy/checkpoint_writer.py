"""Writing checkpoint files: what they hold, checked to load safely, written atomically.

`PolicyBundle.save` (and `save_policy`) end here. This module knows the file format and
plain data only, not bundles or the registry, so the base can save without importing
the modules that import it. `checkpoint` reads the files back.

The file is a `torch.save` of one dict (format version 2):

| key | value |
|---|---|
| `format` | `"esper.tamiyo.policy"`, what marks a checkpoint of this library |
| `format_version` | `FORMAT_VERSION` when written |
| `torch_version` | the torch version that wrote it, as a string |
| `policy` | the registered name of the bundle's class |
| `config` | the constructor's keyword arguments, an `ActionSpace` as a tagged dict (with its hierarchy's table, if any) |
| `dtype` | the parameters' dtype, such as `"float32"` |
| `state_dict` | the network's `state_dict`, without a `DataParallel` wrapper's prefix |
| `sha256` | `payload_digest` of `policy`, `config`, `dtype` and `state_dict` (new in 2) |

Version 1 was the same dict without `sha256`.

A save never leaves a half-written checkpoint: the file is written next to its target
under a temporary name, synced to disk, then renamed onto the target in one step. If
anything fails the previous checkpoint is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from esper.tamiyo.policy.action_space import HEAD_NAMES, ActionSpace

if sys.platform != "win32":
    import fcntl

__all__ = [
    "DIGESTED_KEYS",
    "DIGEST_KEY",
    "FORMAT",
    "FORMAT_VERSION",
    "LOADABLE_DTYPES",
    "MAX_CONFIG_ITEMS",
    "MAX_NESTING",
    "PLAIN_CONTAINERS",
    "PLAIN_SCALARS",
    "TYPE_TAG",
    "non_finite_key",
    "payload_digest",
    "write_checkpoint",
]

FORMAT_VERSION: Final = 2
"""The version of the file layout written here; `load_policy` reads up to it."""

FORMAT: Final = "esper.tamiyo.policy"
"""The value of the `format` key, what marks a checkpoint of this library."""

TYPE_TAG: Final = "__esper_type__"
"""The key that marks a config value stored as a tagged dict (an `ActionSpace`)."""

DIGEST_KEY: Final = "sha256"
"""The key of the digest (version 2 on): `payload_digest` of the file's content."""

DIGESTED_KEYS: Final = ("policy", "config", "dtype", "state_dict")
"""What the digest covers: everything `load_policy` rebuilds a bundle from."""

MAX_NESTING: Final = 32
"""How deep lists, tuples and dicts may nest in a config or a `state_dict`."""

MAX_CONFIG_ITEMS: Final = 100_000
"""How many values a config may hold, all its lists, tuples and dicts together."""

LOADABLE_DTYPES: Final = (
    *(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    *(torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64),
)
"""The dtypes a checkpoint's tensors may have; the floating ones are the parameters'."""

PLAIN_SCALARS: Final = (int, float, str, bool, type(None))
"""The scalar types a checkpoint may hold besides tensors (what `weights_only` reads)."""

PLAIN_CONTAINERS: Final = (dict, OrderedDict, list, tuple, torch.Size)
"""The container types a checkpoint may hold."""
_WRAPPERS: Final = (nn.DataParallel, nn.parallel.DistributedDataParallel)  # weights in .module
_HASH_CHUNK_BYTES: Final = 1 << 22  # a tensor is hashed through a CPU buffer of this size
_STALE_AFTER_S: Final = 60.0  # an unlocked temporary untouched this long is abandoned


def write_checkpoint(
    path: str | os.PathLike[str],
    *,
    policy: str,
    config: Mapping[str, Any],
    dtype: torch.dtype,
    state_dict: dict[str, Any],
    network: nn.Module,
    owner: str,
) -> Path:
    """Check everything, then write the checkpoint atomically; returns its path.

    Temporary files that earlier saves of the same path left behind (a killed
    process cannot remove its own) are removed first, unless a save in progress
    holds them: see `_remove_abandoned_temporaries`.

    Args:
        path: The file to write; its folder must exist. Replaced if it exists.
        policy: The registered name of the bundle's class.
        config: The keyword arguments that rebuild the bundle.
        dtype: The parameters' dtype.
        state_dict: `bundle.state_dict()`, the weights to save.
        network: The bundle's network: when it is a `DataParallel` or
            `DistributedDataParallel` wrapper, the `module.` prefix is left out of the
            saved keys.
        owner: The bundle's class name, for messages.

    Raises:
        TypeError: A config value or a piece of state is something a safe checkpoint
            cannot hold, or nests too deep (the message names it).
        ValueError: A weight holds NaN or infinite values (`load_policy` would refuse
            the file), or `path` is empty.
        IsADirectoryError: `path` is a folder.
        FileNotFoundError: The folder of `path` does not exist.
        OSError: Writing failed (disk full, no permission, ...); the message names
            the file and the cause, and the previous file is untouched.
    """
    target = _target(path)
    encoded = {key: _encode(value, f"{owner}: config[{key!r}]", 1) for key, value in config.items()}
    items = _count_items(encoded)
    if items > MAX_CONFIG_ITEMS:
        raise TypeError(
            f"cannot save {owner}: its config holds {items} values, more than the "
            f"{MAX_CONFIG_ITEMS} a checkpoint stores; pass large data to the bundle "
            "another way (a file it reads, or weights)"
        )
    state = dict(state_dict)  # a copy: stripping a prefix in place must not touch the caller's
    if isinstance(network, _WRAPPERS):
        consume_prefix_in_state_dict_if_present(state, "module.")
    _check_plain(state, f"{owner}: state_dict", 0)
    bad = non_finite_key(state)
    if bad is not None:
        raise ValueError(
            f"cannot save {owner}: state_dict[{bad!r}] holds NaN or infinite values, and "
            "load_policy refuses such weights (did training diverge?); save the weights "
            "for inspection with torch.save(bundle.state_dict(), path)"
        )
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torch_version": str(torch.__version__),  # TorchVersion would not load safely
        "policy": policy,
        "config": encoded,
        "dtype": str(dtype).removeprefix("torch."),
        "state_dict": state,
    }
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(
            errno.ENOENT, f"cannot save the checkpoint: folder {folder} does not exist", str(path)
        )
    payload[DIGEST_KEY] = payload_digest(payload)
    _remove_abandoned_temporaries(target)
    _write_atomically(payload, target)
    return target


def _target(path: str | os.PathLike[str]) -> Path:
    """`path` as a `Path`, refused when it cannot name a file to write."""
    given = os.fspath(path)
    target = Path(given)
    if not given:
        raise ValueError(
            "cannot save the checkpoint: path '' is empty; give the path of a file, such "
            "as 'policy.pt'"
        )
    if not target.name or target.is_dir():
        raise IsADirectoryError(
            errno.EISDIR,
            "cannot save the checkpoint: this path is a folder; give the path of a file "
            f"in it, such as {str(target / 'policy.pt')!r}",
            given,
        )
    return target


# ---------------------------------------------------------------------- what a file holds


def _encode(value: object, where: str, depth: int) -> object:
    """A config value as plain data; a dict (str keys) and an `ActionSpace` become tagged dicts."""
    if type(value) in PLAIN_SCALARS:
        return value
    if type(value) in (list, tuple):
        assert isinstance(value, list | tuple)
        if depth >= MAX_NESTING:
            raise TypeError(
                f"cannot save {where}: lists and tuples nest more than {MAX_NESTING} deep "
                "in it, deeper than a checkpoint stores; flatten it"
            )
        items = [_encode(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if type(value) is dict and all(type(key) is str for key in value):
        assert isinstance(value, dict)
        if depth + 1 >= MAX_NESTING:  # stored two levels deep: the tag, then its items
            raise TypeError(
                f"cannot save {where}: containers nest more than {MAX_NESTING} deep in it "
                "(a dict counts twice), deeper than a checkpoint stores; flatten it"
            )
        entries = {
            key: _encode(item, f"{where}[{key!r}]", depth + 2) for key, item in value.items()
        }
        return {TYPE_TAG: "dict", "items": entries}
    if type(value) is ActionSpace:
        encoded: dict[str, object] = {
            TYPE_TAG: "ActionSpace",
            "sizes": dict(zip(HEAD_NAMES, value.sizes, strict=True)),
        }
        table = value.hierarchy
        if table is not None:  # absent for a flat space, as in files written before it existed
            encoded["hierarchy"] = {
                "ops": list(table.ops),
                "used": [list(heads) for heads in table.used],
                "canonical": dict(zip(HEAD_NAMES, table.canonical, strict=True)),
            }
        return encoded
    raise TypeError(
        f"cannot save {where} = {value!r} ({type(value).__name__}): a checkpoint stores "
        "only ints, floats, strs, bools, None, lists, tuples and str-keyed dicts of them, "
        "and ActionSpace; make the constructor take one of those"
    )


def _count_items(value: object) -> int:
    """The values in the lists, tuples and dicts of an encoded config, all levels."""
    if isinstance(value, Mapping):
        return len(value) + sum(_count_items(item) for item in value.values())
    if isinstance(value, list | tuple):
        return len(value) + sum(_count_items(item) for item in value)
    return 0


def _check_plain(value: object, where: str, depth: int) -> None:
    """Refuse anything `torch.load(weights_only=True)` and `load_policy` would not read."""
    if isinstance(value, torch.Tensor):
        if value.is_meta or value.layout != torch.strided:
            kind = "a meta tensor" if value.is_meta else f"a {value.layout} tensor"
            raise TypeError(
                f"cannot save {where}: it is {kind}; a checkpoint holds tensors with data "
                "in the default (strided) layout"
            )
        if value.dtype not in LOADABLE_DTYPES:
            raise TypeError(
                f"cannot save {where}: its dtype is {value.dtype}; a checkpoint holds "
                f"tensors of {', '.join(str(d).removeprefix('torch.') for d in LOADABLE_DTYPES)}"
            )
        return
    if type(value) in PLAIN_SCALARS:
        return
    if type(value) in PLAIN_CONTAINERS:
        if depth >= MAX_NESTING:
            raise TypeError(
                f"cannot save {where}: containers nest more than {MAX_NESTING} deep in it, "
                "deeper than a checkpoint stores; return flatter data from get_extra_state"
            )
        if isinstance(value, Mapping):
            for key, item in value.items():
                _check_plain(key, f"{where} key {key!r}", depth + 1)
                _check_plain(item, f"{where}[{key!r}]", depth + 1)
        else:
            assert isinstance(value, list | tuple)
            for i, item in enumerate(value):
                _check_plain(item, f"{where}[{i}]", depth + 1)
        return
    raise TypeError(
        f"cannot save {where}: it is a {type(value).__name__}, which a safe checkpoint "
        "cannot hold (only tensors, numbers, strings, None, dicts, lists and tuples); "
        "return plain data from get_extra_state"
    )


def non_finite_key(state: Mapping[str, object]) -> str | None:
    """The first key of `state` whose floating tensor holds NaN or infinity, or `None`.

    One device sync for the whole `state_dict`, not one per tensor.
    """
    floating = [
        (key, value)
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel()
    ]
    if not floating:
        return None
    device = floating[0][1].device
    finite = torch.stack([torch.isfinite(value).all().to(device) for _, value in floating])
    for (key, _), ok in zip(floating, finite.tolist(), strict=True):
        if not ok:
            return key
    return None


def payload_digest(payload: Mapping[str, object]) -> str:
    """SHA-256 of the checkpoint's content, as 64 hex digits.

    It covers `DIGESTED_KEYS`: each tensor by its dtype, shape and raw bytes (in the
    machine's byte order, little-endian on every platform torch ships for), every other
    value by its type and `repr`, containers by their kind, length and items in order.
    So a file whose digest matches loads exactly the content that was saved. It guards
    against damage, not tampering: whoever edits a file can compute a new digest.

    Args:
        payload: The checkpoint's dict; its values must be plain data and tensors,
            nested at most `MAX_NESTING` deep (what `write_checkpoint` writes and
            `load_policy` checks before calling this).

    Returns:
        The hex digest.
    """
    hasher = hashlib.sha256()
    for key in DIGESTED_KEYS:
        _feed(hasher, key)
        _feed(hasher, payload[key])
    return hasher.hexdigest()


def _feed(hasher: Any, value: object) -> None:
    """Add `value` to `hasher`, framed so that different values never feed the same bytes."""
    if isinstance(value, torch.Tensor):
        hasher.update(f"tensor:{value.dtype}:{tuple(value.shape)}:".encode())
        _feed_tensor_bytes(hasher, value)
    elif isinstance(value, Mapping):
        hasher.update(f"dict:{len(value)}:".encode())
        for key, item in value.items():
            _feed(hasher, key)
            _feed(hasher, item)
    elif isinstance(value, list | tuple):
        hasher.update(f"{'list' if isinstance(value, list) else 'tuple'}:{len(value)}:".encode())
        for item in value:
            _feed(hasher, item)
    else:
        text = repr(value).encode("utf-8", "backslashreplace")
        hasher.update(f"{type(value).__name__}:{len(text)}:".encode() + text)


def _feed_tensor_bytes(hasher: Any, tensor: torch.Tensor) -> None:
    """The tensor's raw bytes, copied through a CPU buffer a chunk at a time.

    Through a `bytearray` that a tensor views (`torch.frombuffer`): torch alone, no
    NumPy, and never more than one chunk of extra memory, whatever the device.
    """
    raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
    size = raw.numel()
    if size == 0:
        return
    buffer = bytearray(min(size, _HASH_CHUNK_BYTES))
    window = torch.frombuffer(buffer, dtype=torch.uint8)
    view = memoryview(buffer)
    for start in range(0, size, len(buffer)):
        part = raw[start : start + len(buffer)]
        window[: part.numel()].copy_(part)
        hasher.update(view[: part.numel()])


# ---------------------------------------------------------------------- writing


def _write_atomically(payload: dict[str, Any], target: Path) -> None:
    """`torch.save` to a temporary file beside `target`, sync it, rename it onto `target`.

    Raises:
        OSError: Any failure to write, sync or rename (torch's own `RuntimeError` for
            a failed write, disk full among them, is translated); the message names
            `target` and the cause, the errno is kept where known.
    """
    fd, temporary = _create_temporary(target)
    try:
        with os.fdopen(fd, "wb") as file:  # closing it releases its lock
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError | RuntimeError):  # torch.save turns OSError into this
            raise _save_failed(target, error) from error
        raise
    _fsync_folder(target.parent)


def _save_failed(target: Path, error: BaseException) -> OSError:
    """An `OSError` naming `target` and the cause; errno kept from an `OSError` within."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno is not None:
        return OSError(
            cause.errno,
            f"cannot save the checkpoint ({cause.strerror or cause}); the previous file "
            "at this path, if any, is unchanged",
            str(target),
        )
    first_line = str(error).split("\n", 1)[0]
    return OSError(
        f"cannot save the checkpoint {target}: torch.save failed ({type(error).__name__}: "
        f"{first_line}); the previous file at this path, if any, is unchanged"
    )


def _temporary_prefix(target: Path) -> str:
    """What the temporary files of `target` are named with, then 8 hex digits and `.tmp`.

    From a hash of the target's name, so that it has the same length whatever the
    target's: a target whose name is as long as the file system allows still saves,
    and the temporaries of one target are told apart from another's in the folder.
    """
    key = hashlib.sha256(os.fsencode(target.name)).hexdigest()[:16]
    return f".{key}."


def _create_temporary(target: Path) -> tuple[int, Path]:
    """Create a new, hidden, locked file beside `target`: `(descriptor, path)`.

    Named `.<16 hex of the target's name>.<8 random hex>.tmp`, 30 characters. Locked
    (`flock`, where the OS has it) until it is closed, so that no other save of the
    same target removes it as abandoned. Not `tempfile.mkstemp`: its files are private
    (mode 0600) and the checkpoint would keep that mode; this one gets the permissions
    any new file gets (umask applies).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    prefix = _temporary_prefix(target)
    for _ in range(100):
        temporary = target.with_name(f"{prefix}{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue
        _try_lock(fd)
        return fd, temporary
    raise FileExistsError(errno.EEXIST, "no free temporary name beside the target", str(target))


def _remove_abandoned_temporaries(target: Path) -> None:
    """Remove the temporary files of `target` that killed saves left; never a live one.

    A temporary of `target` (named by `_temporary_prefix`) is abandoned when no process
    holds its lock and it has not changed for a minute: a save locks its file from the
    moment it creates it until it closes it, a moment before renaming it, and the age
    covers those two moments. On Windows, which has no `flock`, a file another process
    has open cannot be deleted, and the age covers the rest. Where the file system
    cannot lock (some network file systems) nothing is removed. Errors are ignored:
    cleaning up must never fail a save.
    """
    prefix = _temporary_prefix(target)
    length = len(prefix) + len("01234567.tmp")
    try:
        names = [
            entry.name
            for entry in os.scandir(target.parent)
            if entry.name.startswith(prefix) and entry.name.endswith(".tmp")
        ]
    except OSError:
        return
    for name in names:
        if len(name) == length:
            with contextlib.suppress(OSError):
                _remove_if_abandoned(target.with_name(name))


def _remove_if_abandoned(path: Path) -> None:
    if sys.platform == "win32":
        if time.time() - path.stat().st_mtime >= _STALE_AFTER_S:
            path.unlink()  # refused while the process that writes it has it open
        return
    fd = os.open(path, os.O_RDWR)
    try:
        if _try_lock(fd, wait=False) and time.time() - os.fstat(fd).st_mtime >= _STALE_AFTER_S:
            path.unlink()
    finally:
        os.close(fd)  # releases the lock


def _try_lock(fd: int, *, wait: bool = True) -> bool:
    """Lock the open file `fd` exclusively; whether it is now locked by this descriptor."""
    if sys.platform == "win32":
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by another descriptor, or no locks on this file system
        return False
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable, where the OS lets a folder be opened and synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)
