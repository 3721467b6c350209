"""A foreign event stream (not an ``EventStreamResponse``) cut by a timeout tier: ended with
an error event when what it sent ends at an event boundary, else aborted as before.
Pure checks of the boundary rule, then real uvicorn, httpx-sse and the openai SDK."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from httpx_sse import aconnect_sse

from aimiddleware import CancellationConfig, IdempotencyConfig, Policy, UsageConfig, install
from aimiddleware._stream_cut import SentWatch, at_event_boundary, is_plain_event_stream
from aimiddleware.errors import UpstreamUnavailable
from tests.live_server import serve
from tests.test_basehttp_middleware import server_errors, split_stack


def ends_with_blank_line(data: bytes) -> bool:
    """The reference: the stream's lines (CRLF, LF or a lone CR ending each; a CR at the
    very end ends its line too) end with a blank one, or nothing was sent."""
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return text in (b"", b"\n") or text.endswith(b"\n\n")


async def test_the_watch_knows_an_event_boundary_whatever_the_chunks() -> None:
    """Random streams of letters, colons, CRs and LFs, cut into random chunks: after every
    chunk the watch (its last 3 bytes) agrees with the reference on the whole prefix."""
    rng = random.Random(7)
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    checked = 0
    for _ in range(3000):
        data = bytes(rng.choice(b"a:\r\n") for _ in range(rng.randrange(0, 12)))
        watch = SentWatch(send)
        await watch({"type": "http.response.start", "status": 200, "headers": []})
        at = 0
        while at < len(data):
            size = rng.randrange(0, 4)  # (an empty body message too)
            await watch({"type": "http.response.body", "body": data[at : at + size],
                         "more_body": True})
            at += size
            assert at_event_boundary(watch.tail) == ends_with_blank_line(data[:at]), data[:at]
            checked += 1
    assert checked > 10000
    for data, expected in [(b"", True), (b"data: x\n\n", True), (b"data: x\r\n\r\n", True),
                           (b"data: x\r\r", True), (b"data: x\n", False), (b"data: x\r", False),
                           (b"data: x\r\n", False), (b"data: x", False), (b": ping\r\n\r\n", True)]:
        assert at_event_boundary((b"\n\n" + data)[-3:]) is expected, data


@pytest.mark.parametrize(
    ("headers", "trailers", "plain"),
    [
        ([(b"content-type", b"text/event-stream")], False, True),
        ([(b"Content-Type", b"Text/Event-Stream; charset=utf-8")], False, True),
        ([(b"content-type", b"text/event-stream"), (b"content-encoding", b"identity")], False,
         True),
        ([(b"content-type", b"text/event-stream"), (b"content-encoding", b"gzip")], False,
         False),
        ([(b"content-type", b"text/event-stream"), (b"content-length", b"100")], False, False),
        ([(b"content-type", b"text/event-stream")], True, False),
        ([(b"content-type", b"application/json")], False, False),
        ([(b"content-type", b"text/plain")], False, False),
        ([], False, False),
    ],
)
def test_only_a_plain_event_stream_can_be_added_to(
    headers: list[tuple[bytes, bytes]], trailers: bool, plain: bool
) -> None:
    head = {"type": "http.response.start", "status": 200, "headers": headers,
            "trailers": trailers}
    assert is_plain_event_stream(head) is plain


def chunk(i: int) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}


def add_timing(app: FastAPI) -> None:
    """An ``@app.middleware("http")`` function: inside the stack when added before
    ``install()``, outside it after."""

    @app.middleware("http")
    async def timing(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["x-process-time"] = "0.1"
        return response


def foreign_app(framing: str) -> FastAPI:
    """A chat route streaming with Starlette's StreamingResponse, one event each 20 ms:
    ``lf`` one whole event per chunk (as most apps write them); ``crlf`` CRLF line ends
    with the blank line in a chunk of its own and comment heartbeats between events (as
    sse-starlette frames them); ``cut`` a whole event, then half of one, then a stall."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            for i in range(100):
                await anyio.sleep(0.02)
                data = json.dumps(chunk(i))
                if framing == "lf":
                    yield f"data: {data}\n\n"
                elif framing == "crlf":
                    yield f"data: {data}\r\n"
                    yield "\r\n"
                    yield ": ping\r\n\r\n"
                else:
                    yield f"data: {data}\n\n" if i == 0 else f"data: {data}"
                    if i:
                        await anyio.sleep(10)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
        "stream": True}


