"""Jobs and batches are charged to their submitter's limits (``JobsRouter(limiter=...)``):
a job's model calls are not a way around tokens/day or cost/day."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aimiddleware import Policy, RateLimiter, Storage, Usage, install
from aimiddleware.context import key_principal
from aimiddleware.jobs import JobContext, JobsRouter
from aimiddleware.jobs.memory import MemoryJobStore
from aimiddleware.ratelimit.memory import MemoryBackend
from aimiddleware.ratelimit.redis import RedisBackend
from aimiddleware.usage import MemoryLedger, UsageConfig
from tests.ratelimit_helpers import PRICES, counters


async def work(ctx: JobContext, input: Any) -> Any:
    if input["use"]:  # (the same body size either way: the submissions reserve alike)
        await ctx.record_usage({"input_tokens": 400, "output_tokens": 300}, model="gpt-4o-mini")
        await ctx.record_usage({"input_tokens": 10, "output_tokens": 5}, cost="0.5")
    for _ in range(input.get("big", 0)):
        await ctx.partial("chunk")
        await ctx.record_usage({"input_tokens": 1000, "output_tokens": 500})
    return {"ok": True}


async def chat(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def finished(c: httpx.AsyncClient, path: str, key: str) -> dict[str, Any]:
    with anyio.fail_after(10):
        while True:
            body: dict[str, Any] = (await c.get(path, headers=auth(key))).json()
            if body["status"] in ("completed", "failed", "cancelled", "expired"):
                return body
            await anyio.sleep(0.02)


@asynccontextmanager
async def running(jobs: JobsRouter, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """``jobs``' routes in an app with the stack (``options``: ``install()``'s), its runner
    running, and a client to it."""
    app = Starlette(routes=jobs.routes)
    install(app, **options)
    async with jobs.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://test"
    ) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_job_and_batch_usage_is_charged_to_the_submitter(storage: Storage) -> None:
    limiter = RateLimiter(
        Policy(requests="100/minute", tokens="2000/day", cost="2/day"),
        storage=storage, prices=PRICES,
    )
    jobs = JobsRouter(work, storage=storage, limiter=limiter, prefix="/v1")
    app = Starlette(routes=[*jobs.routes, Route("/v1/chat/completions", chat, methods=["POST"])])
    install(app, ratelimit=limiter)
    transport = httpx.ASGITransport(app)
    async with jobs.lifespan_context(app), httpx.AsyncClient(
        transport=transport, base_url="http://test"
    ) as c:
        for key, use in (("k1", 1), ("k2", 0)):
            job = await c.post("/v1/jobs", json={"input": {"use": use}}, headers=auth(key))
            assert job.status_code == 202, job.text
            done = await finished(c, f"/v1/jobs/{job.json()['id']}", key)
            assert done["status"] == "completed"
        with_usage, without = await counters(limiter, "k1"), await counters(limiter, "k2")
        assert with_usage["tokens:86400"] == 715
        # 400 x 0.15 + 300 x 0.60 per million, then 0.5 as given; in nano-units
        assert with_usage["cost:86400"] == 500_240_000
        # The submissions themselves take no tokens (their reservations are replaced).
        assert without == {"requests:60": without["requests:60"], "tokens:86400": 0,
                           "cost:86400": 0}

        # k1's day is now nearly spent: a request k2 may make is refused for k1.
        body = {"model": "gpt-4o-mini", "max_tokens": 1500,
                "messages": [{"role": "user", "content": "hi"}]}
        refused = await c.post("/v1/chat/completions", json=body, headers=auth("k1"))
        assert refused.status_code == 429
        assert refused.json()["dimension"] == "tokens"
        ok = await c.post("/v1/chat/completions", json=body, headers=auth("k2"))
        assert ok.status_code == 200

        # A submission that fails is refunded in full, its request included.
        bad = await c.post("/v1/jobs", json={"inputs": {}}, headers=auth("k4"))  # (a typo)
        assert bad.status_code == 400
        assert await counters(limiter, "k4") == {"requests:60": 0, "tokens:86400": 0,
                                                 "cost:86400": 0}

        # A batch's items are charged the same way.
        batch = await c.post("/v1/batches", headers=auth("k3"), json={
            "items": [{"custom_id": str(i), "input": {"use": 1}} for i in range(2)]})
        assert batch.status_code == 202, batch.text
        await finished(c, f"/v1/batches/{batch.json()['id']}", "k3")
        after = await counters(limiter, "k3")
        assert after["tokens:86400"] == 2 * 715 and after["cost:86400"] == 2 * 500_240_000


async def test_ids_that_name_another_key_are_not_found(storage: Storage) -> None:
    """A record's other keys in the store are its id plus a suffix (``:events``...): such
    an id is a 404 like any unknown one (on Redis it reached those keys: a 500)."""
    jobs = JobsRouter(work, storage=storage, prefix="/v1")
    async with running(jobs) as c:
        job = await c.post("/v1/jobs", json={"input": {"use": 0}}, headers=auth("k"))
        job_id = job.json()["id"]
        batch_id = (await c.post("/v1/batches", headers=auth("k"), json={
            "items": [{"custom_id": "a", "input": {"use": 0}}]})).json()["id"]
        await finished(c, f"/v1/jobs/{job_id}", "k")
        await finished(c, f"/v1/batches/{batch_id}", "k")
        for rec in (job_id, batch_id):
            kind = "jobs" if rec == job_id else "batches"
            for suffix in (":events", ":alive", ":results", ":cancel", ":x", "x"):
                for method, path in (("GET", f"/v1/{kind}/{rec}{suffix}"),
                                     ("GET", f"/v1/{kind}/{rec}{suffix}/events"),
                                     ("DELETE", f"/v1/{kind}/{rec}{suffix}")):
                    r = await c.request(method, path, headers=auth("k"))
                    assert r.status_code == 404, (method, path, r.text)
                    assert r.json()["error"]["code"] == "not_found"


async def test_a_job_stops_once_its_callers_budget_is_spent(storage: Storage) -> None:
    # Charged after the fact, a running job went on spending whatever the caller's budget.
    limiter = RateLimiter(Policy(tokens="2000/day"), storage=storage)
    jobs = JobsRouter(work, storage=storage, limiter=limiter, prefix="/v1")
    # (reading a job calls no model: over its budget, the caller can still read it)
    async with running(jobs, ratelimit=limiter, ratelimit_exempt=("/v1/jobs/*",)) as c:
        job = await c.post("/v1/jobs", json={"input": {"use": 0, "big": 5}}, headers=auth("k"))
        assert job.status_code == 202, job.text
        done = await finished(c, f"/v1/jobs/{job.json()['id']}", "k")
    assert done["status"] == "failed" and done["error"]["code"] == "quota_exceeded"
    assert done["partial_output"] == ["chunk", "chunk"]  # stopped after the 2nd call (3000)
    assert (await counters(limiter, "k"))["tokens:86400"] == 3000


async def test_charging_never_raises() -> None:
    def broken_tier(principal: str) -> str:
        raise RuntimeError("tier service down")

    limiter = RateLimiter(Policy(tokens="10/day"), tier=broken_tier)
    assert await limiter.charge("p", Usage(input_tokens=50, output_tokens=5)) is False


async def test_finished_jobs_and_batches_are_rows_of_the_usage_history(storage: Storage) -> None:
    ledger = MemoryLedger()
    jobs = JobsRouter(work, storage=storage, ledger=ledger, prefix="/v1")
    async with running(jobs, usage=UsageConfig(ledger=ledger)) as c:
        job = (await c.post("/v1/jobs", json={"input": {"use": 1}}, headers=auth("k"))).json()
        done = await finished(c, f"/v1/jobs/{job['id']}", "k")
        batch = (await c.post("/v1/batches", headers=auth("k"), json={
            "items": [{"custom_id": str(i), "input": {"use": 1}} for i in range(2)]})).json()
        await finished(c, f"/v1/batches/{batch['id']}", "k")
        idle = (await c.post("/v1/jobs", json={"input": {"use": 0}}, headers=auth("k"))).json()
        await finished(c, f"/v1/jobs/{idle['id']}", "k")
        unpriced = (await c.post("/v1/jobs", json={"input": {"use": 0, "big": 1}},
                                 headers=auth("k"))).json()
        await finished(c, f"/v1/jobs/{unpriced['id']}", "k")
    principal = key_principal(b"k")
    free = await ledger.get_request(principal, unpriced["id"])  # usage, but no cost given
    assert free is not None and free.record.estimated_cost is None  # (unpriced, not $0)
    row = await ledger.get_request(principal, job["id"])
    assert row is not None
    assert (row.record.usage.input_tokens, row.record.usage.output_tokens) == (410, 305)
    assert row.record.estimated_cost == Decimal(done["cost"]) == Decimal("0.5")
    assert row.record.model == "gpt-4o-mini"  # (the last one named)
    assert (row.record.finish_reason, row.record.raw_finish_reason) == ("stop", "completed")
    rows = await ledger.get_request(principal, batch["id"])
    assert rows is not None
    assert (rows.record.usage.input_tokens, rows.record.usage.output_tokens) == (820, 610)
    assert rows.record.estimated_cost == Decimal("1.0")
    assert await ledger.get_request(principal, idle["id"]) is None  # (used nothing)


async def test_a_batch_stops_calling_the_model_once_the_budget_is_spent(
    storage: Storage,
) -> None:
    # Each item found the budget spent only after its own call: a batch of 900 items went
    # on calling (and charging) the model for every one, to 2.2x the caller's limit.
    calls = 0

    async def item(ctx: JobContext, input: Any) -> Any:
        nonlocal calls
        calls += 1
        await ctx.record_usage({"input_tokens": 1000, "output_tokens": 500})
        return {"ok": True}

    limiter = RateLimiter(Policy(tokens="2000/day"), storage=storage)
    jobs = JobsRouter(item, storage=storage, limiter=limiter, prefix="/v1", batch_concurrency=1)
    async with running(jobs, ratelimit=limiter, ratelimit_exempt=("/v1/batches/*",)) as c:
        batch = await c.post("/v1/batches", headers=auth("k"), json={
            "items": [{"custom_id": str(i), "input": {}} for i in range(20)]})
        assert batch.status_code == 202, batch.text
        done = await finished(c, f"/v1/batches/{batch.json()['id']}", "k")
        lines = (await c.get(f"/v1/batches/{batch.json()['id']}/results",
                             headers=auth("k"))).text.splitlines()
    assert calls == 2  # the second call spent the budget; no item after it called the model
    assert done["counts"]["succeeded"] == 1 and done["counts"]["errored"] == 19
    errors = {json.loads(line)["error"]["code"] for line in lines if '"errored"' in line}
    assert errors == {"quota_exceeded"}
    assert (await counters(limiter, "k"))["tokens:86400"] == 3000


async def test_a_cancelled_batch_keeps_the_usage_of_its_unfinished_items(
    storage: Storage,
) -> None:
    # Usage an item reported before the batch was cancelled was charged, yet missing from the
    # batch record and the usage history.
    reported = anyio.Event()
    reports = 0

    async def item(ctx: JobContext, input: Any) -> Any:
        nonlocal reports
        await ctx.record_usage({"input_tokens": 40, "output_tokens": 2}, cost="0.01", model="m")
        reports += 1
        if reports == 2:
            reported.set()
        await anyio.sleep(30)  # (cancelled here)
        return {"ok": True}

    ledger = MemoryLedger()
    jobs = JobsRouter(item, storage=storage, ledger=ledger, prefix="/v1", batch_concurrency=2)
    async with running(jobs) as c:
        batch = (await c.post("/v1/batches", headers=auth("k"), json={
            "items": [{"custom_id": str(i), "input": {}} for i in range(2)]})).json()
        with anyio.fail_after(10):
            await reported.wait()  # (both items have reported)
        await c.delete(f"/v1/batches/{batch['id']}", headers=auth("k"))
        done = await finished(c, f"/v1/batches/{batch['id']}", "k")
    assert done["status"] == "cancelled" and done["counts"]["cancelled"] == 2
    assert done["usage"]["input_tokens"] == 80 and Decimal(done["cost"]) == Decimal("0.02")
    row = await ledger.get_request(key_principal(b"k"), batch["id"])
    assert row is not None and row.record.usage.input_tokens == 80
    assert row.record.raw_finish_reason == "cancelled"


class _SlowResults(MemoryJobStore):
    """A store whose result writes take a while once ``slow`` is set (a busy Redis)."""

    def __init__(self) -> None:
        super().__init__()
        self.slow = anyio.Event()
        self.writing = anyio.Event()

    async def append_result(
        self, principal: str, rec_id: str, line: str, *, worker: bool = False
    ) -> None:
        if self.slow.is_set():
            self.writing.set()
            await anyio.sleep(0.5)
        await super().append_result(principal, rec_id, line, worker=worker)


async def test_an_item_finished_while_the_batch_is_cancelled_keeps_its_usage() -> None:
    # An item that had finished (and been charged) waited for the batch's lock behind
    # another item's result write; cancelled there, its usage never reached the batch.
    store = _SlowResults()
    second_done = anyio.Event()

    async def item(ctx: JobContext, input: Any) -> Any:
        if input["i"] == 1:
            await store.writing.wait()  # the first item's result is being written
        await ctx.record_usage({"input_tokens": 40, "output_tokens": 2}, cost="0.01")
        if input["i"] == 0:
            store.slow.set()
        else:
            second_done.set()
        return {"ok": True}

    jobs = JobsRouter(item, store=store, prefix="/v1", batch_concurrency=2, cancel_poll=0.01)
    async with running(jobs) as c:
        batch = (await c.post("/v1/batches", headers=auth("k"), json={
            "items": [{"custom_id": str(i), "input": {"i": i}} for i in range(2)]})).json()
        with anyio.fail_after(10):
            await second_done.wait()
        await c.delete(f"/v1/batches/{batch['id']}", headers=auth("k"))
        done = await finished(c, f"/v1/batches/{batch['id']}", "k")
    assert done["usage"]["input_tokens"] == 80 and Decimal(done["cost"]) == Decimal("0.02")


async def test_a_spent_batch_goes_on_once_the_window_has_rolled(storage: Storage) -> None:
    # Once spent, a batch refused every later item, even after a per-minute window rolled.
    now = [1_000.0]
    backend = (MemoryBackend(clock=lambda: now[0]) if storage.is_memory
               else RedisBackend(storage, clock=lambda: now[0]))
    limiter = RateLimiter(Policy(tokens="2000/minute"), backend=backend)
    calls: list[int] = []

    async def item(ctx: JobContext, input: Any) -> Any:
        calls.append(input["i"])
        try:
            await ctx.record_usage({"input_tokens": 1000, "output_tokens": 500})
        finally:
            if input["i"] == 1:  # (it spent the minute: the next item starts two later)
                now[0] += 130
        return {"ok": True}

    jobs = JobsRouter(item, storage=storage, limiter=limiter, prefix="/v1", batch_concurrency=1)
    async with running(jobs) as c:
        batch = (await c.post("/v1/batches", headers=auth("k"), json={
            "items": [{"custom_id": str(i), "input": {"i": i}} for i in range(4)]})).json()
        done = await finished(c, f"/v1/batches/{batch['id']}", "k")
    assert calls == [0, 1, 2, 3]
    assert done["counts"]["succeeded"] == 2 and done["counts"]["errored"] == 2


async def test_a_jobs_absurd_usage_is_junk_on_every_store(storage: Storage) -> None:
    # A job step reporting 10**19 input tokens (its upstream's figures, or a bug) was
    # charged as given: the caller's budget spent at once (the job failed, quota_exceeded)
    # and the row kept 10**19 tokens on memory, dropped on Redis. Now junk, as a
    # provider's figure is: read as 0, the job charged and recorded its 5 output tokens.
    from aimiddleware.usage.accounting import ledger_for

    async def absurd(ctx: JobContext, input: Any) -> Any:
        await ctx.record_usage({"input_tokens": 10**19, "output_tokens": 5}, model="gpt-4o-mini")
        return {"ok": True}

    limiter = RateLimiter(Policy(tokens="2000/day"), storage=storage, prices=PRICES)
    ledger = ledger_for(storage)
    jobs = JobsRouter(absurd, storage=storage, limiter=limiter, ledger=ledger, prefix="/v1")
    async with running(jobs, ratelimit=limiter, ratelimit_exempt=("/v1/jobs/*",),
                       usage=UsageConfig(ledger=ledger)) as c:
        job = (await c.post("/v1/jobs", json={"input": {}}, headers=auth("k"))).json()
        done = await finished(c, f"/v1/jobs/{job['id']}", "k")
    assert done["status"] == "completed", done
    assert (done["usage"]["input_tokens"], done["usage"]["output_tokens"]) == (0, 5)
    assert (await counters(limiter, "k"))["tokens:86400"] == 5
    row = await ledger.get_request(key_principal(b"k"), job["id"])
    assert row is not None
    assert (row.record.usage.input_tokens, row.record.usage.output_tokens) == (0, 5)
