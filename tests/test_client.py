from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import anyio
import httpx
import httpx2
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from aimiddleware import install
from aimiddleware.client import AsyncRetryTransport, RetryPolicy, RetryTransport
from aimiddleware.errors import (
    InvalidRequest,
    Overloaded,
    QuotaExceeded,
    RateLimited,
    UpstreamUnavailable,
)
from aimiddleware.headers import http_date
from aimiddleware.testing import FakeModel

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]

# A behaviour runs in a client of each module: httpx2 (the official SDKs' own since openai 3
# and anthropic 2: their http_client= is an httpx2 client) and legacy httpx.
HTTP = pytest.mark.parametrize("http", [httpx2, httpx], ids=["httpx2", "httpx"])


# -- a real server that fails on purpose and counts attempts ------------------------------------


@dataclass
class Attempt:
    key: str | None
    body_sha: str


@dataclass
class ServerState:
    attempts: dict[str, list[Attempt]] = field(default_factory=dict)


def build_app(state: ServerState, model: FakeModel) -> Starlette:
    async def chat(request: Request) -> Response:
        run, scenario = request.path_params["run"], request.path_params["scenario"]
        body = await request.body()
        seen = state.attempts.setdefault(run, [])
        seen.append(
            Attempt(request.headers.get("idempotency-key"), hashlib.sha256(body).hexdigest())
        )
        n = len(seen)
        if scenario == "flaky" and n <= 2:
            raise RateLimited("Too many requests.", retry_after=1)
        if scenario == "overloaded" and n == 1:
            raise Overloaded(status=529)
        if scenario == "quota":
            raise QuotaExceeded()
        if scenario == "down":
            raise UpstreamUnavailable()
        if scenario == "invalid":
            raise InvalidRequest("Bad field.", param="messages")
        if scenario == "slow" and n == 1:
            await anyio.sleep(5)  # far past the client's read timeout, even on a stalled box
        if scenario == "longwait":
            return JSONResponse(
                {"error": "later"}, status_code=429, headers={"retry-after": "3600"}
            )
        if scenario == "dated" and n == 1:
            later = http_date(time.time() + 30)
            return JSONResponse({"error": "later"}, status_code=503, headers={"retry-after": later})
        payload = json.loads(body) if body.startswith(b"{") else {"messages": MESSAGES}
        if payload.get("stream"):

            async def events() -> AsyncIterator[bytes]:
                async for chunk in model.stream(payload):
                    yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse(await model.complete(payload))

    app = Starlette(routes=[Route("/{run}/{scenario}/v1/chat/completions", chat, methods=["POST"])])
    install(app)
    return app


@dataclass
class Server:
    url: str
    state: ServerState

    def base(self, scenario: str) -> tuple[str, str]:
        """A fresh run id (attempts are counted per run) and the SDK base URL for it."""
        run = uuid.uuid4().hex
        return run, f"{self.url}/{run}/{scenario}/v1"

    def attempts(self, run: str) -> list[Attempt]:
        return self.state.attempts.get(run, [])


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    state = ServerState()
    model = FakeModel(first_token_latency=0, inter_token_delay=0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(state, model), log_level="warning", lifespan="off")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    yield Server(f"http://127.0.0.1:{port}", state)
    uv.should_exit = True
    thread.join(10)
    sock.close()


def recorder_policy(**options: Any) -> tuple[RetryPolicy, list[float]]:
    sleeps: list[float] = []
    return RetryPolicy(sleep=sleeps.append, random=lambda: 0.0, **options), sleeps


def sync_sdk(base_url: str, policy: RetryPolicy, http: ModuleType) -> openai.OpenAI:
    client = http.Client(transport=RetryTransport(policy=policy))
    return openai.OpenAI(base_url=base_url, api_key="sk-test", http_client=client, max_retries=0)


def async_sdk(base_url: str, policy: RetryPolicy, http: ModuleType) -> openai.AsyncOpenAI:
    client = http.AsyncClient(transport=AsyncRetryTransport(policy=policy))
    return openai.AsyncOpenAI(
        base_url=base_url, api_key="sk-test", http_client=client, max_retries=0
    )


# -- the official SDK through the transport ----------------------------------------------------


