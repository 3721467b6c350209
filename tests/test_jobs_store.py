"""JobStore contract, one body against memory and a real Redis/Valkey."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import anyio
import pytest

from aimiddleware.jobs import Job, make_store
from aimiddleware.jobs.models import Delivery
from aimiddleware.storage import Storage


async def test_create_is_idempotent_per_principal(storage: Storage) -> None:
    store = make_store(storage)
    a = Job(id="job_a", principal="p1", input=1).stored()
    b = Job(id="job_b", principal="p1", input=2).stored()
    assert await store.create("p1", "job_a", a, "k") == ("job_a", a)
    owner, raw = await store.create("p1", "job_b", b, "k")
    assert (owner, raw) == ("job_a", a)
    assert await store.get("p1", "job_b") is None  # the loser was never kept
    assert (await store.create("p2", "job_c", b, "k"))[0] == "job_c"  # other principal
    assert await store.get("p2", "job_a") is None
    assert (await store.create("p1", "job_d", b, None))[0] == "job_d"


async def test_concurrent_takeovers_of_an_expired_owners_key_make_one_job(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each creator that found the key's owner expired wrote its own record and then the key
    # without NX: concurrent retries of one submission (on several workers) each started a
    # job.
    store = make_store(storage)
    old = Job(id="job_old", principal="p", input=0).stored()
    await store.create("p", "job_old", old, "k")
    if storage.is_memory:
        store._records.pop(("p", "job_old"))  # type: ignore[attr-defined]
    else:
        await storage.redis.delete(storage.key("jobs", "p", "job_old"))  # (expired)
        get = storage.redis.get

        async def slow_get(*args: Any, **kwargs: Any) -> Any:
            found = await get(*args, **kwargs)  # (every creator reads before any writes,
            await anyio.sleep(0.05)  # as creators on other workers may)
            return found

        monkeypatch.setattr(storage.redis, "get", slow_get)
    records = {f"job_{i}": Job(id=f"job_{i}", principal="p", input=i).stored() for i in range(20)}
    results = await asyncio.gather(
        *(store.create("p", rec_id, data, "k") for rec_id, data in records.items())
    )
    owners = {owner for owner, _ in results}
    assert len(owners) == 1, owners
    [owner] = owners
    assert all(raw == records[owner] for _, raw in results)
    kept = [rec_id for rec_id in records if await store.get("p", rec_id) is not None]
    assert kept == [owner]  # (the others' records never kept)


async def test_one_caller_claims_the_run_of_a_queued_record(storage: Storage) -> None:
    # The claim a task queue's delivery takes before running a record: one of many callers
    # at once, only while the record is as it read it and no worker holds the lease.
    store = make_store(storage)
    raw = Job(id="job_q", principal="p", input={}).stored()
    await store.create("p", "job_q", raw, None)
    won = await asyncio.gather(*(store.claim_run("p", "job_q", raw, 0.3) for _ in range(8)))
    assert sorted(won) == [False] * 7 + [True]
    assert await store.alive("p", "job_q")  # (the winner holds the lease)
    await anyio.sleep(0.4)  # (the winner died before starting it: its lease lapses)
    assert await store.claim_run("p", "job_q", raw, 0.3)
    await anyio.sleep(0.4)
    started = Job(id="job_q", principal="p", input={}, status="in_progress").stored()
    await store.put("p", "job_q", started)
    assert not await store.claim_run("p", "job_q", raw, 0.3)  # (no longer as it was read)
    assert not await store.claim_run("p", "job_none", raw, 0.3)  # (no such record)
    assert not await store.claim_run("other", "job_q", raw, 0.3)


async def test_event_log_resumes_after_an_id(storage: Storage) -> None:
    store = make_store(storage)
    ids = [await store.append_event("p", "job_x", "job.partial", f'{{"i":{i}}}')
           for i in range(5)]
    everything = await store.read_events("p", "job_x", None, wait=0.1)
    assert [e[0] for e in everything] == ids
    rest = await store.read_events("p", "job_x", ids[1], wait=0.1)
    assert [e[2] for e in rest] == ['{"i":2}', '{"i":3}', '{"i":4}']
    assert await store.read_events("p", "job_x", ids[-1], wait=0.05) == []
    assert await store.read_events("other", "job_x", None, wait=0.05) == []
    # an unknown or malformed Last-Event-ID replays from the start, never errors
    assert len(await store.read_events("p", "job_x", "garbage\n", wait=0.05)) == 5
    # a resume point: an id of the log (or between two of its ids), else None (the start)
    assert [await store.resume_point("p", "job_x", i) for i in ids] == ids
    past = "6" if storage.is_memory else f"{int(ids[-1].split('-')[0]) + 1}-0"
    for unknown in ("garbage\n", past, "99999999999999999999-0", "0"):
        assert await store.resume_point("p", "job_x", unknown) is None, unknown
    assert await store.resume_point("p", "job_y", ids[0]) is None  # (an empty log)

    got: list[tuple[str, str, str]] = []
    # One blocking read that outlasts the append below by far, so that a stalled machine
    # cannot make it return empty first (on Redis the block is capped at half the client's
    # socket timeout: a client that allows it).
    patient = storage if storage.is_memory else Storage(storage.url, socket_timeout=12)
    reading = store if storage.is_memory else make_store(patient)

    async def reader() -> None:
        got.extend(await reading.read_events("p", "job_x", ids[-1], wait=5.0))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.sleep(0.1)
            await store.append_event("p", "job_x", "job.completed", "{}")
    finally:
        if patient is not storage:
            await patient.aclose()
    assert [g[1] for g in got] == ["job.completed"]


async def test_cancel_flag_and_results(storage: Storage) -> None:
    store = make_store(storage)
    assert not await store.cancel_requested("p", "job_1")
    await store.request_cancel("p", "job_1")
    assert await store.cancel_requested("p", "job_1")
    assert not await store.cancel_requested("q", "job_1")
    await store.append_result("p", "batch_1", '{"a":1}')
    await store.append_result("p", "batch_1", '{"a":2}')
    assert await store.results("p", "batch_1") == ['{"a":1}', '{"a":2}']
    assert await store.results("q", "batch_1") == []


async def test_outbox_claims_due_deliveries_with_a_lease(storage: Storage) -> None:
    store = make_store(storage)
    now = time.time()
    due = Delivery(id="msg_due", url="https://x.example/h", payload="{}", next_at=now - 1)
    later = Delivery(id="msg_later", url="https://x.example/h", payload="{}", next_at=now + 60)
    await store.outbox_put(due.id, due.model_dump_json(), due.next_at, "x.example:443")
    await store.outbox_put(later.id, later.model_dump_json(), later.next_at, "x.example:443")
    claimed = await store.outbox_claim(now, lease=30, limit=10, per_host=4)
    assert [Delivery.model_validate_json(c).id for c in claimed] == ["msg_due"]
    # leased to the first claim, then its lease expired
    assert await store.outbox_claim(now, lease=30, limit=10, per_host=4) == []
    assert len(await store.outbox_claim(now + 31, lease=30, limit=10, per_host=4)) == 1
    done = due.model_copy(update={"state": "succeeded"})
    await store.outbox_done(due.id, done.model_dump_json())
    again = await store.outbox_claim(now + 100, lease=30, limit=10, per_host=4)
    assert [Delivery.model_validate_json(c).id for c in again] == ["msg_later"]
    record = await store.outbox_get("msg_due")
    assert record is not None and Delivery.model_validate_json(record).state == "succeeded"


async def test_a_saturated_host_takes_no_claim_from_the_others(storage: Storage) -> None:
    """Deliveries were claimed oldest first whatever their host: with 16 slots and hundreds
    of messages due for one receiver that never answers, every claim was that receiver's
    and a message to any other waited behind all of them. A host with ``per_host`` leased
    deliveries gets no more; its due ones stay as they are, and the others' are claimed."""
    store = make_store(storage)
    now = time.time()

    def ids(claimed: list[str]) -> list[str]:
        return [json.loads(c)["id"] for c in claimed]

    for n in range(500):  # (due before the good one)
        bad = Delivery(id=f"msg_bad{n}", url="https://bad.example/h", payload="{}",
                       next_at=now - 10 + n / 1000)
        await store.outbox_put(bad.id, bad.model_dump_json(), bad.next_at, "bad.example:443")
    good = Delivery(id="msg_good", url="https://good.example/h", payload="{}", next_at=now - 1)
    await store.outbox_put(good.id, good.model_dump_json(), good.next_at, "good.example:443")
    claimed = ids(await store.outbox_claim(now, lease=30, limit=16, per_host=4))
    assert sorted(claimed) == sorted(["msg_bad0", "msg_bad1", "msg_bad2", "msg_bad3", "msg_good"])
    for _ in range(3):  # however often it is asked: the saturated host's due ones wait
        assert await store.outbox_claim(now, lease=30, limit=16, per_host=4) == []
    waiting = await store.outbox_get("msg_bad4")
    assert waiting is not None and Delivery.model_validate_json(waiting).attempts == []
    # An attempt that ends (rescheduled, or finished) frees its host's slot at once.
    await store.outbox_put("msg_bad0", '{"id":"msg_bad0"}', now + 60, "bad.example:443")
    assert ids(await store.outbox_claim(now, lease=30, limit=16, per_host=4)) == ["msg_bad4"]
    await store.outbox_done("msg_bad1", '{"id":"msg_bad1"}')
    assert ids(await store.outbox_claim(now, lease=30, limit=16, per_host=4)) == ["msg_bad5"]
    # A new message to a saturated host waits too; one to another host does not.
    await store.outbox_put("msg_bad_new", '{"id":"msg_bad_new"}', now - 20, "bad.example:443")
    await store.outbox_put("msg_other", '{"id":"msg_other"}', now, "other.example:443")
    assert ids(await store.outbox_claim(now, lease=30, limit=16, per_host=4)) == ["msg_other"]
    # Leases that ended (their dispatcher died mid-attempt) hold no slot: the host's oldest
    # due deliveries are claimed, no more than the cap (those leased are due again, later).
    later = ids(await store.outbox_claim(now + 31, lease=30, limit=16, per_host=4))
    assert sorted(later) == [
        "msg_bad6", "msg_bad7", "msg_bad8", "msg_bad_new", "msg_good", "msg_other"]


