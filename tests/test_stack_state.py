"""The fused stack leaves the same rate-limit and ledger state as the chained layers.

``_Exchange.run`` inlines ``run_request`` and ``serve`` for an in-process store; the answers
are compared in test_stack_middleware.py, this compares what each request leaves behind
(counters after reconciliation, leases in flight, the ledger's aggregates) in the cases where
the inlined steps could diverge: errors before and after the head, usage reported and then an
error, usage reported by a background task, a body in chunks, a timeout."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import aimiddleware
from aimiddleware import InvalidRequest, Usage, UsageConfig, report_usage
from aimiddleware.ratelimit.middleware import RateLimitMiddleware
from aimiddleware.stack_middleware import StackMiddleware
from aimiddleware.usage.ledger import MemoryLedger
from tests.ratelimit_helpers import counters, principal_of
from tests.test_stack_middleware import ROUTES, chat_scope, config, post


async def stream_crash(request: Request) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        yield b'data: {"choices":[{"delta":{"content":"a"},"finish_reason":null}]}\n\n'
        raise RuntimeError("mid-stream")

    return StreamingResponse(events(), media_type="text/event-stream")


async def reported_then_refused(request: Request) -> Response:
    report_usage(Usage(input_tokens=40, output_tokens=2), finish_reason="stop")
    raise InvalidRequest("after the call", param="messages")


async def background_usage(request: Request) -> Response:
    def later() -> None:
        report_usage(Usage(input_tokens=30, output_tokens=9), finish_reason="stop")

    return Response(b"ok", media_type="text/plain", background=BackgroundTask(later))


async def chunked_json(request: Request) -> StreamingResponse:
    async def parts() -> AsyncIterator[bytes]:
        yield b'{"model":"m-2024","choices":[],'
        yield b'"usage":{"prompt_tokens":11,"completion_tokens":4,"total_tokens":15}}'

    return StreamingResponse(parts(), media_type="application/json")


async def crash_after_json(request: Request) -> Response:
    return JSONResponse(
        {"usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
        background=BackgroundTask(_boom),
    )


def _boom() -> None:
    raise RuntimeError("after the response")


EXTRA = [
    Route("/v1/stream-crash", stream_crash, methods=["POST"]),
    Route("/v1/reported-refused", reported_then_refused, methods=["POST"]),
    Route("/v1/background", background_usage, methods=["POST"]),
    Route("/v1/chunked", chunked_json, methods=["POST"]),
    Route("/v1/crash-after", crash_after_json, methods=["POST"]),
]

PATHS = [
    "/v1/chat", "/v1/stream", "/v1/refuse", "/v1/crash", "/v1/text", "/v1/slow",
    "/v1/stream-crash", "/v1/reported-refused", "/v1/background", "/v1/chunked",
    "/v1/crash-after",
]  # fmt: skip


def installed(routes: list[Any], cfg: Any, fused: bool) -> Any:
    """``routes`` behind ``install(cfg)``: its one StackMiddleware (``fused``), or the same
    layers added one by one (the chain)."""
    app = aimiddleware.install(Starlette(routes=routes), cfg)
    if not fused:
        (stack,) = app.user_middleware
        app.user_middleware.clear()
        for cls, options in reversed(stack.kwargs["layers"]):
            app.add_middleware(cls, **options)
    return app


def build(fused: bool) -> tuple[Any, Any, MemoryLedger]:
    ledger = MemoryLedger()
    cfg = config()
    cfg.usage = UsageConfig(prices=cfg.usage.prices, ledger=ledger)  # type: ignore[union-attr]
    app = aimiddleware.install(Starlette(routes=[*EXTRA, *ROUTES]), cfg)
    (stack,) = app.user_middleware
    assert stack.cls is StackMiddleware  # type: ignore[comparison-overlap]
    layers = stack.kwargs["layers"]
    (limiter,) = [opts["limiter"] for cls, opts in layers if cls is RateLimitMiddleware]
    if not fused:
        app.user_middleware.clear()
        for cls, options in reversed(layers):
            app.add_middleware(cls, **options)
    return app, limiter, ledger


async def state_after_each(fused: bool, key: str) -> list[Any]:
    app, limiter, ledger = build(fused)
    assert limiter.finishes_now  # the inlined path is the one under test
    principal = principal_of(key)
    out: list[Any] = []
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for path in PATHS:
            r = await client.post(path, headers={"authorization": f"Bearer {key}"}, **post())
            aggs = await ledger.query(principal)
            out.append((
                path,
                r.status_code,
                await counters(limiter, key),
                await limiter.backend.in_flight(principal),
                [(a.model, a.requests, a.input_tokens, a.output_tokens, a.total_tokens)
                 for a in aggs],
            ))
    return out


async def test_fused_stack_leaves_the_state_the_chained_layers_leave() -> None:
    fused = await state_after_each(True, "sk-review")
    chained = await state_after_each(False, "sk-review")
    for got, want in zip(fused, chained, strict=True):
        assert got == want, got[0]
    assert all(row[3] == 0 for row in fused)  # no lease left in flight


class HeldThenSlow:
    """A JSON head (held by the usage layer for its body), then past the deadline."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        import anyio

        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await anyio.sleep(5)


