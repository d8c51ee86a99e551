"""The script behind ADR 0006's private-API figures runs, and its variants compute alike.

Timings are never asserted: only that every variant is measured and that each one
computes the library's function (the script refuses to time a variant that does not).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from conftest import BENCHMARKS, imported_script

SCRIPT = BENCHMARKS / "private_torch_access.py"


@pytest.fixture(scope="module")
def script() -> Iterator[ModuleType]:
    with imported_script(SCRIPT, "_private_torch_access") as module:
        yield module


def test_a_quick_run_reports_every_variant(
    script: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert script.main(["--quick"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows[1:]] == list(script.VARIANTS)


def test_the_private_weights_variant_reads_the_same_tensors(script: ModuleType) -> None:
    network = script.PrivateWeights(
        script.FEATURE_DIM, 16, 8, 2, script.LSTMPolicyBundle(4).action_space
    )
    public = script.LSTMPolicyNetwork._read_cell_weights(network)
    private = network._read_cell_weights()
    assert len(public) == len(private) == 8
    assert all(a is b for a, b in zip(public, private, strict=True))


def test_a_variant_that_computes_something_else_is_refused(script: ModuleType) -> None:
    class Wrong(script.LSTMPolicyNetwork):  # type: ignore[name-defined,misc]
        def _single_step(self, features: torch.Tensor, hidden: object) -> object:
            logits, value, new_hidden, by_op = super()._single_step(features, hidden)
            return logits, value + 1.0, new_hidden, by_op

    variants = dict(script.VARIANTS)
    try:
        script.VARIANTS["wrong"] = Wrong
        with pytest.raises(AssertionError, match="wrong differs from the library"):
            script.measure(script.QUICK)
    finally:
        script.VARIANTS.clear()
        script.VARIANTS.update(variants)
