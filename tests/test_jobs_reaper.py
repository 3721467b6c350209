"""The reaper: a record whose worker is gone is reported failed (worker_lost), a queued one
included; one whose worker is alive, waiting for a slot, is left alone."""

from __future__ import annotations

import time
from typing import Any

import anyio

from aimiddleware import Storage
from aimiddleware.context import key_principal
from aimiddleware.jobs import Job, JobContext, JobsRouter
from aimiddleware.jobs.models import new_id
from tests.test_jobs_charge import running

AUTH = {"authorization": "Bearer k"}


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

