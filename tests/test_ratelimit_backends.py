"""Both backends: all-or-nothing admission, refunds, leases, and identical decisions."""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
from decimal import Decimal
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aimiddleware import Policy, RateLimiter
from aimiddleware.ratelimit.backend import Adjustment, Hit
from aimiddleware.ratelimit.memory import MemoryBackend
from aimiddleware.ratelimit.redis import RedisBackend
from aimiddleware.storage import Storage
from tests.live_server import serve
from tests.ratelimit_helpers import PRICES, client, counters, make_app, principal_of
from tests.redis_server import RedisServer


async def test_refused_on_tokens_leaves_requests_and_cost_untouched(storage: Storage) -> None:
    limiter = RateLimiter(
        Policy(requests="10/minute", tokens="600/minute", cost="1/day"),
        storage=storage, prices=PRICES,
    )
    app = make_app(limiter)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with client(app) as c:
        ok = await c.post("/v1/chat/completions", json={**body, "max_tokens": 300})
        assert ok.status_code == 200
        before = await counters(limiter, "k1")
        assert before["requests:60"] == 1 and before["cost:86400"] > 0
        refused = await c.post("/v1/chat/completions", json={**body, "max_tokens": 400})
        assert refused.status_code == 429
        assert refused.json()["dimension"] == "tokens"
        assert refused.json()["error"]["code"] == "rate_limited"
        assert await counters(limiter, "k1") == before  # nothing charged anywhere


async def test_reservation_replaced_by_real_usage(storage: Storage) -> None:
    limiter = RateLimiter(
        Policy(requests="10/minute", tokens="10000/minute", cost="1/day"),
        storage=storage, prices=PRICES,
    )
    app = make_app(limiter)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2000, "usage": {"input_tokens": 9, "output_tokens": 5}}
    async with client(app) as c:
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        after = await counters(limiter, "k1")
        assert after["tokens:60"] == 14  # 2000+ reserved, 14 used: the rest refunded
        expected = PRICES.estimate("gpt-4o-mini", __import__("aimiddleware").Usage(
            input_tokens=9, output_tokens=5))
        assert expected is not None
        assert after["cost:86400"] == int((expected * Decimal(10**9)).to_integral_value(
            rounding="ROUND_CEILING"))
        # Under-reservation is charged: usage above max_tokens counts in full.
        big = {**body, "max_tokens": 10, "usage": {"input_tokens": 9, "output_tokens": 500}}
        assert (await c.post("/v1/chat/completions", json=big)).status_code == 200
        assert (await counters(limiter, "k1"))["tokens:60"] == 14 + 509


async def test_failure_before_the_model_is_refunded_in_full(storage: Storage) -> None:
    limiter = RateLimiter(
        Policy(requests="10/minute", tokens="10000/minute", concurrency=1), storage=storage
    )
    app = make_app(limiter)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with client(app) as c:
        for fail in ("raise", "status"):
            r = await c.post("/v1/chat/completions", json={**body, "fail": fail})
            assert r.status_code in (500, 502)
            assert r.headers["content-type"] == "application/problem+json" or fail == "status"
        assert await counters(limiter, "k1") == {"requests:60": 0, "tokens:60": 0}
        assert await limiter.backend.in_flight(  # type: ignore[attr-defined]
            __import__("tests.ratelimit_helpers").ratelimit_helpers.principal_of("k1")) == 0


CUT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 500}


def _leasing_app(storage: Storage) -> tuple[RateLimiter, Any]:
    limiter = RateLimiter(
        Policy(requests="10/minute", tokens="10000/minute", concurrency=5), storage=storage
    )
    return limiter, make_app(limiter)


