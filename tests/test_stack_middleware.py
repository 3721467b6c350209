"""StackMiddleware answers exactly as the same layers chained one by one.

Two apps from one configuration: ``install()``'s fused stack, and the layers it lists added
one by one with ``add_middleware`` (the hand-built stack). Every scenario is sent to both;
status, body and the response headers (names in order, values with the per-request parts
masked) must match.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import aimiddleware
from aimiddleware import (
    CancellationConfig,
    IdempotencyConfig,
    InvalidRequest,
    ModelRegistry,
    Policy,
    PriceTable,
    StackConfig,
    UsageConfig,
    VersioningConfig,
)
from aimiddleware.stack_middleware import StackMiddleware

CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "m-2024",
    "choices": [{"index": 0, "finish_reason": "length", "message": {"content": "ok"}}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
}


async def chat(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse(CHAT)


async def own_headers(request: Request) -> JSONResponse:
    # The app sets headers some layers also set: each layer's own rule must hold.
    return JSONResponse(
        CHAT,
        headers={
            "x-request-id": "app-chose-this",
            "x-ratelimit-remaining-requests": "999",
            "deprecation": "@1",
            "link": '</docs>; rel="help"',
        },
    )


async def stream(request: Request) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        yield b'data: {"choices":[{"delta":{"content":"a"},"finish_reason":null}]}\n\n'
        yield (
            b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}\n\n'
        )
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def refuse(request: Request) -> Response:
    raise InvalidRequest("no thanks", param="messages")


async def crash(request: Request) -> Response:
    raise RuntimeError("boom")


async def text(request: Request) -> PlainTextResponse:
    return PlainTextResponse("plain")


async def slow(request: Request) -> Response:
    await anyio.sleep(5)  # over its 50 ms tier: a 504 from the cancellation layer
    return Response(b"{}", media_type="application/json")


async def parse(request: Request) -> Response:
    json.loads(await request.body())  # the client's malformed JSON: a 400, not a 500
    return Response(b"{}", media_type="application/json")


ROUTES = [
    Route("/v1/chat", chat, methods=["POST"]),
    Route("/v1/own", own_headers, methods=["POST"]),
    Route("/v1/stream", stream, methods=["POST"]),
    Route("/v1/refuse", refuse, methods=["POST"]),
    Route("/v1/crash", crash, methods=["POST"]),
    Route("/v1/text", text, methods=["GET", "POST"]),
    Route("/v1/parse", parse, methods=["POST"]),
    Route("/v1/slow", slow, methods=["POST"]),
    Route("/health", text, methods=["GET"]),
]


def config() -> StackConfig:
    registry = ModelRegistry()
    registry.add_snapshot("m-2024")
    registry.add_snapshot(
        "m-old", deprecated="2025-01-01", sunset="2099-01-01", replacement="m-2024"
    )
    registry.alias("m", "m-2024")
    prices = PriceTable.from_dict({"m-2024": {"input": Decimal("1"), "output": Decimal("2")}})
    return StackConfig(
        max_body_size=2000,
        versioning=VersioningConfig(registry=registry, models_path="/v1/models"),
        idempotency=IdempotencyConfig(),
        ratelimit=Policy(requests="1000/minute", tokens="1000000/minute", concurrency=10),
        ratelimit_exempt=("/health",),
        usage=UsageConfig(prices=prices),
        cancellation=CancellationConfig(timeouts={"/v1/slow": 0.05}),
    )


def apps() -> tuple[Starlette, Starlette]:
    """The fused stack, and the same layers (own state) as one middleware each."""
    fused = aimiddleware.install(Starlette(routes=ROUTES), config())
    chained = aimiddleware.install(Starlette(routes=ROUTES), config())
    (stack,) = chained.user_middleware
    assert stack.cls is StackMiddleware  # type: ignore[comparison-overlap]
    chained.user_middleware.clear()
    for cls, options in reversed(stack.kwargs["layers"]):
        chained.add_middleware(cls, **options)
    return fused, chained


VOLATILE = re.compile(rb"^(x-request-id|x-usage-duration-ms|x-ratelimit-reset-\w+)$")


def chat_scope(**extra: Any) -> dict[str, Any]:
    """The ASGI scope of ``POST /v1/chat`` (JSON, caller ``k``), for driving an app directly."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat", "raw_path": b"/v1/chat", "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 1), "server": ("t", 80),
        "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer k")],
        **extra,
    }


