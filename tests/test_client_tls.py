"""The retrying client over TLS: a real local TLS server (a trustme CA) that fails on purpose.

A handshake cut is retried whatever the method (nothing was sent); a TLS failure after the
request was sent is retried only where a resend is safe, as a lost response is; a certificate
refused, by either side, is never retried. On asyncio, httpx and httpx2 let some of these
through as a bare ``ssl.SSLError`` (and older httpcore as anyio's stream errors): the
transport raises them as the client's module's own errors.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import anyio
import httpx
import httpx2
import openai
import pytest
import trustme
from anyio.streams.tls import TLSStream
from starlette.applications import Starlette

from aimiddleware._httpx_modules import mapped
from aimiddleware.client import AsyncRetryTransport, RetryPolicy, RetryTransport
from tests.live_server import live_server
from tests.test_client import (  # (the same answer as the plain-socket tests)
    COMPLETION,
    read_request,
)

HTTP = pytest.mark.parametrize("http", [httpx2, httpx], ids=["httpx2", "httpx"])
SYNC = pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])

ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
    b"connection: close\r\n\r\n" % len(COMPLETION)
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
EVENT = b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"fake",' + (
    b'"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":null}]}\n\n'
)
# An application-data record no key decrypts: what a peer gone wrong (a middlebox, a
# corrupted stream) puts on the wire; the client's TLS layer fails on it (bad record MAC).
BAD_RECORD = bytes([23, 3, 3, 0, 32]) + bytes(32)


OPENAI_MAJOR = int(openai.__version__.split(".")[0])


@dataclass
class TLSServer:
    """One connection at a time, each answered by the next behaviour (the last repeats):

    - ``serve``: the handshake, the request read, a 200 JSON answer;
    - ``cut-handshake``: the ClientHello read, half the server's first flight sent, closed;
    - ``close``: the ClientHello read, closed with nothing sent (EOF in the handshake);
    - ``bad-record``: the request read, then a record the client cannot decrypt;
    - ``bad-record-in-body``: the request read, the headers and 20 bytes of the body, then
      that record;
    - ``require-client-cert``: a handshake that asks for a client certificate (the client
      has none: TLS 1.3 has the server refuse it after the client's side is done);
    - ``tls1.3-only`` / ``tls1.2-at-most`` / ``one-cipher``: a server context that takes
      only TLS 1.3, at most TLS 1.2, or only TLS 1.2's ECDHE-RSA-AES128-GCM-SHA256 (the
      handshake fails against a client context that does not meet it);
    - ``reset-handshake``: the ClientHello read, the connection reset (RST, below TLS);
    - ``stream-then-bad-record`` / ``stream-then-cut`` / ``stream-then-reset``: the request
      read, an event stream's head and first event, then (once the client has read that
      event: ``first_event_read``) that record, or the connection closed below TLS (no
      close_notify), or reset (what an aborted transport sends).
    """

    ca: trustme.CA
    port: int = 0
    script: list[str] = field(default_factory=lambda: ["serve"])
    connections: int = 0
    keys: list[str | None] = field(default_factory=list)  # one per request read
    refusals: list[str] = field(default_factory=list)  # the server's own TLS errors' reasons
    first_event_read: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def context(self, behaviour: str = "serve") -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(context)
        if behaviour == "require-client-cert":
            context.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(context)
        elif behaviour == "tls1.3-only":
            context.minimum_version = ssl.TLSVersion.TLSv1_3
        elif behaviour in ("tls1.2-at-most", "one-cipher"):
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            if behaviour == "one-cipher":
                context.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
        return context

    def serve(self, listener: socket.socket, stop: threading.Event) -> None:
        special = ("require-client-cert", "tls1.3-only", "tls1.2-at-most", "one-cipher")
        contexts = {name: self.context(name) for name in ("serve", *special)}
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            behaviour = self.script.pop(0) if len(self.script) > 1 else self.script[0]
            with conn:
                conn.settimeout(10)
                try:
                    self.answer(conn, behaviour, contexts.get(behaviour, contexts["serve"]))
                except ssl.SSLError as exc:  # (a failure on purpose)
                    self.refusals.append(exc.reason or str(exc))
                except OSError:
                    pass

    def answer(self, conn: socket.socket, behaviour: str, context: ssl.SSLContext) -> None:
        if behaviour == "close":
            conn.recv(65536)
            return
        if behaviour == "reset-handshake":
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if behaviour == "cut-handshake":
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls_object = context.wrap_bio(incoming, outgoing, server_side=True)
            incoming.write(conn.recv(65536))
            with pytest.raises(ssl.SSLWantReadError):
                tls_object.do_handshake()
            flight = outgoing.read()
            conn.sendall(flight[: len(flight) // 2])
            return
        if behaviour == "require-client-cert":
            tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            try:
                with pytest.raises(ssl.SSLError, match="PEER_DID_NOT_RETURN_A_CERTIFICATE"):
                    tls.do_handshake()
                raw = socket.socket(fileno=tls.detach())
            finally:
                tls.close()
            with raw:
                raw.settimeout(10)  # (the descriptor is non-blocking: conn's timeout)
                while raw.recv(65536):  # what the client sent, until it leaves (no reset)
                    pass
            return
        with context.wrap_socket(conn, server_side=True) as tls:
            self.read_request(tls)
            if behaviour == "serve":
                tls.sendall(ANSWER + COMPLETION)
                return
            if behaviour == "bad-record-in-body":
                tls.sendall(ANSWER + COMPLETION[:20])
            if behaviour.startswith("stream-then-"):
                tls.sendall(STREAM_HEAD + b"%x\r\n%s\r\n" % (len(EVENT), EVENT))
                self.first_event_read.wait(10)  # (a reset drops what the client has not read)
            with socket.socket(fileno=tls.detach()) as raw:  # the connection, below TLS
                raw.settimeout(10)
                if behaviour == "stream-then-reset":
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif behaviour != "stream-then-cut":
                    raw.sendall(BAD_RECORD)

    def read_request(self, tls: ssl.SSLSocket) -> None:
        self.keys.append(read_request(tls).get("idempotency-key"))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[TLSServer]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.05)
    server = TLSServer(ca, listener.getsockname()[1])
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(listener, stop), daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(10)
    listener.close()


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def recorder_policy(**options: Any) -> tuple[RetryPolicy, list[float]]:
    sleeps: list[float] = []
    return RetryPolicy(sleep=sleeps.append, random=lambda: 0.0, **options), sleeps


def post(
    http: ModuleType, sync: bool, url: str, policy: RetryPolicy, verify: Any
) -> Any:
    """POST a chat body through the retrying transport (its inner one checks ``verify``):
    the response, or the exception raised."""

    def send() -> Any:
        transport = RetryTransport(http.HTTPTransport(verify=verify), policy=policy)
        with http.Client(transport=transport) as client:
            try:
                return client.post(url + "/v1/chat/completions", json={"messages": []})
            except Exception as exc:
                return exc

    async def asend() -> Any:
        transport = AsyncRetryTransport(http.AsyncHTTPTransport(verify=verify), policy=policy)
        async with http.AsyncClient(transport=transport) as client:
            try:
                return await client.post(url + "/v1/chat/completions", json={"messages": []})
            except Exception as exc:
                return exc

    return anyio.run(anyio.to_thread.run_sync, send) if sync else anyio.run(asend)


@pytest.mark.parametrize("cut", ["cut-handshake", "close"])
@HTTP
@SYNC
def test_a_handshake_cut_once_is_retried_for_any_method(
    tls_server: TLSServer, ca: trustme.CA, http: ModuleType, sync: bool, cut: str
) -> None:
    tls_server.script = [cut, "serve"]
    policy, sleeps = recorder_policy(idempotency_methods=())  # a POST without a key
    response = post(http, sync, tls_server.url, policy, trusting(ca))
    assert isinstance(response, http.Response) and response.content == COMPLETION
    assert tls_server.connections == 2 and tls_server.keys == [None] and sleeps == [0.5]


@pytest.mark.parametrize("refusal", ["untrusted", "another-host"])
@HTTP
@SYNC
def test_a_server_certificate_the_client_refuses_is_not_retried(
    tls_server: TLSServer, ca: trustme.CA, http: ModuleType, sync: bool, refusal: str
) -> None:
    policy, sleeps = recorder_policy()
    if refusal == "untrusted":  # the system's trust store: the test CA is not in it
        verify: Any = True
        url = tls_server.url
    else:  # the CA trusted, but the certificate names 127.0.0.1, not localhost
        verify, url = trusting(ca), f"https://localhost:{tls_server.port}"
    error = post(http, sync, url, policy, verify)
    assert isinstance(error, http.ConnectError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(error)
    assert tls_server.connections == 1 and tls_server.keys == [] and sleeps == []


# A client context and a server context with nothing in common: the handshake fails the same
# way on every attempt, so the client raises at once (one connection, no wait), as for a
# certificate refused. What each side's OpenSSL says (3.0 to 3.5): the client, the server's
# alert (TLSV1_ALERT_PROTOCOL_VERSION, SSLV3_ALERT_HANDSHAKE_FAILURE); the server, its reason.
MISMATCHES = [
    ("tls1.3-only", "TLSv1_2", None, "TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL"),
    ("tls1.2-at-most", None, "TLSv1_3", "TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL"),
    ("one-cipher", "TLSv1_2", None, "SSLV3_ALERT_HANDSHAKE_FAILURE", "NO_SHARED_CIPHER"),
]


@pytest.mark.parametrize(("server", "at_most", "at_least", "seen", "server_saw"), MISMATCHES)
@HTTP
@SYNC
def test_a_tls_version_or_cipher_the_peers_do_not_share_is_not_retried(
    tls_server: TLSServer,
    ca: trustme.CA,
    http: ModuleType,
    sync: bool,
    server: str,
    at_most: str | None,
    at_least: str | None,
    seen: str,
    server_saw: str,
) -> None:
    tls_server.script = [server, "serve"]  # (a second attempt would be answered)
    client = trusting(ca)
    if at_most is not None:
        client.maximum_version = ssl.TLSVersion[at_most]
    if at_least is not None:
        client.minimum_version = ssl.TLSVersion[at_least]
    if server == "one-cipher":
        client.set_ciphers("ECDHE-RSA-CHACHA20-POLY1305")
    policy, sleeps = recorder_policy(idempotency_methods=())  # (a handshake: always resendable)
    error = post(http, sync, tls_server.url, policy, client)
    assert isinstance(error, http.ConnectError), repr(error)
    assert seen in str(error)
    assert tls_server.connections == 1 and sleeps == [] and tls_server.keys == []
    # (the server's thread notes its reason after its alert went out, maybe after the
    # client has raised: waited for, not raced)
    deadline = time.monotonic() + 10
    while not tls_server.refusals and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tls_server.refusals == [server_saw]


@HTTP
@SYNC
def test_a_connection_reset_in_the_handshake_is_still_retried(
    tls_server: TLSServer, ca: trustme.CA, http: ModuleType, sync: bool
) -> None:
    tls_server.script = ["reset-handshake", "serve"]
    policy, sleeps = recorder_policy(idempotency_methods=())
    response = post(http, sync, tls_server.url, policy, trusting(ca))
    assert isinstance(response, http.Response) and response.content == COMPLETION
    assert tls_server.connections == 2 and tls_server.keys == [None] and sleeps == [0.5]


@pytest.fixture(scope="module")
def plain_http() -> Iterator[str]:
    """A real plain-HTTP server (uvicorn): its port, for an ``https://`` URL to it."""
    with live_server(Starlette()) as url:
        yield url