async def _settled(limiter: RateLimiter, key: str) -> None:
    """Wait until ``key`` holds no concurrency lease: its request was settled."""
    with anyio.fail_after(10):
        while await limiter.backend.in_flight(principal_of(key)):  # type: ignore[attr-defined]  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def test_stream_cut_off_after_its_head_is_charged(storage: Storage) -> None:
    """A client that reads a stream and leaves before its usage is charged like any 2xx that
    reports no usage (its whole reservation), not refunded: else leaving early would make
    every stream free, on every dimension (requests included)."""
    limiter, app = _leasing_app(storage)
    body = CUT_BODY
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as c:
        headers = {"authorization": "Bearer k1"}
        async with c.stream("POST", "/v1/chat/completions", json={**body, "stream": 300},
                            headers=headers) as r:
            assert r.status_code == 200
            lines = 0
            async for _ in r.aiter_lines():
                lines += 1
                if lines == 10:
                    break  # the client leaves mid-stream
        await _settled(limiter, "k1")  # the server sees the disconnect and settles
        # The same request answered in full, without usage, on another key.
        plain = await c.post("/v1/chat/completions", json=body,
                             headers={"authorization": "Bearer k2"})
        assert plain.status_code == 200
    charged = await counters(limiter, "k1")
    assert charged == await counters(limiter, "k2")
    assert charged["requests:60"] == 1 and charged["tokens:60"] > 500


async def test_client_leaving_before_the_head_is_charged(storage: Storage) -> None:
    """A client that gives up while the model runs is charged (its reservation): refunding
    it would let a client call the model as often as it likes by leaving just before the
    answer. A failure of the server's (an exception, a status >= 400) is still refunded."""
    limiter, app = _leasing_app(storage)
    body = CUT_BODY
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as c:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(
                c.post, "/v1/chat/completions", json={**body, "sleep": 30},
                headers={"authorization": "Bearer k1"},
            ))
            with anyio.fail_after(10):  # admitted: the model is running
                while not await limiter.backend.in_flight(principal_of("k1")):  # type: ignore[attr-defined]  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            await anyio.sleep(0.1)
            tg.cancel_scope.cancel()  # the client gives up and closes its connection
        await _settled(limiter, "k1")  # the server sees the disconnect and settles
        plain = await c.post("/v1/chat/completions", json=body,
                             headers={"authorization": "Bearer k2"})
        assert plain.status_code == 200
        failed = await c.post("/v1/chat/completions", json={**body, "fail": "raise"},
                              headers={"authorization": "Bearer k3"})
        assert failed.status_code == 500
    assert await counters(limiter, "k1") == await counters(limiter, "k2")
    assert (await counters(limiter, "k1"))["requests:60"] == 1
    assert await counters(limiter, "k3") == {"requests:60": 0, "tokens:60": 0}


async def test_lease_expires_without_refresh(storage: Storage) -> None:
    now = [1_000.0]
    backend = (MemoryBackend(clock=lambda: now[0]) if storage.is_memory
               else RedisBackend(storage, clock=lambda: now[0]))
    hits = [Hit("requests:60", 60_000, 100, 1)]
    for i in range(2):
        d = await backend.acquire("p", hits, lease=f"l{i}", concurrency=2, lease_ttl_ms=1000)
        assert d.allowed
    refused = await backend.acquire("p", hits, lease="l2", concurrency=2, lease_ttl_ms=1000)
    assert not refused.allowed and refused.failed == 1
    now[0] += 0.6
    await backend.refresh("p", "l0", 1000)  # l0 kept alive, l1 not
    now[0] += 0.6
    d = await backend.acquire("p", hits, lease="l3", concurrency=2, lease_ttl_ms=1000)
    assert d.allowed and d.in_flight == 2
    await backend.adjust("p", [], release="l0")
    assert (await backend.acquire("p", hits, lease="l4", concurrency=2, lease_ttl_ms=1000)).allowed


_counter = itertools.count()

event = st.one_of(
    st.tuples(st.just("hit"), st.sampled_from(["a", "b"]),
              st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40)), min_size=1, max_size=3),
              st.booleans()),
    st.tuples(st.just("tick"), st.integers(0, 70_000)),
    st.tuples(st.just("adjust"), st.sampled_from(["a", "b"]), st.integers(0, 2),
              st.integers(-50, 50)),
    st.tuples(st.just("release"), st.sampled_from(["a", "b"])),
)
LIMITS = [("requests:1", 1_000, 5), ("tokens:60", 60_000, 100), ("tokens:3600", 3_600_000, 300)]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(event, min_size=1, max_size=40))
def test_memory_and_redis_decide_alike(redis_server: RedisServer, events: list[Any]) -> None:
    asyncio.run(_replay(redis_server.url, events))


