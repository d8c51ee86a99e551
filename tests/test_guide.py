"""docs/adding-a-policy-bundle.md cannot rot: its example and its output are executed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GUIDE_EXAMPLE, load_guide_example
from esper.tamiyo.policy import get_policy, registry
from esper.tamiyo.policy.base import _FINAL_METHODS
from esper.tamiyo.policy.cli import main

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "adding-a-policy-bundle.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)


@pytest.fixture
def _restore_registry() -> Iterator[None]:
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def test_the_guide_shows_the_example_file_verbatim() -> None:
    assert GUIDE_EXAMPLE.read_text() in _blocks("python")


def test_the_example_is_a_new_recurrent_bundle_in_at_most_60_lines() -> None:
    assert len(GUIDE_EXAMPLE.read_text().splitlines()) <= 60
    module = load_guide_example()
    assert module.GRUPolicyBundle.is_recurrent


@pytest.mark.usefixtures("_restore_registry")
def test_importing_the_example_registers_it() -> None:
    module = load_guide_example(keep_registration=True)
    assert get_policy("gru") is module.GRUPolicyBundle


@pytest.mark.usefixtures("_restore_registry")
def test_the_check_output_shown_is_what_the_command_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    (shown,) = _blocks("console")
    command, *expected = shown.splitlines()
    assert command == "$ esper-policy check docs/examples/gru_bundle.py:GRUPolicyBundle"
    assert main(["check", f"{GUIDE_EXAMPLE}:GRUPolicyBundle"]) == 0
    assert capsys.readouterr().out.splitlines() == expected


def test_the_guide_names_every_method_a_subclass_must_not_override() -> None:
    text = GUIDE.read_text()
    for name in _FINAL_METHODS:
        assert f"`{name}`" in text


@pytest.mark.parametrize("document", ["README.md", "docs/adr/0002-policy-bundle-abstract-base.md"])
def test_the_guide_is_linked(document: str) -> None:
    assert "adding-a-policy-bundle.md" in (ROOT / document).read_text()
