"""No method of the package builds a function object per call (the finding, B10-PT-06).

A nested `def`, a `lambda`, a generator expression, and on Python 3.11 also a list,
set or dict comprehension, each create a new function object every time the method
runs. The finding that started this project was one such closure in `forward()`;
this test keeps every class of the package, bundles first, free of them.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import esper.tamiyo.policy as package
from conftest import TinyStatelessBundle
from esper.tamiyo.policy import PolicyBundle, get_policy, list_policies
from esper.tamiyo.policy.testing import function_objects_built_per_call


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
def test_no_method_builds_a_function_object(cls: type) -> None:
    assert function_objects_built_per_call(cls) == []


@pytest.mark.parametrize("name", list_policies())
def test_registered_bundles_build_no_function_object(name: str) -> None:
    cls = get_policy(name)
    for klass in cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, PolicyBundle):
            assert function_objects_built_per_call(klass) == []


def test_the_checker_catches_a_closure() -> None:
    """The check is not vacuous: the old design's closure is found."""

    class OldStyleBundle(TinyStatelessBundle):
        def expand(self, need_expand: bool) -> object:
            def expand_mask(mask: object) -> object:
                return mask

            return [expand_mask(m) for m in (1, 2)], (lambda: need_expand)

    found = function_objects_built_per_call(OldStyleBundle)
    assert found == [
        "OldStyleBundle.expand: FunctionDef",
        "OldStyleBundle.expand: ListComp",
        "OldStyleBundle.expand: Lambda",
    ]