async def test_deliveries_left_in_the_earlier_due_set_are_still_sent(redis_url: str) -> None:
    """Before hosts were capped, Redis kept one due set for every host; a delivery an
    earlier version left there (a retry hours ahead) is claimed as before, and moves to its
    host's queue once it is put back."""
    storage = Storage(redis_url)
    store = make_store(storage)
    now = time.time()
    old = Delivery(id="msg_old", url="https://x.example/h", payload="{}", next_at=now - 1)
    r = storage.redis
    await r.hset(storage.key("jobs", "outbox", "data"), old.id, old.model_dump_json())
    await r.zadd(storage.key("jobs", "outbox", "due"), {old.id: old.next_at})
    try:
        claimed = await store.outbox_claim(now, lease=30, limit=16, per_host=4)
        assert [Delivery.model_validate_json(c).id for c in claimed] == ["msg_old"]
        assert await store.outbox_claim(now, lease=30, limit=16, per_host=4) == []  # leased
        await store.outbox_put(old.id, old.model_dump_json(), now + 60, "x.example:443")
        assert await r.zcard(storage.key("jobs", "outbox", "due")) == 0
        again = await store.outbox_claim(now + 61, lease=30, limit=16, per_host=4)
        assert [Delivery.model_validate_json(c).id for c in again] == ["msg_old"]
    finally:
        await storage.aclose()


