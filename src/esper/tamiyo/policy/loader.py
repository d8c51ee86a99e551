"""Find a bundle class from a command-line target: `MODULE:CLASS`, `FILE.py:CLASS` or a name."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from esper.tamiyo.policy.base import PolicyBundle
from esper.tamiyo.policy.registry import get_policy, list_policies

__all__ = ["TargetError", "import_module_or_file", "load_bundle_class"]


class TargetError(ValueError):
    """The target does not name a concrete `PolicyBundle` subclass; the message says why."""


def load_bundle_class(target: str) -> type[PolicyBundle]:
    """The concrete `PolicyBundle` subclass `target` names.

    Args:
        target: `package.module:Class` (importable from the current directory, as with
            `python -m`), `path/to/file.py:Class` (its folder importable while it loads,
            as with `python file.py`), or a registered policy name.

    Returns:
        The class.

    Raises:
        TargetError: The module cannot be imported, has no such attribute, or it is not
            a concrete `PolicyBundle` subclass.
    """
    if ":" not in target:
        if target in list_policies():
            return get_policy(target)
        raise TargetError(
            f"{target!r} is neither MODULE:CLASS, FILE.py:CLASS nor a registered policy "
            f"({', '.join(list_policies())})"
        )
    where, _, name = target.rpartition(":")
    if not where or not name:
        raise TargetError(f"{target!r}: expected MODULE:CLASS or FILE.py:CLASS")
    module = import_module_or_file(where)
    obj = getattr(module, name, None)
    if obj is None:
        raise TargetError(f"{where!r} has no attribute {name!r}")
    if not (isinstance(obj, type) and issubclass(obj, PolicyBundle)):
        what = f"the class {obj.__qualname__}" if isinstance(obj, type) else type(obj).__name__
        raise TargetError(f"{target} is {what}, not a PolicyBundle subclass")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise TargetError(f"{target} is abstract: implement {missing}")
    return obj


def import_module_or_file(where: str) -> ModuleType:
    """Import `where`, a dotted module name or the path of a `.py` file.

    A module (or file) that is already imported is returned as it is, not run again,
    so its `@register_policy` calls do not run twice.

    A module that calls `sys.exit` while being imported is refused, whatever the exit
    code: left alone, `sys.exit(0)` would end the command with status 0 before any check
    ran. `KeyboardInterrupt` is not caught (it is the user's Ctrl-C, not the module's
    fault), and `os._exit` ends the process at once, beyond anything's reach.

    Raises:
        TargetError: The file does not exist, or importing raised or called `sys.exit`;
            the message says so in one line.
    """
    is_file = where.endswith(".py") or os.sep in where or "/" in where
    try:
        return _load_file(Path(where)) if is_file else _import_name(where)
    except TargetError:
        raise
    except SystemExit as stop:  # from `sys.exit`, or argparse at module level, ...
        call = "sys.exit()" if stop.code is None else f"sys.exit({stop.code!r})"
        raise TargetError(
            f"cannot import {where!r}: it called {call} while being imported; "
            'move that call under if __name__ == "__main__":'
        ) from None
    except Exception as error:  # anything user code raises while importing: one line
        raise TargetError(f"cannot import {where!r}: {type(error).__name__}: {error}") from None


def _import_name(name: str) -> ModuleType:
    with _on_path(os.getcwd()):
        return importlib.import_module(name)


def _load_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise TargetError(f"no such file: {path}")
    resolved = path.resolve()
    for module in list(sys.modules.values()):
        # Already imported (a package module, or checked before): running it again would
        # register its bundles twice.
        file = getattr(module, "__file__", None)
        if file is not None and Path(file).resolve() == resolved:
            return module
    # One name per file: two files named alike must not replace each other's module.
    digest = hashlib.sha1(str(resolved).encode(), usedforsecurity=False).hexdigest()[:8]
    module_name = f"_esper_check_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # inspect finds the classes' source through it
    try:
        with _on_path(str(resolved.parent)):
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


@contextmanager
def _on_path(folder: str) -> Iterator[None]:
    """`folder` first on `sys.path` while the block runs, so its modules import."""
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