def shape(response: httpx.Response) -> tuple[int, list[tuple[bytes, bytes]], Any]:
    headers = []
    for name, value in response.headers.raw:
        if VOLATILE.match(name):
            value = b"*"
        elif name == b"ratelimit":
            value = re.sub(rb";t=\d+", b";t=*", value)
        headers.append((name, value))
    try:
        body: Any = response.json()
        if isinstance(body, dict):
            body.pop("instance", None)  # both carry the request id
            body.pop("request_id", None)
    except ValueError:
        body = response.content
    return response.status_code, headers, body


def post(model: str = "m", *, key: str | None = None, **body: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"json": {"model": model, "messages": [], **body}}
    if key is not None:
        options["headers"] = {"idempotency-key": key}
    return options


SCENARIOS: list[tuple[str, str, dict[str, Any]]] = [
    ("chat", "POST /v1/chat", post(messages=[{"role": "user", "content": "hi"}])),
    ("deprecated model", "POST /v1/chat", post("m-old")),
    ("unknown model", "POST /v1/chat", post("nope")),
    ("app sets our headers", "POST /v1/own", post("m-old")),
    ("event stream", "POST /v1/stream", post()),
    ("typed error", "POST /v1/refuse", post()),
    ("crash", "POST /v1/crash", post()),
    ("plain text", "POST /v1/text", post()),
    ("malformed json", "POST /v1/parse",
     {"content": b"{nope", "headers": {"content-type": "text/plain"}}),
    ("too large", "POST /v1/chat", post(pad="x" * 3000)),
    ("bad content-length", "POST /v1/chat", {"content": b"{}", "headers": {"content-length": "x"}}),
    ("content-length past int()", "POST /v1/chat",
     {"content": b"{}", "headers": {"content-length": "9" * 5000}}),
    ("timeout", "POST /v1/slow", post()),
    ("exempt", "GET /health", {}),
    ("no route", "GET /nowhere", {}),
    ("models list", "GET /v1/models", {}),
    ("models list, wrong method", "POST /v1/models", {}),
    ("idempotent", "POST /v1/chat", post(key="k-1")),
    ("idempotent replay", "POST /v1/chat", post(key="k-1")),
    ("idempotent, other body", "POST /v1/chat", post(key="k-1", temperature=1)),
]  # fmt: skip


@pytest.mark.parametrize("request_id", ["given-id-1", None])
async def test_fused_stack_answers_as_the_chained_layers(request_id: str | None) -> None:
    fused, chained = apps()
    results: dict[str, list[Any]] = {"fused": [], "chained": []}
    for name, app in (("fused", fused), ("chained", chained)):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for _, line, options in SCENARIOS:
                method, path = line.split(" ")
                kwargs = dict(options)
                headers = {"authorization": "Bearer sk-1", **kwargs.pop("headers", {})}
                if request_id is not None:
                    headers["x-request-id"] = request_id
                r = await client.request(method, path, headers=headers, **kwargs)
                results[name].append(shape(r))
                if path == "/v1/own":  # the app's own request id is kept
                    assert r.headers.get_list("x-request-id") == ["app-chose-this"]
                elif request_id is not None:
                    assert r.headers["x-request-id"] == request_id
    labels = [label for label, _, _ in SCENARIOS]
    for label, got, want in zip(labels, results["fused"], results["chained"], strict=True):
        assert got == want, label
    own = results["fused"][labels.index("app sets our headers")][1]
    names = [name for name, _ in own]
    assert names.count(b"deprecation") == 1 and (b"deprecation", b"@1") in own  # the app's
    assert names.count(b"sunset") == 1 and names.count(b"x-model-version") == 1  # the model's
    assert names.count(b"x-ratelimit-remaining-requests") == 1  # ours replaced the app's
    assert (b"x-ratelimit-remaining-requests", b"999") not in own
    statuses = {label: got[0] for label, got in zip(labels, results["fused"], strict=True)}
    assert statuses == {
        "chat": 200, "deprecated model": 200, "unknown model": 404, "app sets our headers": 200,
        "event stream": 200, "typed error": 400, "crash": 500, "plain text": 200,
        "malformed json": 400, "too large": 413, "bad content-length": 400,
        "content-length past int()": 413, "timeout": 504, "exempt": 200, "no route": 404,
        "models list": 200, "models list, wrong method": 405,
        "idempotent": 200, "idempotent replay": 200, "idempotent, other body": 422,
    }  # fmt: skip


