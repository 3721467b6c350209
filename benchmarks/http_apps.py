"""Apps served by uvicorn for the requests-per-second benchmark (``bench_http``).

The same chat route as the in-process full-stack benchmark (``stack_apps``): bare, behind
slowapi's decorator (one limit), and behind the whole stack with its four-dimension policy.
``headers_only`` is bare Starlette adding the stack's response headers (17) as constants:
what the server alone charges for them (uvicorn's h11 validates every header), the floor of
any middleware that sends them. ``floor`` is the hand-written floor of ``floor_app``: the
stack's work on this route in one function.
"""

from __future__ import annotations

import asyncio
import json

from starlette.applications import Starlette

from aimiddleware import TokenCounter
from aimiddleware.types import ASGIApp, Message, Receive, Scope, Send
from benchmarks.floor_app import floor as _floor
from benchmarks.stack_apps import bare as _bare
from benchmarks.stack_apps import chat, routes, slowapi_app
from benchmarks.stack_apps import full as _full

PATH = "/v1/chat/completions"


def _slowapi() -> Starlette:
    return slowapi_app(PATH, chat, "POST")


def _headers_only() -> ASGIApp:
    """Bare Starlette plus a constant copy of the full stack's response headers."""
    inner = _bare()
    added = asyncio.run(_stack_headers())

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], *added]}
            await send(message)

        await inner(scope, receive, with_headers)

    return app


async def _stack_headers() -> list[tuple[bytes, bytes]]:
    """The headers the full stack adds to one chat response (one request through it)."""
    from benchmarks.harness import call, make_request
    from benchmarks.stack_apps import chat_body

    request = make_request(
        "POST",
        PATH,
        json.dumps(chat_body()).encode(),
        [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-bench")],
    )
    _status, messages = await call(_full(), request)
    own = {b"content-length", b"content-type"}  # the route's own
    return [(k, v) for k, v in messages[0]["headers"] if k not in own]


def _floor_app() -> ASGIApp:
    counter = TokenCounter()
    counter.preload("o200k_base")
    return _floor(Starlette(routes=routes()), counter)


bare = _bare()
floor = _floor_app()
headers_only = _headers_only()
slowapi = _slowapi()
stack = _full()
