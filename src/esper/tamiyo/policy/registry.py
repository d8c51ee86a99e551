"""A name -> class registry of policy bundles, so configs and checkpoints can name them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast

from esper.tamiyo.policy import registrations
from esper.tamiyo.policy.base import PolicyBundle
from esper.tamiyo.policy.registrations import name_of

__all__ = ["create_policy", "get_policy", "list_policies", "name_of", "register_policy"]

BundleT = TypeVar("BundleT", bound=type[PolicyBundle])

_REGISTRY = registrations._REGISTRY  # the table itself, for tests that save and restore it


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
        registrations.add(name, cls)
        return cls

    return decorator


def get_policy(name: str) -> type[PolicyBundle]:
    """The class registered under `name`.

    Raises:
        ValueError: No policy has that name; the message lists the known names.
    """
    cls = registrations.lookup(name)
    if cls is None:
        known = ", ".join(list_policies()) or "(none)"
        raise ValueError(f"unknown policy {name!r}; registered policies: {known}")
    return cast("type[PolicyBundle]", cls)  # only register_policy adds, and it checks


def list_policies() -> list[str]:
    """Registered names, sorted."""
    return registrations.names()


def create_policy(name: str, **kwargs: Any) -> PolicyBundle:
    """Build the policy registered under `name` with its constructor's keyword arguments.

    Raises:
        ValueError: No policy has that name.
    """
    return get_policy(name)(**kwargs)