@HTTP
@SYNC
def test_an_https_url_at_a_plain_http_port_is_not_retried(
    plain_http: str, http: ModuleType, sync: bool
) -> None:
    policy, sleeps = recorder_policy()
    error = post(http, sync, plain_http.replace("http://", "https://"), policy, True)
    # (uvicorn answers the ClientHello with a plain 400: not a TLS record. OpenSSL 3.2 and
    # later say "record layer failure" over "wrong version number")
    assert isinstance(error, http.ConnectError), repr(error)
    assert "WRONG_VERSION_NUMBER" in str(error) or "record layer failure" in str(error)
    assert sleeps == []  # at once, as a refused certificate: a resend fails the same way


@HTTP
async def test_a_bare_handshake_error_from_a_plain_http_port_is_not_retried(
    plain_http: str, http: ModuleType
) -> None:
    # (as httpcore before 1.0.6 let it through: ssl.SSLError from anyio's handshake)
    request = http.Request("POST", plain_http.replace("http://", "https://") + "/x")
    port = int(plain_http.rsplit(":", 1)[1])
    async with await anyio.connect_tcp("127.0.0.1", port) as tcp:
        with pytest.raises(ssl.SSLError) as wrong:
            await TLSStream.wrap(tcp, hostname="127.0.0.1", standard_compatible=False)
    error = mapped(wrong.value, request)
    assert isinstance(error, http.ConnectError) and error.__cause__ is wrong.value
    policy, _ = recorder_policy()
    assert policy.error_delay(error, request, 0) is None


