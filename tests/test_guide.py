"""docs/adding-a-policy-bundle.md cannot rot: its example and its output are executed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import GUIDE_EXAMPLE, load_guide_example
from esper.tamiyo.policy import HEAD_NAMES, get_policy, registry, testing
from esper.tamiyo.policy.base import _FINAL_METHODS
from esper.tamiyo.policy.cli import main

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "adding-a-policy-bundle.md"


def _blocks(language: str, text: str | None = None) -> list[str]:
    source = GUIDE.read_text() if text is None else text
    return re.findall(rf"```{language}\n(.*?)```", source, flags=re.DOTALL)


def _section(heading: str) -> str:
    """The guide's `## heading` section, up to the next `## `."""
    text = GUIDE.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


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


def test_the_hierarchy_section_runs_as_one_program() -> None:
    """Its snippets run in order: masks per op, a PPO loss, and an op-conditioned bundle."""
    blocks = _blocks("python", _section("Under Tamiyo's hierarchy"))
    assert len(blocks) == 4
    namespace: dict[str, Any] = {"__name__": "guide_hierarchy"}
    exec(compile("\n".join(blocks), "guide_hierarchy", "exec"), namespace)
    space = namespace["space"]
    assert space.hierarchy.uses(2) == ("slot", "blueprint")
    assert space.hierarchy.canonical_of("slot") == 1
    step = namespace["step"]
    taken = (int(step.action["op"]), int(step.action["slot"]))
    assert taken in {(1, 0), (4, 2), (0, 0)}
    ev = namespace["ev"]
    for head in HEAD_NAMES:  # the update at the stored op reproduces the rollout
        assert torch.allclose(ev.log_prob[head], step.log_prob[head], atol=1e-6)
    assert ev.relevance["slot"].item() == (taken[0] != 0)
    assert ev.availability["slot"].item()  # GERMINATE and FOSSILIZE were on offer
    assert not ev.availability["alpha_speed"].item()  # only SET_ALPHA_TARGET and PRUNE use it
    assert namespace["policy_loss"].requires_grad
    report = namespace["report"]
    assert report.passed
    assert [r.clause for r in report.not_run] == ["probability floors"]  # both spaces ran
    assert report.subject == "OpConditionedGRUBundle"


def test_the_guide_names_every_clause_of_the_kit() -> None:
    table = _section("What the conformance kit catches")
    for clause, _ in testing._CLAUSES:
        assert f"\n| {clause} | " in table


def test_the_extra_inputs_section_runs_and_its_bundle_conforms() -> None:
    blocks = _blocks("python", _section("Extra per-step inputs"))
    assert len(blocks) == 1
    namespace: dict[str, Any] = {"__name__": "guide_extras"}
    exec(compile(blocks[0], "guide_extras", "exec"), namespace)
    assert namespace["step"].value.shape == (4,)
    assert namespace["ev"].log_prob["op"].shape == (4, 5)
    bundle = namespace["bundle"]
    with pytest.raises(ValueError, match="missing extra input 'slot_age'"):
        bundle.get_action(torch.randn(4, 10), None)
    report = testing.check_bundle(namespace["SlotAgeMLP"])
    assert next(r for r in report.results if r.clause == "extra inputs").detail == "slot_age"