async def read_twice(
    url: str, headers: dict[str, str], sdk_error: str
) -> tuple[httpx.Headers, list[tuple[str, str]], list[str | None]]:
    """The chat stream read by httpx-sse (the head, every event as (event, data)), then by
    the openai SDK, which must raise an ``APIError`` matching ``sdk_error`` after the
    contents it returns."""
    async with (
        httpx.AsyncClient(base_url=url) as c,
        aconnect_sse(c, "POST", "/v1/chat/completions", json=BODY, headers=headers) as source,
    ):
        events = [(e.event, e.data) async for e in source.aiter_sse()]
    received = []
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
        )
        with pytest.raises(openai.APIError, match=sdk_error):
            async for item in stream:
                received.append(item.choices[0].delta.content)
    return source.response.headers, events, received


@pytest.mark.parametrize(
    ("form", "usage", "framing", "http_function"),
    [
        ("stack", True, "lf", None),
        ("stack", False, "crlf", None),
        ("layers", True, "crlf", None),
        ("layers", False, "lf", None),
        ("stack", True, "crlf", "before"),
        ("layers", True, "lf", "before"),
        ("stack", True, "lf", "after"),
    ],
)
async def test_a_foreign_event_stream_cut_by_its_time_limit_ends_with_an_error_event(
    caplog: pytest.LogCaptureFixture, form: str, usage: bool, framing: str,
    http_function: str | None,
) -> None:
    """A StreamingResponse of media type text/event-stream cut by a 0.3 s tier was aborted:
    the connection dropped mid-body (httpx: incomplete chunked read; the openai SDK:
    APIConnectionError), a traceback in the server log. Cut at an event boundary, it now
    ends with ``event: error`` carrying the timeout problem body, and the body ends cleanly:
    every event sent arrives whole, then the error; the SDK raises APIError."""
    app = foreign_app(framing)
    if http_function == "before":
        add_timing(app)
    install(app, cancellation=CancellationConfig(timeouts={"/v1/*": 0.3}),
            usage=UsageConfig() if usage else None)
    if form == "layers":
        split_stack(app)
    if http_function == "after":
        add_timing(app)
    with server_errors(caplog) as errors:
        async with serve(app) as url:
            head, events, received = await read_twice(
                url, {}, r"did not complete within 0\.3 s"
            )
    request_id = head["x-request-id"]
    if http_function is not None:
        assert head["x-process-time"] == "0.1"
    *data, (kind, error) = events
    assert kind == "error"
    assert 5 < len(data) < 20
    assert data == [("message", json.dumps(chunk(i))) for i in range(len(data))]
    problem = json.loads(error)
    assert (problem["status"], problem["error"]["code"]) == (504, "timeout")
    assert problem["request_id"] == request_id and problem["retryable"] is True
    assert received == [f"t{i} " for i in range(len(received))] and len(received) > 5
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize("form", ["stack", "layers"])
async def test_a_foreign_event_stream_cut_mid_event_is_still_aborted(
    caplog: pytest.LogCaptureFixture, form: str
) -> None:
    """Half an event sent: an error event would be glued to it (a parser would dispatch
    one event of both), so the stream is aborted as before, and logged."""
    app = foreign_app("cut")
    install(app, cancellation=CancellationConfig(timeouts={"/v1/*": 0.3}))
    if form == "layers":
        split_stack(app)
    events: list[tuple[str, str]] = []
    with server_errors(caplog) as errors:
        async with serve(app) as url, httpx.AsyncClient(base_url=url) as c:
            with pytest.raises(httpx.RemoteProtocolError):
                async with aconnect_sse(c, "POST", "/v1/chat/completions", json=BODY) as source:
                    async for event in source.aiter_sse():
                        events.append((event.event, event.data))
    assert events == [("message", json.dumps(chunk(0)))]
    assert any("closing the connection" in r.getMessage() for r in errors)
    assert all(r.levelno == logging.ERROR for r in errors)


