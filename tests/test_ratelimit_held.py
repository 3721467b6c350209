"""Reservations held under leases on a shared store (real Valkey and a real Cluster): what a
request reserved comes back once its lease expires unrefreshed (its worker died), once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from aimiddleware import Policy, RateLimiter, Usage
from aimiddleware.context import RequestContext
from aimiddleware.errors import QuotaExceeded
from aimiddleware.ratelimit.admission import Admission
from aimiddleware.ratelimit.backend import Hit
from aimiddleware.storage import Storage
from tests.ratelimit_helpers import PRICES, client, make_app, principal_of

TTL = 0.6  # lease_ttl (s): refreshed every 0.2 s while a request runs
POLICY = Policy(requests="100/day", tokens="1000/day", cost="0.0005/day")


@pytest.fixture(params=["redis", "cluster"])
async def shared(request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
    url = request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")
    store = Storage(url)
    yield store
    await store.aclose()


def worker(storage: Storage, policy: Policy = POLICY) -> RateLimiter:
    """A worker's limiter (each its own; they share the store)."""
    return RateLimiter(policy, storage=storage, prices=PRICES, lease_ttl=TTL)


async def warm(*limiters: RateLimiter) -> None:
    """A first request on each (vocabulary, scripts loaded): later steps take no TTL."""
    for limiter in limiters:
        ctx = request("warm-up", max_tokens=1)
        await limiter.finish(await admit(limiter, ctx), ctx, failed=True)


def request(principal: str = "p", max_tokens: int = 600) -> RequestContext:
    body = {"model": "gpt-4o-mini", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}]}
    return RequestContext(request_id="r", principal=principal, method="POST",
                          path="/v1/chat/completions", body=json.dumps(body).encode(),
                          model="gpt-4o-mini")


async def admit(limiter: RateLimiter, ctx: RequestContext) -> Admission:
    return await limiter.admit(ctx, content_type=b"application/json")


async def charged(storage: Storage, principal: str = "p") -> dict[str, int]:
    """What the counters hold (current + previous window), read raw: no script runs, so
    nothing is refunded by reading."""
    fields = ["requests:86400", "tokens:86400", "cost:86400"]
    raw = await storage.redis.hmget(storage.key("rl", principal), fields)
    out = {}
    for f, value in zip(fields, raw, strict=True):
        _, prev, curr = (int(x) for x in value.split()) if value else (0, 0, 0)
        out[f.split(":")[0]] = prev + curr
    return out


async def held_keys(storage: Storage, principal: str = "p") -> int:
    """How many of the principal's lease keys exist (held expiries, held amounts, leases)."""
    key = storage.key
    names = [key("rl", principal, "held"), key("rl", principal, "held", "amounts"),
             key("rl", principal, "leases")]
    return sum([int(await storage.redis.exists(name)) for name in names])


def reserved(admission: Admission) -> dict[str, int]:
    return {h.field.split(":")[0]: h.cost for h in admission.hits}


async def test_a_dead_workers_day_reservation_comes_back_after_the_lease(shared: Storage) -> None:
    dying, alive = worker(shared), worker(shared)
    await warm(dying, alive)
    dead = await admit(dying, request())  # its worker dies: never finished
    spent = reserved(dead)
    assert spent["tokens"] > 600 and spent["cost"] > 0
    assert await charged(shared) == spent
    with pytest.raises(QuotaExceeded):  # a day's tokens and cost, held by a dead request
        await admit(alive, request())
    del dead, dying
    await asyncio.sleep(TTL + 0.2)
    assert await charged(shared) == spent  # nothing runs until the principal's next admission
    ctx = request()
    again = await admit(alive, ctx)  # refunds the expired reservation, then admits
    assert await charged(shared) == {**reserved(again), "requests": 2}  # a request that ran
    ctx.usage = Usage(input_tokens=8, output_tokens=100)
    await alive.finish(again, ctx, failed=False)
    after = await charged(shared)
    assert after["tokens"] == 108 and after["requests"] == 2
    assert await held_keys(shared) == 0


