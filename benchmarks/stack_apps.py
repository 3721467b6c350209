"""The apps the full-stack benchmarks drive: the same Starlette routes, bare and installed."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import aimiddleware
from aimiddleware import (
    IdempotencyConfig,
    ModelRegistry,
    Policy,
    PriceTable,
    StackConfig,
    TokenCounter,
    UsageConfig,
    VersioningConfig,
)

PROMPT_1KB = ("Summarise the following support ticket in two sentences. " * 18)[:1024]


def chat_body(prompt: str = "hello") -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": prompt}],
    }


async def chat(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "ok"},
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
        }
    )


async def item(request: Request) -> JSONResponse:
    """A plain JSON route (no model, no usage): what the stack costs an app's other routes."""
    return JSONResponse({"id": 1, "object": "item", "name": "widget", "tags": ["a", "b"]})


PLAIN_PATH = "/v1/items/1"


def routes() -> list[Route]:
    return [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route(PLAIN_PATH, item, methods=["GET"]),
    ]


def slowapi_app(path: str, endpoint: Any, method: str) -> Starlette:
    """``endpoint`` at ``path`` behind slowapi's decorator with one generous limit (by client
    address, in memory), as its documentation sets it up."""
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.util import get_remote_address

    limiter = Limiter(key_func=get_remote_address, storage_uri="memory://")

    @limiter.limit("100000000/minute")
    async def limited(request: Request) -> JSONResponse:
        return await endpoint(request)  # type: ignore[no-any-return]

    app = Starlette(routes=[Route(path, limited, methods=[method])])
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    return app


def bare() -> Starlette:
    return Starlette(routes=routes())


def stack_config(counter: TokenCounter | None = None, storage: str = "memory://") -> StackConfig:
    registry = ModelRegistry()
    registry.add_snapshot("gpt-4o-mini-2024-07-18")
    registry.alias("gpt-4o-mini", "gpt-4o-mini-2024-07-18")
    prices = PriceTable.from_dict(
        {"gpt-4o-mini-2024-07-18": {"input": Decimal("0.15"), "output": Decimal("0.60")}}
    )
    counter = counter or TokenCounter()
    return StackConfig(
        storage=storage,
        versioning=VersioningConfig(registry=registry),
        idempotency=IdempotencyConfig(),
        # Four dimensions, generous enough never to refuse during a run.
        ratelimit=Policy(
            requests="100000000/minute",
            tokens="100000000000/minute",
            cost="100000000/day",
            concurrency=10_000,
        ),
        usage=UsageConfig(prices=prices, counter=counter),
    )


def full(counter: TokenCounter | None = None, storage: str = "memory://") -> Starlette:
    return aimiddleware.install(Starlette(routes=routes()), stack_config(counter, storage))  # type: ignore[no-any-return]
