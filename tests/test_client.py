from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
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


def sync_sdk(base_url: str, policy: RetryPolicy) -> openai.OpenAI:
    http = httpx.Client(transport=RetryTransport(policy=policy))
    return openai.OpenAI(base_url=base_url, api_key="sk-test", http_client=http, max_retries=0)


def async_sdk(base_url: str, policy: RetryPolicy) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=AsyncRetryTransport(policy=policy))
    return openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", http_client=http, max_retries=0)


# -- the official SDK through the transport ----------------------------------------------------


def test_sdk_sync_retries_rate_limit_twice_then_succeeds(server: Server) -> None:
    run, base = server.base("flaky")
    policy, sleeps = recorder_policy()
    with sync_sdk(base, policy) as client:
        completion = client.chat.completions.create(model="fake", messages=MESSAGES)
    assert completion.choices[0].message.content
    attempts = server.attempts(run)
    assert len(attempts) == 3
    assert attempts[0].key and {a.key for a in attempts} == {attempts[0].key}
    assert sleeps == [1.0, 1.0]  # retry-after-ms: 1000, honoured, not the 0.5 s backoff


async def test_sdk_async_retries_rate_limit_twice_then_succeeds(server: Server) -> None:
    run, base = server.base("flaky")
    policy, sleeps = recorder_policy()
    async with async_sdk(base, policy) as client:
        completion = await client.chat.completions.create(model="fake", messages=MESSAGES)
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    attempts = server.attempts(run)
    assert len(attempts) == 3 and len({a.key for a in attempts}) == 1 and attempts[0].key
    assert sleeps == [1.0, 1.0]


async def test_sdk_async_stream_after_retries(server: Server) -> None:
    run, base = server.base("flaky")
    policy, sleeps = recorder_policy()
    async with async_sdk(base, policy) as client:
        stream = await client.chat.completions.create(
            model="fake", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    assert len(server.attempts(run)) == 3 and sleeps == [1.0, 1.0]


def test_sdk_sync_quota_exceeded_is_not_retried(server: Server) -> None:
    run, base = server.base("quota")
    policy, sleeps = recorder_policy()
    with sync_sdk(base, policy) as client, pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="fake", messages=MESSAGES)
    assert info.value.response.headers["x-should-retry"] == "false"
    assert info.value.code == "quota_exceeded"
    assert len(server.attempts(run)) == 1 and sleeps == []


async def test_sdk_async_quota_exceeded_is_not_retried(server: Server) -> None:
    run, base = server.base("quota")
    policy, sleeps = recorder_policy()
    async with async_sdk(base, policy) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="fake", messages=MESSAGES)
    assert info.value.response.headers["x-should-retry"] == "false"
    assert info.value.code == "quota_exceeded"
    assert len(server.attempts(run)) == 1 and sleeps == []


def test_sdk_caller_idempotency_key_is_reused(server: Server) -> None:
    run, base = server.base("flaky")
    policy, _ = recorder_policy()
    with sync_sdk(base, policy) as client:
        client.chat.completions.create(
            model="fake", messages=MESSAGES, extra_headers={"Idempotency-Key": "mine-1"}
        )
    assert [a.key for a in server.attempts(run)] == ["mine-1"] * 3


def test_sdk_529_retried_with_backoff(server: Server) -> None:
    run, base = server.base("overloaded")
    policy, sleeps = recorder_policy()
    with sync_sdk(base, policy) as client:
        client.chat.completions.create(model="fake", messages=MESSAGES)
    assert len(server.attempts(run)) == 2
    assert sleeps == [0.5]  # no Retry-After: initial delay (random=0: no jitter taken off)


async def test_sdk_gives_up_after_max_retries(server: Server) -> None:
    run, base = server.base("down")
    policy, sleeps = recorder_policy(max_retries=3)
    async with async_sdk(base, policy) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="fake", messages=MESSAGES)
    assert len(server.attempts(run)) == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_sdk_invalid_request_is_not_retried(server: Server) -> None:
    run, base = server.base("invalid")
    policy, sleeps = recorder_policy()
    with sync_sdk(base, policy) as client, pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fake", messages=MESSAGES)
    assert len(server.attempts(run)) == 1 and sleeps == []