@pytest.mark.parametrize("concurrency", [None, 5])
async def test_a_finished_request_leaves_no_record(
    shared: Storage, concurrency: int | None
) -> None:
    policy = Policy(tokens="100000/day", concurrency=concurrency)
    limiter = worker(shared, policy)
    for i in range(20):
        ctx = request(max_tokens=100)
        admission = await admit(limiter, ctx)
        assert admission.lease is not None and admission.held
        assert await held_keys(shared) == (2 if concurrency is None else 3)
        if i % 2:
            ctx.usage = Usage(input_tokens=8, output_tokens=10)
        await limiter.finish(admission, ctx, failed=i % 4 == 0)
        assert await held_keys(shared) == 0
    # requests only: a request that ran is a request, nothing to hold (no lease either)
    only = await admit(worker(shared, Policy(requests="10/day")), request())
    assert only.lease is None and not only.held and await held_keys(shared) == 0


async def test_refunded_once_when_two_admissions_prune_the_same_lease(shared: Storage) -> None:
    policy = Policy(tokens="100000/day")
    first = worker(shared, policy)
    ctx = request()
    done = await admit(first, ctx)
    ctx.usage = Usage(input_tokens=100, output_tokens=200)
    await first.finish(done, ctx, failed=False)
    stores = [Storage(shared.url) for _ in range(8)]  # eight workers, their own connections
    try:
        workers = [worker(store, policy) for store in stores]
        await warm(*workers)
        for _ in range(5):
            await admit(first, request())  # five requests of a worker that dies
        await asyncio.sleep(TTL + 0.2)
        admitted = await asyncio.gather(*(admit(w, request(max_tokens=50)) for w in workers))
    finally:
        for store in stores:
            await store.aclose()
    small = sum(reserved(a)["tokens"] for a in admitted)
    assert (await charged(shared))["tokens"] == 300 + small  # each dead lease refunded once


async def test_a_request_kept_alive_past_several_ttls_is_not_refunded(shared: Storage) -> None:
    limiter = worker(shared)
    other = worker(shared)
    app = make_app(limiter)
    principal = principal_of("k1")
    await warm(limiter, other)
    body = {"model": "gpt-4o-mini", "max_tokens": 600, "stream": 300,  # 3 s: 5 TTLs
            "messages": [{"role": "user", "content": "hi"}]}

    async def probe() -> None:
        await asyncio.sleep(3 * TTL)
        assert await held_keys(shared, principal) == 2  # the stream's reservation is held
        with pytest.raises(QuotaExceeded):  # an admission prunes: still held, not refunded
            await admit(other, request(principal))

    async with client(app) as c:
        r, _ = await asyncio.gather(c.post("/v1/chat/completions", json=body), probe())
    assert r.status_code == 200
    spent = await charged(shared, principal)
    assert spent["requests"] == 1 and spent["tokens"] > 600  # a stream with no usage: all of it
    assert await held_keys(shared, principal) == 0


async def test_a_late_finish_after_the_refund_charges_its_usage_once(shared: Storage) -> None:
    """A refresh came too late: the lease expired and was refunded, then the request ends."""
    slow, other = worker(shared), worker(shared)
    await warm(slow, other)
    used_ctx, failed_ctx = request(max_tokens=300), request(max_tokens=300)
    used = await admit(slow, used_ctx)
    failed = await admit(slow, failed_ctx)
    await asyncio.sleep(TTL + 0.2)
    probe_ctx = request(max_tokens=10)
    probe = await admit(other, probe_ctx)  # refunds both
    assert (await charged(shared))["tokens"] == reserved(probe)["tokens"]
    used_ctx.usage = Usage(input_tokens=8, output_tokens=100)
    await slow.finish(used, used_ctx, failed=False)  # charged its usage, not refunded again
    await slow.finish(failed, failed_ctx, failed=True)  # refunded already: nothing more
    assert (await charged(shared))["tokens"] == reserved(probe)["tokens"] + 108
    await other.finish(probe, probe_ctx, failed=True)
    assert (await charged(shared))["tokens"] == 108
    assert await held_keys(shared) == 0


async def test_reading_the_counters_refunds_expired_reservations(shared: Storage) -> None:
    """peek (the jobs' budget check, spent()) sweeps too: the budget reads whole again."""
    limiter = worker(shared, Policy(tokens="1000/day"))
    dead = await admit(limiter, request(max_tokens=1000 - 8))
    assert await limiter.spent("p")
    del dead
    await asyncio.sleep(TTL + 0.2)
    assert not await limiter.spent("p")
    hits = [Hit("tokens:86400", 86_400_000, 1000, 0)]
    assert [s.prev + s.curr for s in await limiter.backend.peek("p", hits)] == [0]