# (as CPython's _ssl builds them: the reason set, None where its table has no name for it)
OTHER_WORDS = [
    ("[SSL: UNKNOWN_PROTOCOL] unknown protocol", "UNKNOWN_PROTOCOL", None),  # OpenSSL < 1.1
    ("[SSL: RECORD_LAYER_FAILURE] record layer failure", "RECORD_LAYER_FAILURE", None),  # 3.2+
    ("[SSL] record layer failure (_ssl.c:1006)", None, None),  # 3.2+, the reason unnamed
    ("[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred", "UNEXPECTED_EOF_WHILE_READING", 0.5),
    ("[SSL: BAD_LENGTH] bad length", "BAD_LENGTH", 0.5),
]


@pytest.mark.parametrize(("message", "reason", "delay"), OTHER_WORDS)
@HTTP
def test_openssl_s_other_words_for_a_peer_not_speaking_tls(
    http: ModuleType, message: str, reason: str | None, delay: float | None
) -> None:
    request = http.Request("POST", "https://127.0.0.1:1/x")
    kind = ssl.SSLEOFError if "EOF" in message else ssl.SSLError
    tls_error = kind(1, message)
    tls_error.reason = reason  # type: ignore[misc]
    error = http.ConnectError(message, request=request)
    error.__cause__ = tls_error
    policy, _ = recorder_policy()
    assert policy.error_delay(error, request, 0) == delay  # an EOF is a cut: retried


