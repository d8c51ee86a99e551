"""The command line: `list` and `check` work; bad arguments give one clear line.

`demo` has its own tests, in test_demo_command.py.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GUIDE_EXAMPLE
from esper.tamiyo.policy import LSTMPolicyBundle, list_policies, registry
from esper.tamiyo.policy.cli import main
from esper.tamiyo.policy.loader import load_bundle_class


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
        [sys.executable, "-m", "esper.tamiyo.policy", "list"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "LSTMPolicyBundle" in result.stdout


BROKEN = Path(__file__).resolve().parent / "broken_bundle.py"


def test_list_shows_every_registered_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--feature-dim", "10"]) == 0
    out = capsys.readouterr().out
    assert "built with feature_dim=10" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert set(rows) == set(list_policies())
    assert rows["lstm"][:2] == ["LSTMPolicyBundle", "yes"]
    assert rows["mlp"][:2] == ["MLPPolicyBundle", "no"]
    assert rows["uniform"] == ["UniformPolicyBundle", "no", "0"]
    params = sum(p.numel() for p in LSTMPolicyBundle(10).network.parameters())
    assert rows["lstm"][2] == f"{params:,}"


def test_check_passes_a_registered_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "mlp", "--feature-dim", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Conformance of MLPPolicyBundle:")
    assert out.count("  PASS  ") == 21
    assert "FAIL" not in out


def test_check_by_module_and_class(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "esper.tamiyo.policy:UniformPolicyBundle"]) == 0
    assert "21 clauses, all clauses pass." in capsys.readouterr().out


def test_check_reports_the_broken_bundle_in_words(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", f"{BROKEN}:BrokenBundle"]) == 1
    out = capsys.readouterr().out
    assert "  FAIL  rows independent: row 0's values alone and in the batch differ" in out
    assert "  FAIL  float64: after to(torch.float64) forward returns torch.float32" in out
    assert "  FAIL  no per-call closures: a nested function or lambda is created on every" in out
    assert out.rstrip().endswith("21 clauses, 3 failed, 5 not run.")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["check", "no_such_module:X"], "cannot import 'no_such_module': ModuleNotFoundError"),
        (["check", "esper.tamiyo.policy:HEAD_NAMES"], "is tuple, not a PolicyBundle subclass"),
        (["check", "esper.tamiyo.policy:PolicyBundle"], "is abstract: implement _forward"),
        (["check", "esper.tamiyo.policy:Nope"], "has no attribute 'Nope'"),
        (["check", "gruu"], "'gruu' is neither MODULE:CLASS, FILE.py:CLASS nor a registered"),
        (["check", "missing/file.py:X"], "no such file: missing/file.py"),
        (["check", ":X"], "expected MODULE:CLASS or FILE.py:CLASS"),
        (["check", "lstm", "--feature-dim", "0"], "expected a positive integer, got 0"),
        (["list", "--feature-dim", "-1"], "expected a positive integer, got -1"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"esper-policy {argv[0]}: error: ")


def test_a_module_that_fails_to_import_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad_bundle.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["check", f"{bad}:X"])
    assert exit_info.value.code == 2
    assert "cannot import" in capsys.readouterr().err


def test_check_runs_as_a_console_command_without_a_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "esper.tamiyo.policy", "check", f"{BROKEN}:BrokenBundle"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 1
    assert "FAIL  float64" in result.stdout
    assert result.stderr == ""


def test_checking_a_file_twice_in_one_process_imports_it_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    saved = dict(registry._REGISTRY)
    classes = []
    try:
        for _ in range(2):  # run twice, the file would define a second class
            assert main(["check", f"{GUIDE_EXAMPLE}:GRUPolicyBundle", "--feature-dim", "2"]) == 0
            classes.append(load_bundle_class(f"{GUIDE_EXAMPLE}:GRUPolicyBundle"))
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)
    assert classes[0] is classes[1]
    assert capsys.readouterr().out.count("21 clauses, all clauses pass.") == 2


def test_a_failed_import_is_reported_again_on_a_second_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "half_bundle.py"
    bad.write_text("class Early: ...\nraise RuntimeError('boom')\n")
    for _ in range(2):
        with pytest.raises(SystemExit):
            main(["check", f"{bad}:Early"])
        assert "cannot import" in capsys.readouterr().err
    assert not [name for name in sys.modules if name.startswith("_esper_check_half_bundle")]


def test_a_file_imports_its_siblings_and_leaves_sys_path_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "sibling_widths.py").write_text("WIDTH = 16\n")
    (tmp_path / "sibling_bundle.py").write_text(
        "from sibling_widths import WIDTH\n"
        "from esper.tamiyo.policy import MLPPolicyBundle\n\n\n"
        "class Wide(MLPPolicyBundle):\n"
        "    def __init__(self, feature_dim: int) -> None:\n"
        "        super().__init__(feature_dim, hidden_dim=WIDTH)\n"
    )
    path_before = list(sys.path)
    try:
        assert main(["check", f"{tmp_path / 'sibling_bundle.py'}:Wide"]) == 0
    finally:
        sys.modules.pop("sibling_widths", None)
    assert sys.path == path_before
    assert "21 clauses, 16 pass, 5 not run." in capsys.readouterr().out


def test_a_file_of_the_package_itself_is_not_imported_twice(
    capsys: pytest.CaptureFixture[str],
) -> None:
    mlp_file = Path(__file__).resolve().parents[1] / "src/esper/tamiyo/policy/mlp.py"
    assert main(["check", f"{mlp_file}:MLPPolicyBundle", "--feature-dim", "3"]) == 0
    assert "21 clauses, all clauses pass." in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["check", "esper.tamiyo.policy:ActionSpace"], "is the class ActionSpace, not a"),
        (["check", "lstm", "--seed", "-1"], "expected a seed in [0, 2**63), got -1"),
        (["check", "lstm", "--seed", "x"], "expected an integer seed, got 'x'"),
    ],
)
def test_more_bad_arguments(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


EXITING_BUNDLE = """\
import sys

