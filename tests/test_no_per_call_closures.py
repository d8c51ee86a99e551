"""No method of the package creates a closure per call.

A nested `def` or a `lambda` creates a new function object every time the method
runs. The finding this project started from was one such closure in `forward()`;
this test keeps every class of the package, bundles first, free of them. Comprehensions
and generator expressions are loops, not closures: they are allowed, and the checker
must not report them.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import esper.tamiyo.policy as package
from conftest import TinyStatelessBundle
from esper.tamiyo.policy import PolicyBundle, get_policy, list_policies
from esper.tamiyo.policy.testing import closures_built_per_call


def _package_classes() -> list[type]:
    classes: list[type] = []
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == module.__name__:
                classes.append(obj)
    return classes


CLASSES = _package_classes()


def test_the_package_classes_are_all_found() -> None:
    names = {cls.__name__ for cls in CLASSES}
    assert {"PolicyBundle", "LSTMPolicyBundle", "LSTMPolicyNetwork", "ActionMasks"} <= names
    assert {"PolicyInputs", "HeadLayout", "PolicyHeads"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=[cls.__name__ for cls in CLASSES])
def test_no_method_builds_a_closure(cls: type) -> None:
    assert closures_built_per_call(cls) == []


@pytest.mark.parametrize("name", list_policies())
def test_registered_bundles_build_no_closure(name: str) -> None:
    cls = get_policy(name)
    for klass in cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, PolicyBundle):
            assert closures_built_per_call(klass) == []


def test_the_checker_catches_a_nested_def() -> None:
    """The check is not vacuous: the old design's nested helper is found."""

    class OldStyleBundle(TinyStatelessBundle):
        def expand(self, masks: list[object]) -> list[object]:
            def expand_mask(mask: object) -> object:
                return mask

            return [expand_mask(m) for m in masks]

    assert closures_built_per_call(OldStyleBundle) == ["OldStyleBundle.expand: FunctionDef"]


def test_the_checker_catches_a_lambda_and_an_async_def() -> None:
    class Lambdas(TinyStatelessBundle):
        def key(self, items: list[int]) -> list[int]:
            return sorted(items, key=lambda item: -item)

        async def later(self) -> None:
            async def tick() -> None:
                return None

            await tick()

    assert closures_built_per_call(Lambdas) == [
        "Lambdas.key: Lambda",
        "Lambdas.later: AsyncFunctionDef",
    ]


def test_the_checker_finds_a_closure_inside_a_comprehension() -> None:
    class Hidden(TinyStatelessBundle):
        def order(self, groups: list[list[int]]) -> list[list[int]]:
            return [sorted(group, key=lambda value: -value) for group in groups]

    assert closures_built_per_call(Hidden) == ["Hidden.order: Lambda"]


def test_comprehensions_and_generator_expressions_are_not_closures() -> None:
    """The rule means closures: these loops build no function a contributor should hoist."""

    class Loops(TinyStatelessBundle):
        def as_list(self, items: list[int]) -> list[int]:
            return [item + 1 for item in items]

        def as_set(self, items: list[int]) -> set[int]:
            return {item % 3 for item in items}

        def as_dict(self, items: list[int]) -> dict[int, int]:
            return {item: item * 2 for item in items}

        def total(self, items: list[int]) -> int:
            return sum(item for item in items if item > 0)

    assert closures_built_per_call(Loops) == []


def test_only_the_named_methods_are_read() -> None:
    class Mixed(TinyStatelessBundle):
        def hot(self) -> object:
            return lambda: None

        def cold(self) -> object:
            return lambda: None

    assert closures_built_per_call(Mixed, ["cold"]) == ["Mixed.cold: Lambda"]
