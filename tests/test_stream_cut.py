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

from aimiddleware import CancellationConfig, UsageConfig, install
from aimiddleware._stream_cut import SentWatch, at_event_boundary, is_plain_event_stream
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
        async with serve(app) as url, httpx.AsyncClient(base_url=url) as c:
            async with aconnect_sse(c, "POST", "/v1/chat/completions", json=BODY) as source:
                request_id = source.response.headers["x-request-id"]
                if http_function is not None:
                    assert source.response.headers["x-process-time"] == "0.1"
                events = [(e.event, e.data) async for e in source.aiter_sse()]
            received = []
            async with openai.AsyncOpenAI(
                base_url=url + "/v1", api_key="k", max_retries=0
            ) as sdk:
                stream = await sdk.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                )
                with pytest.raises(openai.APIError, match=r"did not complete within 0\.3 s"):
                    async for item in stream:
                        received.append(item.choices[0].delta.content)
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