# -- transport details over real HTTP -----------------------------------------------------------


def test_retry_after_longer_than_max_is_not_waited_for(server: Server) -> None:
    run, base = server.base("longwait")
    policy, sleeps = recorder_policy()
    with httpx.Client(transport=RetryTransport(policy=policy)) as client:
        response = client.post(base + "/chat/completions", json={"messages": MESSAGES})
    assert response.status_code == 429 and len(server.attempts(run)) == 1 and sleeps == []
    capped, sleeps2 = recorder_policy(over_max_retry_after="cap", max_retries=1)
    with httpx.Client(transport=RetryTransport(policy=capped)) as client:
        client.post(base + "/chat/completions", json={"messages": MESSAGES})
    assert sleeps2 == [60.0]


def test_http_date_retry_after_over_the_wire(server: Server) -> None:
    run, base = server.base("dated")
    policy, sleeps = recorder_policy()
    with httpx.Client(transport=RetryTransport(policy=policy)) as client:
        response = client.post(base + "/chat/completions", json={"messages": MESSAGES})
    assert response.status_code == 200 and len(server.attempts(run)) == 2
    assert len(sleeps) == 1 and 25 <= sleeps[0] <= 30


def test_body_is_replayed_identically_and_failed_responses_closed(server: Server) -> None:
    seen: list[httpx.Response] = []

    class Spy(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = super().handle_request(request)
            seen.append(response)
            return response

    run, base = server.base("flaky")
    policy, _ = recorder_policy()
    with httpx.Client(transport=RetryTransport(Spy(), policy=policy)) as client:
        response = client.post(base + "/chat/completions", json={"messages": MESSAGES})
        assert response.status_code == 200
        attempts = server.attempts(run)
        assert len(attempts) == 3 and len({a.body_sha for a in attempts}) == 1
        assert [r.is_closed for r in seen] == [True, True, True]  # the last one was read


def test_multipart_body_is_buffered_and_replayed(server: Server) -> None:
    run, base = server.base("flaky")
    policy, _ = recorder_policy()
    with httpx.Client(transport=RetryTransport(policy=policy)) as client:
        response = client.post(
            base + "/chat/completions", files={"file": ("a.txt", b"x" * 1000)}, data={"p": "1"}
        )
    attempts = server.attempts(run)
    assert response.status_code == 200
    assert len(attempts) == 3 and len({a.body_sha for a in attempts}) == 1


async def test_streaming_request_body_is_never_retried(server: Server) -> None:
    run, base = server.base("flaky")
    policy, sleeps = recorder_policy()

    async def body() -> AsyncIterator[bytes]:
        yield b'{"messages": '
        yield json.dumps(MESSAGES).encode() + b"}"

    async with httpx.AsyncClient(transport=AsyncRetryTransport(policy=policy)) as client:
        response = await client.post(base + "/chat/completions", content=body())
    assert response.status_code == 429 and response.headers["x-should-retry"] == "true"
    attempts = server.attempts(run)
    assert len(attempts) == 1 and attempts[0].key and sleeps == []


# The "slow" scenario answers its first attempt after 5 s (its handler is cancelled when
# the client hangs up): the client's 0.2 s read timeout fires, even if the machine stalls.
# A retry is answered at once, but gets 10 s (set below the retrying transport), so that a
# stalled machine cannot time it out too; connecting is never the short part.
SHORT_READ = httpx.Timeout(10, read=0.2)


class PatientRetries(httpx.HTTPTransport):
    attempts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        if self.attempts > 1:
            request.extensions["timeout"] = httpx.Timeout(10).as_dict()
        return super().handle_request(request)


class AsyncPatientRetries(httpx.AsyncHTTPTransport):
    attempts = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        if self.attempts > 1:
            request.extensions["timeout"] = httpx.Timeout(10).as_dict()
        return await super().handle_async_request(request)


def test_read_timeout_retried_only_with_idempotency_key_sync(server: Server) -> None:
    policy, sleeps = recorder_policy()
    no_key, no_key_sleeps = recorder_policy(idempotency_methods=())
    run, base = server.base("slow")
    run2, base2 = server.base("slow")
    transport = RetryTransport(PatientRetries(), policy=policy)
    with httpx.Client(transport=transport, timeout=SHORT_READ) as client:
        assert (
            client.post(base + "/chat/completions", json={"messages": MESSAGES}).status_code == 200
        )
    with (
        httpx.Client(transport=RetryTransport(PatientRetries(), policy=no_key),
                     timeout=SHORT_READ) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post(base2 + "/chat/completions", json={"messages": MESSAGES})
    assert len(server.attempts(run)) == 2 and len(sleeps) == 1
    assert len(server.attempts(run2)) == 1 and no_key_sleeps == []
    assert server.attempts(run2)[0].key is None


async def test_read_timeout_retried_only_with_idempotency_key_async(server: Server) -> None:
    policy, sleeps = recorder_policy()
    no_key, no_key_sleeps = recorder_policy(idempotency_methods=())
    run, base = server.base("slow")
    run2, base2 = server.base("slow")
    transport = AsyncRetryTransport(AsyncPatientRetries(), policy=policy)
    async with httpx.AsyncClient(transport=transport, timeout=SHORT_READ) as client:
        assert (
            await client.post(base + "/chat/completions", json={"messages": MESSAGES})
        ).status_code == 200
    transport = AsyncRetryTransport(AsyncPatientRetries(), policy=no_key)
    async with httpx.AsyncClient(transport=transport, timeout=SHORT_READ) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(base2 + "/chat/completions", json={"messages": MESSAGES})
    assert len(server.attempts(run)) == 2 and len(sleeps) == 1
    assert len(server.attempts(run2)) == 1 and no_key_sleeps == []
    assert server.attempts(run2)[0].key is None


async def test_connection_refused_is_retried_for_any_method() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once we leave: nothing listens there
    policy, sleeps = recorder_policy(idempotency_methods=())
    async with httpx.AsyncClient(transport=AsyncRetryTransport(policy=policy)) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(f"http://127.0.0.1:{port}/x", json={})
    assert sleeps == [0.5, 1.0]


async def test_async_sleep_hook_is_awaited(server: Server) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        await anyio.lowlevel.checkpoint()
        slept.append(seconds)

    run, base = server.base("flaky")
    policy = RetryPolicy(sleep=sleep)
    async with httpx.AsyncClient(transport=AsyncRetryTransport(policy=policy)) as client:
        response = await client.post(base + "/chat/completions", json={"messages": MESSAGES})
    assert response.status_code == 200 and slept == [1.0, 1.0]
    assert len(server.attempts(run)) == 3


# -- a response body lost mid-way, from a raw socket server -------------------------------------

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
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = [line.split(b":", 1) for line in head.split(b"\r\n")[1:]]
        headers = {name.strip().lower().decode(): value.strip().decode() for name, value in lines}
        while len(body) < int(headers.get("content-length", "0")):
            body += conn.recv(65536)
        self.keys.append(headers.get("idempotency-key"))
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


def test_sdk_sync_body_lost_mid_way_is_retried_with_the_same_key(raw_server: RawServer) -> None:
    raw_server.replies = [Reply(cut=20), Reply()]  # headers and 20 bytes, then a reset
    policy, sleeps = recorder_policy()
    with sync_sdk(raw_server.url + "/v1", policy) as client:
        completion = client.chat.completions.create(model="fake", messages=MESSAGES)
    assert completion.choices[0].message.content == "ok"
    keys = raw_server.keys
    assert len(keys) == 2 and keys[0] and keys == [keys[0]] * 2
    assert sleeps == [0.5]


async def test_sdk_async_body_lost_twice_is_retried_with_backoff(raw_server: RawServer) -> None:
    raw_server.replies = [Reply(cut=20), Reply(cut=20), Reply()]
    policy, sleeps = recorder_policy()
    async with async_sdk(raw_server.url + "/v1", policy) as client:
        completion = await client.chat.completions.create(model="fake", messages=MESSAGES)
    assert completion.choices[0].message.content == "ok"
    keys = raw_server.keys
    assert len(keys) == 3 and keys[0] and keys == [keys[0]] * 3
    assert sleeps == [0.5, 1.0]


def test_body_lost_every_time_spends_the_same_budget(raw_server: RawServer) -> None:
    raw_server.replies = [Reply(cut=20)]
    policy, sleeps = recorder_policy(max_retries=1)
    with (
        httpx.Client(transport=RetryTransport(policy=policy)) as client,
        pytest.raises(httpx.ReadError),
    ):
        client.post(raw_server.url + "/v1/chat/completions", json={"messages": MESSAGES})
    assert len(raw_server.keys) == 2 and sleeps == [0.5]


async def test_body_lost_is_retried_only_where_a_resend_is_safe(raw_server: RawServer) -> None:
    raw_server.replies = [Reply(cut=20), Reply(cut=20), Reply()]
    policy, sleeps = recorder_policy(idempotency_methods=())
    async with httpx.AsyncClient(transport=AsyncRetryTransport(policy=policy)) as client:
        with pytest.raises(httpx.ReadError):  # a POST without a key: it may have run
            await client.post(raw_server.url + "/v1/chat/completions", json={})
        assert raw_server.keys == [None] and sleeps == []
        response = await client.get(raw_server.url + "/v1/models")  # idempotent: resent
    assert response.content == COMPLETION and len(raw_server.keys) == 3 and sleeps == [0.5]


BIG = json.dumps({"data": "x" * 3000}).encode()


def fetch(url: str, policy: RetryPolicy) -> bytes | None:
    """The body, or ``None`` if the connection went before its end."""
    with httpx.Client(transport=RetryTransport(policy=policy)) as client:
        try:
            return client.get(url).content
        except httpx.RemoteProtocolError:
            return None


async def afetch(url: str, policy: RetryPolicy) -> bytes | None:
    async with httpx.AsyncClient(transport=AsyncRetryTransport(policy=policy)) as client:
        try:
            return (await client.get(url)).content
        except httpx.RemoteProtocolError:
            return None


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
async def test_buffering_is_capped(
    raw_server: RawServer, reply: Reply, attempts: int, sync: bool
) -> None:
    raw_server.replies = [dataclasses.replace(reply, reset=False), Reply(BIG)]
    limit = 4000 if reply.content_type == "application/octet-stream" else 1000
    policy, _ = recorder_policy(max_buffered_body=limit)
    url = raw_server.url + "/v1/files"
    content = await (anyio.to_thread.run_sync(fetch, url, policy) if sync else afetch(url, policy))
    assert len(raw_server.keys) == attempts
    assert content == (None if attempts == 1 and reply.cut else BIG)


def test_sdk_event_stream_is_not_buffered_and_a_cut_is_the_callers(
    raw_server: RawServer,
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
        sync_sdk(raw_server.url + "/v1", policy) as client,
        pytest.raises(openai.APIConnectionError),
    ):
        stream = client.chat.completions.create(model="fake", messages=MESSAGES, stream=True)
        for event in stream:  # the first event arrives while the server still holds the rest
            release.set()
            words.append(event.choices[0].delta.content)
    assert raw_server.held == [True] and words[0] == "a"
    assert len(raw_server.keys) == 1 and sleeps == []  # to resume is the caller's


async def test_unknown_length_stream_is_not_buffered(raw_server: RawServer) -> None:
    release = threading.Event()
    lines = b'{"n": 1}\n{"n": 2}\n'
    raw_server.replies = [Reply(lines, "application/x-ndjson", chunked=True, chunk=9, hold=release)]
    policy, _ = recorder_policy()
    async with (
        httpx.AsyncClient(transport=AsyncRetryTransport(policy=policy)) as client,
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
async def test_a_json_answer_to_a_request_for_a_stream_is_not_buffered(
    raw_server: RawServer, path: str, body: dict[str, Any]
) -> None:
    # JSON of unknown length was read whole before the transport returned: Gemini's
    # streamGenerateContent (a JSON array, chunk by chunk, without alt=sse) arrived at once.
    release = threading.Event()
    array = b'[{"n": 1},\n{"n": 2}]'
    raw_server.replies = [Reply(array, "application/json", chunked=True, chunk=10, hold=release)]
    policy, _ = recorder_policy()
    async with (
        httpx.AsyncClient(transport=AsyncRetryTransport(policy=policy)) as client,
        client.stream("POST", raw_server.url + path, json=body) as response,
    ):
        received = b""
        async for part in response.aiter_raw():
            release.set()
            received += part
    assert raw_server.held == [True] and received == array


# -- the pure policy -----------------------------------------------------------------------------


def response(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers={k.replace("_", "-"): v for k, v in headers.items()})


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


def test_server_delay_parsing() -> None:
    policy = RetryPolicy(clock=lambda: 1_000_000.0)
    headers = httpx.Headers
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


def test_should_retry_signal_wins_over_status() -> None:
    policy = RetryPolicy()
    assert policy.should_retry_response(response(400, x_should_retry="true"))
    assert not policy.should_retry_response(response(503, x_should_retry="false"))
    assert not policy.should_retry_response(response(429, x_should_retry="false"))
    assert not policy.should_retry_response(response(200, x_should_retry="true"))
    for status in (408, 409, 429, 500, 502, 503, 504, 529):
        assert policy.should_retry_response(response(status))
    for status in (400, 401, 403, 404, 410, 413, 422, 501):
        assert not policy.should_retry_response(response(status))


def test_response_delay_limits() -> None:
    policy = RetryPolicy(max_retries=2, random=lambda: 0.0)
    assert policy.response_delay(response(429, retry_after="3"), 0) == 3.0
    assert policy.response_delay(response(429, retry_after="3"), 2) is None
    assert policy.response_delay(response(429, retry_after="61"), 0) is None
    capped = RetryPolicy(over_max_retry_after="cap", max_retry_after=10)
    assert capped.response_delay(response(429, retry_after="61"), 0) == 10
    assert policy.response_delay(response(503), 1) == 1.0


def test_error_delay_depends_on_method_and_key() -> None:
    policy = RetryPolicy(random=lambda: 0.0)
    post = httpx.Request("POST", "http://x/")
    keyed = httpx.Request("POST", "http://x/", headers={"Idempotency-Key": "k"})
    get = httpx.Request("GET", "http://x/")
    assert policy.error_delay(httpx.ConnectError("refused"), post, 0) == 0.5
    assert policy.error_delay(httpx.PoolTimeout("pool"), post, 0) == 0.5
    assert policy.error_delay(httpx.ReadTimeout("slow"), post, 0) is None
    assert policy.error_delay(httpx.RemoteProtocolError("eof"), post, 0) is None
    assert policy.error_delay(httpx.ReadTimeout("slow"), keyed, 1) == 1.0
    assert policy.error_delay(httpx.ReadError("reset"), get, 0) == 0.5
    assert policy.error_delay(httpx.LocalProtocolError("bad"), get, 0) is None
    assert policy.error_delay(ValueError("app bug"), get, 0) is None
    assert policy.error_delay(httpx.ConnectError("refused"), get, 2) is None


def test_idempotency_key_added_once_and_only_where_configured() -> None:
    keys = iter(["k1", "k2"])
    policy = RetryPolicy(key_factory=lambda: next(keys))
    post = httpx.Request("POST", "http://x/")
    policy.add_idempotency_key(post)
    policy.add_idempotency_key(post)
    assert post.headers.get_list("idempotency-key") == ["k1"]
    patch = httpx.Request("PATCH", "http://x/", headers={"idempotency-key": "mine"})
    policy.add_idempotency_key(patch)
    assert patch.headers["Idempotency-Key"] == "mine"
    get = httpx.Request("GET", "http://x/")
    policy.add_idempotency_key(get)
    assert "idempotency-key" not in get.headers
    default = RetryPolicy()
    put = httpx.Request("post", "http://x/")
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


def test_transport_arguments_are_validated() -> None:
    with pytest.raises(TypeError):
        RetryTransport(policy=RetryPolicy(), max_retries=1)
    with pytest.raises(TypeError):
        RetryTransport(httpx.AsyncHTTPTransport())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        AsyncRetryTransport(httpx.HTTPTransport())  # type: ignore[arg-type]
    assert RetryTransport(max_retries=5).policy.max_retries == 5
