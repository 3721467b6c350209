"""The stack beside Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``): a
typical FastAPI app has such functions (request logging, timing), defined before
``install()`` (inside the stack) or after it (outside). BaseHTTPMiddleware runs what it
wraps in a task group behind a memory stream; real uvicorn, real clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import openai
import pytest
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Header, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from httpx_sse import aconnect_sse
from openai.types.chat import ChatCompletionChunk
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from aimiddleware import (
    CancellationConfig,
    CancellationMiddleware,
    EventStreamResponse,
    IdempotencyConfig,
    ModelRegistry,
    OpenAIChatDialect,
    Policy,
    RateLimiter,
    RequestContextMiddleware,
    StackConfig,
    UsageConfig,
    VersioningConfig,
    install,
    rate_limit,
)
from aimiddleware.context import RequestContext, after_response, current
from aimiddleware.stack_middleware import StackMiddleware
from aimiddleware.testing import FakeModel
from tests.live_server import serve
from tests.ratelimit_helpers import counters, principal_of

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


def slow_chat_app() -> tuple[FastAPI, anyio.Event]:
    """A FastAPI app whose ``POST /v1/chat`` is a slow model call, and the event set once
    that call is cancelled."""
    cancelled = anyio.Event()
    app = FastAPI()

    @app.post("/v1/chat")
    async def chat() -> dict[str, Any]:
        try:
            await anyio.sleep(10)  # a slow model call
        finally:
            cancelled.set()
        return {}

    return app, cancelled


def add_access_log(app: Any, seen: list[int], logged: list[anyio.Event]) -> None:
    """An ``@app.middleware("http")`` function noting each status in ``seen`` and setting the
    ``logged`` event of its turn (the first ``len(logged)`` requests)."""

    @app.middleware("http")
    async def access_log(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        seen.append(response.status_code)
        if len(seen) <= len(logged):
            logged[len(seen) - 1].set()
        return response


async def leave_twice(url: str, logged: list[anyio.Event]) -> None:
    """A client that leaves after its body, then one that leaves halfway through it; each
    waits (up to 3 s) for the app's access log to see its request end."""
    for i, head_only in enumerate((False, True)):
        await post_and_leave(url, head_only=head_only)
        with anyio.fail_after(3):
            await logged[i].wait()


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
    app, cancelled = slow_chat_app()

    limiter = RateLimiter(Policy(requests="100/minute", tokens="10000/minute", concurrency=1))
    install(app, StackConfig(ratelimit=limiter, usage=UsageConfig()))
    if form == "layers":
        split_stack(app)

    add_access_log(app, seen, logged)

    with server_errors(caplog) as errors:
        async with serve(app) as url:
            await leave_twice(url, logged)
            assert cancelled.is_set()
            # the slot is free: the next request is admitted
            assert not await limiter.backend.in_flight(principal_of("k1"))  # type: ignore[attr-defined]
    assert seen == [499, 499]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize(
    "options", [{}, {"splice_scopes": False}, {"default_timeout": 10}, {"watch_after": 0}],
    ids=["spliced", "scoped", "time-limited", "watched-at-once"],
)
async def test_the_cancellation_layer_alone_ends_a_request_whose_client_left(
    caplog: pytest.LogCaptureFixture, options: dict[str, Any]
) -> None:
    """``CancellationMiddleware`` used on its own (no context layer, not through
    ``install()``) with an ``@app.middleware("http")`` function around it: a client that
    left before the answer (the endpoint cancelled, or its body cut off) got no response
    from the layer, and BaseHTTPMiddleware raised "No response returned." (a traceback and
    a 500 in the server log for each). It now ends such a request with the empty 499 the
    context layer sends (end_abandoned)."""
    seen: list[int] = []
    logged = [anyio.Event(), anyio.Event()]
    app, cancelled = slow_chat_app()

    @app.post("/v1/quick")
    async def quick(body: dict[str, Any]) -> dict[str, Any]:
        return body

    app.add_middleware(CancellationMiddleware, **options)

    add_access_log(app, seen, logged)

    with server_errors(caplog) as errors:
        async with serve(app) as url:
            await leave_twice(url, logged)
            assert cancelled.is_set()
            async with httpx.AsyncClient(base_url=url) as c:  # a client that stays
                r = await c.post("/v1/quick", json={"a": 1})
            assert (r.status_code, r.json()) == (200, {"a": 1})
    assert seen == [499, 499, 200]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize("options", [{}, {"default_timeout": 10}], ids=["untimed", "timed"])
