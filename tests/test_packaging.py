"""`esper` and `esper.tamiyo` are namespace packages: the wheel ships `esper.tamiyo.policy` only.

esper-lite, the host system, installs its own portions of `esper` beside ours. An
`esper/__init__.py` or `esper/tamiyo/__init__.py` in our wheel would overwrite the host's,
or shadow every portion installed on another path entry.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import esper
import esper.tamiyo
import esper.tamiyo.policy

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "esper" / "tamiyo" / "policy"
TIMEOUT_S = 120
# What setuptools reads to build the wheel; copied so that building leaves nothing in the repo.
BUILD_INPUTS = ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE")


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    """Run a command; its stdout, or a failed assertion carrying its output."""
    result = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"{args[:4]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our wheel, built offline from a copy of the project."""
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    out = tmp_path_factory.mktemp("wheel")
    _run(
        *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"),
        *("--disable-pip-version-check", "--quiet", "--wheel-dir", out, source),
    )
    [built] = out.glob("esper_tamiyo_policy-*.whl")
    return built


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _stand_in_wheel(directory: Path) -> Path:
    """A wheel of other `esper` portions, as esper-lite's: `esper.other`, `esper.tamiyo.other`."""
    dist_info = "esper_other-0.1.dist-info"
    files = {
        "esper/other/__init__.py": b'"""Another portion of esper."""\n',
        "esper/tamiyo/other/__init__.py": b'"""Another portion of esper.tamiyo."""\n',
        f"{dist_info}/METADATA": b"Metadata-Version: 2.1\nName: esper-other\nVersion: 0.1\n",
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test_packaging\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = [_record_line(name, data) for name, data in files.items()]
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = directory / "esper_other-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def _dependencies_without_us(directory: Path) -> Path:
    """The outer site-packages, where torch lies, as symlinks, minus this project's install.

    Leaves out `esper/` (a regular install of ours), our dist-info and the editable
    install's hook, so that the fresh venv can only import our code from its own wheel.
    """
    outer = Path(torch.__file__).resolve().parents[1]
    directory.mkdir()
    for entry in outer.iterdir():
        ours = entry.name == "esper" or entry.name.startswith(
            ("esper_tamiyo_policy", "__editable__")
        )
        if not ours and entry.suffix != ".pth":
            (directory / entry.name).symlink_to(entry)
    return directory


def test_the_wheel_ships_the_policy_package_and_no_namespace_init(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        f"esper/tamiyo/policy/{path.relative_to(PACKAGE).as_posix()}"
        for path in PACKAGE.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert "esper/tamiyo/policy/bench/__init__.py" in sources
    assert "esper/tamiyo/policy/demo/__init__.py" in sources
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    assert "esper/tamiyo/policy/py.typed" in names
    assert "esper/__init__.py" not in names
    assert "esper/tamiyo/__init__.py" not in names
    extra = {n for n in names if not n.startswith(("esper/tamiyo/policy/", "esper_tamiyo_policy-"))}
    assert not extra, f"the wheel ships more than esper.tamiyo.policy: {sorted(extra)}"


# Run in the fresh venv: what it imported, and from where.
_PROBE = """
import json, sys
from importlib.resources import files
import esper, esper.elsewhere, esper.other, esper.tamiyo, esper.tamiyo.other
import esper.tamiyo.policy, esper.tamiyo.policy.bench, esper.tamiyo.policy.demo
print(json.dumps({
    "esper_file": getattr(esper, "__file__", None),
    "esper_origin": esper.__spec__.origin,
    "esper_path": list(esper.__spec__.submodule_search_locations),
    "tamiyo_file": getattr(esper.tamiyo, "__file__", None),
    "tamiyo_path": list(esper.tamiyo.__path__),
    "policy": esper.tamiyo.policy.__file__,
    "policies": esper.tamiyo.policy.list_policies(),
    "py_typed": files("esper.tamiyo.policy").joinpath("py.typed").is_file(),
    "other": esper.other.__file__,
    "sys_path": sys.path,
}))
"""


def _fresh_venv(tmp_path: Path, *wheels: Path, extra_path: Path | None = None) -> tuple[Path, Path]:
    """A venv with `wheels` installed and the outer dependencies (torch) visible: python, site."""
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    )
    pip: tuple[str | Path, ...] = (sys.executable, "-m", "pip", "--python", python, "install")
    _run(*pip, "--no-deps", "--no-index", "--disable-pip-version-check", "--quiet", *wheels)
    dependencies = _dependencies_without_us((tmp_path / "dependencies").resolve())
    lines = [str(dependencies)] + ([] if extra_path is None else [str(extra_path)])
    (site / "outer_dependencies.pth").write_text("\n".join(lines) + "\n")
    return python, site


def test_the_wheel_installs_beside_other_esper_portions(wheel: Path, tmp_path: Path) -> None:
    """In a fresh venv, with another `esper` distribution and a portion on another path entry."""
    elsewhere = tmp_path / "elsewhere"  # as an editable install of esper-lite would add
    (elsewhere / "esper" / "elsewhere").mkdir(parents=True)
    (elsewhere / "esper" / "elsewhere" / "__init__.py").write_text("")
    python, site = _fresh_venv(tmp_path, wheel, _stand_in_wheel(tmp_path), extra_path=elsewhere)

    seen = json.loads(_run(python, "-I", "-c", _PROBE, cwd=tmp_path))

    policy = Path(seen["policy"])
    assert policy == site / "esper" / "tamiyo" / "policy" / "__init__.py", seen["sys_path"]
    assert str(ROOT / "src") not in seen["sys_path"]
    assert Path(seen["other"]) == site / "esper" / "other" / "__init__.py"
    assert seen["esper_file"] is None  # a namespace package
    assert seen["esper_origin"] is None
    assert [Path(p) for p in seen["esper_path"]] == [site / "esper", elsewhere / "esper"]
    assert seen["tamiyo_file"] is None
    assert [Path(p) for p in seen["tamiyo_path"]] == [site / "esper" / "tamiyo"]
    assert seen["py_typed"]
    assert {"lstm", "mlp", "uniform"} <= set(seen["policies"])  # the built-ins register on import


def test_esper_and_esper_tamiyo_are_namespace_packages_in_the_dev_install() -> None:
    for name in ("esper", "esper/tamiyo"):
        assert not (ROOT / "src" / name / "__init__.py").exists()
    for module in (esper, esper.tamiyo):
        assert getattr(module, "__file__", None) is None, module
        assert module.__spec__ is not None
        assert module.__spec__.origin is None, module
    assert esper.tamiyo.policy.__file__ is not None
    assert Path(esper.tamiyo.policy.__file__).name == "__init__.py"


# A host whose `esper` and `esper.tamiyo` are regular packages, first on the path, as
# esper-lite's are when it runs from its source tree.
_HOST_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
try:
    import esper, esper.simic, esper.tamiyo.policy
except ModuleNotFoundError as error:
    print(json.dumps({"error": str(error)}))
else:
    print(json.dumps({"policy": esper.tamiyo.policy.__file__, "stage": esper.SeedStage}))
"""


@pytest.mark.parametrize("extends_path", [True, False], ids=["extend_path", "plain"])
def test_a_host_with_regular_esper_packages_sees_ours_only_if_it_extends_its_path(
    wheel: Path, tmp_path: Path, extends_path: bool
) -> None:
    """What the README says a host must do: `pkgutil.extend_path` in its `__init__` files."""
    host = tmp_path / "host"
    (host / "esper" / "simic").mkdir(parents=True)
    (host / "esper" / "tamiyo").mkdir()
    extend = "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"
    head = extend if extends_path else ""
    (host / "esper" / "__init__.py").write_text(head + "SeedStage = 'GERMINATED'\n")
    (host / "esper" / "tamiyo" / "__init__.py").write_text(head)
    (host / "esper" / "simic" / "__init__.py").write_text("")
    python, site = _fresh_venv(tmp_path, wheel)

    seen = json.loads(_run(python, "-I", "-c", _HOST_PROBE, host, cwd=tmp_path))

    if extends_path:
        assert Path(seen["policy"]) == site / "esper" / "tamiyo" / "policy" / "__init__.py"
        assert seen["stage"] == "GERMINATED"
    else:
        assert seen == {"error": "No module named 'esper.tamiyo.policy'"}
