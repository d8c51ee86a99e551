"""A bundle's `config`: the constructor arguments it was built with, recorded by the base.

`PolicyBundle.__new__` snapshots the arguments of every constructor call, so that
`config` (and the checkpoints built on it) can rebuild any bundle without each subclass
reporting its own arguments.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["Arguments", "bind", "keyword_arguments", "snapshot"]

Arguments = tuple[tuple[Any, ...], dict[str, Any]]
"""The positional and keyword arguments of one constructor call."""


def snapshot(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Arguments:
    """A copy of the arguments' lists, tuples and dicts; every other value as it is.

    So `config` reports the arguments as they were passed, even if the caller mutates
    a list it passed afterwards.
    """
    return _copy_containers(args), _copy_containers(kwargs)


def _copy_containers(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy_containers(item) for item in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):  # not a NamedTuple
        return tuple(_copy_containers(item) for item in value)
    if isinstance(value, dict):
        return {key: _copy_containers(item) for key, item in value.items()}
    return value


def bind(cls: type[Any], arguments: Arguments) -> dict[str, Any]:
    """The arguments bound to `cls.__init__`'s parameters by name, defaults filled in.

    Args:
        cls: The class that was built.
        arguments: From `snapshot`.

    Returns:
        Parameter name to value, without `self`; a `*args` parameter holds a tuple and
        a `**kwargs` one a dict, under their own names.
    """
    args, kwargs = arguments
    bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
    bound.apply_defaults()
    config = dict(bound.arguments)
    del config[next(iter(config))]  # self
    return config


def keyword_arguments(cls: type[Any], config: dict[str, Any]) -> dict[str, Any]:
    """`config` as the keyword arguments `cls(**kwargs)` takes to rebuild the object.

    A `**kwargs` parameter's dict is spread; an empty `*args` tuple is dropped.

    Raises:
        TypeError: The constructor takes a non-empty `*args` or a positional-only
            parameter, which keywords cannot pass.
    """
    kwargs = dict(config)
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # no self
    for param in parameters:
        if param.kind is param.VAR_KEYWORD:
            kwargs.update(kwargs.pop(param.name, {}))
        elif param.kind is param.VAR_POSITIONAL and kwargs.pop(param.name, ()) == ():
            continue
        elif param.kind in (param.VAR_POSITIONAL, param.POSITIONAL_ONLY):
            star = "*" if param.kind is param.VAR_POSITIONAL else ""
            raise TypeError(
                f"cannot save {cls.__name__}: its constructor takes {star}{param.name} "
                "positionally only, and load_policy rebuilds a bundle from keyword "
                "arguments; make it a keyword parameter"
            )
    return kwargs
