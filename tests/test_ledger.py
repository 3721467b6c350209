"""Usage ledger: one test body against memory, SQLite and a real Redis/Valkey."""

from __future__ import annotations

import gc
import logging
import threading
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from aimiddleware.storage import Storage
from aimiddleware.usage.ledger import Feedback, Ledger, MemoryLedger, UsageRecord
from aimiddleware.usage.ledger_redis import RedisLedger
from aimiddleware.usage.ledger_sqlite import SQLiteLedger
from aimiddleware.usage.models import Usage
from tests.gc_counts import tracked_per_entry
from tests.redis_server import RedisServer


def ts(day: str, hour: int = 12) -> float:
    when = datetime.fromisoformat(f"{day}T{hour:02d}:00:00").replace(tzinfo=UTC)
    return when.timestamp()


def rec(principal: str = "alice", *, rid: str = "req_1", model: str | None = "gpt-4o",
        day: str = "2026-03-01", cost: str | None = "0.01", reason: str | None = "stop",
        inp: int = 100, out: int = 20) -> UsageRecord:
    return UsageRecord(
        principal=principal, request_id=rid, model=model,
        usage=Usage(input_tokens=inp, output_tokens=out, cached_input_tokens=10,
                    reasoning_tokens=5),
        estimated_cost=Decimal(cost) if cost is not None else None,
        finish_reason=reason, raw_finish_reason=reason, status=200, duration_ms=3.2,
        timestamp=ts(day),
    )


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    if request.param == "memory":
        led: Ledger = MemoryLedger()
    elif request.param == "sqlite":
        led = SQLiteLedger(tmp_path / "usage.db")
    else:
        store = Storage(request.getfixturevalue("redis_url"))
        led = RedisLedger(store)
    yield led
    await led.aclose()
    if isinstance(led, RedisLedger):
        await led.storage.aclose()


async def test_aggregates_by_day_and_model(ledger: Ledger) -> None:
    await ledger.record(rec(rid="a"))
    await ledger.record(rec(rid="b", cost="0.02", reason="length", out=30))
    await ledger.record(rec(rid="c", model="claude-x", cost=None))
    await ledger.record(rec(rid="d", day="2026-03-02"))
    await ledger.record(rec(rid="e", model=None, reason=None))
    rows = await ledger.query("alice")
    assert [(r.day, r.model) for r in rows] == [
        ("2026-03-01", "claude-x"), ("2026-03-01", "gpt-4o"), ("2026-03-01", "unknown"),
        ("2026-03-02", "gpt-4o"),
    ]
    gpt = rows[1]
    assert gpt.requests == 2 and gpt.input_tokens == 200 and gpt.output_tokens == 50
    assert gpt.total_tokens == 250 and gpt.cached_input_tokens == 20
    assert gpt.reasoning_tokens == 10
    assert gpt.estimated_cost == Decimal("0.03") and gpt.unpriced_requests == 0
    assert gpt.finish_reasons == {"stop": 1, "length": 1}
    assert rows[0].unpriced_requests == 1 and rows[0].estimated_cost == 0
    assert rows[2].finish_reasons == {"unknown": 1}


async def test_filters(ledger: Ledger) -> None:
    for i, day in enumerate(["2026-02-27", "2026-03-01", "2026-03-03"]):
        await ledger.record(rec(rid=f"r{i}", day=day))
    await ledger.record(rec(rid="x", model="other", day="2026-03-01"))
    got = await ledger.query("alice", start=date(2026, 3, 1), end=date(2026, 3, 2))
    assert [(r.day, r.model) for r in got] == [("2026-03-01", "gpt-4o"), ("2026-03-01", "other")]
    got = await ledger.query("alice", start=date(2026, 3, 1), model="gpt-4o")
    assert [r.day for r in got] == ["2026-03-01", "2026-03-03"]
    assert await ledger.query("alice", end=date(2026, 1, 1)) == []


async def test_principals_never_see_each_other(ledger: Ledger) -> None:
    await ledger.record(rec("alice", rid="a1"))
    await ledger.record(rec("bob", rid="b1", inp=7))
    alice = await ledger.query("alice")
    bob = await ledger.query("bob")
    assert [r.input_tokens for r in alice] == [100] and [r.input_tokens for r in bob] == [7]
    assert await ledger.get_request("bob", "a1") is None
    assert await ledger.add_feedback("bob", Feedback(request_id="a1", rating=-1)) is False
    assert (await ledger.query("alice"))[0].feedback_count == 0
    assert await ledger.query("carol") == []