@HTTP
@SYNC
def test_a_client_certificate_the_server_refuses_is_not_retried(
    tls_server: TLSServer, ca: trustme.CA, http: ModuleType, sync: bool
) -> None:
    tls_server.script = ["require-client-cert"]
    policy, sleeps = recorder_policy()  # the POST has a key: a lost answer would be resent
    error = post(http, sync, tls_server.url, policy, trusting(ca))
    # (TLS 1.3: the client's side of the handshake is done when the server refuses, so the
    # refusal comes as the answer is read; httpx maps it to a ReadError in a sync client)
    assert isinstance(error, http.NetworkError), repr(error)
    assert "CERTIFICATE_REQUIRED" in str(error)
    assert tls_server.connections == 1 and sleeps == []


@HTTP
@SYNC
def test_a_tls_failure_after_the_request_is_retried_only_where_a_resend_is_safe(
    tls_server: TLSServer, ca: trustme.CA, http: ModuleType, sync: bool
) -> None:
    tls_server.script = ["bad-record", "serve"]
    policy, sleeps = recorder_policy()
    response = post(http, sync, tls_server.url, policy, trusting(ca))
    assert isinstance(response, http.Response) and response.content == COMPLETION
    keys = tls_server.keys
    assert len(keys) == 2 and keys[0] and keys == [keys[0]] * 2 and sleeps == [0.5]

    tls_server.script, tls_server.keys = ["bad-record", "serve"], []
    policy, sleeps = recorder_policy(idempotency_methods=())  # no key: it may have run
    error = post(http, sync, tls_server.url, policy, trusting(ca))
    assert isinstance(error, http.ReadError), repr(error)
    assert "DECRYPTION_FAILED_OR_BAD_RECORD_MAC" in str(error)
    assert tls_server.keys == [None] and sleeps == []