async def test_a_middleware_function_between_the_context_and_cancellation_layers(
    caplog: pytest.LogCaptureFixture, options: dict[str, Any]
) -> None:
    """A chain built by hand: ``RequestContextMiddleware`` outside, an
    ``@app.middleware("http")`` function, then ``CancellationMiddleware``. When a client left
    before the answer, the cancellation layer cancelled the endpoint and returned without a
    response, leaving the 499 to the context layer; the function between them got nothing,
    and BaseHTTPMiddleware raised "No response returned." (a traceback and a 500 in the log,
    and its code after ``call_next`` never ran). The layer now ends such a request itself,
    with the same empty 499, once, whichever layer is outside it. (A client that leaves
    halfway through its body is ended by the context layer, which reads it, before the
    function is called.)"""
    seen: list[int] = []
    logged = [anyio.Event()]
    app, cancelled = slow_chat_app()

    @app.post("/v1/quick")
    async def quick(body: dict[str, Any]) -> dict[str, Any]:
        return body

    app.add_middleware(CancellationMiddleware, **options)
    add_access_log(app, seen, logged)
    app.add_middleware(RequestContextMiddleware)

    with server_errors(caplog) as errors:
        async with serve(app) as url:
            await post_and_leave(url)
            with anyio.fail_after(3):
                await logged[0].wait()
            assert cancelled.is_set()
            await post_and_leave(url, head_only=True)
            async with httpx.AsyncClient(base_url=url) as c:  # a client that stays
                r = await c.post("/v1/quick", json={"a": 1})
            assert (r.status_code, r.json()) == (200, {"a": 1})
            assert r.headers["x-request-id"]
    assert seen == [499, 200]
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

    add_timing(app)

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


class AppError(Exception):
    """An app's own error, answered by its own exception handler."""


def untidy_app(order: str, model: FakeModel, limiter: RateLimiter) -> FastAPI:
    """A typical FastAPI app: logging and timing functions, CORS, GZip, TrustedHost, its own
    exception handlers, a router with a prefix and an auth dependency, a mounted sub-app, a
    plain StreamingResponse and an EventStreamResponse, BackgroundTasks; the stack installed
    with the ``@app.middleware("http")`` functions defined ``before`` it or ``after``."""
    app = FastAPI()

    def http_functions() -> None:
        @app.middleware("http")
        async def timing(request: Request, call_next: Any) -> Any:
            response = await call_next(request)
            response.headers["x-process-time"] = "0.001"
            return response

        @app.middleware("http")
        async def log_body(request: Request, call_next: Any) -> Any:
            if request.method == "POST":
                await request.body()  # (the body read in the function, then replayed)
            return await call_next(request)

    async def api_key(authorization: str | None = Header(default=None)) -> None:
        if authorization != "Bearer k1":
            raise HTTPException(401, "bad key", headers={"WWW-Authenticate": "Bearer"})

    router = APIRouter(prefix="/v1", dependencies=[Depends(api_key)])
    done: list[str] = []
    app.state.background = done

    @router.post("/chat/completions")
    async def chat(body: dict[str, Any], tasks: BackgroundTasks) -> Any:
        tasks.add_task(done.append, "logged")
        if not body.get("stream"):
            return await model.complete(body)
        chunks = await model.open_stream(body)

        async def sse() -> AsyncIterator[str]:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @router.post("/responses")
    async def responses(body: dict[str, Any]) -> EventStreamResponse:
        return EventStreamResponse(
            await model.open_stream(body), dialect=OpenAIChatDialect.for_request(body)
        )

    @router.post("/boom")
    async def boom() -> None:
        raise AppError

    app.include_router(router)
    sub = FastAPI()

    @sub.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"pong": True}

    app.mount("/sub", sub)

    @app.exception_handler(AppError)
    async def app_error(request: Request, exc: AppError) -> JSONResponse:
        return JSONResponse({"error": "the app's own"}, status_code=418)

    app.add_middleware(GZipMiddleware, minimum_size=200)
    app.add_middleware(CORSMiddleware, allow_origins=["https://app.example"])
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1"])
    if order == "before":
        http_functions()
    registry = ModelRegistry()
    registry.add_snapshot("gpt-4o-mini-2024-07-18")
    registry.alias("gpt-4o-mini", "gpt-4o-mini-2024-07-18")
    install(app, StackConfig(
        ratelimit=limiter, usage=UsageConfig(), idempotency=IdempotencyConfig(),
        cancellation=CancellationConfig(timeouts={"/v1/*": 10}),
        versioning=VersioningConfig(registry=registry),
    ))
    if order == "after":
        http_functions()
    return app


