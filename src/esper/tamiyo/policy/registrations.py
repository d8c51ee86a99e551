"""The table of registered policy bundles: name to class, and class back to name.

`register_policy` (in `registry`) checks a class and adds it here; `get_policy`,
`name_of` and `PolicyBundle.save` (which stores a bundle's name in its checkpoint)
read it. The table holds classes as plain `type`s and imports nothing of the package,
so the base can read it without importing `registry`, which imports the base.
"""

from __future__ import annotations

import sys

__all__ = ["add", "lookup", "name_of", "names"]

_REGISTRY: dict[str, type] = {}
# The file each registered class was defined in, read when it was registered: later,
# its module's name may belong to another file (a same-named module imported anew).
_ORIGINS: dict[type, str | None] = {}


def add(name: str, cls: type) -> None:
    """Register `cls` under `name`, which must be free or held by `cls` defined before.

    Raises:
        ValueError: `name` is taken by another class.
    """
    taken = _REGISTRY.get(name)
    if taken is not None and not _same_definition(taken, cls):
        raise ValueError(
            f"policy name {name!r} is already taken by {taken.__module__}."
            f"{taken.__qualname__}; choose another name"
        )
    _REGISTRY[name] = cls
    _ORIGINS[cls] = _file_of(cls)


def lookup(name: str) -> type | None:
    """The class registered under `name`, or `None`."""
    return _REGISTRY.get(name)


def names() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)


def name_of(cls: type) -> str:
    """The name `cls` is registered under: the reverse of `get_policy`.

    Checkpoints store this name, so that `get_policy(name_of(cls))` rebuilds the same
    class. The exact class counts, and so does an earlier definition of a registered
    class (same module, file and name, before a reload or a re-run notebook cell): its
    instances save under the name and load as the current definition. A subclass of a
    registered class is not registered by inheritance, since its parent's name would
    rebuild the parent.

    Example:
        >>> from esper.tamiyo.policy import LSTMPolicyBundle
        >>> name_of(LSTMPolicyBundle)
        'lstm'

    Args:
        cls: A `PolicyBundle` subclass.

    Returns:
        Its name; the first one it was registered under if it has several.

    Raises:
        ValueError: `cls` is not registered; the message says how to register it.
    """
    for name, registered in _REGISTRY.items():
        if registered is cls:
            return name
    for name, registered in _REGISTRY.items():
        if isinstance(cls, type) and _same_definition(registered, cls):
            return name  # an instance made before its class was defined again
    what = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)
    known = ", ".join(names()) or "(none)"
    raise ValueError(
        f"{what} is not a registered policy (registered: {known}); decorate it with "
        '@register_policy("a_name") and import its module first'
    )


def _same_definition(registered: type, cls: type) -> bool:
    """`cls` is `registered` defined again: same module, file and qualified name.

    A class local to a function is never the same definition: each call makes a
    different class under the same name.
    """
    if "<locals>" in cls.__qualname__:
        return False
    same_name = (registered.__module__, registered.__qualname__) == (
        cls.__module__,
        cls.__qualname__,
    )
    return same_name and _ORIGINS.get(registered, _file_of(registered)) == _file_of(cls)


def _file_of(cls: type) -> str | None:
    """The file of the module `cls` says it is from, as imported now."""
    return getattr(sys.modules.get(cls.__module__), "__file__", None)
