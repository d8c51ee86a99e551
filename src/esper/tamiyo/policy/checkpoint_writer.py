"""Writing checkpoint files: what they hold, checked to load safely, written atomically.

`PolicyBundle.save` (and `save_policy`) end here. This module knows the file format and
plain data only, not bundles or the registry, so the base can save without importing
the modules that import it. `checkpoint` reads the files back.

The file is a `torch.save` of one dict (format version 1):

| key | value |
|---|---|
| `format` | `"esper.tamiyo.policy"`, what marks a checkpoint of this library |
| `format_version` | `FORMAT_VERSION` when written |
| `torch_version` | the torch version that wrote it, as a string |
| `policy` | the registered name of the bundle's class |
| `config` | the constructor's keyword arguments, an `ActionSpace` as a tagged dict |
| `dtype` | the parameters' dtype, such as `"float32"` |
| `state_dict` | the network's `state_dict`, without a `DataParallel` wrapper's prefix |

A save never leaves a half-written checkpoint: the file is written next to its target
under a temporary name, synced to disk, then renamed onto the target in one step. If
anything fails the previous checkpoint is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from esper.tamiyo.policy.action_space import HEAD_NAMES, ActionSpace

__all__ = ["FORMAT", "FORMAT_VERSION", "TYPE_TAG", "write_checkpoint"]

FORMAT_VERSION: Final = 1
"""The version of the file layout written here; `load_policy` reads up to it."""

FORMAT: Final = "esper.tamiyo.policy"
"""The value of the `format` key, what marks a checkpoint of this library."""

TYPE_TAG: Final = "__esper_type__"
"""The key that marks a config value stored as a tagged dict (an `ActionSpace`)."""

_SCALARS: Final = (int, float, str, bool, type(None))
_CONTAINERS: Final = (dict, OrderedDict, list, tuple, torch.Size)
_WRAPPERS: Final = (nn.DataParallel, nn.parallel.DistributedDataParallel)  # weights in .module


def write_checkpoint(
    path: str | os.PathLike[str],
    *,
    policy: str,
    config: Mapping[str, Any],
    dtype: torch.dtype,
    network: nn.Module,
    owner: str,
) -> Path:
    """Check everything, then write the checkpoint atomically; returns its path.

    Args:
        path: The file to write; its folder must exist. Replaced if it exists.
        policy: The registered name of the bundle's class.
        config: The keyword arguments that rebuild the bundle.
        dtype: The parameters' dtype.
        network: The bundle's network; a `DataParallel` or `DistributedDataParallel`
            wrapper's `module.` prefix is left out of the saved keys.
        owner: The bundle's class name, for messages.

    Raises:
        TypeError: A config value or a piece of state is something a safe checkpoint
            cannot hold (the message names it).
        FileNotFoundError: The folder of `path` does not exist.
        OSError: Writing failed (disk full, no permission, ...); nothing changed.
    """
    target = Path(path)
    encoded = {key: _encode(value, f"{owner}: config[{key!r}]") for key, value in config.items()}
    state = network.state_dict()  # a fresh dict: stripping a prefix in place is safe
    if isinstance(network, _WRAPPERS):
        consume_prefix_in_state_dict_if_present(state, "module.")
    _check_plain(state, f"{owner}: state_dict")
    payload = {
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
    _write_atomically(payload, target)
    return target


def _encode(value: object, where: str) -> object:
    """A config value as plain data; an `ActionSpace` becomes a tagged dict."""
    if type(value) in _SCALARS:
        return value
    if type(value) in (list, tuple):
        assert isinstance(value, list | tuple)
        items = [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if type(value) is ActionSpace:
        return {TYPE_TAG: "ActionSpace", "sizes": dict(zip(HEAD_NAMES, value.sizes, strict=True))}
    raise TypeError(
        f"cannot save {where} = {value!r} ({type(value).__name__}): a checkpoint stores "
        "only ints, floats, strs, bools, None, lists and tuples of them, and ActionSpace; "
        "make the constructor take one of those"
    )


def _check_plain(value: object, where: str) -> None:
    """Refuse anything `torch.load(weights_only=True)` would refuse to read back."""
    if isinstance(value, torch.Tensor) or type(value) in _SCALARS:
        return
    if type(value) in _CONTAINERS:
        if isinstance(value, Mapping):
            for key, item in value.items():
                _check_plain(key, f"{where} key {key!r}")
                _check_plain(item, f"{where}[{key!r}]")
        else:
            assert isinstance(value, list | tuple)
            for i, item in enumerate(value):
                _check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"cannot save {where}: it is a {type(value).__name__}, which a safe checkpoint "
        "cannot hold (only tensors, numbers, strings, None, dicts, lists and tuples); "
        "return plain data from get_extra_state"
    )


def _write_atomically(payload: dict[str, Any], target: Path) -> None:
    """`torch.save` to a temporary file beside `target`, sync it, rename it onto `target`."""
    fd, temporary = _create_temporary(target)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_folder(target.parent)


def _create_temporary(target: Path) -> tuple[int, Path]:
    """Create a new, hidden file beside `target`: `(descriptor, path)`.

    Not `tempfile.mkstemp`: its files are private (mode 0600) and the checkpoint would
    keep that mode; this one gets the permissions any new file gets (umask applies).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name beside the target", str(target))


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
