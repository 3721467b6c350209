"""The test helpers' temporary directories (a private CA's key files, a Valkey's working
directory) are removed: when closed, when collected, and at exit at the latest."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

from tests.redis_server import RedisServer, project_root
from tests.tls_proxy import PrivateCA


def test_a_private_ca_removes_its_key_files() -> None:
    """PrivateCA wrote a CA, a client certificate and its private key to /tmp/aimw-tls-*
    and never removed them (three such directories per run of test_storage_tls.py)."""
    with PrivateCA() as ca:
        assert ca.client_key.read_bytes().startswith(b"-----BEGIN")
        closed = ca.dir
    assert not closed.exists()
    dropped = PrivateCA().dir  # (not closed: removed once collected)
    gc.collect()
    assert not dropped.exists()


def test_a_valkey_keeps_its_directory_across_a_restart_then_removes_it() -> None:
    server = RedisServer().start()
    try:
        server.stop()
        server.start()  # (the directory is still there to start in)
        assert server.ping()
    finally:
        server.stop()
    directory = Path(server.dir)
    assert directory.is_dir()
    del server
    gc.collect()
    assert not directory.exists()


def test_the_helpers_leave_no_directory_at_exit() -> None:
    """Objects still alive when the interpreter exits (a session fixture's): their
    directories go too."""
    code = (
        "import builtins\n"
        "from tests.redis_server import RedisServer\n"
        "from tests.tls_proxy import PrivateCA\n"
        "builtins.kept = (PrivateCA(), RedisServer())\n"
        "print(builtins.kept[0].dir, builtins.kept[1].dir)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=project_root(), capture_output=True, text=True,
        check=True, timeout=60,
    ).stdout.split()
    assert len(out) == 2 and all(Path(path).name.startswith("aimw-") for path in out)
    assert [path for path in out if Path(path).exists()] == []
