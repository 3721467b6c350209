"""Batches: many items through the job function, bounded concurrency, per-item results.

Each item carries a ``custom_id``; its outcome is one JSON line ``{custom_id, type, output,
error}`` with ``type`` in ``succeeded``, ``errored``, ``cancelled``, ``expired`` (order may
differ from the request: match by ``custom_id``). One failing item never fails the batch:
the batch ``completed`` and its ``counts`` say how many of each. Cancelling a batch (or its
time limit) marks the items not yet finished ``cancelled`` (``expired``); a batch whose
worker died, ``errored`` (``worker_lost``). Either way every item has its line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from pydantic_core import to_jsonable_python

from aimiddleware.jobs.context import JobContext, JobLimitExceeded, add_usage
from aimiddleware.jobs.models import Batch, BatchCounts, BatchItem, BatchItemResult, JobError
from aimiddleware.jobs.store import JobStore

if TYPE_CHECKING:
    from aimiddleware.jobs.runner import JobRunner

__all__ = ["BatchExecution", "counted", "fail_unfinished", "result_lines", "results_jsonl"]

SAVE_EVERY = 0.2
"""Seconds between writes of a running batch's record (counts, usage); each finished item
logs its ``batch.progress`` event at once."""


def counted(counts: BatchCounts, kinds: Iterable[str], total: int, done: int) -> BatchCounts:
    """``counts`` plus one per finished item of each kind in ``kinds`` (``succeeded``,
    ``errored``...); ``processing`` is what of ``total`` items is not ``done``."""
    c = counts.model_dump()
    for kind in kinds:
        c[kind] += 1
    c["processing"] = max(0, total - done)
    return BatchCounts(**c)


def results_jsonl(lines: list[str]) -> bytes:
    """The batch results file: one JSON object per line."""
    return "".join(line + "\n" for line in lines).encode()


async def result_lines(store: JobStore, principal: str, rec_id: str) -> list[str]:
    """A batch's result lines, each once: a write tried again after a timeout may have
    reached the store twice (sent before the timeout, run when the store came back), as the
    same line. Compared as text, not parsed: 100,000 lines take ~15 ms so, ~170 ms parsed."""
    return list(dict.fromkeys(await store.results(principal, rec_id)))


async def fail_unfinished(store: JobStore, batch: Batch, error: JobError) -> BatchCounts:
    """A batch whose worker died: an ``errored`` line with ``error`` for each item that has
    no result yet (written in bulk), and the counts of the whole results file."""
    seen: set[str] = set()
    kinds: list[str] = []
    for line in await store.results(batch.principal, batch.id):
        res = json.loads(line)
        if res["custom_id"] not in seen:
            seen.add(res["custom_id"])
            kinds.append(res["type"])
    left = [_line(item, "errored", error) for item in batch.items if item.custom_id not in seen]
    await store.append_results(batch.principal, batch.id, left)
    kinds += ["errored"] * len(left)
    return counted(BatchCounts(), kinds, batch.total, len(kinds))


def _line(item: BatchItem, kind: str, error: JobError) -> str:
    res = BatchItemResult(custom_id=item.custom_id, type=kind, error=error)  # type: ignore[arg-type]
    return res.model_dump_json()


async def _ignore(kind: str, data: dict[str, Any]) -> None:
    """Items report usage through their context; progress and partial output stay per item."""


class BatchExecution:
    """One run of a batch inside :class:`~aimiddleware.jobs.runner.JobRunner`."""

    def __init__(self, runner: JobRunner, batch: Batch) -> None:
        self.runner = runner
        self.batch = batch
        self.done: set[str] = set()
        self._lock = anyio.Lock()
        self._stale = False  # the stored record lags the counts (written every SAVE_EVERY s)
        self.model: str | None = None  # (the last one an item's record_usage named)
        self.spent: JobError | None = None  # (an item found the caller's budget spent)

    async def _save(self, event: str, data: dict[str, Any]) -> None:
        store = self.runner.store
        self._stale = False
        batch = self.batch

        async def write() -> None:
            await store.put(batch.principal, batch.id, batch.stored(), worker=True)
            await store.append_event(batch.principal, batch.id, event,
                                     json.dumps(data, default=str), worker=True)

        with anyio.CancelScope(shield=True):  # (see _put_if_stale)
            await self.runner.persist(write)

    async def start(self) -> None:
        async with self._lock:
            self.batch = self.batch.model_copy(
                update={"status": "in_progress", "started_at": time.time()}
            )
            await self._save("batch.status", {"status": "in_progress"})

    async def run(self) -> None:
        limiter = anyio.CapacityLimiter(self.runner.batch_concurrency)
        async with anyio.create_task_group() as saver:
            saver.start_soon(self._save_while_running)
            async with anyio.create_task_group() as tg:
                for item in self.batch.items:
                    tg.start_soon(self._item, limiter, item)
            saver.cancel_scope.cancel()
        async with self._lock:
            await self._put_if_stale()

    async def _save_while_running(self) -> None:
        # The record holds every item: writing it per finished item made a batch quadratic.
        while True:
            await anyio.sleep(SAVE_EVERY)
            async with self._lock:
                await self._put_if_stale()

    async def _put_if_stale(self) -> None:
        if self._stale:
            self._stale = False
            batch = self.batch
            write = partial(self.runner.store.put, batch.principal, batch.id, batch.stored(),
                            worker=True)
            # Shielded: a write cancelled with the batch may still be on the wire (a Redis
            # command sent) and land after the final record, putting it back in_progress.
            # Finished, it is ordered before finish()'s writes, which wait for the lock.
            with anyio.CancelScope(shield=True):
                await self.runner.persist(write)

    async def _item(self, limiter: anyio.CapacityLimiter, item: BatchItem) -> None:
        async with limiter:
            if self.spent is not None:  # an item found the caller's budget spent
                if await self.runner.spent(self.batch.principal, self.model):
                    await self._record(BatchItemResult(  # (no more model calls)
                        custom_id=item.custom_id, type="errored", error=self.spent
                    ))
                    return
                self.spent = None  # (its window has rolled)
            ctx = JobContext(f"{self.batch.id}:{item.custom_id}", item.input, _ignore,
                             max_steps=self.runner.max_steps, max_cost=self.runner.max_cost,
                             charge=self.runner.charge_for(self.batch.principal))
            try:
                output = to_jsonable_python(await self.runner.fn(ctx, item.input))  # (a job's)
                res = BatchItemResult(custom_id=item.custom_id, type="succeeded", output=output)
            except Exception as exc:
                from aimiddleware.jobs.runner import failure

                res = BatchItemResult(custom_id=item.custom_id, type="errored",
                                      error=failure(exc, ctx.id))
                if isinstance(exc, JobLimitExceeded) and exc.code == "quota_exceeded":
                    self.spent = res.error
            finally:  # before any await: a cancellation (the batch's end) cannot lose it
                self._add_usage(ctx)
            await self._record(res)

    def _add_usage(self, ctx: JobContext) -> None:
        """Add an item's usage and cost to the batch (in memory; written with the record).
        No ``await``: nothing else changes the batch meanwhile."""
        update: dict[str, Any] = {"cost": self.batch.cost + ctx.cost}
        if ctx.usage is not None:
            update["usage"] = add_usage(self.batch.usage, ctx.usage)
        self.batch = self.batch.model_copy(update=update)
        self.model = ctx.model or self.model
        self._stale = True

    async def _record(self, res: BatchItemResult) -> None:
        async with self._lock:
            if res.custom_id in self.done:
                return
            # Shielded: cancelled between marking the item done and counting it (the batch
            # cancelled as it finished), the item was neither counted nor marked leftover.
            with anyio.CancelScope(shield=True):
                self.done.add(res.custom_id)
                counts = counted(self.batch.counts, [res.type], self.batch.total, len(self.done))
                self.batch = self.batch.model_copy(update={"counts": counts})
                self._stale = True  # (stored by _save_while_running, or when the batch ends)
                store, principal, rec_id = self.runner.store, self.batch.principal, self.batch.id
                await self.runner.persist(partial(  # (a line written twice is read once)
                    store.append_result, principal, rec_id, res.model_dump_json(), worker=True
                ))
                await self.runner.persist(partial(
                    store.append_event, principal, rec_id, "batch.progress",
                    json.dumps({"counts": counts.model_dump()}), worker=True,
                ))

    async def finish(self, status: str, leftover: str, error: JobError | None = None) -> None:
        """Mark unfinished items ``leftover`` and the batch ``status`` (final event last)."""
        if leftover == "expired":
            item_error = JobError(code="batch_expired", message="The batch expired first.")
        else:
            item_error = error or JobError(code="cancelled", message="The batch was cancelled.")
        async with self._lock:  # every unfinished item at once: one write of the record
            left = [item for item in self.batch.items if item.custom_id not in self.done]
            self.done.update(item.custom_id for item in left)
            await self.runner.persist(partial(  # (in bulk: a few round trips)
                self.runner.store.append_results, self.batch.principal, self.batch.id,
                [_line(item, leftover, item_error) for item in left], worker=True,
            ))
            if left:
                counts = counted(self.batch.counts, [leftover] * len(left), self.batch.total,
                                 len(self.done))
                self.batch = self.batch.model_copy(update={"counts": counts})
                await self._save("batch.progress", {"counts": counts.model_dump()})
        async with self._lock:
            self.batch = self.batch.model_copy(
                update={"status": status, "finished_at": time.time(), "error": error}
            )
            await self.runner.record(self.batch, self.model)  # (first, as a job's)
            await self._save(f"batch.{status}", self.batch.public())