async def test_feedback_is_stored_beside_the_request(ledger: Ledger) -> None:
    await ledger.record(rec(rid="req_9"))
    assert await ledger.add_feedback("alice", Feedback(request_id="nope", rating=1)) is False
    fb = Feedback(request_id="req_9", rating=4, comment="good", labels=["helpful"])
    assert await ledger.add_feedback("alice", fb) is True
    got = await ledger.get_request("alice", "req_9")
    assert got is not None and got.feedback == fb
    assert got.record.usage.input_tokens == 100 and got.record.estimated_cost == Decimal("0.01")
    # a second rating replaces the first; the count stays 1
    assert await ledger.add_feedback("alice", Feedback(request_id="req_9", rating=2))
    row = (await ledger.query("alice"))[0]
    assert (row.feedback_count, row.rating_sum) == (1, 2)


async def test_concurrent_writes_lose_nothing(ledger: Ledger) -> None:
    n = 200

    async def write(i: int) -> None:
        await ledger.record(rec(rid=f"c{i}", cost="0.000001", out=1))

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(write, i)
    # A burst past the Redis client's connection pool fails some writes: they are kept and
    # retried, never dropped.
    assert await ledger.flush() is True and ledger.pending == 0
    [row] = await ledger.query("alice")
    assert row.requests == n and row.input_tokens == 100 * n and row.output_tokens == n
    assert row.estimated_cost == Decimal("0.0002")


async def test_a_reused_request_id_is_still_counted(ledger: Ledger) -> None:
    await ledger.record(rec(rid="same"))
    await ledger.record(rec(rid="same"))
    assert (await ledger.query("alice"))[0].requests == 2


@asynccontextmanager
async def own_server_ledger() -> AsyncIterator[tuple[RedisServer, RedisLedger]]:
    """A RedisLedger on a real server of its own, which the test may stop, restart or fill;
    failed writes retried at once. A stopped server refuses at once: the writes that must
    succeed get time enough for a stalled machine."""
    server = RedisServer().start()
    store = Storage(server.url, socket_timeout=5)
    led = RedisLedger(store, write_timeout=10.0)
    led.retry_interval = 0.0
    try:
        yield server, led
    finally:
        await store.aclose()
        server.stop()


async def test_failed_writes_are_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    async with own_server_ledger() as (server, led):
        await led.record(rec(rid="before"))
        assert len(await led.query("alice")) == 1
        server.stop()  # the restarted server starts empty (no persistence)
        with caplog.at_level(logging.WARNING, logger="aimiddleware.usage"):
            await led.record(rec(rid="during-1"))  # must not raise
            await led.record(rec(rid="during-2"))
        assert led.pending == 2
        assert any("usage ledger write failed" in r.message for r in caplog.records)
        server.start()
        await led.record(rec(rid="after"))  # flushes the backlog first
        assert led.pending == 0
        [row] = await led.query("alice")
        assert row.requests == 3  # during-1, during-2, after
        await led._write(rec(rid="x").model_copy(update={"record_id": "fixed"}))
        await led._write(rec(rid="x").model_copy(update={"record_id": "fixed"}))
        [row] = await led.query("alice")
        assert row.requests == 4  # a retried write that had landed is not counted twice


async def test_requests_finishing_together_as_the_store_returns_lose_nothing() -> None:
    # Each finishing request flushed the retry buffer at once: each wrote the oldest record
    # and then each dropped one, so records never written were lost (15 given, 6 stored on a
    # real cluster) and an emptied buffer's popleft raised out of a record() that never raises.
    async with own_server_ledger() as (server, led):
        server.stop()
        for i in range(5):
            await led.record(rec(rid=f"during-{i}"))
        assert led.pending == 5
        server.start()  # (empty: no persistence)
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(led.record, rec(rid=f"after-{i}"))
        await led.flush()
        assert led.pending == 0
        [row] = await led.query("alice")
        assert row.requests == 15


async def test_a_full_store_keeps_the_record_for_a_retry() -> None:
    # RedisLedger classified the client's errors by a list of its own: a full store (OOM),
    # or a cluster that cannot be reached, was "a record this store can never take", and
    # the record was dropped.
    async with own_server_ledger() as (server, led):
        await led.record(rec(rid="before"))
        server.command("CONFIG", "SET", "maxmemory", "1")
        await led.record(rec(rid="full"))
        assert led.pending == 1  # kept, not dropped
        server.command("CONFIG", "SET", "maxmemory", "0")
        assert await led.flush()
        [row] = await led.query("alice")
        assert row.requests == 2