async def slot_freed(limiter: RateLimiter, key: str) -> None:
    """Wait (up to 3 s) until the caller with API key ``key`` holds no concurrency slot."""
    with anyio.fail_after(3):
        while await limiter.backend.in_flight(principal_of(key)):  # type: ignore[attr-defined]  # noqa: ASYNC110
            await anyio.sleep(0.005)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 20, **extra}


@pytest.mark.parametrize("order", ["before", "after"])
async def test_an_untidy_fastapi_app_in_either_order(
    caplog: pytest.LogCaptureFixture, order: str
) -> None:
    model = FakeModel("gpt-4o-mini", first_token_latency=0, inter_token_delay=0.01,
                      length=(20, 20))
    await model.warm()
    limiter = RateLimiter(Policy(requests="100/minute", tokens="10000/minute", concurrency=1))
    app = untidy_app(order, model, limiter)
    with server_errors(caplog) as errors:
        async with serve(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as c:
            # a JSON completion: usage and every layer's headers, once each
            r = await c.post("/v1/chat/completions", json=chat_body())
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
            names = [k for k, _ in r.headers.multi_items()]
            for name in ("x-request-id", "x-ratelimit-remaining-tokens", "ratelimit",
                         "x-usage-total-tokens", "x-model-version", "x-process-time"):
                assert names.count(name) == 1, name
            # a plain stream and an EventStreamResponse, through the official SDK
            sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="k1", max_retries=0)
            for path in ("/chat/completions", "/responses"):
                stream = await sdk.post(
                    path, body=chat_body(stream=True, stream_options={"include_usage": True}),
                    cast_to=ChatCompletionChunk, stream=True,
                    stream_cls=openai.AsyncStream[ChatCompletionChunk],
                )
                chunks = [chunk async for chunk in stream]
                assert chunks[-1].usage is not None
                assert chunks[-1].usage.completion_tokens == 20
            # the dependency's 401 is typed and not charged; the app's own error is its own
            before = await counters(limiter, "k2")
            r = await c.post("/v1/chat/completions", json=chat_body(),
                             headers={"authorization": "Bearer k2"})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.headers["content-type"] == "application/problem+json"
            await slot_freed(limiter, "k2")  # (outside, the function sends the answer first)
            assert await counters(limiter, "k2") == before
            r = await c.post("/v1/boom")
            assert (r.status_code, r.json()) == (418, {"error": "the app's own"})
            assert (await c.get("/sub/ping")).json() == {"pong": True}
            # idempotency: a retry and three concurrent duplicates, one model call each
            runs = model.stats.requests
            key = {"idempotency-key": "order-42"}
            first = await c.post("/v1/chat/completions", json=chat_body(), headers=key)
            again = await c.post("/v1/chat/completions", json=chat_body(), headers=key)
            assert again.headers["idempotent-replayed"] == "true"
            assert again.content == first.content
            dupes = await asyncio.gather(*[
                c.post("/v1/responses", json=chat_body(stream=True),
                       headers={"idempotency-key": "order-43"}) for _ in range(3)
            ])
            assert sorted(d.status_code for d in dupes) == [200, 409, 409]
            assert model.stats.requests == runs + 2
            # a client that leaves mid-stream: the model stops, what streamed is charged,
            # the slot is free. (On the EventStreamResponse route, which closes its source
            # when cut: Starlette's StreamingResponse leaves its iterator to the garbage
            # collector, which with a middleware function inside the stack sometimes
            # finalizes it only after the request has settled. README: limitations.)
            used = await counters(limiter, "k1")
            generated = model.stats.tokens_generated
            async with c.stream("POST", "/v1/responses",
                                json=chat_body(stream=True, max_tokens=500)) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data:") and "content" in line and '""' not in line:
                        break
            await slot_freed(limiter, "k1")
            streamed = model.stats.tokens_generated - generated
            assert model.stats.cancelled == 1 and 0 < streamed < 20
            charged = (await counters(limiter, "k1"))["tokens:60"] - used["tokens:60"]
            assert charged == 8 + streamed  # (the prompt's 8 and what streamed)
            # bad input: typed 4xx answers
            r = await c.post("/v1/chat/completions", content=b"{not json",
                             headers={"content-type": "application/json"})
            assert (r.status_code, r.headers["content-type"]) == (400, "application/problem+json")
            r = await c.post("/v1/chat/completions", json=chat_body(),
                             headers={"idempotency-key": "x" * 300})
            assert r.status_code == 400
        # (the JSON answers and the whole stream: not the one its client left)
        assert app.state.background == ["logged"] * 3
    assert not errors, [r.getMessage() for r in errors]


