"""Reaping: a job or batch whose worker stopped renewing its lease is failed, visibly, once.

Any reader of the record (a poll, an event stream, on any worker) may notice; one wins an
atomic claim in the store (which fences the record: should the worker only have been cut off
from the store, its writes are refused from then on) and writes the final record, its event
and its webhook, and the others return what it stored.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anyio

from aimiddleware.jobs.batches import fail_unfinished
from aimiddleware.jobs.models import Batch, Job, JobError
from aimiddleware.jobs.runner import JobRunner
from aimiddleware.jobs.store import JobStore

__all__ = ["Reaper"]

# How long a reader that lost the claim to reap a record waits for the winner to store it.
_REAP_WAIT = 5.0


class Reaper:
    """``await reaper(rec)``: ``rec``, or its final record when its worker is gone.

    ``queued``: a ``queued`` record is this process's to judge (no task queue holds it)."""

    def __init__(self, store: JobStore, runner: JobRunner, *, queued: bool) -> None:
        self.store = store
        self.runner = runner
        self.queued = queued

    async def __call__(self, rec: Job | Batch) -> Job | Batch:
        """A record whose worker stopped renewing its lease: fail it, visibly. That is one
        ``in_progress``, or without a task queue one still ``queued`` (the worker that took
        it renews its lease while it waits for a slot) once a lease has passed since it was
        created: its worker died, or the store failed under its first write."""
        waited = (
            rec.status == "queued"
            and self.queued  # (queued in a task queue, no worker has it yet: not ours to judge)
            and time.time() - rec.created_at >= self.runner.lease
        )
        if not (rec.status == "in_progress" or waited) or await self.store.alive(
            rec.principal, rec.id
        ):
            return rec
        if not await self.store.claim_reap(rec.principal, rec.id, self.runner.lease):
            return await self._reaped(rec)  # another reader (of any worker) reports it
        # Shielded: a reader that goes away (an event stream's client) finishes what it
        # claimed. If a write fails, the claim lapses after a lease and a later reader
        # reaps the record again (its final event is then written again too).
        with anyio.CancelScope(shield=True):
            raw = await self.store.get(rec.principal, rec.id)  # (as it is now: ended since?)
            if raw is None:  # (expired meanwhile: not written back)
                return rec
            now = type(rec).model_validate_json(raw)
            final = now if now.terminal else await self._fail(now)
        return final

    async def _fail(self, rec: Job | Batch) -> Job | Batch:
        err = JobError(code="worker_lost", retryable=True,
                       message="The worker running this job stopped; submit it again.")
        update: dict[str, Any] = {"status": "failed", "error": err, "finished_at": time.time()}
        if isinstance(rec, Batch):
            # A running batch's record is written at most every SAVE_EVERY s, each result at
            # once: the counts are the results file's (usage and cost may lag that much),
            # with an errored line for every item that has none (before the final record).
            update["counts"] = await fail_unfinished(self.store, rec, err)
        final = rec.model_copy(update=update)
        # Its row in the usage history (ledger=): what it used, as its record last stored it,
        # under no model (a record does not keep one: a field more would fail an older
        # worker's reading of it); the worker's own row, should it come back, has the same
        # id and counts once.
        await self.runner.record(final, None)
        # The record last: once it is final no reader reaps it again, so a failure before it
        # leaves the whole report to the next reaper (which may write the event twice).
        await self.store.append_event(rec.principal, rec.id, f"{rec.object}.failed",
                                      json.dumps(final.public()))
        await self.runner.notify(final)
        await self.store.put(rec.principal, rec.id, final.stored())
        return final

    async def _reaped(self, rec: Job | Batch) -> Job | Batch:
        """The record as the reader that claimed its reaping stores it, once it has (up to
        ``_REAP_WAIT`` s; else as it is now)."""
        with anyio.move_on_after(_REAP_WAIT):
            while True:
                raw = await self.store.get(rec.principal, rec.id)
                if raw is None:
                    break
                current = type(rec).model_validate_json(raw)
                if current.terminal:
                    return current
                await anyio.sleep(0.05)
        return rec