def test_one_ledger_flushed_from_two_threads_with_loops_of_their_own() -> None:
    # With an anyio.Lock, the waiter on the second thread's loop was never woken: its flush
    # hung and the lock stayed taken for ever (every later record only queued).
    class Slow(MemoryLedger):
        does_io = True

        async def _write(self, r: UsageRecord) -> None:
            await anyio.sleep(0.2)  # (a write in flight on a slow store)
            await super()._write(r)

    led = Slow()
    led._keep(rec(rid="waiting"))  # (an earlier write failed)
    done: list[bool] = []

    def flush_in_a_thread(delay: float) -> None:
        async def go() -> None:
            await anyio.sleep(delay)
            done.append(await led.flush())

        anyio.run(go)

    threads = [
        threading.Thread(target=flush_in_a_thread, args=(d,), daemon=True) for d in (0.0, 0.05)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert done == [True, True] and not led._flushing.locked() and led.pending == 0


async def test_sqlite_is_durable_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "u.db"
    first = SQLiteLedger(path)
    await first.record(rec(rid="a"))
    await first.aclose()
    second = SQLiteLedger(path)
    assert (await second.query("alice"))[0].requests == 1
    await second.aclose()


async def test_memory_ledger_is_bounded() -> None:
    led = MemoryLedger(max_aggregates=2, max_requests=2)
    for i, day in enumerate(["2026-01-01", "2026-01-02", "2026-01-03"]):
        await led.record(rec(rid=f"r{i}", day=day))
    assert [r.day for r in await led.query("alice")] == ["2026-01-02", "2026-01-03"]
    assert await led.get_request("alice", "r0") is None
    with pytest.raises(ValueError):
        MemoryLedger(max_aggregates=0)


async def test_memory_ledger_query_reads_only_the_callers_aggregates() -> None:
    """A tenant's ``/usage`` query reads that tenant's aggregates, not every tenant's: with
    20,000 other principals held it allocates what its own rows need (the scan of all of
    them copied 20,000 items, ~1.3 MB, and held the event loop while doing it)."""
    led = MemoryLedger()
    usage = Usage(input_tokens=1, output_tokens=1)
    for i in range(20_000):
        row = (f"p{i}", "r", "m", None, usage, None, "stop", "stop", 200, 1.0, ts("2026-03-01"))
        assert led.record_values(row) is True  # type: ignore[arg-type]
    await led.record(rec())
    await led.query("alice")  # (anything built once, on the first query, is not counted)
    tracemalloc.start()
    try:
        rows = await led.query("alice")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(r.day, r.model, r.requests) for r in rows] == [("2026-03-01", "gpt-4o", 1)]
    assert peak < 64 * 1024


@pytest.mark.parametrize("fields", [
    ("input_tokens", "output_tokens", "total_tokens"),  # what a stream's usage sets
    ("input_tokens", "output_tokens"),
    ("input_tokens", "output_tokens", "total_tokens", "cached_input_tokens"),
])
async def test_memory_ledger_rows_hold_plain_ints_for_any_token_fields(
    fields: tuple[str, ...],
) -> None:
    """A kept request holds its usage as plain ints whatever token fields were set, so the
    garbage collector stops tracking it (a Usage kept as is is three tracked objects per row,
    walked by every full collection); read back, it is the same usage with the same fields."""
    led = MemoryLedger()
    usage = Usage(**{f: 7 if f != "total_tokens" else 14 for f in fields})
    assert usage.model_fields_set not in ({"input_tokens", "output_tokens", "total_tokens",
                                           "cached_input_tokens", "reasoning_tokens"}, set())
    row = ("alice", "r1", "m", None, usage, None, "stop", "stop", 200, 1.0, ts("2026-03-01"))
    assert led.record_values(row) is True  # type: ignore[arg-type]
    gc.collect()
    gc.collect()  # (a tuple in a tuple: the inner one is untracked first)
    assert not gc.is_tracked(led._requests[("alice", "r1")])
    got = await led.get_request("alice", "r1")
    assert got is not None
    assert got.record.usage == usage
    assert got.record.usage.model_fields_set == usage.model_fields_set


