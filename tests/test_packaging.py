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

# The retrying client as the SDKs' own docs have a user build it: in an httpx2 client, which
# their http_client= is typed as (openai 3, anthropic 2).
USER_CLIENT = '''\
import httpx2
import openai

from aimiddleware.client import AsyncRetryTransport, RetryTransport

http = httpx2.AsyncClient(transport=AsyncRetryTransport())
client = openai.AsyncOpenAI(api_key="sk-test", http_client=http, max_retries=0)
sync = openai.OpenAI(api_key="sk-test", http_client=httpx2.Client(transport=RetryTransport()))
'''


def mypy_strict(tmp_path: Path, source: str) -> str:
    """What ``mypy --strict`` says of ``source`` as a user's module, beside no config."""
    (tmp_path / "user_app.py").write_text(source)
    found = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
         "user_app.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    return found.stdout + found.stderr


def test_a_user_type_checking_their_app_sees_the_package_types(tmp_path: Path) -> None:
    # Without a py.typed marker (PEP 561), mypy skipped the package ("module is installed,
    # but missing library stubs or py.typed marker") and an app importing it failed strict
    # mypy, or with the error silenced saw every name from it as Any.
    out = mypy_strict(tmp_path, USER_APP)
    assert "import-untyped" not in out, out
    # the one deliberate error, which only the package's own annotations reveal
    assert 'user_app.py:4: error: Incompatible types in assignment' in out, out
    assert "Found 1 error in 1 file" in out, out


def test_the_retrying_client_type_checks_in_an_httpx2_client(tmp_path: Path) -> None:
    # The transports were httpx's alone: httpx2.AsyncClient(transport=AsyncRetryTransport())
    # was an arg-type error, and the README's httpx.AsyncClient given to the SDK another.
    out = mypy_strict(tmp_path, USER_CLIENT)
    assert "Success: no issues found in 1 source file" in out, out


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
