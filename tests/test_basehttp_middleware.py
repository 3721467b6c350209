"""The stack beside Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``): a
typical FastAPI app has such functions (request logging, timing), defined before
``install()`` (inside the stack) or after it (outside). BaseHTTPMiddleware runs what it
wraps in a task group behind a memory stream; real uvicorn, real clients."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI, Request
from httpx_sse import aconnect_sse
from starlette.middleware import Middleware

from aimiddleware import (
    CancellationConfig,
    EventStreamResponse,
    OpenAIChatDialect,
    Policy,
    RateLimiter,
    StackConfig,
    UsageConfig,
    install,
)
from aimiddleware.stack_middleware import StackMiddleware
from tests.live_server import serve
from tests.ratelimit_helpers import principal_of

AUTH = {"authorization": "Bearer k1"}


def split_stack(app: FastAPI) -> None:
    """install()'s stack as the same layers, one middleware each (the chained form)."""
    stack = next(m for m in app.user_middleware if m.cls is StackMiddleware)
    at = app.user_middleware.index(stack)
    app.user_middleware[at : at + 1] = [
        Middleware(cls, **options) for cls, options in stack.kwargs["layers"]
    ]


@contextmanager
def server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """The ERROR records of uvicorn (which does not propagate to the root) and the stack."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(caplog.handler)
    errors: list[logging.LogRecord] = []
    try:
        yield errors
    finally:
        uvicorn_log.removeHandler(caplog.handler)
        errors.extend(r for r in caplog.records if r.levelno >= logging.ERROR)


async def post_and_leave(url: str, head_only: bool = False) -> None:
    """A raw POST whose client leaves: once the app is called (the whole body sent), or
    half-way through the body (``head_only``)."""
    host, port = url.removeprefix("http://").split(":")
    stream = await anyio.connect_tcp(host, int(port))
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    await stream.send(
        b"POST /v1/chat HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer k1\r\ncontent-length: %d\r\n\r\n" % len(body)
        + (body[:10] if head_only else body)
    )
    await anyio.sleep(0.15)  # (the app is called, or the server waits for the rest)
    await stream.aclose()


@pytest.mark.parametrize("form", ["stack", "layers"])
async def test_a_client_gone_before_the_answer_ends_in_a_response_outside(
    caplog: pytest.LogCaptureFixture, form: str
) -> None:
    """Defined after install(), an ``@app.middleware("http")`` function wraps the stack.
    A client that left before the answer (its model call cancelled, or its body cut off)
    got no response from the stack, and BaseHTTPMiddleware raised "No response returned.":
    a traceback and a 500 in the server log for every client that gave up, and the outer
    function's code after ``call_next`` never ran."""
    seen: list[int] = []
    logged = [anyio.Event(), anyio.Event()]
    cancelled = anyio.Event()
    app = FastAPI()

    @app.post("/v1/chat")
    async def chat() -> dict[str, Any]:
        try:
            await anyio.sleep(10)  # a slow model call
        finally:
            cancelled.set()
        return {}

    limiter = RateLimiter(Policy(requests="100/minute", tokens="10000/minute", concurrency=1))
    install(app, StackConfig(ratelimit=limiter, usage=UsageConfig()))
    if form == "layers":
        split_stack(app)

    @app.middleware("http")
    async def access_log(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        seen.append(response.status_code)
        logged[len(seen) - 1].set()
        return response

    with server_errors(caplog) as errors:
        async with serve(app) as url:
            for i, head_only in enumerate((False, True)):
                await post_and_leave(url, head_only=head_only)
                with anyio.fail_after(3):
                    await logged[i].wait()
            assert cancelled.is_set()
            # the slot is free: the next request is admitted
            assert not await limiter.backend.in_flight(principal_of("k1"))  # type: ignore[attr-defined]
    assert seen == [499, 499]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize("form", ["stack", "layers"])
async def test_a_time_limit_ends_a_stream_with_its_error_event_through_the_middleware(
    caplog: pytest.LogCaptureFixture, form: str
) -> None:
    """Defined before install(), an ``@app.middleware("http")`` function sits inside the
    stack, between it and the endpoint. A timeout tier cutting an ``EventStreamResponse``
    cancels that middleware's task group with the endpoint, and its memory stream is closed:
    the error event was written into it (anyio.ClosedResourceError, a traceback in the
    server log) and the client's stream was cut off without it. It is now sent through the
    error layer's own ``send``: the client gets the timeout error event and ``[DONE]``."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> EventStreamResponse:
        async def tokens() -> AsyncIterator[str]:
            for i in range(100):
                await anyio.sleep(0.02)
                yield f"tok{i} "

        return EventStreamResponse(tokens(), dialect=OpenAIChatDialect.for_request(body))

    @app.middleware("http")
    async def timing(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["x-process-time"] = "0.1"
        return response

    install(app, cancellation=CancellationConfig(timeouts={"/v1/*": 0.3}), usage=UsageConfig())
    if form == "layers":
        split_stack(app)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "stream": True}
    with server_errors(caplog) as errors:
        async with (
            serve(app) as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as c,
            aconnect_sse(c, "POST", "/v1/chat/completions", json=body) as source,
        ):
            assert source.response.headers["x-process-time"] == "0.1"
            data = [event.data async for event in source.aiter_sse()]
    assert 5 < len(data) < 20 and data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "timeout"
    assert not errors, [r.getMessage() for r in errors]