async def test_memory_ledger_index_follows_evictions() -> None:
    """The per-principal index drops what the LRU bound evicts: after many principals it
    holds exactly the kept aggregates, and an evicted principal has no entry left."""
    led = MemoryLedger(max_aggregates=50, max_requests=10)
    for i in range(5_000):
        await led.record(rec(f"p{i % 700}", rid=f"r{i}", model=f"m{i % 3}"))
    assert len(led._aggs) == 50
    assert sum(map(len, led._mine.values())) == 50
    assert len(led._mine) <= 50
    assert {k for mine in led._mine.values() for k in mine} == set(led._aggs)
    gc.collect()
    assert not gc.is_tracked(led._mine)  # (tuples of text: no more work for a full collection)
    kept = next(iter(led._aggs))
    assert [r.model for r in await led.query(kept[0])] == sorted(
        k[2] for k in led._aggs if k[0] == kept[0]
    )
    gone = next(f"p{i}" for i in range(700) if all(k[0] != f"p{i}" for k in led._aggs))
    assert gone not in led._mine and await led.query(gone) == []


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_retried_write_counts_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    led: Ledger
    if kind == "sqlite":
        led = SQLiteLedger(tmp_path / "u.db")
    else:
        led = RedisLedger(Storage(request.getfixturevalue("redis_url")))
    same = rec(rid="r").model_copy(update={"record_id": "one-record"})
    await led._write(same)
    await led._write(same)  # e.g. the first attempt landed but timed out client-side
    assert (await led.query("alice"))[0].requests == 1
    await led.aclose()
    if isinstance(led, RedisLedger):
        await led.storage.aclose()


def test_record_of_matches_validation_and_falls_back_on_odd_types() -> None:
    args = dict(
        principal="alice", request_id="r1", model="gpt-4o", model_version=None,
        usage=Usage(input_tokens=3, output_tokens=2), estimated_cost=Decimal("0.5"),
        finish_reason="stop", raw_finish_reason="end_turn", status=200, duration_ms=1.5,
        timestamp=ts("2026-03-01"),
    )
    fast = UsageRecord.of(**args)  # type: ignore[arg-type]
    valid = UsageRecord(**args, record_id=fast.record_id)  # type: ignore[arg-type]
    assert fast == valid and fast.model_dump_json() == valid.model_dump_json()
    assert UsageRecord.model_validate_json(fast.model_dump_json()) == fast
    assert len(fast.record_id) == 32 and fast.record_id != UsageRecord.of(**args).record_id  # type: ignore[arg-type]
    assert fast.day == "2026-03-01"
    odd = UsageRecord.of(**{**args, "status": "200", "timestamp": 5})  # type: ignore[arg-type]
    assert odd.status == 200 and odd.timestamp == 5.0 and odd.day == "1970-01-01"


def test_utc_day_matches_datetime() -> None:
    from aimiddleware.usage.ledger import utc_day

    for t in (0.0, 86399.5, 86400.0, -1.0, 1_767_225_599.25, 1_767_225_600.0, 4_102_444_800.0):
        want = datetime.fromtimestamp(t, tz=UTC).date().isoformat()
        assert utc_day(t) == want


async def test_record_values_reads_back_as_record_does() -> None:
    """The memory ledger's fast write (values, record built on first read) gives readers
    exactly what record(UsageRecord.of(...)) gives."""
    rows = [
        ("alice", f"r{i}", model, "v1" if model else None,
         Usage(input_tokens=100 + i, output_tokens=20, cached_input_tokens=i,
               reasoning_tokens=5 * (i % 2)),
         cost, reason, reason.upper() if reason else None, 200, 3.14159 + i,
         ts("2026-03-01" if i < 4 else "2026-03-02"))
        for i, (model, cost, reason) in enumerate([
            ("gpt-4o", Decimal("0.0000024"), "stop"), ("gpt-4o", Decimal("0.01"), "length"),
            ("gpt-4o", None, None), (None, Decimal("0.5"), "stop"), ("gpt-4o", Decimal(0), "x"),
        ])
    ]
    fast, slow = MemoryLedger(), MemoryLedger()
    for row in rows:
        nanos = None if row[5] is None else int(row[5] * 10**9)
        assert fast.record_values(row, nanos if row[1] != "r1" else None) is True
        p, rid, model, version, usage, cost, reason, raw, status, ms, t = row
        await slow.record(UsageRecord.of(
            principal=p, request_id=rid, model=model, model_version=version, usage=usage,
            estimated_cost=cost, finish_reason=reason, raw_finish_reason=raw, status=status,
            duration_ms=round(ms, 3), timestamp=t))
    assert await fast.query("alice") == await slow.query("alice")
    assert [a.model_dump() for a in await fast.query("alice")] == [
        a.model_dump() for a in await slow.query("alice")]
    for row in rows:
        got = await fast.get_request("alice", row[1])
        want = await slow.get_request("alice", row[1])
        assert got is not None and want is not None
        assert got.record.model_dump(exclude={"record_id"}) == want.record.model_dump(
            exclude={"record_id"})
        again = await fast.get_request("alice", row[1])
        assert again is not None and again.record.record_id == got.record.record_id
        assert len(got.record.record_id) == 32
    fb = Feedback(request_id="r0", rating=4)
    assert await fast.add_feedback("alice", fb) and await slow.add_feedback("alice", fb)
    assert await fast.query("alice") == await slow.query("alice")
    # values that need validation, or a pending retry: the caller records the usual way
    odd = ("alice", "r9", 5, None, Usage(), None, None, None, 200, 1.0, ts("2026-03-01"))
    assert fast.record_values(odd) is False  # type: ignore[arg-type]
    fast._pending.append(UsageRecord.of(**dict(zip(
        ("principal", "request_id", "model", "model_version", "usage", "estimated_cost",
         "finish_reason", "raw_finish_reason", "status", "duration_ms", "timestamp"),
        rows[0], strict=True))))
    assert fast.record_values(rows[0]) is False