@HTTP
@SYNC
def test_a_tls_failure_in_a_buffered_body_is_retried_with_the_same_key(
    tls_server: TLSServer, ca: trustme.CA, http: ModuleType, sync: bool
) -> None:
    tls_server.script = ["bad-record-in-body", "serve"]
    policy, sleeps = recorder_policy()
    response = post(http, sync, tls_server.url, policy, trusting(ca))
    assert isinstance(response, http.Response) and response.content == COMPLETION
    keys = tls_server.keys
    assert len(keys) == 2 and keys[0] and keys == [keys[0]] * 2 and sleeps == [0.5]


def sdk_over(server: TLSServer, http: ModuleType, transport: Any) -> openai.AsyncOpenAI:
    """The openai SDK (its own retries off) on ``server`` through ``transport``."""
    return openai.AsyncOpenAI(
        base_url=server.url + "/v1",
        api_key="sk-test",
        http_client=http.AsyncClient(transport=transport),
        max_retries=0,
    )


@HTTP
async def test_the_sdk_gets_its_answer_after_a_tls_failure(
    tls_server: TLSServer, ca: trustme.CA, http: ModuleType
) -> None:
    tls_server.script = ["bad-record", "serve"]
    policy, sleeps = recorder_policy()
    transport = AsyncRetryTransport(http.AsyncHTTPTransport(verify=trusting(ca)), policy=policy)
    async with sdk_over(tls_server, http, transport) as client:
        completion = await client.chat.completions.create(model="fake", messages=[])
    assert completion.choices[0].message.content == "ok"
    assert len(tls_server.keys) == 2 and sleeps == [0.5]


def stream(server: TLSServer, http: ModuleType, sync: bool, verify: Any) -> tuple[bytes, Any]:
    """POST for a stream through the retrying transport and read it as it comes: what
    arrived, and the exception that ended it (None: none)."""
    body = {"messages": [], "stream": True}
    url = server.url
    received = bytearray()

    def read() -> Any:
        transport = RetryTransport(http.HTTPTransport(verify=verify))
        with http.Client(transport=transport) as client:
            try:
                with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                    for chunk in response.iter_bytes():
                        received.extend(chunk)
                        server.first_event_read.set()
            except Exception as exc:
                return exc
        return None

    async def aread() -> Any:
        transport = AsyncRetryTransport(http.AsyncHTTPTransport(verify=verify))
        async with http.AsyncClient(transport=transport) as client:
            try:
                async with client.stream(
                    "POST", url + "/v1/chat/completions", json=body
                ) as response:
                    async for chunk in response.aiter_bytes():
                        received.extend(chunk)
                        server.first_event_read.set()
            except Exception as exc:
                return exc
        return None

    error = anyio.run(anyio.to_thread.run_sync, read) if sync else anyio.run(aread)
    return bytes(received), error