@HTTP
def test_sdk_sync_retries_rate_limit_twice_then_succeeds(server: Server, http: ModuleType) -> None:
    run, base = server.base("flaky")
    policy, sleeps = recorder_policy()
    with sync_sdk(base, policy, http) as client:
        completion = client.chat.completions.create(model="fake", messages=MESSAGES)
    assert completion.choices[0].message.content
    attempts = server.attempts(run)
    assert len(attempts) == 3
    assert attempts[0].key and {a.key for a in attempts} == {attempts[0].key}
    assert sleeps == [1.0, 1.0]  # retry-after-ms: 1000, honoured, not the 0.5 s backoff


@HTTP
async def test_sdk_async_retries_rate_limit_twice_then_succeeds(
    server: Server, http: ModuleType
) -> None:
    run, base = server.base("flaky")
    policy, sleeps = recorder_policy()
    async with async_sdk(base, policy, http) as client:
        completion = await client.chat.completions.create(model="fake", messages=MESSAGES)
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    attempts = server.attempts(run)
    assert len(attempts) == 3 and len({a.key for a in attempts}) == 1 and attempts[0].key
    assert sleeps == [1.0, 1.0]


@HTTP
async def test_sdk_async_stream_after_retries(server: Server, http: ModuleType) -> None:
    run, base = server.base("flaky")
    policy, sleeps = recorder_policy()
    async with async_sdk(base, policy, http) as client:
        stream = await client.chat.completions.create(
            model="fake", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    assert len(server.attempts(run)) == 3 and sleeps == [1.0, 1.0]


@HTTP
def test_sdk_sync_quota_exceeded_is_not_retried(server: Server, http: ModuleType) -> None:
    run, base = server.base("quota")
    policy, sleeps = recorder_policy()
    with sync_sdk(base, policy, http) as client, pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="fake", messages=MESSAGES)
    assert info.value.response.headers["x-should-retry"] == "false"
    assert info.value.code == "quota_exceeded"
    assert len(server.attempts(run)) == 1 and sleeps == []


@HTTP
async def test_sdk_async_quota_exceeded_is_not_retried(server: Server, http: ModuleType) -> None:
    run, base = server.base("quota")
    policy, sleeps = recorder_policy()
    async with async_sdk(base, policy, http) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="fake", messages=MESSAGES)
    assert info.value.response.headers["x-should-retry"] == "false"
    assert info.value.code == "quota_exceeded"
    assert len(server.attempts(run)) == 1 and sleeps == []


@HTTP
def test_sdk_caller_idempotency_key_is_reused(server: Server, http: ModuleType) -> None:
    run, base = server.base("flaky")
    policy, _ = recorder_policy()
    with sync_sdk(base, policy, http) as client:
        client.chat.completions.create(
            model="fake", messages=MESSAGES, extra_headers={"Idempotency-Key": "mine-1"}
        )
    assert [a.key for a in server.attempts(run)] == ["mine-1"] * 3


@HTTP
def test_sdk_529_retried_with_backoff(server: Server, http: ModuleType) -> None:
    run, base = server.base("overloaded")
    policy, sleeps = recorder_policy()
    with sync_sdk(base, policy, http) as client:
        client.chat.completions.create(model="fake", messages=MESSAGES)
    assert len(server.attempts(run)) == 2
    assert sleeps == [0.5]  # no Retry-After: initial delay (random=0: no jitter taken off)


@HTTP
async def test_sdk_gives_up_after_max_retries(server: Server, http: ModuleType) -> None:
    run, base = server.base("down")
    policy, sleeps = recorder_policy(max_retries=3)
    async with async_sdk(base, policy, http) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="fake", messages=MESSAGES)
    assert len(server.attempts(run)) == 4
    assert sleeps == [0.5, 1.0, 2.0]


@HTTP
def test_sdk_invalid_request_is_not_retried(server: Server, http: ModuleType) -> None:
    run, base = server.base("invalid")
    policy, sleeps = recorder_policy()
    with sync_sdk(base, policy, http) as client, pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fake", messages=MESSAGES)
    assert len(server.attempts(run)) == 1 and sleeps == []


# -- transport details over real HTTP -----------------------------------------------------------


@HTTP
def test_retry_after_longer_than_max_is_not_waited_for(server: Server, http: ModuleType) -> None:
    run, base = server.base("longwait")
    policy, sleeps = recorder_policy()
    with http.Client(transport=RetryTransport(policy=policy)) as client:
        response = client.post(base + "/chat/completions", json={"messages": MESSAGES})
    assert response.status_code == 429 and len(server.attempts(run)) == 1 and sleeps == []
    capped, sleeps2 = recorder_policy(over_max_retry_after="cap", max_retries=1)
    with http.Client(transport=RetryTransport(policy=capped)) as client:
        client.post(base + "/chat/completions", json={"messages": MESSAGES})
    assert sleeps2 == [60.0]


