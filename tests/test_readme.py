"""The README's Python example runs as written, and its quick start is the two commands."""

from __future__ import annotations

import re
from pathlib import Path

from esper.tamiyo.policy import testing

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})  # our own README, run as a user would


def test_readme_opens_with_the_two_quick_start_commands() -> None:
    first_block = re.search(r"```sh\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]


def test_the_readme_counts_the_kits_clauses() -> None:
    counted = re.search(r"checks (\d+)\s+clauses", README.read_text())
    assert counted is not None
    assert int(counted.group(1)) == len(testing._CLAUSES)
