"""Idempotency overhead per request: no key, a new key, a replay; memory and Redis.

Contenders run interleaved in one process on the same Starlette app (one POST route that
returns a small JSON body). Our middleware needs the request context, so its baseline is
``RequestContextMiddleware`` alone; the anchor is ``fastapi-idempotency`` 0.1.1
(BaseHTTPMiddleware, memory store). fastapi-idempotency has no Redis store (memory and
Tortoise ORM only), so the Redis rows are ours alone. Bodies differ per request in the
"no key" and "new key" cases: fastapi-idempotency otherwise dedupes identical keyless
requests for 10 s by itself.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aimiddleware import IdempotencyMiddleware, RequestContextMiddleware, Storage
from benchmarks.harness import as_json, compare, make_request, table

Factory = Callable[[], tuple[dict[str, Any], Any]]


def base_app() -> Starlette:
    async def chat(request: Request) -> Response:
        body = await request.body()
        return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "n": len(body)})

    return Starlette(routes=[Route("/v1/chat", chat, methods=["POST"])])


def varying(with_key: bool) -> Factory:
    """A new body (and a new key) on every request."""
    counter = itertools.count()

    def factory() -> tuple[dict[str, Any], Any]:
        n = next(counter)
        headers = [(b"content-type", b"application/json"), (b"authorization", b"Bearer b")]
        if with_key:
            headers.append((b"idempotency-key", f"key-{os.getpid()}-{n}".encode()))
        return make_request("POST", "/v1/chat", f'{{"q":{n}}}'.encode(), headers)()

    return factory


def replaying() -> Factory:
    return make_request(
        "POST",
        "/v1/chat",
        b'{"q":"same"}',
        [
            (b"content-type", b"application/json"),
            (b"authorization", b"Bearer b"),
            (b"idempotency-key", b"replayed-key"),
        ],
    )


def ours(storage: Storage) -> Any:
    return RequestContextMiddleware(
        IdempotencyMiddleware(base_app(), storage=storage, secret="bench-secret-0123456789")
    )


def theirs() -> Any:
    from fastapi_idempotency import IdempotencyMiddleware as FastapiIdempotency

    return FastapiIdempotency(base_app())


async def run(quick: bool) -> tuple[str, dict[str, Any]]:
    redis_server = None
    url = os.environ.get("AIMW_BENCH_REDIS")
    if url is None:
        from tests.redis_server import RedisServer

        redis_server = RedisServer().start()
        url = redis_server.url
    redis_storage = Storage(url)
    sizes = (
        {"requests": 200, "rounds": 3, "warmup": 20}
        if quick
        else {"requests": 1000, "rounds": 7, "warmup": 100}
    )
    try:
        mem, red, fi = ours(Storage("memory://")), ours(redis_storage), theirs()
        baseline = RequestContextMiddleware(base_app())
        contenders = {
            "bare app": (base_app(), varying(False)),
            "context only (our baseline)": (baseline, varying(False)),
            "aimw memory, no key": (mem, varying(False)),
            "aimw memory, new key": (mem, varying(True)),
            "aimw memory, replay": (mem, replaying()),
            "aimw redis, no key": (red, varying(False)),
            "aimw redis, new key": (red, varying(True)),
            "aimw redis, replay": (red, replaying()),
            "fastapi-idempotency memory, no key": (fi, varying(False)),
            "fastapi-idempotency memory, new key": (fi, varying(True)),
            "fastapi-idempotency memory, replay": (fi, replaying()),
        }
        results = await compare(contenders, **sizes)
    finally:
        await redis_storage.aclose()
        if redis_server is not None:
            redis_server.stop()
    anchor = "fastapi-idempotency memory, new key"
    text = table(results, anchor, "Idempotency: µs per request (in-process ASGI)")
    text += (
        "\n\nfastapi-idempotency 0.1.1 has no Redis store (memory and Tortoise ORM only): "
        "the Redis rows are aimiddleware against a real local Valkey (one Lua round trip to "
        "claim, one to complete; a replay is one round trip)."
    )
    return text, as_json(results, anchor)
