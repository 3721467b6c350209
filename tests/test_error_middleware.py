"""ErrorMiddleware through real servers and real clients: the openai SDK, httpx."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import openai
import pytest
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import aimiddleware
from aimiddleware import errors as E
from aimiddleware.context import current
from tests.live_server import live_server, serve
from tests.test_errors import all_error_classes, instantiate

attempts: Counter[str] = Counter()


class Chat(BaseModel):
    model: str
    max_tokens: int = 16


def build_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: Chat) -> dict[str, Any]:
        kind = request.headers.get("x-raise", "")
        attempts[kind] += 1
        if kind == "rate_limited":
            raise E.RateLimited(
                "60/minute exceeded", retry_after=0.01, extra={"dimension": "requests"}
            )
        if kind == "quota":
            raise E.QuotaExceeded("Daily cost budget exhausted.")
        if kind == "invalid":
            raise E.InvalidRequest("messages must not be empty", param="messages")
        if kind == "crash":
            raise RuntimeError("db password=hunter2 while handling 'my secret prompt'")
        if kind == "http":
            raise HTTPException(404, "no such model")
        if kind == "echo-model":  # an app naming the model it was sent, as many do
            raise E.NotFound(f"The model {body.model} does not exist.", param="model")
        if kind == "nan-wait":  # a wait read from somewhere with float(), say "nan"
            raise E.Overloaded(retry_after=float("nan"))
        if kind == "http-echo-model":
            raise HTTPException(404, f"The model {body.model} does not exist.")
        if kind.startswith("class:"):
            cls = next(c for c in all_error_classes() if c.__name__ == kind[6:])
            raise instantiate(cls)
        return {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "hi"},
                }
            ],
        }

    @app.get("/broken-stream")
    async def broken_stream() -> StreamingResponse:
        async def gen() -> Any:
            yield b"partial "
            raise RuntimeError("boom")

        return StreamingResponse(gen(), media_type="text/plain")

    @app.get("/sse-error")
    async def sse_error() -> StreamingResponse:
        ctx = current()
        written: list[bytes] = []
        ctx.state["written"] = written

        async def writer(err: E.AIError) -> None:
            written.append(err.code.encode())

        ctx.stream_error_writer = writer

        async def gen() -> Any:
            yield b"data: 1\n\n"
            raise E.UpstreamTimeout()

        return StreamingResponse(gen(), media_type="text/event-stream")

    aimiddleware.install(app)
    return app


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with live_server(build_app()) as url:
        yield url


def sdk(base_url: str, max_retries: int = 2) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="sk-test", max_retries=max_retries)


def call(client: openai.OpenAI, kind: str) -> Any:
    return client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-raise": kind}
    )


def test_success_passes_through(base_url: str) -> None:
    out = call(sdk(base_url), "")
    assert out.choices[0].message.content == "hi"


def test_rate_limited_is_retried_then_raises_with_our_code_and_type(base_url: str) -> None:
    attempts.clear()
    with pytest.raises(openai.RateLimitError) as info:
        call(sdk(base_url, max_retries=2), "rate_limited")
    assert attempts["rate_limited"] == 3  # retryable: the SDK tried 1 + 2 times
    assert info.value.code == "rate_limited" and info.value.type == "rate_limit_error"
    assert info.value.response.headers["retry-after-ms"] == "10"
    assert info.value.response.json()["dimension"] == "requests"


def test_quota_exceeded_is_a_429_the_sdk_does_not_retry(base_url: str) -> None:
    attempts.clear()
    with pytest.raises(openai.RateLimitError) as info:
        call(sdk(base_url, max_retries=2), "quota")
    assert attempts["quota"] == 1
    assert info.value.code == "quota_exceeded" and info.value.type == "insufficient_quota"
    assert info.value.response.headers["x-should-retry"] == "false"


def test_bad_request_error(base_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        call(sdk(base_url), "invalid")
    assert info.value.code == "invalid_request" and info.value.param == "messages"


def test_crash_is_internal_server_error_without_leaks(base_url: str) -> None:
    attempts.clear()
    with pytest.raises(openai.InternalServerError) as info:
        call(sdk(base_url, max_retries=0), "crash")
    text = info.value.response.text
    assert "hunter2" not in text and "secret prompt" not in text and "Traceback" not in text
    assert info.value.code == "internal"
    rid = info.value.response.headers["x-request-id"]
    assert info.value.response.json()["request_id"] == rid


def test_fastapi_http_exception_renders_in_the_taxonomy(base_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        call(sdk(base_url), "http")
    assert info.value.code == "not_found" and "no such model" in str(info.value.message)


def test_fastapi_validation_error_renders_in_the_taxonomy(base_url: str) -> None:
    r = httpx.post(base_url + "/v1/chat/completions", json={"model": "m", "max_tokens": "lots"})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(
        base_url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_failed"


@pytest.mark.parametrize("kind", ["echo-model", "http-echo-model"])
def test_an_error_detail_with_a_lone_surrogate_is_still_its_typed_problem(
    base_url: str, kind: str
) -> None:
    # JSON lets a string carry half a surrogate pair ("\ud83d"); UTF-8 cannot. An error
    # whose detail names such a value was a bare text/plain 500 (an AIError) or an
    # `internal` 500 (an HTTPException) instead of its 404.
    r = httpx.post(
        base_url + "/v1/chat/completions",
        content=b'{"model": "gpt-\\ud83d", "messages": []}',
        headers={"content-type": "application/json", "x-raise": kind},
    )
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["error"]["code"] == "not_found"
    assert body["detail"] == "The model gpt-\ud83d does not exist."
    assert body["error"]["message"] == body["detail"]


def test_a_retry_after_that_is_not_a_number_still_renders_the_error(base_url: str) -> None:
    # math.ceil(nan) raised while rendering: a bare text/plain 500 instead of the 503.
    r = httpx.post(base_url + "/v1/chat/completions", json={"model": "m"},
                   headers={"x-raise": "nan-wait"})
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["error"]["code"] == "overloaded"
    assert r.headers["x-should-retry"] == "true" and "retry-after" not in r.headers


def test_unknown_route_and_method(base_url: str) -> None:
    r = httpx.get(base_url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(base_url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"


EXPECTED_SDK_CLASS = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_parses_as_problem_json_and_through_the_sdk(
    base_url: str, cls: type[E.AIError]
) -> None:
    err = instantiate(cls)
    r = httpx.post(
        base_url + "/v1/chat/completions",
        json={"model": "m"},
        headers={"x-raise": f"class:{cls.__name__}"},
    )
    assert r.status_code == err.status
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == err.status and body["error"]["code"] == err.code
    with pytest.raises(openai.APIStatusError) as info:
        call(sdk(base_url, max_retries=0), f"class:{cls.__name__}")
    expected = EXPECTED_SDK_CLASS.get(
        err.status, openai.InternalServerError if err.status >= 500 else openai.APIStatusError
    )
    assert isinstance(info.value, expected)
    assert info.value.code == err.code and info.value.type == err.openai_type


def test_error_after_start_closes_the_connection_and_logs(
    base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="aimiddleware"),
        pytest.raises(httpx.RemoteProtocolError),
    ):
        httpx.get(base_url + "/broken-stream")
    assert any("after the response started" in r.getMessage() for r in caplog.records)


async def test_error_after_start_of_an_event_stream_goes_to_the_stream_writer() -> None:
    app = build_app()
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/sse-error",
        "raw_path": b"/sse-error",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("t", 80),
        "scheme": "http",
        "root_path": "",
        "http_version": "1.1",
    }
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        import anyio

        await anyio.sleep(10)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    state = scope["state"]["aimiddleware"].state  # type: ignore[index]
    assert state["written"] == [b"upstream_timeout"]
    assert sent[0]["status"] == 200


async def test_starlette_app_with_middleware_added_directly() -> None:
    async def boom(request: Request) -> Any:
        raise E.Overloaded(status=529, retry_after=2)

    app = Starlette(routes=[Route("/", boom)])
    app.add_middleware(aimiddleware.ErrorMiddleware)
    app.add_middleware(aimiddleware.RequestContextMiddleware)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/")
    assert r.status_code == 529 and r.headers["retry-after"] == "2"
    assert r.json()["request_id"] == r.headers["x-request-id"]


def test_error_middleware_validates_its_options() -> None:
    with pytest.raises(ValueError):
        aimiddleware.ErrorMiddleware(
            build_app(), mapper=E.ExceptionMapper(), mappings={KeyError: lambda e: None}
        )


async def test_an_on_error_hook_that_raises_does_not_replace_the_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aimiddleware import ErrorMiddleware, NotFound, RequestContextMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise NotFound("nothing here")

    def hook(err: Any, exc: BaseException) -> None:
        raise RuntimeError("the hook broke")

    wrapped = RequestContextMiddleware(ErrorMiddleware(app, on_error=hook))
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/")
    assert r.status_code == 404 and r.json()["detail"] == "nothing here"
    assert any("on_error callback failed" in rec.message for rec in caplog.records)


def test_the_apps_own_handlers_registered_before_install_are_kept() -> None:
    # install() replaced them: an app's own 400 for validation errors became a 422.
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse

    app = FastAPI()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"mine": "invalid"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"mine": "http"}, status_code=418)

    @app.post("/v1/chat/completions")
    async def chat(body: Chat) -> dict[str, Any]:
        return {"ok": True}

    aimiddleware.install(app)
    with live_server(app) as url:
        bad = httpx.post(url + "/v1/chat/completions", json={"model": "m", "max_tokens": "x"})
        missing = httpx.get(url + "/nope")
    assert (bad.status_code, bad.json()) == (400, {"mine": "invalid"})
    assert (missing.status_code, missing.json()) == (418, {"mine": "http"})
    assert bad.headers["x-request-id"]  # (the stack still runs around them)


def shutdown_app(form: str, started: list[str]) -> Starlette:
    """A plain route and an event stream that run until something cancels them."""

    async def slow(request: Request) -> JSONResponse:
        started.append("slow")
        await anyio.sleep(30)
        return JSONResponse({})

    async def stream(request: Request) -> aimiddleware.EventStreamResponse:
        async def events() -> AsyncIterator[str]:
            yield "first"
            started.append("stream")
            await anyio.sleep(30)
            yield "never"

        return aimiddleware.EventStreamResponse(events())

    app = Starlette(routes=[Route("/slow", slow, methods=["POST"]), Route("/stream", stream)])
    if form == "install":
        aimiddleware.install(app)
    else:  # the layers one by one (the last one added is the outermost)
        app.add_middleware(aimiddleware.ErrorMiddleware)
        app.add_middleware(aimiddleware.RequestContextMiddleware)
    return app


@pytest.mark.parametrize("form", ["install", "layers"])
async def test_requests_the_server_cancels_at_shutdown_get_a_typed_end(form: str) -> None:
    """uvicorn cancels what still runs past --timeout-graceful-shutdown (1 s here): a request
    not yet answered got uvicorn's bare text/plain 500, an event stream was cut without an
    end. Now: a retryable problem+json 503, and the stream's error event."""
    started: list[str] = []
    lines: list[str] = []

    async def read(client: httpx.AsyncClient, url: str) -> None:
        try:
            async with client.stream("GET", url + "/stream") as r:
                async for line in r.aiter_lines():
                    lines.append(line)
        except httpx.TransportError:
            lines.append("<cut>")

    async with httpx.AsyncClient(timeout=10) as client:
        # (serve() shuts the server down first; the stream's reader ends with it)
        async with anyio.create_task_group() as tg, serve(shutdown_app(form, started)) as url:
            plain = asyncio.ensure_future(client.post(url + "/slow"))
            tg.start_soon(read, client, url)
            with anyio.fail_after(5):
                while len(started) < 2:  # noqa: ASYNC110 - the server runs in this loop
                    await anyio.sleep(0.01)
        r = await plain
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["x-should-retry"] == "true" and r.headers["x-request-id"]
    assert r.json()["error"]["code"] == "overloaded"
    assert "event: error" in lines and "<cut>" not in lines
    error = json.loads(next(x for x in lines if x.startswith("data:") and "overloaded" in x)[5:])
    assert error["error"]["code"] == "overloaded" and error["retryable"] is True