@HTTP
def test_http_date_retry_after_over_the_wire(server: Server, http: ModuleType) -> None:
    run, base = server.base("dated")
    policy, sleeps = recorder_policy()
    with http.Client(transport=RetryTransport(policy=policy)) as client:
        response = client.post(base + "/chat/completions", json={"messages": MESSAGES})
    assert response.status_code == 200 and len(server.attempts(run)) == 2
    assert len(sleeps) == 1 and 25 <= sleeps[0] <= 30


@HTTP
def test_body_is_replayed_identically_and_failed_responses_closed(
    server: Server, http: ModuleType
) -> None:
    seen: list[Any] = []

    class Spy(http.HTTPTransport):
        def handle_request(self, request: Any) -> Any:
            response = super().handle_request(request)
            seen.append(response)
            return response

    run, base = server.base("flaky")
    policy, _ = recorder_policy()
    with http.Client(transport=RetryTransport(Spy(), policy=policy)) as client:
        response = client.post(base + "/chat/completions", json={"messages": MESSAGES})
        assert response.status_code == 200
        attempts = server.attempts(run)
        assert len(attempts) == 3 and len({a.body_sha for a in attempts}) == 1
        assert [r.is_closed for r in seen] == [True, True, True]  # the last one was read


@HTTP
def test_multipart_body_is_buffered_and_replayed(server: Server, http: ModuleType) -> None:
    run, base = server.base("flaky")
    policy, _ = recorder_policy()
    with http.Client(transport=RetryTransport(policy=policy)) as client:
        response = client.post(
            base + "/chat/completions", files={"file": ("a.txt", b"x" * 1000)}, data={"p": "1"}
        )
    attempts = server.attempts(run)
    assert response.status_code == 200
    assert len(attempts) == 3 and len({a.body_sha for a in attempts}) == 1


@HTTP
async def test_streaming_request_body_is_never_retried(server: Server, http: ModuleType) -> None:
    run, base = server.base("flaky")
    policy, sleeps = recorder_policy()

    async def body() -> AsyncIterator[bytes]:
        yield b'{"messages": '
        yield json.dumps(MESSAGES).encode() + b"}"

    async with http.AsyncClient(transport=AsyncRetryTransport(policy=policy)) as client:
        response = await client.post(base + "/chat/completions", content=body())
    assert response.status_code == 429 and response.headers["x-should-retry"] == "true"
    attempts = server.attempts(run)
    assert len(attempts) == 1 and attempts[0].key and sleeps == []


# The "slow" scenario answers its first attempt after 5 s (its handler is cancelled when
# the client hangs up): the client's 0.2 s read timeout fires, even if the machine stalls.
# A retry is answered at once, but gets 10 s (set below the retrying transport), so that a
# stalled machine cannot time it out too; connecting is never the short part.
def short_read(http: ModuleType) -> Any:
    return http.Timeout(10, read=0.2)


def patient_retries(http: ModuleType) -> Any:
    class PatientRetries(http.HTTPTransport):
        attempts = 0

        def handle_request(self, request: Any) -> Any:
            self.attempts += 1
            if self.attempts > 1:
                request.extensions["timeout"] = http.Timeout(10).as_dict()
            return super().handle_request(request)

    return PatientRetries()


def async_patient_retries(http: ModuleType) -> Any:
    class AsyncPatientRetries(http.AsyncHTTPTransport):
        attempts = 0

        async def handle_async_request(self, request: Any) -> Any:
            self.attempts += 1
            if self.attempts > 1:
                request.extensions["timeout"] = http.Timeout(10).as_dict()
            return await super().handle_async_request(request)

    return AsyncPatientRetries()


@HTTP
def test_read_timeout_retried_only_with_idempotency_key_sync(
    server: Server, http: ModuleType
) -> None:
    policy, sleeps = recorder_policy()
    no_key, no_key_sleeps = recorder_policy(idempotency_methods=())
    run, base = server.base("slow")
    run2, base2 = server.base("slow")
    transport = RetryTransport(patient_retries(http), policy=policy)
    with http.Client(transport=transport, timeout=short_read(http)) as client:
        assert (
            client.post(base + "/chat/completions", json={"messages": MESSAGES}).status_code == 200
        )
    with (
        http.Client(transport=RetryTransport(patient_retries(http), policy=no_key),
                    timeout=short_read(http)) as client,
        pytest.raises(http.ReadTimeout),
    ):
        client.post(base2 + "/chat/completions", json={"messages": MESSAGES})
    assert len(server.attempts(run)) == 2 and len(sleeps) == 1
    assert len(server.attempts(run2)) == 1 and no_key_sleeps == []
    assert server.attempts(run2)[0].key is None


