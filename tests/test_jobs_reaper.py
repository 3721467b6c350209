"""The reaper: a record whose worker is gone is reported failed (worker_lost), a queued one
included, once however many read it at the same time, a batch with a result for every
item; one whose worker is alive, waiting for a slot, is left alone."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from aimiddleware import Storage
from aimiddleware.context import key_principal
from aimiddleware.errors import StoreUnavailable
from aimiddleware.jobs import Batch, CallbackPolicy, Job, JobContext, JobsRouter
from aimiddleware.jobs.models import BatchCounts, BatchItem, BatchItemResult, new_id
from aimiddleware.usage import MemoryLedger, Usage
from tests.test_jobs_charge import running

AUTH = {"authorization": "Bearer k"}
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


async def test_a_queued_job_without_a_worker_is_reported_lost(storage: Storage) -> None:
    # A job still queued when its worker died (or whose first write failed in an outage)
    # stayed queued until its retention ran out, and a DELETE left it "cancelling".
    gate = anyio.Event()

    async def work(ctx: JobContext, input: Any) -> Any:
        await gate.wait()
        return {"ok": True}

    jobs = JobsRouter(work, storage=storage, prefix="/v1", lease=0.5, max_concurrent_jobs=1)
    async with running(jobs) as c:
        busy = (await c.post("/v1/jobs", json={"input": {}}, headers=AUTH)).json()["id"]
        waiting = (await c.post("/v1/jobs", json={"input": {}}, headers=AUTH)).json()["id"]
        await anyio.sleep(1.0)  # two leases: the waiting job's worker keeps renewing its own
        assert (await c.get(f"/v1/jobs/{waiting}", headers=AUTH)).json()["status"] == "queued"

        # A queued record no worker took (its worker died before it had a slot).
        principal = key_principal(b"k")  # (the caller's, as the stack computes it)
        orphan = Job(id=new_id("job"), principal=principal, input={}, fingerprint="f",
                     created_at=time.time() - 1.0)
        await jobs.store.create(principal, orphan.id, orphan.stored(), None)
        lost = (await c.get(f"/v1/jobs/{orphan.id}", headers=AUTH)).json()
        assert lost["status"] == "failed" and lost["error"]["code"] == "worker_lost"
        assert lost["error"]["retryable"] is True
        cancelled = await c.delete(f"/v1/jobs/{orphan.id}", headers=AUTH)
        assert cancelled.json()["status"] == "failed"  # (final: not left "cancelling")

        gate.set()
        for job_id in (busy, waiting):
            with anyio.fail_after(10):
                while True:  # (polling, as a client does)
                    job = (await c.get(f"/v1/jobs/{job_id}", headers=AUTH)).json()
                    if job["status"] == "completed":
                        break
                    await anyio.sleep(0.02)



async def _never(ctx: JobContext, input: Any) -> Any:
    raise AssertionError("not run here")


async def test_many_readers_of_a_lost_job_report_it_once(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every reader that found the lease lapsed reaped the job itself: as many job.failed
    # events and webhooks (each with its own webhook-id) as readers, each with its own
    # finished_at, and a stream resumed at the first job.failed got another.
    jobs = JobsRouter(
        _never, storage=storage, prefix="/v1", principal=lambda request: "p", lease=0.5,
        webhook_secrets=[SECRET],
        callback_policy=CallbackPolicy(schemes=("http",), allow_hosts=["127.0.0.1"]),
    )
    alive = jobs.store.alive

    async def slow_alive(principal: str, rec_id: str) -> bool:
        # Every reader finds the lease lapsed before any has acted on it (as readers on
        # other workers do), whatever the store's timing.
        found = await alive(principal, rec_id)
        await anyio.sleep(0.05)
        return found

    monkeypatch.setattr(jobs.store, "alive", slow_alive)
    dead = Job(id=new_id("job"), principal="p", status="in_progress", input={},
               callback_url="http://127.0.0.1:9/hook", fingerprint="f", started_at=time.time())
    await jobs.store.put("p", dead.id, dead.stored())  # (its worker gone: no lease)
    seen: list[dict[str, Any]] = []
    streamed: list[str] = []
    transport = httpx.ASGITransport(Starlette(routes=jobs.routes))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:

        async def read(i: int) -> None:
            if i % 4 == 3:  # (a stream reaps too)
                streamed.append((await c.get(f"/v1/jobs/{dead.id}/events")).text)
            else:
                seen.append((await c.get(f"/v1/jobs/{dead.id}")).json())

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(24):
                    tg.start_soon(read, i)

        assert {(j["status"], j["error"]["code"]) for j in seen} == {("failed", "worker_lost")}
        assert len({j["finished_at"] for j in seen}) == 1  # one final record
        events = await jobs.store.read_events("p", dead.id, None, wait=0.1)
        assert [e[1] for e in events] == ["job.failed"]
        assert all(text.count("event: job.failed") == 1 for text in streamed)
        resumed = await c.get(f"/v1/jobs/{dead.id}/events",
                              headers={"last-event-id": events[0][0]})
        assert resumed.status_code == 204
    # One webhook: every delivery in the outbox, whenever due.
    deliveries = await jobs.store.outbox_claim(time.time() + 86400, lease=30, limit=100,
                                                 per_host=100)
    assert len(deliveries) == 1


@pytest.mark.parametrize("failing", ["put", "append_event"])
async def test_a_reaper_whose_writes_failed_is_taken_over_after_a_lease(
    storage: Storage, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    # The claim to reap was held for the whole retention: once its winner's write failed (a
    # store blip, a 503 for that reader), nobody reported the loss, and every later read
    # waited 5 s for a report that never came. With the record written first, a failed event
    # write was never made good: the record was final, so nobody reaped it again.

    jobs = JobsRouter(_never, storage=storage, prefix="/v1", principal=lambda r: "p",
                      lease=0.5)
    dead = Job(id=new_id("job"), principal="p", status="in_progress", input={},
               fingerprint="f", started_at=time.time())
    await jobs.store.put("p", dead.id, dead.stored())
    write, blips = getattr(jobs.store, failing), [1]

    async def flaky(*args: Any) -> Any:
        if blips:
            blips.pop()
            raise StoreUnavailable("The job store is unavailable.", retry_after=1)
        return await write(*args)

    monkeypatch.setattr(jobs.store, failing, flaky)
    transport = httpx.ASGITransport(Starlette(routes=jobs.routes))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.get(f"/v1/jobs/{dead.id}")).status_code == 503
        await anyio.sleep(0.6)  # (the failed reaper's claim lapses after a lease)
        started = time.monotonic()
        found = (await c.get(f"/v1/jobs/{dead.id}")).json()
        assert time.monotonic() - started < 2
    assert (found["status"], found["error"]["code"]) == ("failed", "worker_lost")
    events = await jobs.store.read_events("p", dead.id, None, wait=0.1)
    assert {e[1] for e in events} == {"job.failed"}  # (twice if the first got that far)


async def test_a_claim_left_by_the_previous_version_does_not_block_the_reaper(
    redis_url: str,
) -> None:
    # The previous version held ":reaped" for the whole retention: a job whose reap had
    # failed under it stayed in_progress after the upgrade.
    storage = Storage(redis_url)
    jobs = JobsRouter(_never, storage=storage, prefix="/v1", principal=lambda r: "p",
                      lease=0.5)
    dead = Job(id=new_id("job"), principal="p", status="in_progress", input={},
               fingerprint="f", started_at=time.time())
    await jobs.store.put("p", dead.id, dead.stored())
    await storage.redis.set(storage.key("jobs", "p", dead.id, "reaped"), b"1", ex=7 * 86400)
    transport = httpx.ASGITransport(Starlette(routes=jobs.routes))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        found = (await c.get(f"/v1/jobs/{dead.id}")).json()
    assert (found["status"], found["error"]["code"]) == ("failed", "worker_lost")
    await storage.aclose()


async def test_a_lost_batch_has_a_result_for_every_item(storage: Storage) -> None:
    # A batch whose worker died ended failed, but its unfinished items had no result line
    # (clients matching by custom_id missed them) and its counts said they were processing.
    jobs = JobsRouter(_never, storage=storage, prefix="/v1", principal=lambda request: "p")
    n = 100_000
    items = [BatchItem(custom_id=f"i{k}", input={}) for k in range(n)]
    dead = Batch(id=new_id("batch"), principal="p", status="in_progress", items=items,
                 total=n, counts=BatchCounts(processing=n), started_at=time.time())
    await jobs.store.put("p", dead.id, dead.stored())
    for k in range(32):
        kind = "succeeded" if k % 4 else "errored"
        line = BatchItemResult(custom_id=f"i{k}", type=kind)  # type: ignore[arg-type]
        await jobs.store.append_result("p", dead.id, line.model_dump_json())
    transport = httpx.ASGITransport(Starlette(routes=jobs.routes))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
        body = (await c.get(f"/v1/batches/{dead.id}")).json()
        assert body["status"] == "failed" and body["error"]["code"] == "worker_lost"
        assert body["counts"] == {"processing": 0, "succeeded": 24, "errored": n - 24,
                                  "cancelled": 0, "expired": 0}
        lines = [json.loads(x) for x in
                 (await c.get(f"/v1/batches/{dead.id}/results")).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(i.custom_id for i in items)
    lost = [x for x in lines if x["custom_id"] == f"i{n - 1}"]
    assert lost[0]["type"] == "errored" and lost[0]["error"]["code"] == "worker_lost"
    assert lost[0]["error"]["retryable"] is True


class _CutOff:
    """A worker's view of the store: while ``cut``, every call fails as an outage does (the
    worker is alive but cannot reach the store; the readers can)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.cut = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.cut:
                raise StoreUnavailable("The job store is unavailable.", retry_after=1)
            return await method(*args, **kwargs)

        return call


