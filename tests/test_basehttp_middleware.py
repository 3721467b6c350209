"""The stack beside Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``): a
typical FastAPI app has such functions (request logging, timing), defined before
``install()`` (inside the stack) or after it (outside). BaseHTTPMiddleware runs what it
wraps in a task group behind a memory stream; real uvicorn, real clients."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
from fastapi import FastAPI, Request

from aimiddleware import Policy, RateLimiter, StackConfig, UsageConfig, install
from tests.live_server import serve
from tests.ratelimit_helpers import principal_of

AUTH = {"authorization": "Bearer k1"}


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
    if form == "layers":  # the same layers, one middleware each
        (stack,) = app.user_middleware
        app.user_middleware.clear()
        for cls, options in reversed(stack.kwargs["layers"]):
            app.add_middleware(cls, **options)

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