async def test_a_deadline_after_a_held_head_answers_as_the_chained_layers() -> None:
    from aimiddleware import CancellationConfig
    from tests.test_stack_middleware import shape

    results = []
    for fused in (True, False):
        ledger = MemoryLedger()
        cfg = config()
        cfg.usage = UsageConfig(prices=cfg.usage.prices, ledger=ledger)  # type: ignore[union-attr]
        cfg.cancellation = CancellationConfig(timeouts={"/v1/held": 0.05})
        app = installed([Route("/v1/held", HeldThenSlow()), *ROUTES], cfg, fused)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.post("/v1/held", headers={"authorization": "Bearer k"}, **post())
            after = await client.post("/v1/chat", headers={"authorization": "Bearer k"}, **post())
        aggs = await ledger.query(principal_of("k"))
        results.append((shape(r), shape(after)[0], [(a.requests, a.finish_reasons) for a in aggs]))
    assert results[0][0][0] == 504
    assert results[0] == results[1]


async def test_a_disconnect_during_an_io_ledger_write_still_records_fused_and_chained() -> None:
    """The inlined serve steps shield the ledger write; here the cancellation layer (a
    spliced scope on asyncio) cuts the request on a disconnect that arrives mid-write."""
    found = [await _disconnect_mid_write(True), await _disconnect_mid_write(False)]
    assert found[0] == (200, [(1, 10)])
    assert found[0] == found[1]


async def _disconnect_mid_write(fused: bool) -> tuple[int, list[tuple[int, int]]]:
    import anyio

    from aimiddleware import CancellationConfig
    from aimiddleware.usage.ledger import UsageRecord

    writing = anyio.Event()

    class SlowLedger(MemoryLedger):
        does_io = True  # awaited, shielded: not the in-process fast path

        async def record(self, rec: UsageRecord) -> None:
            writing.set()
            await anyio.sleep(0.1)
            await super().record(rec)

    ledger = SlowLedger()
    cfg = config()
    cfg.usage = UsageConfig(prices=cfg.usage.prices, ledger=ledger)  # type: ignore[union-attr]
    cfg.cancellation = CancellationConfig(watch_after=0)
    app = installed(ROUTES, cfg, fused)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    scope = chat_scope(app=app)
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []
    delivered: list[bool] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await writing.wait()  # the client goes while the ledger is being written
        delivered.append(True)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await app(scope, receive, send)
    aggs = await ledger.query(principal_of("k"))
    assert delivered  # the disconnect reached the watcher mid-write
    return sent[0]["status"], [(a.requests, a.total_tokens) for a in aggs]


@pytest.mark.parametrize(("cut", "reason"), [("disconnect", "cancelled"), ("timeout", "error")])
async def test_a_non_streaming_request_cut_before_its_answer_has_its_row(
    cut: str, reason: str
) -> None:
    """Abandoned by its client, or past its time limit: it was charged (the limiter kept its
    reservation) but had no row in the usage history, fused or chained: the usage layer
    settled before the cancellation layer named the reason. (A stream names its own.)"""
    found = [await _cut(True, cut), await _cut(False, cut)]
    assert found[0] == [(1, {reason: 1})]
    assert found[0] == found[1]


async def _cut(fused: bool, cut: str) -> list[tuple[int, dict[str, int]]]:
    import anyio

    from aimiddleware import CancellationConfig

    async def slow(request: Request) -> Response:
        await request.body()
        await anyio.sleep(30)  # (the model call nobody waits for)
        return JSONResponse({})

    ledger = MemoryLedger()
    cfg = config()
    cfg.usage = UsageConfig(prices=cfg.usage.prices, ledger=ledger)  # type: ignore[union-attr]
    cfg.cancellation = CancellationConfig(
        watch_after=0, default_timeout=0.1 if cut == "timeout" else None
    )
    app = installed([Route("/v1/chat", slow, methods=["POST"])], cfg, fused)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    gone = anyio.Event()
    sent: list[int] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        if cut == "disconnect":
            await anyio.sleep(0.1)  # the client goes before the answer
        else:
            await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent.append(message["status"])
        elif not message.get("more_body"):
            gone.set()

    with anyio.fail_after(5):
        await app(chat_scope(app=app), receive, send)
    # (a client gone gets an empty 499 the server drops: see end_abandoned)
    assert sent == ([499] if cut == "disconnect" else [504])
    return [(a.requests, a.finish_reasons) for a in await ledger.query(principal_of("k"))]