async def test_a_record_the_store_cannot_take_does_not_block_the_others(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    # A count past the store's integer range fails every time: retrying it would queue every
    # later record behind it. It is logged whole and dropped; the rest are written.
    with caplog.at_level(logging.ERROR, logger="aimiddleware.usage"):
        await ledger.record(rec(rid="huge", inp=2**64))
        await ledger.record(rec(rid="next"))
    assert ledger.pending == 0
    assert await ledger.get_request("alice", "next") is not None
    if not isinstance(ledger, MemoryLedger):  # (in process, any int fits)
        assert any("cannot store" in r.message for r in caplog.records)


async def test_memory_ledger_last_key_cache_keeps_lru_and_totals() -> None:
    """A run of writes to one aggregate skips its lookup: the bounds, the least recently
    used order (feedback and other keys in between) and every total stay as without it."""
    from aimiddleware.usage.ledger_memory import _pack

    usage = Usage.from_openai_chat({"prompt_tokens": 12, "completion_tokens": 1})
    assert type(_pack(usage)) is tuple and len(_pack(usage)) == 6  # the usual: 6 values

    def row(i: int, model: str) -> tuple:  # type: ignore[type-arg]
        return ("alice", f"r{i}", model, None, usage, Decimal("0.000002"), "stop", "stop",
                200, 1.0, ts("2026-03-01"))

    fast = MemoryLedger(max_aggregates=2, max_requests=3)
    slow = MemoryLedger(max_aggregates=2, max_requests=3)
    plan = ["a", "a", "b", "a", "fb:r3", "c", "c", "b", "b", "fb:r8", "a"]
    for i, step in enumerate(plan):
        if step.startswith("fb:"):
            fb = Feedback(request_id=step[3:], rating=3)
            assert await fast.add_feedback("alice", fb) is await slow.add_feedback("alice", fb)
            continue
        r = row(i, step)
        assert fast.record_values(r) is True  # type: ignore[arg-type]
        p, rid, model, version, u, cost, reason, raw, status, ms, t = r
        await slow.record(UsageRecord.of(
            principal=p, request_id=rid, model=model, model_version=version, usage=u,
            estimated_cost=cost, finish_reason=reason, raw_finish_reason=raw, status=status,
            duration_ms=ms, timestamp=t))
        assert list(fast._aggs) == list(slow._aggs)
        assert list(fast._requests) == list(slow._requests)
    assert await fast.query("alice") == await slow.query("alice")
    for rid in list(fast._requests):
        got, want = await fast.get_request("alice", rid[1]), await slow.get_request("alice", rid[1])
        assert got is not None and want is not None
        assert got.record.usage == want.record.usage == usage
        assert got.record.usage.model_fields_set == usage.model_fields_set
        assert got.feedback == want.feedback


def test_memory_ledger_aggregates_are_untracked_by_the_gc() -> None:
    """An aggregate's counters (and a request's row) are plain data the garbage collector
    does not track: 100,000 aggregates add nothing to a full collection (they were a list
    and its holder each: 200,000 objects, ~60 ms more per full collection, measured)."""

    def fill(n: int) -> MemoryLedger:
        led = MemoryLedger()
        for i in range(n):
            usage = Usage(input_tokens=20 + i % 50, output_tokens=100, total_tokens=120 + i % 50)
            row = (f"p{i}", f"r{i}", "m", None, usage, Decimal("0.001"), "stop", "stop", 200,
                   1.5, ts("2026-03-01"))
            assert led.record_values(row)  # type: ignore[arg-type]
        return led

    assert tracked_per_entry(fill) < 0.01
    led = fill(3)
    assert [a.requests for a in anyio.run(led.query, "p1")] == [1]