@HTTP
async def test_read_timeout_retried_only_with_idempotency_key_async(
    server: Server, http: ModuleType
) -> None:
    policy, sleeps = recorder_policy()
    no_key, no_key_sleeps = recorder_policy(idempotency_methods=())
    run, base = server.base("slow")
    run2, base2 = server.base("slow")
    transport = AsyncRetryTransport(async_patient_retries(http), policy=policy)
    async with http.AsyncClient(transport=transport, timeout=short_read(http)) as client:
        assert (
            await client.post(base + "/chat/completions", json={"messages": MESSAGES})
        ).status_code == 200
    transport = AsyncRetryTransport(async_patient_retries(http), policy=no_key)
    async with http.AsyncClient(transport=transport, timeout=short_read(http)) as client:
        with pytest.raises(http.ReadTimeout):
            await client.post(base2 + "/chat/completions", json={"messages": MESSAGES})
    assert len(server.attempts(run)) == 2 and len(sleeps) == 1
    assert len(server.attempts(run2)) == 1 and no_key_sleeps == []
    assert server.attempts(run2)[0].key is None


@HTTP
async def test_connection_refused_is_retried_for_any_method(http: ModuleType) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once we leave: nothing listens there
    policy, sleeps = recorder_policy(idempotency_methods=())
    async with http.AsyncClient(transport=AsyncRetryTransport(policy=policy)) as client:
        with pytest.raises(http.ConnectError):
            await client.post(f"http://127.0.0.1:{port}/x", json={})
    assert sleeps == [0.5, 1.0]


@HTTP
async def test_async_sleep_hook_is_awaited(server: Server, http: ModuleType) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        await anyio.lowlevel.checkpoint()
        slept.append(seconds)

    run, base = server.base("flaky")
    policy = RetryPolicy(sleep=sleep)
    async with http.AsyncClient(transport=AsyncRetryTransport(policy=policy)) as client:
        response = await client.post(base + "/chat/completions", json={"messages": MESSAGES})
    assert response.status_code == 200 and slept == [1.0, 1.0]
    assert len(server.attempts(run)) == 3


# -- a response body lost mid-way, from a raw socket server -------------------------------------

