"""``./dev`` refuses a Python older than pyproject's ``requires-python``, and says so.

It used to make ``.venv`` with whatever interpreter it was given and leave the refusal to
pip: with Python 3.10 the install failed ("requires a different Python"), the ``.venv`` of
3.10 stayed, and every later ``./dev``, ``PYTHON=python3.13`` included, reused it and failed
the same way. Here a copy of ``dev`` runs beside a ``pyproject.toml`` whose floor is above
the running interpreter (the one a test can be sure is there).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOOR = "3.99"


def project(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "dev", tmp_path / "dev")
    (tmp_path / "pyproject.toml").write_text(
        f'[project]\nname = "x"\nversion = "0"\nrequires-python = ">={FLOOR}"\n'
    )
    return tmp_path


def run_dev(where: Path, command: str = "test") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(where / "dev"), command], cwd=where, env=env, capture_output=True,
        text=True, timeout=300, check=False,
    )


@pytest.mark.parametrize(("command", "venv"), [("test", ".venv"), ("test-lowest", ".venv-lowest")])
def test_an_interpreter_below_the_floor_is_refused_before_a_venv_is_made(
    tmp_path: Path, command: str, venv: str
) -> None:
    where = project(tmp_path)
    done = run_dev(where, command)
    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert done.returncode == 2
    assert f"is Python {mine}; aimiddleware needs Python >= {FLOOR}" in done.stderr
    assert f"PYTHON=python3.13 ./dev {command}" in done.stderr
    assert not (where / venv).exists()  # nothing left to trip the next run


def test_a_venv_below_the_floor_is_refused_with_how_to_remove_it(tmp_path: Path) -> None:
    where = project(tmp_path)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where / ".venv")],
                   check=True, timeout=120)
    done = run_dev(where)
    assert done.returncode == 2
    assert f".venv is Python {sys.version_info[0]}.{sys.version_info[1]}" in done.stderr
    assert "rm -rf .venv" in done.stderr


def test_dev_reads_the_floor_pyproject_declares() -> None:
    # dev reads `requires-python = ">=X.Y"`; another form would leave it on its fallback
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^requires-python *= *">= *\d+\.\d+"', text, re.M)
