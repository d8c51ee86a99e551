"""The examples in docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import esper.tamiyo.policy as package

SUBMODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
    if not info.name.endswith("__main__")
)
MODULES = [*SUBMODULES, package.__name__]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_the_base_class_example_is_checked() -> None:
    """The 15-line example bundle in PolicyBundle's docstring is among the examples run."""
    finder = doctest.DocTestFinder()
    tests = finder.find(importlib.import_module("esper.tamiyo.policy.base"))
    sources = [e.source for t in tests if t.name.endswith(".PolicyBundle") for e in t.examples]
    assert any("class TinyBundle(PolicyBundle)" in source for source in sources)
    assert any("get_action" in source for source in sources)
