"""Rate limiting: per-request overhead, Redis round trips, and scaling, beside the anchors.

1. In-process ASGI, interleaved rounds: a bare Starlette app (anchor); slowapi's decorator
   (one limit, memory); ``limits`` called directly with 3 limits (async memory,
   sliding-window counter) in a pure ASGI middleware; aimiddleware's context layer alone;
   and context + ``RateLimitMiddleware`` with 4 dimensions (requests, tokens, cost,
   concurrency; the prompt tokenized with tiktoken) on the memory backend.
2. Redis (a real Valkey started here): commands and latency per admission, one Lua script
   for every dimension, against ``limits`` doing 3 sequential hits.
3. Scaling: the same with 100 / 1,000 / 5,000 principals, and with a tokens/day window
   already holding 900,000 tokens (``limits``' moving window keeps one entry per token).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from limits import parse
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aimiddleware import Policy, RateLimiter, RateLimitMiddleware, RequestContextMiddleware
from aimiddleware.pricing import PriceTable
from aimiddleware.ratelimit.backend import Hit
from aimiddleware.ratelimit.memory import MemoryBackend
from aimiddleware.ratelimit.redis import RedisBackend
from aimiddleware.storage import Storage
from benchmarks.harness import as_json, compare, make_request, table

PATH = "/v1/chat/completions"
BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello to the world."}],
     "max_tokens": 16}
).encode()
HEADERS = [(b"content-type", b"application/json")]
PRICES = PriceTable({"gpt-4o-mini": {"input": "0.15", "output": "0.60"}})
BIG = "1000000000"


def bare_app() -> Starlette:
    async def chat(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route(PATH, chat, methods=["POST"])])


def slowapi_app() -> Any:
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.util import get_remote_address

    limiter = Limiter(key_func=get_remote_address, storage_uri="memory://")

    @limiter.limit(f"{BIG}/minute")
    async def chat(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route(PATH, chat, methods=["POST"])])
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    return app


class LimitsDirect:
    """``limits`` called directly: three limits hit one after another per request."""

    def __init__(self, app: Any, strategy: Any, items: list[Any]) -> None:
        self.app, self.strategy, self.items = app, strategy, items

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        key = dict(scope["headers"]).get(b"authorization", b"anon").decode()
        for item in self.items:
            if not await self.strategy.hit(item, key, cost=1):
                raise RuntimeError("limited")
        await self.app(scope, receive, send)


def limits_app() -> Any:
    items = [parse(f"{BIG}/second"), parse(f"{BIG}/minute"), parse(f"{BIG}/day")]
    return LimitsDirect(bare_app(), SlidingWindowCounterRateLimiter(MemoryStorage()), items)


def policy() -> Policy:
    return Policy(requests=f"{BIG}/minute", tokens=f"{BIG}/minute", cost="1000000/day",
                  concurrency=1000)


def ours_app(limiter: RateLimiter | None = None) -> Any:
    limiter = limiter or RateLimiter(policy(), prices=PRICES)
    return RequestContextMiddleware(RateLimitMiddleware(bare_app(), limiter=limiter))


def cycling(n: int) -> Callable[[], Any]:
    factories = [
        make_request("POST", PATH, BODY, [*HEADERS, (b"authorization", f"Bearer k{i}".encode())])
        for i in range(n)
    ]
    it = itertools.cycle(factories)
    return lambda: next(it)()


async def overhead(quick: bool) -> tuple[str, dict[str, Any]]:
    req = make_request("POST", PATH, BODY, HEADERS)
    contenders = {
        "bare starlette": (bare_app(), req),
        "slowapi decorator (1 limit)": (slowapi_app(), req),
        "limits direct (3 limits)": (limits_app(), req),
        "aimiddleware context only": (RequestContextMiddleware(bare_app()), req),
        "aimiddleware requests only (1 limit)": (
            ours_app(RateLimiter(Policy(requests=f"{BIG}/minute"))), req),
        "aimiddleware 4 dimensions": (ours_app(), req),
    }
    n, rounds = (300, 3) if quick else (2000, 7)
    res = await compare(contenders, requests=n, rounds=rounds)
    return table(res, "bare starlette", "Rate limit overhead, memory backend"), as_json(
        res, "bare starlette")


async def principals(quick: bool) -> tuple[str, dict[str, Any]]:
    items = [parse(f"{BIG}/second"), parse(f"{BIG}/minute"), parse(f"{BIG}/day")]
    contenders: dict[str, Any] = {"bare starlette": (bare_app(), cycling(1))}
    for n in (100, 1000, 5000):
        contenders[f"limits direct, {n} principals"] = (
            LimitsDirect(bare_app(), SlidingWindowCounterRateLimiter(MemoryStorage()), items),
            cycling(n))
        contenders[f"aimiddleware, {n} principals"] = (ours_app(), cycling(n))
    reqs, rounds = (500, 2) if quick else (5000, 5)
    res = await compare(contenders, requests=reqs, rounds=rounds, warmup=5000)
    return table(res, "bare starlette", "Cost with many principals (each seen before)"), as_json(
        res, "bare starlette")


async def principals_backend(quick: bool) -> tuple[str, dict[str, Any]]:
    """The limiter alone (no HTTP, no tokenizer): one admission of 3 limits + a lease."""
    hits = [Hit("requests:60", 60_000, 10**9, 1), Hit("tokens:60", 60_000, 10**9, 30),
            Hit("cost:86400", 86_400_000, 10**12, 900)]
    items = [parse(f"{BIG}/second"), parse(f"{BIG}/minute"), parse(f"{BIG}/day")]
    n = 2000 if quick else 20000
    out: dict[str, dict[int, float]] = {"aimiddleware memory": {}, "limits direct": {}}
    for count in (100, 1000, 5000):
        names = [f"p{i}" for i in range(count)]
        ours = MemoryBackend()
        theirs = SlidingWindowCounterRateLimiter(MemoryStorage())

        async def one_ours(p: str, ours: MemoryBackend = ours) -> None:
            await ours.acquire(p, hits, lease="x", concurrency=10**9, lease_ttl_ms=10**12)

        async def one_theirs(p: str, theirs: Any = theirs) -> None:
            for item in items:
                await theirs.hit(item, p)

        for name, fn in (("aimiddleware memory", one_ours), ("limits direct", one_theirs)):
            for p in names:
                await fn(p)
            best = float("inf")
            for _ in range(3 if quick else 5):
                t0 = time.perf_counter()
                for i in range(n):
                    await fn(names[i % count])
                best = min(best, (time.perf_counter() - t0) / n * 1e6)
            out[name][count] = best
    lines = ["## Limiter alone: µs per admission (3 limits; ours also takes a lease)", "",
             "| contender | 100 principals | 1,000 | 5,000 |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | " + " | ".join(f"{v[c]:.1f}" for c in (100, 1000, 5000)) + " |"
              for k, v in out.items()]
    return "\n".join(lines), out


async def full_window(quick: bool) -> tuple[str, dict[str, Any]]:
    """Per-hit time with a tokens/day window already holding 900,000 tokens."""
    fill = 100_000 if quick else 900_000
    item = parse("1000000/day")
    moving = MovingWindowRateLimiter(MemoryStorage())
    await moving.hit(item, "p", cost=fill)
    limiter = RateLimiter(Policy(tokens="1000000/day"))
    hits = [Hit("tokens:86400", 86_400_000, 1_000_000, 10)]
    await limiter.backend.acquire("p", [Hit("tokens:86400", 86_400_000, 1_000_000, fill)])
    empty = MovingWindowRateLimiter(MemoryStorage())
    out: dict[str, float] = {}
    n = 100 if quick else 500
    contenders = {
        "limits moving window, empty": lambda: empty.hit(item, "p", cost=10),
        f"limits moving window, {fill} tokens in window": lambda: moving.hit(item, "p", cost=10),
        "aimiddleware memory, empty": lambda: limiter.backend.acquire("q", hits),
        f"aimiddleware memory, {fill} tokens in window": lambda: limiter.backend.acquire("p", hits),
    }
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(5):  # interleaved rounds, median
        for name, fn in contenders.items():
            await fn()
            t0 = time.perf_counter()
            for _ in range(n):
                await fn()
            samples[name].append((time.perf_counter() - t0) / n * 1e6)
    out = {name: statistics.median(v) for name, v in samples.items()}
    lines = ["## Cost with a full tokens/day window (one hit of 10 tokens)", "",
             "| contender | µs per hit |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in out.items()]
    return "\n".join(lines), out


async def per_request(quick: bool) -> tuple[str, dict[str, Any]]:
    """``admit`` + ``finish`` alone on the full-stack benchmark's policy (4 dimensions, the
    chat body, usage reported), memory backend; with the real token counter and with its
    ``count_request`` replaced by a constant (what is left is the limiter's own work)."""
    from decimal import Decimal

    from aimiddleware import TokenCounter, Usage
    from aimiddleware.context import RequestContext

    body = b'{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"hello"}]}'
    usage = Usage(input_tokens=12, output_tokens=1, total_tokens=13)
    prices = PriceTable({"gpt-4o-mini-2024-07-18": {"input": Decimal("0.15"),
                                                    "output": Decimal("0.60")}})
    counter = TokenCounter()
    limiter = RateLimiter(
        Policy(requests="100000000/minute", tokens="100000000000/minute", cost="100000000/day",
               concurrency=10_000),
        counter=counter, prices=prices,
    )

    def context() -> RequestContext:
        ctx = RequestContext(request_id="r", principal="key_1", method="POST", path=PATH,
                             body=body, model="gpt-4o-mini",
                             model_version="gpt-4o-mini-2024-07-18")
        ctx.json()  # parsed by an outer layer (versioning) in the stack
        return ctx

    async def batch(ctxs: list[RequestContext]) -> float:
        t0 = time.perf_counter()
        while ctxs:  # each context dies after its request, as in a server
            ctx = ctxs.pop()
            admission = await limiter.admit(ctx, content_type=b"application/json")
            ctx.usage = usage
            await limiter.finish(admission, ctx, failed=False)
        return time.perf_counter() - t0

    n, rounds = (500, 5) if quick else (2000, 15)
    await batch([context() for _ in range(10)])  # warm: vocabulary, caches
    real = counter.count_request
    fixed = real(context().json(), "gpt-4o-mini-2024-07-18")
    variants = {"admit + finish": real,
                "admit + finish, counting excluded": lambda body, model: fixed}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):  # interleaved, the best round of each (a noisy shared box)
        for name, count in variants.items():
            counter.count_request = count  # type: ignore[method-assign]
            times[name].append(await batch([context() for _ in range(n)]))
    counter.count_request = real  # type: ignore[method-assign]
    out = {name: min(v) / n * 1e6 for name, v in times.items()}
    lines = ["## Limiter per request: admit + finish (µs, no HTTP)", "",
             "| measure | µs per request |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in out.items()]
    return "\n".join(lines), out


@contextlib.contextmanager
def count_round_trips() -> Iterator[list[int]]:
    """Count requests written to Redis by redis-py's asyncio connections (benchmark only)."""
    from redis.asyncio.connection import AbstractConnection

    box = [0]
    original = AbstractConnection.send_packed_command

    async def counted(self: Any, command: Any, check_health: bool = True) -> None:
        box[0] += 1
        await original(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        yield box
    finally:
        AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


async def redis_round_trips(quick: bool) -> tuple[str, dict[str, Any]]:
    from tests.redis_server import RedisServer

    server = RedisServer().start()
    storage = Storage(server.url)
    try:
        backend = RedisBackend(storage)
        hits = [Hit("requests:60", 60_000, 10**9, 1), Hit("tokens:60", 60_000, 10**9, 40),
                Hit("cost:86400", 86_400_000, 10**12, 900)]
        lim_storage = RedisStorage(f"async+{server.url}", implementation="redispy")
        strategy = SlidingWindowCounterRateLimiter(lim_storage)
        items = [parse(f"{BIG}/second"), parse(f"{BIG}/minute"), parse(f"{BIG}/day")]

        async def ours() -> None:
            await backend.acquire("p", hits, lease="x", concurrency=10**6, lease_ttl_ms=30_000,
                                  held="011")  # (tokens and cost held under the lease)

        async def theirs() -> None:
            for item in items:
                await strategy.hit(item, "p")

        n = 100 if quick else 1000
        rows: dict[str, dict[str, float]] = {}
        for name, fn in {"aimiddleware (4 dimensions, one Lua script)": ours,
                         "limits, 3 sequential hits": theirs}.items():
            await fn()
            with count_round_trips() as trips:
                samples = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    await fn()
                    samples.append((time.perf_counter() - t0) * 1e6)
            rows[name] = {"round_trips_per_admission": trips[0] / n,
                          "median_us": statistics.median(samples)}
    finally:
        await storage.aclose()
        server.stop()
    lines = ["## Redis: round trips and latency per admission", "",
             "| contender | round trips per admission | median µs |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['round_trips_per_admission']:.2f} | {v['median_us']:.0f} |"
              for k, v in rows.items()]
    return "\n".join(lines), rows


async def run(quick: bool) -> tuple[str, dict[str, Any]]:
    parts: list[str] = []
    figures: dict[str, Any] = {}
    for name, fn in (("per_request", per_request), ("overhead", overhead),
                     ("redis", redis_round_trips),
                     ("principals", principals), ("principals_backend", principals_backend),
                     ("full_window", full_window)):
        text, data = await fn(quick)
        parts.append(text)
        figures[name] = data
    return "\n\n".join(parts), figures
