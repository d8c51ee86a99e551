"""A name -> class registry of policy bundles, so configs and checkpoints can name them."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from esper.tamiyo.policy.base import PolicyBundle, registered_name

name_of = registered_name
"""The name a class is registered under, the reverse of `get_policy` (see `registered_name`)."""

__all__ = ["create_policy", "get_policy", "list_policies", "name_of", "register_policy"]

BundleT = TypeVar("BundleT", bound=type[PolicyBundle])

_REGISTRY: dict[str, type[PolicyBundle]] = {}
# The file each registered class was defined in, read when it was registered: later,
# its module's name may belong to another file (a same-named module imported anew).
_ORIGINS: dict[type[PolicyBundle], str | None] = {}


def register_policy(name: str) -> Callable[[BundleT], BundleT]:
    """Class decorator registering a concrete `PolicyBundle` subclass under `name`.

    Example:
        >>> @register_policy("my_gru")  # doctest: +SKIP
        ... class GRUPolicyBundle(PolicyBundle): ...

    Args:
        name: Registry key, a non-empty string taken by no other class. The same
            class defined again (a reloaded module, a re-run notebook cell: same
            module, file and qualified name, not local to a function) replaces its
            earlier definition.

    Raises:
        TypeError: `name` is not a string, or the decorated object is not a concrete
            `PolicyBundle` subclass.
        ValueError: `name` is empty or taken by another class.
    """
    if not isinstance(name, str):
        raise TypeError(f"policy name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("policy name must not be empty")

    def decorator(cls: BundleT) -> BundleT:
        if not (isinstance(cls, type) and issubclass(cls, PolicyBundle)):
            raise TypeError(
                f"register_policy({name!r}) decorates PolicyBundle subclasses, got {cls!r}"
            )
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise TypeError(
                f"register_policy({name!r}): {cls.__qualname__} is abstract; implement {missing}"
            )
        taken = _REGISTRY.get(name)
        if taken is not None and not _same_definition(taken, cls):
            raise ValueError(
                f"policy name {name!r} is already taken by {taken.__module__}."
                f"{taken.__qualname__}; choose another name"
            )
        _REGISTRY[name] = cls
        _ORIGINS[cls] = _file_of(cls)
        if cls._registered_name is None:  # the first name a class is registered under
            cls._registered_name = name
        return cls

    return decorator


def _same_definition(registered: type[PolicyBundle], cls: type[PolicyBundle]) -> bool:
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


def _file_of(cls: type[PolicyBundle]) -> str | None:
    """The file of the module `cls` says it is from, as imported now."""
    return getattr(sys.modules.get(cls.__module__), "__file__", None)


def get_policy(name: str) -> type[PolicyBundle]:
    """The class registered under `name`.

    Raises:
        ValueError: No policy has that name; the message lists the known names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_policies()) or "(none)"
        raise ValueError(f"unknown policy {name!r}; registered policies: {known}") from None


def list_policies() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)


def create_policy(name: str, **kwargs: Any) -> PolicyBundle:
    """Build the policy registered under `name` with its constructor's keyword arguments.

    Raises:
        ValueError: No policy has that name.
    """
    return get_policy(name)(**kwargs)