@pytest.mark.parametrize(
    ("cut", "kind"),
    [
        ("stream-then-bad-record", "ReadError"),  # (a bare ssl.SSLError on asyncio before)
        ("stream-then-cut", "RemoteProtocolError"),  # (h11: incomplete chunked read)
        ("stream-then-reset", "TransportError"),  # (sync: RemoteProtocolError)
    ],
)
@HTTP
@SYNC
def test_a_tls_failure_in_a_stream_handed_back_is_the_clients_own_error(
    tls_server: TLSServer, ca: trustme.CA, http: ModuleType, sync: bool, cut: str, kind: str
) -> None:
    tls_server.script = [cut]
    received, error = stream(tls_server, http, sync, trusting(ca))
    assert received == EVENT  # (the transport returned at the head: the cut is the caller's)
    assert isinstance(error, getattr(http, kind)), repr(error)
    if cut == "stream-then-bad-record":
        assert "DECRYPTION_FAILED_OR_BAD_RECORD_MAC" in str(error)
    assert tls_server.connections == 1


@HTTP
async def test_the_sdk_gets_a_connection_error_for_a_tls_failure_mid_stream(
    tls_server: TLSServer, ca: trustme.CA, http: ModuleType
) -> None:
    tls_server.script = ["stream-then-bad-record"]
    transport = AsyncRetryTransport(http.AsyncHTTPTransport(verify=trusting(ca)))
    contents = []
    async with sdk_over(tls_server, http, transport) as client:
        events = await client.chat.completions.create(model="fake", messages=[], stream=True)
        with pytest.raises((openai.APIConnectionError, http.ReadError)) as lost:
            async for event in events:
                contents.append(event.choices[0].delta.content)
                tls_server.first_event_read.set()
    assert contents == ["ok"]
    if OPENAI_MAJOR >= 3:  # (the SDK wraps an error while reading a stream)
        assert isinstance(lost.value, openai.APIConnectionError)
        assert isinstance(lost.value.__cause__, http.ReadError)
    else:  # (openai 2, on the lowest pins: the transport's error reaches the caller as is)
        assert isinstance(lost.value, http.ReadError)


# httpcore before 1.0.6 (within httpx's own range) let a failed handshake through as it
# came: ssl.SSLError, anyio.EndOfStream, anyio.BrokenResourceError. Here the handshake
# runs through anyio's TLSStream as that httpcore ran it, and its bare error is classified.


@HTTP
async def test_a_bare_handshake_error_is_a_connect_error(
    tls_server: TLSServer, ca: trustme.CA, http: ModuleType
) -> None:
    request = http.Request("POST", tls_server.url + "/v1/chat/completions")
    policy, _ = recorder_policy(idempotency_methods=())

    tls_server.script = ["cut-handshake"]
    async with await anyio.connect_tcp("127.0.0.1", tls_server.port) as tcp:
        with pytest.raises(anyio.EndOfStream) as cut:
            await TLSStream.wrap(
                tcp, hostname="127.0.0.1", ssl_context=trusting(ca), standard_compatible=False
            )
    error = mapped(cut.value, request)
    assert isinstance(error, http.ConnectError) and error.__cause__ is cut.value
    assert policy.error_delay(error, request, 0) == 0.5  # nothing was sent: retried

    tls_server.script = ["serve"]
    async with await anyio.connect_tcp("127.0.0.1", tls_server.port) as tcp:
        with pytest.raises(ssl.SSLCertVerificationError) as refused:
            await TLSStream.wrap(
                tcp,
                hostname="127.0.0.1",
                ssl_context=ssl.create_default_context(),  # the system's trust: not the CA's
                standard_compatible=False,
            )
    error = mapped(refused.value, request)
    assert isinstance(error, http.ConnectError)
    assert policy.error_delay(error, request, 0) is None  # a certificate refused: never