from esper.tamiyo.policy import MLPPolicyBundle


class Exiting(MLPPolicyBundle):
    pass


{call}
"""


@pytest.mark.parametrize(
    ("call", "shown", "as_file"),
    [
        ("sys.exit(0)", "sys.exit(0)", True),
        ("sys.exit()", "sys.exit()", False),
        ("raise SystemExit(None)", "sys.exit()", True),
        ("sys.exit('bye')", "sys.exit('bye')", False),
    ],
)
def test_a_module_that_exits_while_imported_is_refused(
    call: str,
    shown: str,
    as_file: bool,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`sys.exit(0)` at import must not end `check` with status 0 and no report."""
    module = "exits_at_import"
    (tmp_path / f"{module}.py").write_text(EXITING_BUNDLE.format(call=call))
    monkeypatch.chdir(tmp_path)  # MODULE:CLASS imports from the current directory
    importlib.invalidate_caches()
    where = f"{tmp_path / module}.py" if as_file else module
    with pytest.raises(SystemExit) as exit_info:
        main(["check", f"{where}:Exiting"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"esper-policy check: error: cannot import {where!r}: it called {shown} while "
        'being imported; move that call under if __name__ == "__main__":'
    ]
    assert not [name for name in sys.modules if module in name]


def test_check_exits_2_when_the_target_exits_0_while_imported(tmp_path: Path) -> None:
    """As CI runs it: status 2 and one line, not a silent 0; the advised guard works."""
    target = tmp_path / "exits_zero.py"
    target.write_text(EXITING_BUNDLE.format(call="sys.exit(0)"))
    result = subprocess.run(
        [sys.executable, "-m", "esper.tamiyo.policy", "check", f"{target}:Exiting"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr == (
        f"esper-policy check: error: cannot import {str(target)!r}: it called sys.exit(0) "
        'while being imported; move that call under if __name__ == "__main__":\n'
    )
    guarded = 'if __name__ == "__main__":\n    sys.exit(0)'  # exits only when run as a script
    target.write_text(EXITING_BUNDLE.format(call=guarded))
    assert main(["check", f"{target}:Exiting", "--feature-dim", "3"]) == 0


def test_a_bundle_that_exits_during_the_checks_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sys.exit(0)` in the bundle's code must not end `check` with status 0 either."""
    target = tmp_path / "quits.py"
    target.write_text(
        "import sys\n\n"
        "from esper.tamiyo.policy import MLPPolicyBundle\n\n\n"
        "class Quits(MLPPolicyBundle):\n"
        "    def __init__(self, feature_dim: int) -> None:\n"
        "        sys.exit(0)\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["check", f"{target}:Quits"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"esper-policy check: error: {target}:Quits called sys.exit(0) during the checks; "
        "a bundle must not exit the process"
    ]