async def run_again_then_replayed(
    c: httpx.AsyncClient, body: dict[str, Any], calls: list[str]
) -> None:
    """After a first call whose stream was cut: the retry with the same key runs the handler
    again and gets the whole stream, and that whole answer is the one kept (a third try
    replays it)."""
    async with aconnect_sse(c, "POST", "/v1/chat/completions", json=body) as source:
        assert "idempotent-replayed" not in source.response.headers
        data = [event.data async for event in source.aiter_sse()]
    assert calls == ["call", "call"]
    assert data[-1] == "[DONE]" and len(data) >= 21 and "t19 " in "".join(data)
    async with aconnect_sse(c, "POST", "/v1/chat/completions", json=body) as source:
        assert source.response.headers["idempotent-replayed"] == "true"
        assert [event.data async for event in source.aiter_sse()] == data


def add_timing(app: FastAPI) -> None:
    """An ``@app.middleware("http")`` function (defined before install(): inside the stack)
    that adds a header to each response."""

    @app.middleware("http")
    async def timing(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["x-process-time"] = "0.1"
        return response


class ModelError(Exception):
    """A model call that fails after some of its answer streamed."""


def keyed_stream_app(route: str, cut: str) -> tuple[FastAPI, list[str]]:
    """``POST /v1/chat/completions``, a 20-event stream (a Starlette ``StreamingResponse``,
    or an ``EventStreamResponse``) behind an ``@app.middleware("http")`` function inside the
    stack, with idempotency; its first call slow (50 ms an event), the others at once.
    ``cut``: how the first call's stream is cut (see the tests; ``raises``: its iterator
    raises after 3 events, at once). Returns the app and the handler's calls."""
    app = FastAPI()
    calls: list[str] = []

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> Any:
        calls.append("call")
        first = len(calls) == 1
        delay = 0.05 if first and cut != "raises" else 0.0

        async def tokens() -> AsyncIterator[str]:
            for i in range(20):
                if first and cut == "raises" and i == 3:
                    raise ModelError("the model failed midway")
                await anyio.sleep(delay)
                yield f"t{i} "

        if route == "events":
            return EventStreamResponse(tokens(), dialect=OpenAIChatDialect.for_request(body))

        async def sse() -> AsyncIterator[str]:
            async for token in tokens():
                yield f"data: {json.dumps({'content': token})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    add_timing(app)

    cancellation = {
        "left-uncancelled": CancellationConfig(cancel_on_disconnect=False),
        "left-no-cancellation-layer": None,
        "left": CancellationConfig(),
        "time-limit": CancellationConfig(timeouts={"/v1/*": 0.3}),
        "raises": CancellationConfig(),
    }[cut]
    install(app, StackConfig(idempotency=IdempotencyConfig(), usage=UsageConfig(),
                             cancellation=cancellation))
    return app, calls


@pytest.mark.parametrize("form", ["stack", "layers"])
@pytest.mark.parametrize("route", ["streaming-response", "events"])
@pytest.mark.parametrize(
    "cut", ["left-uncancelled", "left-no-cancellation-layer", "left", "time-limit"]
)
async def test_a_cut_stream_through_the_middleware_is_not_replayed(
    caplog: pytest.LogCaptureFixture, form: str, route: str, cut: str
) -> None:
    """An ``@app.middleware("http")`` function inside the stack relays the endpoint's body
    and ends it with a clean last message however the endpoint stopped. A client that left
    a keyed stream midway where the endpoint is not cancelled for it (cancel_on_disconnect
    off, or no cancellation layer: the endpoint's response sees the disconnect and returns)
    had its stream ended that way, and the idempotency layer stored it as the answer: the
    retry with the same Idempotency-Key got 3 events and no end, Idempotent-Replayed, the
    handler not run again. A cut end of a body of undeclared length (the client gone, or
    the time limit's scope cancelled) now releases the key: the retry runs the handler and
    gets the whole stream. (A client that left with cancel_on_disconnect on, and the time
    limit, cancel the function with the endpoint: no end is sent, and none was stored.)"""
    app, calls = keyed_stream_app(route, cut)
    if form == "layers":
        split_stack(app)
    headers = {**AUTH, "idempotency-key": "order-7"}
    body = chat_body(stream=True)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, headers=headers) as c:
        events: list[str] = []
        async with aconnect_sse(c, "POST", "/v1/chat/completions", json=body) as source:
            assert source.response.headers["x-process-time"] == "0.1"
            with contextlib.suppress(httpx.RemoteProtocolError):  # (a time limit mid-event)
                async for event in source.aiter_sse():
                    events.append(event.data)
                    if cut.startswith("left") and len(events) == 3:
                        break  # the client leaves
        assert len(events) < 15 and not any("t19" in data for data in events)  # cut
        await anyio.sleep(0.5)  # (the first call is over; its stream ended or was cut)
        await run_again_then_replayed(c, body, calls)
    assert calls == ["call", "call"]


