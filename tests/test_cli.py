"""The command line: `esper-policy demo` runs; bad arguments give one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from esper.tamiyo.policy.cli import main


def test_demo_runs_a_masked_rollout_for_every_bundle(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--steps", "3", "--batch", "2", "--feature-dim", "5"]) == 0
    out = capsys.readouterr().out
    assert "LSTMPolicyBundle" in out
    assert "µs per get_action" in out
    assert "Every sampled action was valid under its mask." in out
    assert "blueprint" in out


@pytest.mark.parametrize("bad", ["0", "-4", "x"])
def test_bad_numbers_are_refused_without_a_traceback(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--steps", bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "expected a positive integer" in err
    assert "Traceback" not in err


def test_module_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "esper.tamiyo.policy", "demo", "--steps", "2", "--batch", "1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "lstm" in result.stdout
