"""Events per second: EventStreamResponse against sse-starlette and Starlette's StreamingResponse.

Each request streams ``EVENTS`` short events from an async generator through the response
class alone (no middleware), driven in-process by the harness; a sample is the mean time
per request, converted to events per second. Same items where the APIs allow: ``{"data":
tok}`` dicts for both SSE libraries, pre-framed strings for ``StreamingResponse`` (which
frames nothing).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from sse_starlette.sse import EventSourceResponse
from starlette.responses import StreamingResponse

from aimiddleware import CancellationMiddleware, RequestContextMiddleware
from aimiddleware.sse import EventStreamResponse, OpenAIChatDialect
from benchmarks.harness import as_json, compare, make_request, table

EVENTS = 1000
TOKENS = [f"token {i} " for i in range(EVENTS)]


def app_for(make_response: Callable[[], Any]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await make_response()(scope, receive, send)

    return app


async def dicts() -> AsyncIterator[dict[str, str]]:
    for tok in TOKENS:
        yield {"data": tok}


async def strings() -> AsyncIterator[str]:
    for tok in TOKENS:
        yield tok


async def framed() -> AsyncIterator[str]:
    for tok in TOKENS:
        yield f"data: {tok}\n\n"


CONTENDERS: dict[str, Callable[[], Any]] = {
    "sse-starlette EventSourceResponse (dict events)": lambda: EventSourceResponse(dicts()),
    "starlette StreamingResponse (pre-framed str)": lambda: StreamingResponse(
        framed(), media_type="text/event-stream"
    ),
    "aimiddleware EventStreamResponse (dict events)": lambda: EventStreamResponse(dicts()),
    "aimiddleware EventStreamResponse (str deltas, generic JSON)": lambda: EventStreamResponse(
        strings()
    ),
    "aimiddleware EventStreamResponse (str deltas, OpenAI chunks)": lambda: EventStreamResponse(
        strings(), dialect=OpenAIChatDialect("gpt-bench")
    ),
}
ANCHOR = "sse-starlette EventSourceResponse (dict events)"


async def run(quick: bool) -> tuple[str, dict[str, Any]]:
    factory = make_request("GET", "/stream")
    contenders = {name: (app_for(make), factory) for name, make in CONTENDERS.items()}
    results = await compare(
        contenders,
        requests=3 if quick else 20,
        rounds=3 if quick else 7,
        warmup=2 if quick else 10,
    )
    base = results[ANCHOR].median_us
    lines = [
        f"## SSE throughput ({EVENTS} events per response, median of interleaved rounds)",
        "",
        "| contender | events/s | x sse-starlette |",
        "|---|---:|---:|",
    ]
    figures: dict[str, Any] = {"events_per_response": EVENTS, "raw": as_json(results, ANCHOR)}
    for name, res in results.items():
        eps = EVENTS / (res.median_us / 1e6)
        figures[name] = {"events_per_second": eps, "x_sse_starlette": base / res.median_us}
        lines.append(f"| {name} | {eps:,.0f} | {base / res.median_us:.2f}x |")
    overhead_text, overhead = await _cancellation_overhead(quick)
    figures["cancellation_overhead"] = overhead
    return "\n".join(lines) + "\n\n" + overhead_text, figures


def _server(app: Any) -> Any:
    """Receive as an ASGI server does (uvicorn): after the body, ``receive`` waits until the
    response is complete (or the client leaves) and then answers ``http.disconnect``. The
    harness's own ``receive`` blocks for an hour instead, which no server does."""

    async def served(scope: Any, receive: Any, send: Any) -> None:
        done = asyncio.Event()
        first = True

        async def server_receive() -> dict[str, Any]:
            nonlocal first
            if first:
                first = False
                return await receive()  # type: ignore[no-any-return]
            await done.wait()
            return {"type": "http.disconnect"}

        async def server_send(message: dict[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        await app(scope, server_receive, server_send)

    return served


async def _cancellation_overhead(quick: bool) -> tuple[str, dict[str, Any]]:
    """What the disconnect watch costs a small JSON request (it runs on every request)."""
    body = b'{"ok":true}'

    async def json_app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    factory = make_request("POST", "/v1/classify", body=b'{"input":"x"}')
    contenders = {
        "bare app": (_server(json_app), factory),
        "CancellationMiddleware": (_server(CancellationMiddleware(json_app)), factory),
        "Context": (_server(RequestContextMiddleware(json_app)), factory),
        "Context + Cancellation": (
            _server(RequestContextMiddleware(CancellationMiddleware(json_app))), factory
        ),
    }
    results = await compare(
        contenders,
        requests=200 if quick else 2000,
        rounds=3 if quick else 7,
        warmup=50 if quick else 200,
    )
    return table(results, "bare app", "Cancellation layer cost on a JSON request"), as_json(
        results, "bare app"
    )