async def test_a_whole_answer_of_declared_length_whose_client_left_is_still_kept() -> None:
    """The other side of the rule above: a JSON answer (its Content-Length declared and
    filled) that the endpoint finished after its client left (cancel_on_disconnect off) is
    whole, and is kept for the retry, as before."""
    app = FastAPI()
    calls: list[int] = []

    @app.post("/v1/chat")
    async def chat() -> dict[str, Any]:
        calls.append(1)
        await anyio.sleep(0.3)
        return {"answer": "whole", "n": len(calls)}

    @app.middleware("http")
    async def timing(request: Request, call_next: Any) -> Any:
        return await call_next(request)

    install(app, StackConfig(idempotency=IdempotencyConfig(),
                             cancellation=CancellationConfig(cancel_on_disconnect=False)))
    headers = {**AUTH, "idempotency-key": "order-8"}
    async with serve(app) as url, httpx.AsyncClient(base_url=url, headers=headers) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/v1/chat", json={}, timeout=0.1)  # the client leaves
        await anyio.sleep(0.5)
        r = await c.post("/v1/chat", json={})
    assert r.headers["idempotent-replayed"] == "true"
    assert (r.json(), calls) == ({"answer": "whole", "n": 1}, [1])


@pytest.mark.parametrize("form", ["stack", "layers"])
@pytest.mark.parametrize("route", ["streaming-response", "events"])
async def test_a_stream_whose_iterator_raises_through_the_middleware_is_not_replayed(
    form: str, route: str
) -> None:
    """The endpoint's iterator raises after 3 events (a model error) behind an
    ``@app.middleware("http")`` function inside the stack. BaseHTTPMiddleware catches the
    exception in the task that runs the endpoint, ends the body it relays with a clean last
    message, and re-raises the exception only after that: the idempotency layer took the
    clean end for the answer's and stored the 3 events, so a retry with the same
    Idempotency-Key got them replayed (Idempotent-Replayed, no [DONE], the handler not run
    again). The record of a body of undeclared length is now completed once the app
    returns, and the exception releases the key: the retry runs the handler and gets the
    whole stream, a third try replays it. (An EventStreamResponse ends a failed stream with
    its error event, which was never stored: held before, tested here too.)"""
    app, calls = keyed_stream_app(route, "raises")
    if form == "layers":
        split_stack(app)
    headers = {**AUTH, "idempotency-key": "order-9"}
    body = chat_body(stream=True)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, headers=headers) as c:
        async with aconnect_sse(c, "POST", "/v1/chat/completions", json=body) as source:
            assert source.response.headers["x-process-time"] == "0.1"
            first = [event.data async for event in source.aiter_sse()]
        assert "t3 " not in "".join(first) and "t2 " in "".join(first)  # cut at the error
        await run_again_then_replayed(c, body, calls)
    assert calls == ["call", "call"]