def failing_app(ending: str) -> FastAPI:
    """A chat route streaming 5 whole events with Starlette's StreamingResponse, then
    ``raise``: its iterator raises (an upstream lost: UpstreamUnavailable), or ``hang``:
    waits until the server cancels it (uvicorn, past its graceful-shutdown timeout)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            for i in range(5):
                yield f"data: {json.dumps(chunk(i))}\n\n"
            if ending == "raise":
                raise UpstreamUnavailable("The model server went away.")
            await anyio.sleep(30)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


# (form, usage, a time limit, an Idempotency-Key: the chained layers from idempotency in)
FAILURE_CASES = [
    ("stack", True, False, False),
    ("stack", True, True, False),
    ("stack", False, True, False),
    ("stack", True, False, True),
    ("stack", False, False, False),
    ("stack", False, False, True),
    ("layers", True, False, False),
    ("layers", False, True, False),
    ("layers", False, False, False),
    ("layers", False, False, True),
]


def install_failing(ending: str, form: str, usage: bool, timed: bool) -> FastAPI:
    app = failing_app(ending)
    install(
        app,
        cancellation=CancellationConfig(timeouts={"/v1/*": 30} if timed else {}),
        usage=UsageConfig() if usage else None,
        idempotency=IdempotencyConfig(secret="stream-cut-test-secret-0123456789"),
    )
    if form == "layers":
        split_stack(app)
    return app


def sse_events(lines: list[str]) -> list[tuple[str, str]]:
    """The events of an SSE body read as lines (``event``, ``data``), as a parser makes them."""
    events, kind, data = [], "message", None
    for line in lines:
        if not line:
            if data is not None:
                events.append((kind, data))
            kind, data = "message", None
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
    return events


@pytest.mark.parametrize(("form", "usage", "timed", "key"), FAILURE_CASES)
async def test_a_foreign_event_stream_whose_iterator_raises_ends_with_an_error_event(
    caplog: pytest.LogCaptureFixture, form: str, usage: bool, timed: bool, key: bool
) -> None:
    """The iterator of a StreamingResponse of text/event-stream raising once it has sent
    whole events was aborted (the error layer logged 'after the response started; closing
    the connection', uvicorn a traceback; httpx: incomplete chunked read; the openai SDK:
    APIConnectionError), where an EventStreamResponse's ends with its error event. Now it
    ends with ``event: error``, the problem body of what was raised, and a clean end."""
    app = install_failing("raise", form, usage, timed)
    headers = {"idempotency-key": "k-1"} if key else {}
    with server_errors(caplog) as errors:
        async with serve(app) as url:
            head, events, received = await read_twice(url, headers, "model server went away")
    request_id = head["x-request-id"]
    *data, (kind, error) = events
    assert kind == "error"
    assert data == [("message", json.dumps(chunk(i))) for i in range(5)]
    problem = json.loads(error)
    assert (problem["status"], problem["error"]["code"]) == (503, "upstream_unavailable")
    assert problem["request_id"] == request_id and problem["retryable"] is True
    assert received == [f"t{i} " for i in range(5)]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize("form", ["stack", "layers"])
async def test_a_raising_foreign_stream_with_only_a_rate_limit_ends_with_an_error_event(
    caplog: pytest.LogCaptureFixture, form: str
) -> None:
    """install() with only a rate limit (no usage layer, no time limit): the raising
    StreamingResponse was aborted (httpx-sse: RemoteProtocolError; the openai SDK:
    APIConnectionError), as it is watched only by the usage layer or a time limit. Now it
    ends with its error event as with them, after the rate-limit headers."""
    app = failing_app("raise")
    install(app, ratelimit=Policy(requests="100/minute"))
    if form == "layers":
        split_stack(app)
    with server_errors(caplog) as errors:
        async with serve(app) as url:
            head, events, received = await read_twice(url, {}, "model server went away")
    assert head["x-ratelimit-limit-requests"] == "100" and "x-usage-duration-ms" not in head
    *data, (kind, error) = events
    assert data == [("message", json.dumps(chunk(i))) for i in range(5)]
    problem = json.loads(error)
    assert kind == "error" and problem["error"]["code"] == "upstream_unavailable"
    assert problem["request_id"] == head["x-request-id"]
    assert received == [f"t{i} " for i in range(5)]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize(("form", "usage", "timed", "key"), FAILURE_CASES)
async def test_a_foreign_event_stream_the_server_cancels_ends_with_an_error_event(
    form: str, usage: bool, timed: bool, key: bool
) -> None:
    """uvicorn cancels what still runs past --timeout-graceful-shutdown (1 s here): such a
    stream was cut without an end, where an EventStreamResponse's ends with the retryable
    503 'shutting down' error event. Now it does too, after its whole events."""
    app = install_failing("hang", form, usage, timed)
    headers = {"idempotency-key": "k-1"} if key else {}
    lines: list[str] = []

    async def read(client: httpx.AsyncClient, url: str) -> None:
        try:
            async with client.stream(
                "POST", url + "/v1/chat/completions", json=BODY, headers=headers
            ) as r:
                async for line in r.aiter_lines():
                    lines.append(line)
        except httpx.TransportError:
            lines.append("<cut>")

    # (serve() shuts the server down first; the stream's reader ends with it)
    async with (
        httpx.AsyncClient(timeout=10) as client,
        anyio.create_task_group() as tg,
        serve(app) as url,
    ):
        tg.start_soon(read, client, url)
        with anyio.fail_after(5):
            while lines.count("") < 5:  # noqa: ASYNC110 - the server runs in this loop
                await anyio.sleep(0.01)
    assert "<cut>" not in lines, lines
    *data, (kind, error) = sse_events(lines)
    assert data == [("message", json.dumps(chunk(i))) for i in range(5)]
    problem = json.loads(error)
    assert kind == "error" and problem["error"]["code"] == "overloaded"
    assert problem["status"] == 503 and problem["retryable"] is True


@pytest.mark.parametrize("http_function", ["after", "before"])
async def test_a_raising_foreign_stream_through_an_http_function(
    caplog: pytest.LogCaptureFixture, http_function: str
) -> None:
    """An ``@app.middleware("http")`` function outside the stack relays the error event;
    inside it, BaseHTTPMiddleware has ended the body cleanly before the exception reaches
    the stack (see the README's limitation), so nothing more is written after that end
    (uvicorn would refuse it: 'Unexpected ASGI message'): logged as before."""
    app = failing_app("raise")
    if http_function == "before":
        add_timing(app)
    install(app, usage=UsageConfig())
    if http_function == "after":
        add_timing(app)
    with server_errors(caplog) as errors:
        async with (
            serve(app) as url,
            httpx.AsyncClient(base_url=url) as c,
            aconnect_sse(c, "POST", "/v1/chat/completions", json=BODY) as source,
        ):
            assert source.response.headers["x-process-time"] == "0.1"
            events = [(e.event, e.data) async for e in source.aiter_sse()]
    data = [("message", json.dumps(chunk(i))) for i in range(5)]
    if http_function == "after":
        assert events[:5] == data and events[5][0] == "error" and len(events) == 6
        assert json.loads(events[5][1])["error"]["code"] == "upstream_unavailable"
        assert not errors, [r.getMessage() for r in errors]
    else:
        assert events == data
        assert any("closing the connection" in r.getMessage() for r in errors)
        assert not any("Unexpected ASGI message" in str(r.exc_info) for r in errors)