async def test_a_request_leaves_no_cyclic_garbage() -> None:
    # Reference cycles would keep every request's objects until a GC run (the cost grows
    # with load); the stack must let them go by reference counting alone.
    fused, _ = apps()
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()

    async def one() -> int:
        sent: list[dict[str, Any]] = []
        scope = chat_scope()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await fused(scope, receive, send)
        return int(sent[0]["status"])

    for _ in range(20):  # warm up: caches, lazy imports
        assert await one() == 200
    gc.collect()
    gc.disable()
    try:
        for _ in range(50):
            await one()
        found = gc.collect()
    finally:
        gc.enable()
    assert found == 0


async def test_fused_in_process_path_records_a_cancelled_request_in_an_io_ledger() -> None:
    """The fused stack runs the usage layer's serve steps inline when rate limiting is in
    process: a ledger doing I/O still gets the record of a request cancelled while it is
    written (shielded), and the response went out with its usage headers first."""
    from aimiddleware.usage.ledger import MemoryLedger, UsageRecord

    class SlowLedger(MemoryLedger):
        does_io = True  # not the in-process fast path: the write is awaited, shielded

        async def record(self, rec: UsageRecord) -> None:
            started.set()
            await anyio.sleep(0.05)
            await super().record(rec)

    started = anyio.Event()
    ledger = SlowLedger()
    cfg = config()
    cfg.usage = UsageConfig(prices=cfg.usage.prices, ledger=ledger)  # type: ignore[union-attr]
    cfg.cancellation = None
    app = aimiddleware.install(Starlette(routes=ROUTES), cfg)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    scope = chat_scope()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with anyio.create_task_group() as tg:
        tg.start_soon(app, scope, receive, send)
        await started.wait()
        tg.cancel_scope.cancel()  # while the ledger write is in progress
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 200 and headers[b"x-usage-total-tokens"] == b"10"
    (agg,) = await ledger.query(next(iter(ledger._requests))[0])
    assert agg.requests == 1 and agg.total_tokens == 10 and agg.model == "m"


def test_bad_usage_and_versioning_configs_are_refused_when_they_are_made() -> None:
    # They were checked only when Starlette built the layers, on the app's first ASGI call:
    # install() took them, and the app's lifespan or every request then failed.
    from aimiddleware.usage import UsageConfig
    from aimiddleware.versioning import ApiVersions, ModelRegistry, VersioningConfig

    for options in ({"max_json_body": -1}, {"header_prefix": "x usage-"},
                    {"header_prefix": "x-usage:"}):
        with pytest.raises(ValueError, match=next(iter(options))):
            UsageConfig(**options)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"PriceTable \(a dict: PriceTable.from_dict"):
        UsageConfig(prices={"gpt-4o": {"input": 1}})  # type: ignore[arg-type]
    versions = ApiVersions(["v1"])
    for options in ({}, {"versions": versions, "models_path": "v1/models"},
                    {"registry": ModelRegistry(), "model_field": None, "model_header": None},
                    {"versions": versions, "migration_path": "migrate"}):
        with pytest.raises(ValueError):
            VersioningConfig(**options)  # type: ignore[arg-type]
    for option in ("model_header", "model_echo_header", "model_version_header"):
        with pytest.raises(ValueError, match=f"^{option} must be a header name"):
            VersioningConfig(registry=ModelRegistry(), **{option: "x model"})
    app = Starlette()
    aimiddleware.install(app, usage=UsageConfig(max_json_body=0),
                         versioning=VersioningConfig(versions=versions))


async def test_bad_context_options_are_refused_by_install() -> None:
    """``max_body_size``, ``request_id_header`` and ``principal`` were checked only when
    Starlette built the stack on the app's first ASGI call (a header name with a space was
    never refused: such a request-id header could not be matched nor sent)."""
    for options, error in (
        ({"max_body_size": -1}, ValueError), ({"max_body_size": "1MB"}, ValueError),
        ({"max_body_size": True}, ValueError), ({"request_id_header": "x request id"}, ValueError),
        ({"request_id_header": "x-request-id:"}, ValueError),
        ({"request_id_header": b"x-request-id"}, TypeError), ({"principal": "k"}, TypeError),
    ):
        with pytest.raises(error, match=next(iter(options))):
            aimiddleware.install(Starlette(), **options)

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = aimiddleware.install(
        Starlette(routes=[Route("/", hello)]), request_id_header="X-Correlation-ID"
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        sent = await c.get("/", headers={"x-correlation-id": "req-from-client-1"})
    assert sent.headers["x-correlation-id"] == "req-from-client-1"