async def _replay(url: str, events: list[Any]) -> None:
    now = [1_700_000_000.0]
    store = Storage(url)
    memory = MemoryBackend(clock=lambda: now[0])
    redis = RedisBackend(store, namespace=f"prop{next(_counter)}", clock=lambda: now[0])
    leases: dict[str, list[str]] = {"a": [], "b": []}
    last_index: dict[tuple[str, str], int] = {}
    try:
        for n, ev in enumerate(events):
            if ev[0] == "tick":
                now[0] += ev[1] / 1000
            elif ev[0] == "hit":
                _, who, picks, with_lease = ev
                hits = [Hit(LIMITS[i][0], LIMITS[i][1], LIMITS[i][2], cost) for i, cost in
                        dict(picks).items()]
                lease = f"l{n}" if with_lease else None
                got = [await b.acquire(who, hits, lease=lease, concurrency=2 if lease else 0,
                                       lease_ttl_ms=5_000) for b in (memory, redis)]
                assert got[0] == got[1]
                if got[0].allowed and lease:
                    leases[who].append(lease)
                for h, state in zip(hits, got[0].states, strict=True):
                    last_index[(who, h.field)] = state.window
            elif ev[0] == "adjust":
                _, who, i, delta = ev
                index = last_index.get((who, LIMITS[i][0]), int(now[0] * 1000) // LIMITS[i][1])
                adj = [Adjustment(LIMITS[i][0], LIMITS[i][1], index, delta)]
                for b in (memory, redis):
                    await b.adjust(who, adj)
            elif leases[ev[1]]:
                lease = leases[ev[1]].pop(0)
                for b in (memory, redis):
                    await b.adjust(ev[1], [], release=lease)
        probe = [Hit(name, w, lim, 0) for name, w, lim in LIMITS]
        for who in ("a", "b"):
            assert await memory.peek(who, probe) == await redis.peek(who, probe)
            assert await memory.in_flight(who) == await redis.in_flight(who)
    finally:
        await store.aclose()


async def test_memory_backend_forgets_idle_principals_but_not_leases() -> None:
    now = [1_000.0]
    backend = MemoryBackend(clock=lambda: now[0])
    hits = [Hit("requests:1", 1_000, 10, 1)]
    await backend.acquire("busy", hits, lease="l", concurrency=1, lease_ttl_ms=10**12)
    for i in range(1000):
        await backend.acquire(f"p{i}", hits)
    assert len(backend) == 1001
    now[0] += 5
    for i in range(400):  # each call evicts a few of the idle ones, never a full scan
        await backend.acquire(f"q{i}", hits)
    assert len(backend) < 1001 + 400 - 1000 + 5
    assert await backend.in_flight("busy") == 1  # an entry holding a lease is kept


def test_memory_backend_state_is_untracked_by_the_gc_once_idle() -> None:
    """What an idle principal leaves behind is plain data the garbage collector stops
    tracking: only its entry object stays tracked, so a full collection (a pause for every
    request in flight) does not grow with several objects per principal seen in the window."""
    backend = MemoryBackend(clock=lambda: 1_000.0)
    hits = [Hit("requests:60", 60_000, 100, 1), Hit("tokens:60", 60_000, 10**6, 500),
            Hit("tokens:86400", 86_400_000, 10**7, 500)]
    for i in range(2_000):
        backend.acquire_now(f"p{i}", hits)
        backend.adjust_now(f"p{i}", [Adjustment("tokens:60", 60_000, 16, -380),
                                     Adjustment("tokens:86400", 86_400_000, 0, -380)])
        backend.acquire_now(f"p{i}", hits[:1])
    gc.collect()
    entries = list(backend._entries.values())
    assert len(entries) == 2_000
    states = [state for entry in entries for state in entry.counters.values()]
    assert len(states) == 6_000
    assert not any(map(gc.is_tracked, states))
    assert not any(gc.is_tracked(entry.counters) for entry in entries)


def test_an_idle_daily_principal_does_not_keep_minute_only_ones() -> None:
    """Tiers of different windows: an idle principal goes once its own windows have ended.
    (In one LRU order an idle principal with a daily limit at its front kept every expired
    minute-only principal behind it for two days.)"""
    now = [1_000.0]
    backend = MemoryBackend(clock=lambda: now[0])
    daily = [Hit("tokens:86400", 86_400_000, 10**6, 1)]
    minute = [Hit("requests:60", 60_000, 10, 1)]
    backend.acquire_now("daily", daily)
    for i in range(1_000):
        backend.acquire_now(f"m{i}", minute)
    assert len(backend) == 1_001
    now[0] += 3_600  # an hour: every minute-only window has long ended
    for _ in range(100):  # each step drops a bounded number (never a scan of all)
        backend.acquire_now("active", minute)
    assert set(backend._entries) == {"daily", "active"}
    now[0] += 2 * 86_400 // 8 * 9  # kept two days after its last use, up to an eighth more
    for _ in range(10):
        backend.acquire_now("active", minute)
    assert set(backend._entries) == {"active"}


def test_an_expired_lease_does_not_keep_its_principal() -> None:
    """A lease whose holder died (never released, past its TTL) holds nothing in flight: its
    principal is dropped like any idle one; a live lease still keeps its principal."""
    now = [1_000.0]
    backend = MemoryBackend(clock=lambda: now[0])
    minute = [Hit("requests:60", 60_000, 10, 1)]
    backend.acquire_now("crashed", minute, "lost", 1, 30_000)
    backend.acquire_now("running", minute, "held", 1, 10**9)
    now[0] += 3_600
    for _ in range(10):
        backend.acquire_now("other", minute)
    assert set(backend._entries) == {"running", "other"}


class Refreshing(MemoryBackend):
    """The in-process store posing as a shared one (the limiter then refreshes leases),
    counting its refreshes; with ``fail``, each refresh raises it instead."""

    shared = True

    def __init__(self, fail: Exception | None = None) -> None:
        super().__init__()
        self.fail = fail
        self.refreshed = 0

    async def refresh(self, principal: str, lease: str, ttl_ms: int, *,
                      concurrent: bool = True, held: bool = False) -> None:
        self.refreshed += 1
        if self.fail is not None:
            raise self.fail
        await super().refresh(principal, lease, ttl_ms, concurrent=concurrent, held=held)


async def test_a_failing_lease_refresh_never_cuts_the_call_short() -> None:
    """A store error while refreshing a lease (not an outage: e.g. Redis out of memory) is
    logged; the call completes and its lease is released."""
    from aimiddleware.context import RequestContext
    from aimiddleware.ratelimit._run import run_admitted

    backend = Refreshing(
        fail=RuntimeError("OOM command not allowed when used memory > 'maxmemory'")
    )
    limiter = RateLimiter(
        Policy(requests="10/minute", concurrency=1), backend=backend, lease_ttl=0.06
    )
    ctx = RequestContext(request_id="r", principal="p", method="POST", path="/", body=b"")
    admission = await limiter.admit(ctx)
    assert admission.lease is not None

    async def call() -> str:
        with anyio.fail_after(10):  # runs through (failing) refreshes, every 0.05 s
            while backend.refreshed < 2:  # noqa: ASYNC110 - a counter, no event to wait on
                await asyncio.sleep(0.01)
        return "done"

    assert await run_admitted(limiter, admission, ctx, call, lambda _: False) == "done"
    assert backend.refreshed >= 2
    assert await backend.in_flight(admission.principal) == 0


@pytest.mark.parametrize("backend_name", ["asyncio", "trio"])
def test_a_lease_is_refreshed_only_while_a_long_call_runs(backend_name: str) -> None:
    """A quick call starts no refresher (on asyncio: a timer, no task); a long one is
    refreshed every third of the TTL until it ends, is cancelled, or is settled because its
    response went out whole; on both backends."""
    from aimiddleware.context import RequestContext
    from aimiddleware.ratelimit._run import run_admitted, settle_once

    async def main() -> list[int]:
        backend = Refreshing()
        limiter = RateLimiter(Policy(requests="10/minute", concurrency=3), backend=backend,
                              lease_ttl=0.3)  # refreshed every 0.1 s
        seen = []
        for seconds in (0.0, 0.45):
            ctx = RequestContext(request_id="r", principal="p", method="POST", path="/")
            admission = await limiter.admit(ctx)

            async def call(seconds: float = seconds) -> None:
                await anyio.sleep(seconds)

            await run_admitted(limiter, admission, ctx, call, lambda _: False)
            seen.append(backend.refreshed)
            await anyio.sleep(0.25)  # nothing refreshes a lease released
            assert backend.refreshed == seen[-1]
        ctx = RequestContext(request_id="r", principal="p", method="POST", path="/")
        admission = await limiter.admit(ctx)
        with anyio.move_on_after(0.25):  # a call cancelled mid-way stops its refresher too
            await run_admitted(limiter, admission, ctx, lambda: anyio.sleep(10), lambda _: False)
        seen.append(backend.refreshed)
        await anyio.sleep(0.25)
        assert backend.refreshed == seen[-1]
        assert await backend.in_flight("p") == 0
        # A call whose response went out whole mid-way (then runs on: background tasks) is
        # settled then: its refresher stops, its slot is free while it still runs.
        ctx = RequestContext(request_id="r", principal="p", method="POST", path="/")
        admission = await limiter.admit(ctx)

        async def sent_then_more() -> None:
            await anyio.sleep(0.25)
            await settle_once(limiter, admission, ctx, False)
            seen.append(backend.refreshed)
            assert await backend.in_flight("p") == 0
            await anyio.sleep(0.45)
            assert backend.refreshed == seen[-1]
            assert await backend.in_flight("p") == 0

        await run_admitted(limiter, admission, ctx, sent_then_more, lambda _: False)
        return seen

    quick, long, cancelled, sent = anyio.run(main, backend=backend_name)
    assert quick == 0
    assert 3 <= long <= 4  # at 0.1, 0.2, 0.3, 0.4 s (a late timer may miss the last one)
    assert 1 <= cancelled - long <= 2
    assert 1 <= sent - cancelled <= 2  # (at 0.1 and 0.2 s, then none)


async def test_a_redirect_is_refunded(storage: Storage) -> None:
    # A trailing-slash 307 calls no model but kept its whole reservation (the prompt plus
    # max_tokens), and a client that followed it paid twice.
    limiter, app = _leasing_app(storage)
    async with client(app) as c:
        r = await c.post("/v1/chat/completions/", json=CUT_BODY)
        assert r.status_code == 307
        assert await counters(limiter, "k1") == {"requests:60": 0, "tokens:60": 0}
        followed = await c.post("/v1/chat/completions/", json=CUT_BODY, follow_redirects=True)
        assert followed.status_code == 200
    async with client(app, "k2") as c2:
        assert (await c2.post("/v1/chat/completions", json=CUT_BODY)).status_code == 200
    assert await counters(limiter, "k1") == await counters(limiter, "k2")  # charged once


async def test_a_charge_past_what_a_counter_can_hold_still_refuses_every_later_request(
    storage: Storage,
) -> None:
    # An app reporting 10**19 tokens (report_usage takes what it is given). On a shared
    # store the script counts in Lua doubles and writes with %d, which wraps past 2**63 to
    # -2**63: the counter read as empty, the window open again. A counter now stops at
    # 2**53 (exact in a double, past any limit), so each store refuses what follows.
    now = [1_000.0]
    backend = (MemoryBackend(clock=lambda: now[0]) if storage.is_memory
               else RedisBackend(storage, clock=lambda: now[0]))
    hits = [Hit("tokens:60", 60_000, 100_000, 10)]
    first = await backend.acquire("p", hits)
    assert first.allowed
    await backend.adjust("p", [Adjustment("tokens:60", 60_000, first.states[0].window, 10**19)])
    await backend.adjust("p", [Adjustment("tokens:60", 60_000, first.states[0].window, 10**19)])
    later = await backend.acquire("p", hits)
    assert not later.allowed and later.states[0].curr >= 2**53
