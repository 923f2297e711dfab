"""tools/bootstrap.sh installs only when something changed: its up-to-date check, run from the real script.

A real install needs the package registries, so these runs use `--check` (the decision alone) or an environment that
is up to date (the run stops before pip). The environment is this test interpreter's, behind a stand-in `bin/python`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def fake_venv(tmp_path: Path, python_flags: str = "") -> Path:
    """A folder with a `bin/python` that runs this interpreter, whose environment has the package installed."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" {python_flags} "$@"\n')
    python.chmod(0o755)
    return venv


def current_stamp(root: Path = ROOT) -> str:
    """What a complete install writes: the hash of pyproject.toml followed by the script."""
    return hashlib.sha256(
        (root / "pyproject.toml").read_bytes() + (root / "tools" / "bootstrap.sh").read_bytes()
    ).hexdigest()


def bootstrap(venv: Path, *args: str, root: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(root / "tools" / "bootstrap.sh"), *args],
        env={"PATH": os.environ["PATH"], "VENV": str(venv), "HOME": str(venv.parent)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _needs_the_editable_install():
    import trl_selfdistill

    if not Path(trl_selfdistill.__file__).resolve().is_relative_to(ROOT):
        pytest.skip("trl_selfdistill is not installed from this checkout")


def test_an_up_to_date_environment_is_not_reinstalled(tmp_path):
    venv = fake_venv(tmp_path)
    (venv / ".trl_selfdistill-bootstrap").write_text(current_stamp() + "\n")
    assert bootstrap(venv, "--check").returncode == 0
    start = time.perf_counter()
    result = bootstrap(venv)  # a real run: it must stop before pip, or it would install into this environment
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"environment ready: {venv} (up to date)\n"
    assert result.stderr == ""  # no pip, no setuptools warning block
    assert time.perf_counter() - start < 10
    assert sorted(p.name for p in venv.iterdir()) == [".trl_selfdistill-bootstrap", "bin"]


def test_no_stamp_or_a_changed_pyproject_needs_an_install(tmp_path):
    venv = fake_venv(tmp_path)
    assert bootstrap(venv, "--check").returncode == 1  # never installed by the script (a fresh CI venv, too)
    (venv / ".trl_selfdistill-bootstrap").write_text("0" * 64 + "\n")  # pyproject.toml or the script changed since
    assert bootstrap(venv, "--check").returncode == 1
    assert bootstrap(tmp_path / "missing-venv", "--check").returncode == 1


def test_a_stamp_without_the_packages_needs_an_install(tmp_path):
    venv = fake_venv(tmp_path, python_flags="-S")  # the same interpreter without its site-packages
    (venv / ".trl_selfdistill-bootstrap").write_text(current_stamp() + "\n")
    assert bootstrap(venv, "--check").returncode == 1


def test_an_environment_installed_from_another_checkout_needs_an_install(tmp_path):
    checkout = tmp_path / "other-checkout"
    (checkout / "tools").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", checkout / "pyproject.toml")
    shutil.copy(ROOT / "tools" / "bootstrap.sh", checkout / "tools" / "bootstrap.sh")
    venv = fake_venv(tmp_path)
    (venv / ".trl_selfdistill-bootstrap").write_text(current_stamp(checkout) + "\n")
    assert bootstrap(venv, "--check", root=checkout).returncode == 1  # its package points at ROOT, not there
    assert bootstrap(venv, "--check").returncode == 0