async def _kinds(store: Any, rec_id: str) -> list[str]:
    """The types of the events of ``p``'s record ``rec_id``, in order."""
    return [e[1] for e in await store.read_events("p", rec_id, None, wait=0.05)]


async def test_a_worker_cut_off_past_its_lease_writes_nothing_once_reaped(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    # A worker cut off from the store for longer than its lease is reported lost by the
    # reaper; when it reached the store again it still wrote its progress, its result and a
    # final record: a job the client was told had failed (and resubmitted) became completed.
    gate = anyio.Event()

    async def work(ctx: JobContext, input: Any) -> Any:
        await ctx.record_usage({"input_tokens": 40, "output_tokens": 2}, model="m")
        await gate.wait()
        await ctx.progress(0.5, "half way")
        return {"answer": 42}

    ledger = MemoryLedger()
    jobs = JobsRouter(work, storage=storage, prefix="/v1", principal=lambda r: "p",
                      lease=0.5, cancel_poll=0.02, ledger=ledger)
    view = jobs.runner.store = _CutOff(jobs.store)  # type: ignore[assignment]
    async with running(jobs) as c:
        job_id = (await c.post("/v1/jobs", json={"input": {}})).json()["id"]
        with anyio.fail_after(10):  # (its usage written: nothing left to write during the cut)
            while "job.usage" not in await _kinds(jobs.store, job_id):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        view.cut = True
        await anyio.sleep(0.6)  # (past the lease: no beat reached the store)
        lost = (await c.get(f"/v1/jobs/{job_id}")).json()
        assert (lost["status"], lost["error"]["code"]) == ("failed", "worker_lost")
        view.cut = False
        gate.set()
        await anyio.sleep(0.5)  # (the worker reaches the store again, and the job goes on)
        after = (await c.get(f"/v1/jobs/{job_id}")).json()
    assert after == lost  # the record the client was told, unchanged
    kinds = await _kinds(jobs.store, job_id)
    assert kinds[-1] == "job.failed" and kinds.count("job.failed") == 1, kinds
    assert "job.completed" not in kinds and "job.progress" not in kinds
    assert any("reported lost" in r.getMessage() for r in caplog.records)
    # What it used is in the usage history once: the reaper's row (the worker's own, on
    # its way out, has the same id).
    row = await ledger.get_request("p", job_id)
    assert row is not None and row.record.usage.input_tokens == 40
    assert (row.record.model, row.record.raw_finish_reason) == (None, "failed")
    (day,) = await ledger.query("p")
    assert (day.requests, day.input_tokens) == (1, 40)


async def test_a_batch_cut_off_past_its_lease_has_one_result_per_item(storage: Storage) -> None:
    # Its items finished after the reaper wrote "errored" lines for them got a second line.
    gate = anyio.Event()

    async def work(ctx: JobContext, input: Any) -> Any:
        if input["n"] >= 2:
            await gate.wait()
        return {"n": input["n"]}

    jobs = JobsRouter(work, storage=storage, prefix="/v1", principal=lambda r: "p",
                      lease=0.5, cancel_poll=0.02, batch_concurrency=4)
    view = jobs.runner.store = _CutOff(jobs.store)  # type: ignore[assignment]
    items = [{"custom_id": f"i{n}", "input": {"n": n}} for n in range(6)]
    async with running(jobs) as c:
        batch_id = (await c.post("/v1/batches", json={"items": items})).json()["id"]
        with anyio.fail_after(10):
            while len(await jobs.store.results("p", batch_id)) < 2:  # noqa: ASYNC110 (the store)
                await anyio.sleep(0.02)
        await anyio.sleep(0.3)  # (its record written: nothing left to write during the cut)
        view.cut = True
        await anyio.sleep(0.6)
        lost = (await c.get(f"/v1/batches/{batch_id}")).json()
        assert (lost["status"], lost["error"]["code"]) == ("failed", "worker_lost")
        view.cut = False
        gate.set()
        await anyio.sleep(0.5)
        after = (await c.get(f"/v1/batches/{batch_id}")).json()
        lines = [json.loads(x) for x in
                 (await c.get(f"/v1/batches/{batch_id}/results")).text.splitlines()]
    assert after == lost
    assert sorted(x["custom_id"] for x in lines) == [f"i{n}" for n in range(6)]
    assert {x["custom_id"]: x["type"] for x in lines} == {
        **{f"i{n}": "succeeded" for n in range(2)}, **{f"i{n}": "errored" for n in range(2, 6)}
    }


async def test_a_crashed_worker_s_job_and_batch_are_in_the_usage_history(
    storage: Storage,
) -> None:
    # A job whose worker died (a crash, not a shutdown) was reported failed with no row in
    # the usage history (ledger=), though its calls had been charged to the caller's limits:
    # the row was written only by the worker, at the job's end.
    ledger = MemoryLedger()
    jobs = JobsRouter(_never, storage=storage, prefix="/v1", principal=lambda r: "p",
                      ledger=ledger)
    used = Usage(input_tokens=30, output_tokens=7, total_tokens=37)
    started = time.time() - 5
    dead_job = Job(id=new_id("job"), principal="p", status="in_progress", usage=used,
                   cost=Decimal("0.25"), started_at=started)
    dead_batch = Batch(id=new_id("batch"), principal="p", status="in_progress", usage=used,
                       items=[BatchItem(custom_id="a", input={})], total=1,
                       counts=BatchCounts(processing=1), started_at=started)
    for rec in (dead_job, dead_batch):
        await jobs.store.put("p", rec.id, rec.stored())
    transport = httpx.ASGITransport(Starlette(routes=jobs.routes))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        for path in (f"/v1/jobs/{dead_job.id}", f"/v1/batches/{dead_batch.id}"):
            body = (await c.get(path)).json()
            assert (body["status"], body["error"]["code"]) == ("failed", "worker_lost")
            await c.get(path)  # (read again: reported once, one row)
    for rec, cost in ((dead_job, Decimal("0.25")), (dead_batch, None)):
        row = await ledger.get_request("p", rec.id)
        assert row is not None, rec.id
        got = row.record
        assert (got.model, got.usage, got.estimated_cost) == (None, used, cost)
        assert got.raw_finish_reason == "failed"
    (day,) = await ledger.query("p")
    assert (day.requests, day.input_tokens, day.model) == (2, 60, "unknown")