@pytest.mark.parametrize("form", ["stack", "layers"])
async def test_a_body_cut_short_of_its_content_length_is_not_replayed(form: str) -> None:
    """The same through the function for a body of declared length (a download passed on
    with its upstream's Content-Length) whose iterator raises midway: the function's clean
    end came after 20 of its 50 bytes, the recording completed the record on it, and every
    retry with the same Idempotency-Key got the 20 bytes under ``content-length: 50``, a
    broken answer (httpx: "peer closed connection without sending complete message body"),
    the handler never run again. A body that ends short of its declared length now
    releases the key: the retry runs the handler and gets the 50 bytes, a third try
    replays them."""
    app = FastAPI()
    calls: list[str] = []

    @app.post("/v1/files/report")
    async def report() -> StreamingResponse:
        calls.append("call")
        fails = len(calls) == 1

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(5):
                if fails and i == 2:
                    raise ModelError("the upstream failed midway")
                yield b"0123456789"

        return StreamingResponse(chunks(), media_type="application/octet-stream",
                                 headers={"content-length": "50"})

    add_timing(app)

    install(app, StackConfig(idempotency=IdempotencyConfig()))
    if form == "layers":
        split_stack(app)
    headers = {**AUTH, "idempotency-key": "order-10"}
    async with serve(app) as url, httpx.AsyncClient(base_url=url, headers=headers) as c:
        with pytest.raises(httpx.RemoteProtocolError, match="received 20 bytes, expected 50"):
            await c.post("/v1/files/report")
        r = await c.post("/v1/files/report")
        assert "idempotent-replayed" not in r.headers
        assert r.content == b"0123456789" * 5 and calls == ["call", "call"]
        r = await c.post("/v1/files/report")
        assert r.headers["idempotent-replayed"] == "true" and r.content == b"0123456789" * 5
    assert calls == ["call", "call"]


@pytest.mark.parametrize("form", ["stack", "layers"])
async def test_a_call_whose_client_left_before_its_head_is_charged_in_both_forms(
    caplog: pytest.LogCaptureFixture, form: str
) -> None:
    """A ``@rate_limit`` endpoint returned its value (the model was called), then the client
    left while an ``@app.middleware("http")`` function inside the stack still held the
    response: the request is cancelled and ended with the empty 499 of a client gone, which
    is no response to anyone: ``ctx.response_status`` stays None for the after-response
    hooks, and the decorator's settlement by the response charges the call (a client gone
    with no response: ``failed_response``). Chained, the context layer took the cancellation
    layer's own 499 for the response, so the call was refunded in full there."""
    returned, ended = anyio.Event(), anyio.Event()
    seen: list[int | None] = []
    app = FastAPI()

    @app.post("/v1/chat")
    @rate_limit(Policy(requests="1/minute"))
    async def chat() -> dict[str, Any]:
        returned.set()  # (the model was called)
        return {"ok": True}

    contexts: list[RequestContext] = []

    async def note_end() -> None:  # (after the decorator's hook: registered after it)
        seen.append(contexts[0].response_status)
        ended.set()

    @app.middleware("http")  # inside the stack: added before install()
    async def audit(request: Request, call_next: Any) -> Any:
        contexts.append(current())
        response = await call_next(request)
        try:
            await anyio.sleep(10)  # (writing an audit row, say)
        finally:
            after_response(contexts[0], note_end)
        return response

    install(app)
    if form == "layers":
        split_stack(app)
    with server_errors(caplog) as errors:
        async with serve(app) as url:
            host, port = url.removeprefix("http://").split(":")
            body = b'{"model": "gpt-4o-mini"}'
            stream = await anyio.connect_tcp(host, int(port))
            await stream.send(
                b"POST /v1/chat HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"authorization: Bearer k1\r\ncontent-length: %d\r\n\r\n" % len(body) + body
            )
            with anyio.fail_after(5):
                await returned.wait()
            await stream.aclose()
            with anyio.fail_after(5):
                await ended.wait()
    assert seen == [None]
    assert await counters(chat.rate_limiter, "k1") == {"requests:60": 1}  # type: ignore[attr-defined]
    assert not errors, [r.getMessage() for r in errors]