async def test_finished_deliveries_expire_after_the_retention(storage: Storage) -> None:
    # On Redis a finished delivery (its whole payload) stayed in the outbox hash for ever.
    store = make_store(storage, ttl=1)
    now = time.time()
    pending = Delivery(id="msg_pending", url="https://x.example/h", payload="{}", next_at=now + 60)
    await store.outbox_put(pending.id, pending.model_dump_json(), pending.next_at,
                           "x.example:443")
    for delivery_id in ("msg_old", "msg_old_too"):
        await store.outbox_done(delivery_id, "{}")
    await anyio.sleep(1.2)
    await store.outbox_done("msg_new", "{}")  # finishing one drops those past retention
    assert await store.outbox_get("msg_old") is None
    assert await store.outbox_get("msg_old_too") is None
    assert await store.outbox_get("msg_new") == "{}"
    assert await store.outbox_get(pending.id) is not None  # (not finished: kept)
    await anyio.sleep(1.2)
    # so does a claim
    assert await store.outbox_claim(time.time(), lease=30, limit=10, per_host=4) == []
    assert await store.outbox_get("msg_new") is None
    assert await store.outbox_get(pending.id) is not None


async def test_many_result_lines_are_appended_in_a_few_round_trips(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cancelling a batch of 100,000 items wrote its leftover lines one round trip each.
    store = make_store(storage)
    await store.append_result("p", "batch_1", "first")
    lines = [f'{{"custom_id":"i{n}","type":"cancelled"}}' for n in range(25_000)]
    calls = []
    script = storage.script

    def counting(text: str) -> Any:
        calls.append(text)
        return script(text)

    monkeypatch.setattr(storage, "script", counting)
    await store.append_results("p", "batch_1", lines)
    await store.append_results("p", "batch_1", [])
    assert await store.results("p", "batch_1") == ["first", *lines]
    assert len(calls) <= 30  # (none in memory)


async def test_memory_store_forgets_records_after_ttl() -> None:
    from aimiddleware.jobs.memory import MemoryJobStore

    store = MemoryJobStore(ttl=0.2)
    await store.create("p", "job_old", "{}", "key-1")
    await store.append_event("p", "job_old", "job.status", "{}")
    await store.request_cancel("p", "job_old")
    await store.outbox_done("msg_old", "{}")
    await anyio.sleep(0.3)
    assert (await store.create("p", "job_new", "{}", "key-1"))[0] == "job_new"  # key freed
    assert await store.get("p", "job_old") is None
    assert await store.read_events("p", "job_old", None, wait=0) == []
    assert not await store.cancel_requested("p", "job_old")
    await store.outbox_done("msg_new", "{}")
    assert await store.outbox_get("msg_old") is None
    assert await store.outbox_get("msg_new") == "{}"
