"""What a user gets from the package as built: its data files, and its types."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "aimiddleware"

USER_APP = '''\
from aimiddleware import Policy, StackConfig

config = StackConfig(ratelimit=Policy(requests="10/minute"))
wrong: int = config.ratelimit
'''


def test_a_user_type_checking_their_app_sees_the_package_types(tmp_path: Path) -> None:
    # Without a py.typed marker (PEP 561), mypy skipped the package ("module is installed,
    # but missing library stubs or py.typed marker") and an app importing it failed strict
    # mypy, or with the error silenced saw every name from it as Any.
    (tmp_path / "user_app.py").write_text(USER_APP)
    found = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
         "user_app.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    out = found.stdout + found.stderr
    assert "import-untyped" not in out, out
    # the one deliberate error, which only the package's own annotations reveal
    assert 'user_app.py:4: error: Incompatible types in assignment' in out, out
    assert "Found 1 error in 1 file" in out, out


def test_the_wheel_holds_every_file_the_package_needs(tmp_path: Path) -> None:
    # The Redis backends read their Lua scripts from the package directory; the marker
    # above must ship too. Built as pip builds it for a user (no build isolation: the
    # test extra has hatchling, so this needs no network).
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("aimiddleware-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    wanted = {
        path.relative_to(ROOT).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert "aimiddleware/py.typed" in wanted
    assert {name for name in wanted if name.endswith(".lua")}, "no Lua scripts found"
    assert wanted <= shipped, sorted(wanted - shipped)
