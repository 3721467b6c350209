"""In-process execution: job functions run in an anyio task group owned by the app lifespan.

``JobRunner.running()`` is an async context manager (wire it into the app's lifespan, or
use ``JobsRouter.lifespan``). Each job runs under its own cancel scope; a watcher polls the
store's cancel flag, so a ``DELETE`` served by any worker stops the function. On shutdown
running jobs get ``shutdown_grace`` seconds, then are cancelled and marked ``failed`` with
the retryable error ``shutdown`` (never silently lost).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any, Literal

import anyio
import anyio.abc
from pydantic_core import to_jsonable_python

from aimiddleware.errors import AIError, NotConfigured, StoreUnavailable
from aimiddleware.finish_reason import normalize_finish_reason
from aimiddleware.jobs.batches import BatchExecution, result_lines
from aimiddleware.jobs.context import Charge, JobContext, JobLimitExceeded
from aimiddleware.jobs.dispatcher import WebhookDispatcher
from aimiddleware.jobs.models import Batch, Job, JobError
from aimiddleware.jobs.store import JobFenced, JobStore
from aimiddleware.jobs.webhooks import webhook_payload
from aimiddleware.ratelimit.limiter import RateLimiter
from aimiddleware.usage.ledger import Ledger, UsageRecord
from aimiddleware.usage.models import Usage

__all__ = ["JobFunction", "JobRunner", "job_error"]

logger = logging.getLogger("aimiddleware.jobs")

JobFunction = Callable[[JobContext, Any], Awaitable[Any]]
Outcome = Literal["done", "cancelled", "expired"]
INLINE_RESULTS = 1000
"""A batch webhook carries its results when it has at most this many items."""


def job_error(exc: BaseException) -> JobError:
    """The typed error body for an exception raised by a job function (nothing leaked)."""
    if isinstance(exc, JobLimitExceeded):
        return JobError(code=exc.code, message=exc.message, type="invalid_request_error")
    if isinstance(exc, AIError):
        return JobError(
            code=exc.code, message=exc.detail, type=exc.openai_type, retryable=exc.retryable
        )
    return JobError(code="internal", message="The job function failed.", retryable=True)


def failure(exc: Exception, what: str) -> JobError:
    """:func:`job_error`, with an unexpected exception (not a typed error) logged with its
    traceback and ``what`` failed (the body the client sees says only "internal")."""
    if not isinstance(exc, (AIError, JobLimitExceeded)):  # (those are outcomes, not bugs)
        logger.error("%s: the job function raised", what, exc_info=exc)
    return job_error(exc)


class JobRunner:
    def __init__(
        self,
        fn: JobFunction,
        store: JobStore,
        *,
        dispatcher: WebhookDispatcher | None = None,
        max_steps: int | None = None,
        max_cost: Decimal | float | str | None = None,
        timeout: float | None = None,
        max_concurrent_jobs: int | None = None,
        batch_concurrency: int = 8,
        cancel_poll: float = 0.1,
        shutdown_grace: float = 5.0,
        lease: float = 30.0,
        limiter: RateLimiter | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        if batch_concurrency < 1:
            raise ValueError("batch_concurrency must be >= 1")
        if max_concurrent_jobs is not None and max_concurrent_jobs < 1:
            raise ValueError("max_concurrent_jobs must be >= 1")
        self.fn = fn
        self.store = store
        self.dispatcher = dispatcher
        self.max_steps = max_steps
        self.max_cost = None if max_cost is None else Decimal(str(max_cost))
        self.timeout = timeout
        self.max_concurrent_jobs = max_concurrent_jobs
        self.batch_concurrency = batch_concurrency
        self.cancel_poll = cancel_poll
        self.lease = lease
        self.shutdown_grace = shutdown_grace
        self.limiter = limiter
        self.ledger = ledger
        self._tg: anyio.abc.TaskGroup | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._running = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[JobRunner]:
        """Own the task group jobs (and the webhook dispatcher) run in."""
        if self.max_concurrent_jobs is not None:
            self._limiter = anyio.CapacityLimiter(self.max_concurrent_jobs)
        try:
            async with anyio.create_task_group() as delivering:
                if self.dispatcher is not None:
                    delivering.start_soon(self.dispatcher.run)
                try:
                    async with anyio.create_task_group() as tg:
                        self._tg = tg
                        try:
                            yield self
                        finally:
                            self._tg = None
                            with anyio.move_on_after(self.shutdown_grace, shield=True):
                                while self._running:  # noqa: ASYNC110 - a counter, polled briefly at shutdown
                                    await anyio.sleep(0.02)
                            tg.cancel_scope.cancel()
                finally:
                    delivering.cancel_scope.cancel()
        finally:
            if self.dispatcher is not None:
                # The jobs it ended just put their webhooks in the outbox: send what is due
                # before the worker goes (a memory:// outbox dies with it; a shared one is
                # sent by the next worker otherwise), for up to shutdown_grace.
                with anyio.move_on_after(self.shutdown_grace, shield=True):
                    await self.dispatcher.run(until_idle=True)

    def submit(self, record: Job | Batch) -> None:
        """Start a stored record now (in this process)."""
        if self._tg is None:  # a deployment error: JobsRouter.lifespan_context is not wired in
            raise NotConfigured(
                "The job runner is not running: the app's lifespan did not start it (a server "
                "without lifespan support, or JobsRouter.lifespan not wired in)."
            )
        self._running += 1
        self._tg.start_soon(self._execute, record)

    async def execute(self, record: Job | Batch) -> None:
        """Run a stored record to its end in the caller's task (used by a task-queue worker)."""
        self._running += 1
        await self._execute(record)

    def cancel_local(self, rec_id: str) -> None:
        """Fast path when the job runs here; the store flag reaches every other worker."""
        scope = self._scopes.get(rec_id)
        if scope is not None:
            scope.cancel()

    # -- execution -------------------------------------------------------------------

    def charge_for(self, principal: str) -> Charge | None:
        """What a job's (or batch item's) ``record_usage`` charges ``principal`` with."""
        limiter = self.limiter
        if limiter is None:
            return None

        async def charge(usage: Usage, cost: Decimal | None, model: str | None) -> bool:
            return await limiter.charge(principal, usage, model=model, cost=cost)

        return charge

    async def spent(self, principal: str, model: str | None) -> bool:
        """Whether ``principal``'s token or cost budget is spent now (False without a limiter)."""
        return self.limiter is not None and await self.limiter.spent(principal, model=model)

    async def _execute(self, record: Job | Batch) -> None:
        try:
            if isinstance(record, Job):
                await self._run_job(record)
            else:
                await self._run_batch(record)
        except Exception as exc:
            if _fenced(exc):  # (after a lease cut off from the store: nothing of it is kept)
                logger.warning("%s: reported lost while it ran (its worker was cut off from "
                               "the store past its lease); its results are dropped", record.id)
                return
            # (the store failed under it: left to the reaper, which reports it failed and
            # retryable once its lease lapses; the runner goes on with the other records)
            logger.exception("%s: could not be run to its end", record.id)
        finally:
            self._running -= 1

    def _time_left(self, rec: Job | Batch) -> float | None:
        """Seconds until ``rec``'s deadline: the ``expires_at`` its client was shown (counted
        from its submission, so a wait for a worker or a ``max_concurrent_jobs`` slot counts),
        else ``timeout`` from now; ``None`` without either."""
        if rec.expires_at is not None:
            return rec.expires_at - time.time()
        return self.timeout

    async def _guarded(
        self, rec: Job | Batch, body: Callable[[], Awaitable[None]],
        on_start: Callable[[], Awaitable[None]],
    ) -> Outcome:
        """Run ``body`` under a cancel scope watched by the store's cancel flag and deadline."""
        principal, rec_id = rec.principal, rec.id
        scope = anyio.CancelScope()
        self._scopes[rec_id] = scope
        expired = False
        try:
            with scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch_cancel, principal, rec_id, scope)
                    limiter = self._limiter or contextlib.nullcontext()
                    left = self._time_left(rec)
                    try:
                        if left is not None and left <= 0:  # (taken after its deadline)
                            raise TimeoutError
                        with anyio.fail_after(left):  # (the slot's wait included)
                            async with limiter:  # (beat: before in_progress)
                                await self.store.beat(principal, rec_id, self.lease)
                                await on_start()
                                await body()
                    except TimeoutError:
                        expired = True
                    tg.cancel_scope.cancel()
        finally:
            self._scopes.pop(rec_id, None)
        if scope.cancelled_caught:
            return "cancelled"
        return "expired" if expired else "done"

    async def _watch_cancel(self, principal: str, rec_id: str, scope: anyio.CancelScope) -> None:
        """Poll the store's cancel flag (a DELETE on any worker) and fence (the record reported
        lost: its writes are refused, so it stops too), and renew the liveness lease."""
        next_beat = 0.0
        while True:
            now = anyio.current_time()
            try:
                if now >= next_beat:
                    await self.store.beat(principal, rec_id, self.lease)
                    next_beat = now + self.lease / 3
                if await self.store.should_stop(principal, rec_id):
                    scope.cancel()
                    return
            except StoreUnavailable:  # an outage: the job runs on; asked again next poll
                logger.warning("%s: the job store is unavailable", rec_id)
                await anyio.sleep(max(self.cancel_poll, 1.0))
            await anyio.sleep(self.cancel_poll)

    async def _run_job(self, job: Job) -> None:
        state = {"job": job}
        lock = anyio.Lock()

        async def save(event: str, data: dict[str, Any], **update: Any) -> None:
            async with lock:
                state["job"] = state["job"].model_copy(update=update)
                # Shielded: a write cancelled with the job may still be on the wire (a Redis
                # command sent) and land after the final record, putting it back in_progress.
                with anyio.CancelScope(shield=True):
                    await self.persist(functools.partial(write, event, data))

        async def write(event: str, data: dict[str, Any]) -> None:
            await self.store.put(job.principal, job.id, state["job"].stored(), worker=True)
            await self.store.append_event(
                job.principal, job.id, event, json.dumps(data, default=_jsonable), worker=True
            )

        async def emit(kind: str, data: dict[str, Any]) -> None:
            cur = state["job"]
            if kind == "progress":
                await save("job.progress", data, progress=data["progress"], message=data["message"])
            elif kind == "partial":
                out = [*cur.partial_output, data["output"]]
                await save("job.partial", {"index": len(out) - 1, **data}, partial_output=out)
            else:
                await save("job.usage", data, usage=data["usage"], cost=data["cost"],
                           steps=data["steps"])

        ctx = JobContext(job.id, job.input, emit, max_steps=self.max_steps,
                         max_cost=self.max_cost, charge=self.charge_for(job.principal))

        async def start() -> None:
            now = time.time()
            await save("job.status", {"status": "in_progress", "started_at": now},
                       status="in_progress", started_at=now)

        result: dict[str, Any] = {}

        async def body() -> None:
            try:
                # As JSON now: a value with none (an object, bytes not UTF-8) fails the job
                # here, not the final write (which left it in_progress until it was "lost").
                result["result"] = to_jsonable_python(await self.fn(ctx, job.input))
                result["status"] = "completed"
            except Exception as exc:
                result["status"], result["error"] = "failed", failure(exc, job.id)

        try:
            outcome = await self._guarded(job, body, start)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                err = JobError(code="shutdown", retryable=True,
                               message="The server shut down before the job finished.")
                await self._finish(state["job"], save, "failed", model=ctx.model, error=err)
            raise
        if outcome == "cancelled":
            await self._finish(state["job"], save, "cancelled", model=ctx.model)
        elif outcome == "expired":
            err = JobError(code="job_expired", message="The job ran past its time limit.")
            await self._finish(state["job"], save, "expired", model=ctx.model, error=err)
        else:
            await self._finish(state["job"], save, result["status"], model=ctx.model,
                               result=result.get("result"), error=result.get("error"))

    async def _finish(
        self,
        job: Job,
        save: Callable[..., Awaitable[None]],
        status: str,
        *,
        model: str | None,
        **update: Any,
    ) -> None:
        final = job.model_copy(update={"status": status, "finished_at": time.time(), **update})
        await self.record(final, model)  # (first: a client that sees the end finds its row)
        await save(f"job.{status}", final.public(), status=status,
                   finished_at=final.finished_at, **update)
        await self.notify(final)

    async def persist(self, write: Callable[[], Awaitable[object]]) -> None:
        """A worker's ``write`` to a record, tried again while the store is unavailable, for
        up to half a lease (the liveness lease outlasts that): a job writing as the store
        comes back (its first commands time out) neither fails on a progress write nor
        loses its result to the reaper."""
        give_up = anyio.current_time() + self.lease / 2
        delay = 0.05
        while True:
            try:
                await write()
                return
            except StoreUnavailable:
                if anyio.current_time() + delay > give_up:
                    raise
                logger.warning("the job store is unavailable: a job's write is retried")
            await anyio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def record(self, rec: Job | Batch, model: str | None) -> None:
        """A finished job's or batch's row in the usage history (``ledger``): its usage and
        cost (unpriced when it reported none) under its id, as a request's would be; only
        when it used something. Shielded: a shutdown must not lose it. The row's id is the
        record's, so it counts once when both a worker cut off past its lease and the
        reaper that reported it lost write it."""
        if self.ledger is None or (rec.usage is None and not rec.cost):
            return
        finished = rec.finished_at or time.time()
        with anyio.CancelScope(shield=True):
            await self.ledger.record(UsageRecord(
                principal=rec.principal,
                request_id=rec.id,
                model=model,
                usage=rec.usage or Usage(),
                estimated_cost=rec.cost or None,
                finish_reason=normalize_finish_reason(rec.status).value,
                raw_finish_reason=rec.status,
                duration_ms=(finished - (rec.started_at or rec.created_at)) * 1000.0,
                timestamp=finished,
                record_id=rec.id,
            ))

    async def notify(self, rec: Job | Batch) -> None:
        """Send the webhook of a record that ended to its ``callback_url``, if it has one
        (a batch of at most ``INLINE_RESULTS`` items carries its results: self-contained)."""
        if not rec.callback_url:
            return
        if self.dispatcher is None:  # (refused at submission: a worker set up otherwise)
            logger.warning("%s: no webhook_secrets in this worker: its callback is not sent",
                           rec.id)
            return
        data = rec.public()
        if isinstance(rec, Batch) and rec.total <= INLINE_RESULTS:
            lines = await result_lines(self.store, rec.principal, rec.id)
            data["results"] = [json.loads(line) for line in lines]
        await self.dispatcher.enqueue(
            rec.callback_url, webhook_payload(f"{rec.object}.{rec.status}", data)
        )

    async def _run_batch(self, batch: Batch) -> None:
        execution = BatchExecution(self, batch)
        try:
            outcome = await self._guarded(batch, execution.run, execution.start)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await execution.finish("failed", "cancelled", JobError(
                    code="shutdown", retryable=True,
                    message="The server shut down before the batch finished."))
                await self.notify(execution.batch)  # (as a job's _finish does)
            raise
        if outcome == "cancelled":
            await execution.finish("cancelled", "cancelled")
        elif outcome == "expired":
            await execution.finish("expired", "expired")
        else:
            await execution.finish("completed", "cancelled")
        await self.notify(execution.batch)


def _fenced(exc: BaseException) -> bool:
    """Whether ``exc`` is (or a task group's group holds) a write refused by the fence."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(JobFenced) is not None
    return isinstance(exc, JobFenced)


def _jsonable(value: Any) -> Any:
    """Event payloads: pydantic models as their JSON form, anything else (Decimal) as text."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    return str(value)