def read_request(conn: socket.socket) -> dict[str, str]:
    """Read one HTTP/1.1 request from ``conn`` (a plain or TLS socket); its headers."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = [line.split(b":", 1) for line in head.split(b"\r\n")[1:]]
    headers = {name.strip().lower().decode(): value.strip().decode() for name, value in lines}
    while len(body) < int(headers.get("content-length", "0")):
        body += conn.recv(65536)
    return headers


COMPLETION = json.dumps(
    {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "stop",
            }
        ],
    }
).encode()


@dataclass
class Reply:
    """One scripted answer; the last one given repeats."""

    body: bytes = COMPLETION
    content_type: str = "application/json"
    chunked: bool = False
    chunk: int = 1 << 16
    cut: int | None = None  # bytes of the body sent before the connection goes
    reset: bool = True  # the connection goes with a RST, else with a FIN
    hold: threading.Event | None = None  # after the first chunk, wait for it (at most 5 s)


@dataclass
class RawServer:
    url: str
    replies: list[Reply] = field(default_factory=lambda: [Reply()])
    keys: list[str | None] = field(default_factory=list)  # one per attempt
    held: list[bool] = field(default_factory=list)  # whether each hold was released in time

    def serve(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                self.answer(conn)

    def answer(self, conn: socket.socket) -> None:
        self.keys.append(read_request(conn).get("idempotency-key"))
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        sent = reply.body if reply.cut is None else reply.body[: reply.cut]
        framing = (
            "transfer-encoding: chunked" if reply.chunked else f"content-length: {len(reply.body)}"
        )
        conn.sendall(
            f"HTTP/1.1 200 OK\r\ncontent-type: {reply.content_type}\r\n{framing}\r\n"
            "connection: close\r\n\r\n".encode()
        )
        for start in range(0, len(sent), reply.chunk):
            piece = sent[start : start + reply.chunk]
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if reply.chunked else piece)
            if start == 0 and reply.hold is not None:
                self.held.append(reply.hold.wait(5))
        if reply.cut is None:
            conn.sendall(b"0\r\n\r\n" if reply.chunked else b"")
        elif reply.reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.fixture
def raw_server() -> Iterator[RawServer]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.05)
    server = RawServer(f"http://127.0.0.1:{listener.getsockname()[1]}")
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(listener, stop), daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(10)
    listener.close()


@HTTP
def test_sdk_sync_body_lost_mid_way_is_retried_with_the_same_key(
    raw_server: RawServer, http: ModuleType
) -> None:
    raw_server.replies = [Reply(cut=20), Reply()]  # headers and 20 bytes, then a reset
    policy, sleeps = recorder_policy()
    with sync_sdk(raw_server.url + "/v1", policy, http) as client:
        completion = client.chat.completions.create(model="fake", messages=MESSAGES)
    assert completion.choices[0].message.content == "ok"
    keys = raw_server.keys
    assert len(keys) == 2 and keys[0] and keys == [keys[0]] * 2
    assert sleeps == [0.5]


@HTTP
async def test_sdk_async_body_lost_twice_is_retried_with_backoff(
    raw_server: RawServer, http: ModuleType
) -> None:
    raw_server.replies = [Reply(cut=20), Reply(cut=20), Reply()]
    policy, sleeps = recorder_policy()
    async with async_sdk(raw_server.url + "/v1", policy, http) as client:
        completion = await client.chat.completions.create(model="fake", messages=MESSAGES)
    assert completion.choices[0].message.content == "ok"
    keys = raw_server.keys
    assert len(keys) == 3 and keys[0] and keys == [keys[0]] * 3
    assert sleeps == [0.5, 1.0]


@HTTP
def test_body_lost_every_time_spends_the_same_budget(
    raw_server: RawServer, http: ModuleType
) -> None:
    raw_server.replies = [Reply(cut=20)]
    policy, sleeps = recorder_policy(max_retries=1)
    with (
        http.Client(transport=RetryTransport(policy=policy)) as client,
        pytest.raises(http.ReadError),
    ):
        client.post(raw_server.url + "/v1/chat/completions", json={"messages": MESSAGES})
    assert len(raw_server.keys) == 2 and sleeps == [0.5]


@HTTP
async def test_body_lost_is_retried_only_where_a_resend_is_safe(
    raw_server: RawServer, http: ModuleType
) -> None:
    raw_server.replies = [Reply(cut=20), Reply(cut=20), Reply()]
    policy, sleeps = recorder_policy(idempotency_methods=())
    async with http.AsyncClient(transport=AsyncRetryTransport(policy=policy)) as client:
        with pytest.raises(http.ReadError):  # a POST without a key: it may have run
            await client.post(raw_server.url + "/v1/chat/completions", json={})
        assert raw_server.keys == [None] and sleeps == []
        response = await client.get(raw_server.url + "/v1/models")  # idempotent: resent
    assert response.content == COMPLETION and len(raw_server.keys) == 3 and sleeps == [0.5]


BIG = json.dumps({"data": "x" * 3000}).encode()


def fetch(url: str, policy: RetryPolicy, http: ModuleType) -> bytes | None:
    """The body, or ``None`` if the connection went before its end."""
    with http.Client(transport=RetryTransport(policy=policy)) as client:
        try:
            content: bytes = client.get(url).content
        except http.RemoteProtocolError:
            return None
        return content


async def afetch(url: str, policy: RetryPolicy, http: ModuleType) -> bytes | None:
    async with http.AsyncClient(transport=AsyncRetryTransport(policy=policy)) as client:
        try:
            content: bytes = (await client.get(url)).content
        except http.RemoteProtocolError:
            return None
        return content


@pytest.mark.parametrize(
    ("reply", "attempts"),
    [
        pytest.param(Reply(BIG, chunked=True, chunk=100, cut=500), 2, id="chunked-cut-in-limit"),
        pytest.param(Reply(BIG, chunked=True, chunk=100, cut=2000), 1, id="chunked-cut-past"),
        pytest.param(Reply(BIG, chunked=True, chunk=100), 1, id="chunked-past-limit-whole"),
        pytest.param(Reply(BIG, chunk=100, cut=500), 1, id="length-over-limit-not-read"),
        pytest.param(Reply(BIG, "application/octet-stream", cut=500), 2, id="length-in-limit"),
        pytest.param(Reply(BIG, "text/plain", chunked=True, cut=500), 1, id="unknown-not-json"),
    ],
)
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
@HTTP
async def test_buffering_is_capped(
    raw_server: RawServer, reply: Reply, attempts: int, sync: bool, http: ModuleType
) -> None:
    raw_server.replies = [dataclasses.replace(reply, reset=False), Reply(BIG)]
    limit = 4000 if reply.content_type == "application/octet-stream" else 1000
    policy, _ = recorder_policy(max_buffered_body=limit)
    url = raw_server.url + "/v1/files"
    content = await (
        anyio.to_thread.run_sync(fetch, url, policy, http) if sync else afetch(url, policy, http)
    )
    assert len(raw_server.keys) == attempts
    assert content == (None if attempts == 1 and reply.cut else BIG)


@HTTP
def test_sdk_event_stream_is_not_buffered_and_a_cut_is_the_callers(
    raw_server: RawServer, http: ModuleType
) -> None:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "fake"}
    events = [
        b"data: " + json.dumps({**chunk, "choices": [choice]}).encode() + b"\n\n"
        for choice in [{"index": 0, "delta": {"content": word}} for word in ("a", "b", "c")]
    ]
    release = threading.Event()
    raw_server.replies = [
        Reply(
            b"".join(events),
            "text/event-stream",
            chunked=True,
            chunk=len(events[0]),
            cut=len(events[0]) * 2,
            hold=release,
        )
    ]
    policy, sleeps = recorder_policy()
    words = []
    with (
        sync_sdk(raw_server.url + "/v1", policy, http) as client,
        pytest.raises(openai.APIConnectionError),
    ):
        stream = client.chat.completions.create(model="fake", messages=MESSAGES, stream=True)
        for event in stream:  # the first event arrives while the server still holds the rest
            release.set()
            words.append(event.choices[0].delta.content)
    assert raw_server.held == [True] and words[0] == "a"
    assert len(raw_server.keys) == 1 and sleeps == []  # to resume is the caller's


@HTTP
async def test_unknown_length_stream_is_not_buffered(
    raw_server: RawServer, http: ModuleType
) -> None:
    release = threading.Event()
    lines = b'{"n": 1}\n{"n": 2}\n'
    raw_server.replies = [Reply(lines, "application/x-ndjson", chunked=True, chunk=9, hold=release)]
    policy, _ = recorder_policy()
    async with (
        http.AsyncClient(transport=AsyncRetryTransport(policy=policy)) as client,
        client.stream("POST", raw_server.url + "/v1/jobs", json={}) as response,
    ):
        received = b""
        async for part in response.aiter_raw():
            release.set()
            received += part
    assert raw_server.held == [True] and received == lines


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/v1beta/models/m:streamGenerateContent", {}, id="gemini-json-array"),
        pytest.param("/v1/chat/completions", {"stream": True}, id="stream-true"),
    ],
)
@HTTP
async def test_a_json_answer_to_a_request_for_a_stream_is_not_buffered(
    raw_server: RawServer, path: str, body: dict[str, Any], http: ModuleType
) -> None:
    # JSON of unknown length was read whole before the transport returned: Gemini's
    # streamGenerateContent (a JSON array, chunk by chunk, without alt=sse) arrived at once.
    release = threading.Event()
    array = b'[{"n": 1},\n{"n": 2}]'
    raw_server.replies = [Reply(array, "application/json", chunked=True, chunk=10, hold=release)]
    policy, _ = recorder_policy()
    async with (
        http.AsyncClient(transport=AsyncRetryTransport(policy=policy)) as client,
        client.stream("POST", raw_server.url + path, json=body) as response,
    ):
        received = b""
        async for part in response.aiter_raw():
            release.set()
            received += part
    assert raw_server.held == [True] and received == array


# -- the pure policy -----------------------------------------------------------------------------


def response(status: int, http: ModuleType = httpx, **headers: str) -> Any:
    return http.Response(status, headers={k.replace("_", "-"): v for k, v in headers.items()})


def test_backoff_is_exponential_capped_and_jittered() -> None:
    full = RetryPolicy(random=lambda: 0.0)
    assert [full.backoff(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    most = RetryPolicy(random=lambda: 1.0)
    assert [most.backoff(n) for n in range(3)] == [0.375, 0.75, 1.5]
    none = RetryPolicy(jitter=0, random=lambda: 1.0)
    assert none.backoff(1) == 1.0


def test_backoff_stays_capped_after_a_thousand_retries() -> None:
    # 2.0 ** 1024 is an OverflowError: a policy meant to retry for a long time (say
    # max_retries=5000, max_delay=30) raised it from its 1025th retry instead of waiting.
    policy = RetryPolicy(max_retries=5000, max_delay=30.0, random=lambda: 0.0)
    assert [policy.backoff(n) for n in (1023, 1024, 4999)] == [30.0, 30.0, 30.0]
    assert RetryPolicy(initial_delay=0.0).backoff(2000) == 0.0


@HTTP
def test_server_delay_parsing(http: ModuleType) -> None:
    policy = RetryPolicy(clock=lambda: 1_000_000.0)
    headers = http.Headers
    assert policy.server_delay(headers({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    assert policy.server_delay(headers({"retry-after-ms": "junk", "retry-after": "2.5"})) == 2.5
    assert policy.server_delay(headers({"retry-after": http_date(1_000_007.0)})) == 7.0
    assert policy.server_delay(headers({"retry-after": http_date(999_000.0)})) == 0.0
    assert policy.server_delay(headers({"retry-after": "soon"})) is None
    assert policy.server_delay(headers({"retry-after": "-3"})) is None
    assert policy.server_delay(headers({"retry-after": "nan"})) is None
    overflow = "Fri, 31 Dec 9999 23:59:59 -1400"  # past year 9999 in UTC
    assert policy.server_delay(headers({"retry-after": overflow})) is None
    assert policy.server_delay(headers({})) is None


@HTTP
def test_should_retry_signal_wins_over_status(http: ModuleType) -> None:
    policy = RetryPolicy()
    assert policy.should_retry_response(response(400, http, x_should_retry="true"))
    assert not policy.should_retry_response(response(503, http, x_should_retry="false"))
    assert not policy.should_retry_response(response(429, http, x_should_retry="false"))
    assert not policy.should_retry_response(response(200, http, x_should_retry="true"))
    for status in (408, 409, 429, 500, 502, 503, 504, 529):
        assert policy.should_retry_response(response(status, http))
    for status in (400, 401, 403, 404, 410, 413, 422, 501):
        assert not policy.should_retry_response(response(status, http))


def test_response_delay_limits() -> None:
    policy = RetryPolicy(max_retries=2, random=lambda: 0.0)
    assert policy.response_delay(response(429, retry_after="3"), 0) == 3.0
    assert policy.response_delay(response(429, retry_after="3"), 2) is None
    assert policy.response_delay(response(429, retry_after="61"), 0) is None
    capped = RetryPolicy(over_max_retry_after="cap", max_retry_after=10)
    assert capped.response_delay(response(429, retry_after="61"), 0) == 10
    assert policy.response_delay(response(503), 1) == 1.0


@HTTP
def test_error_delay_depends_on_method_and_key(http: ModuleType) -> None:
    policy = RetryPolicy(random=lambda: 0.0)
    post = http.Request("POST", "http://x/")
    keyed = http.Request("POST", "http://x/", headers={"Idempotency-Key": "k"})
    get = http.Request("GET", "http://x/")
    assert policy.error_delay(http.ConnectError("refused"), post, 0) == 0.5
    assert policy.error_delay(http.ConnectTimeout("connect"), post, 0) == 0.5
    assert policy.error_delay(http.PoolTimeout("pool"), post, 0) == 0.5
    assert policy.error_delay(http.ReadTimeout("slow"), post, 0) is None
    assert policy.error_delay(http.RemoteProtocolError("eof"), post, 0) is None
    assert policy.error_delay(http.ReadTimeout("slow"), keyed, 1) == 1.0
    assert policy.error_delay(http.WriteError("reset"), keyed, 0) == 0.5
    assert policy.error_delay(http.ReadError("reset"), get, 0) == 0.5
    assert policy.error_delay(http.LocalProtocolError("bad"), get, 0) is None
    assert policy.error_delay(ValueError("app bug"), get, 0) is None
    assert policy.error_delay(http.ConnectError("refused"), get, 2) is None


@HTTP
def test_idempotency_key_added_once_and_only_where_configured(http: ModuleType) -> None:
    keys = iter(["k1", "k2"])
    policy = RetryPolicy(key_factory=lambda: next(keys))
    post = http.Request("POST", "http://x/")
    policy.add_idempotency_key(post)
    policy.add_idempotency_key(post)
    assert post.headers.get_list("idempotency-key") == ["k1"]
    patch = http.Request("PATCH", "http://x/", headers={"idempotency-key": "mine"})
    policy.add_idempotency_key(patch)
    assert patch.headers["Idempotency-Key"] == "mine"
    get = http.Request("GET", "http://x/")
    policy.add_idempotency_key(get)
    assert "idempotency-key" not in get.headers
    default = RetryPolicy()
    put = http.Request("post", "http://x/")
    default.add_idempotency_key(put)
    assert uuid.UUID(put.headers["idempotency-key"])


@pytest.mark.parametrize(
    "options",
    [
        {"max_retries": -1},
        {"initial_delay": -0.1},
        {"jitter": 1.5},
        {"over_max_retry_after": "wait"},
    ],
)
def test_policy_is_validated(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**options)


@HTTP
def test_transport_arguments_are_validated(http: ModuleType) -> None:
    with pytest.raises(TypeError):
        RetryTransport(policy=RetryPolicy(), max_retries=1)
    with pytest.raises(TypeError, match="BaseTransport"):
        RetryTransport(http.AsyncHTTPTransport())
    with pytest.raises(TypeError, match="AsyncBaseTransport"):
        AsyncRetryTransport(http.HTTPTransport())
    assert RetryTransport(max_retries=5).policy.max_retries == 5
    RetryTransport(http.HTTPTransport()).close()
    RetryTransport(RetryTransport(http.HTTPTransport())).close()


# -- one transport for both modules --------------------------------------------------------------


async def test_the_default_inner_transport_follows_each_client(server: Server) -> None:
    # Its default was an httpx.AsyncHTTPTransport, which an httpx2 client's request failed
    # (an AssertionError: httpx2's ByteStream is no httpx stream). Now each request goes out
    # on a transport of its own client's module, and comes back as that module's response.
    run, base = server.base("flaky")
    policy, sleeps = recorder_policy()
    transport = AsyncRetryTransport(policy=policy)
    for http in (httpx2, httpx, httpx2):
        client = http.AsyncClient(transport=transport)
        response = await client.post(base + "/chat/completions", json={"messages": MESSAGES})
        assert isinstance(response, http.Response) and response.status_code == 200
    await transport.aclose()
    assert len(server.attempts(run)) == 3 + 2 and sleeps == [1.0, 1.0]  # (flaky: 2 then 200s)


@pytest.mark.parametrize(
    ("client_module", "inner_module"), [(httpx2, httpx), (httpx, httpx2)], ids=["h2-h", "h-h2"]
)
async def test_an_inner_transport_of_the_other_module_is_refused(
    server: Server, client_module: ModuleType, inner_module: ModuleType
) -> None:
    run, base = server.base("flaky")
    sync = RetryTransport(inner_module.HTTPTransport())
    with (
        client_module.Client(transport=sync) as client,
        pytest.raises(TypeError, match=f"cannot send an {client_module.__name__} client's"),
    ):
        client.post(base + "/chat/completions", json={"messages": MESSAGES})
    transport = AsyncRetryTransport(inner_module.AsyncHTTPTransport())
    async with client_module.AsyncClient(transport=transport) as client:
        with pytest.raises(TypeError, match=f"wrap an {client_module.__name__}.AsyncBase"):
            await client.post(base + "/chat/completions", json={"messages": MESSAGES})
    assert server.attempts(run) == []  # refused before anything was sent


@pytest.mark.parametrize(
    "preamble",
    [
        pytest.param("sys.modules['httpx2'] = None  # (not installed)", id="httpx-alone"),
        pytest.param("import httpx2; httpx2.alias_httpx()", id="httpx-aliased-to-httpx2"),
    ],
)
def test_the_transports_with_one_httpx_module(server: Server, preamble: str) -> None:
    # httpx2 is optional (the client extra is httpx); and after httpx2.alias_httpx() both
    # names are one module, of which the transports must not take the same base twice.
    run, base = server.base("flaky")
    script = f"""
import sys
{preamble}
import httpx
from aimiddleware.client import AsyncRetryTransport, RetryPolicy, RetryTransport
assert httpx.__name__ == sys.argv[1] and RetryTransport.__mro__[1] is httpx.BaseTransport
assert AsyncRetryTransport.__mro__[1] is httpx.AsyncBaseTransport
policy = RetryPolicy(sleep=lambda seconds: None)
with httpx.Client(transport=RetryTransport(policy=policy)) as client:
    response = client.post(sys.argv[2], json={{"messages": {MESSAGES!r}}})
print(type(response).__module__.partition(".")[0], response.status_code)
"""
    module = "httpx" if "None" in preamble else "httpx2"
    found = subprocess.run(
        [sys.executable, "-c", script, module, base + "/chat/completions"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert found.stdout.split() == [module, "200"], found.stderr
    assert len(server.attempts(run)) == 3
