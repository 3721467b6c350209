"""``JobsRouter``: a Starlette ``Router`` with the jobs and batches API around one job function.

::

    jobs = JobsRouter(summarize, storage="redis://localhost:6379/0",
                      webhook_secrets=["whsec_..."], max_steps=20, max_cost="0.50")
    app = Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)

Routes (every one scoped to the calling principal; another principal's ids are 404):
``POST /jobs`` (202 + ``Location``), ``GET /jobs/{id}``, ``GET /jobs/{id}/events`` (SSE,
resumable with ``Last-Event-ID``), ``DELETE /jobs/{id}``; ``POST /batches``,
``GET /batches/{id}``, ``GET /batches/{id}/results`` (JSON lines), ``DELETE /batches/{id}``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

import anyio
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from aimiddleware._problem import shown
from aimiddleware.context import current_or_none, default_principal
from aimiddleware.errors import IdempotencyKeyReused, InvalidRequest, NotFound, StoreUnavailable
from aimiddleware.jobs.batches import fail_unfinished, result_lines, results_jsonl
from aimiddleware.jobs.dispatcher import DEFAULT_SCHEDULE, WebhookDispatcher
from aimiddleware.jobs.http import (
    SubmitBatch,
    SubmitJob,
    idempotency_key,
    parse_body,
    typed_errors,
)
from aimiddleware.jobs.models import Batch, BatchCounts, Job, JobError, is_id, new_id
from aimiddleware.jobs.openapi import openapi_paths
from aimiddleware.jobs.reaper import Reaper
from aimiddleware.jobs.runner import JobFunction, JobRunner
from aimiddleware.jobs.store import JobStore, make_store
from aimiddleware.jobs.stream import JobEventsDialect, event_stream
from aimiddleware.jobs.taskiq_queue import TaskiqQueue
from aimiddleware.jobs.webhooks import CallbackPolicy, WebhookSigner
from aimiddleware.ratelimit.limiter import RateLimiter
from aimiddleware.sse import EventStreamResponse
from aimiddleware.storage import Storage
from aimiddleware.usage.ledger import Ledger

__all__ = ["JobsRouter"]

# How long an ended record's events are awaited on a resume before answering 204: the
# record is stored as ended just before its final event is logged.
_FINAL_EVENT_WAIT = 1.0


class JobsRouter(Router):
    """Mount it anywhere; pass ``lifespan=router.lifespan_context`` to the app (it runs jobs).

    ``principal``: who is calling, as the stack's ``principal=`` resolver (sync or async,
    given the request, a mapping of its scope; ``None``: the stack's principal, else the
    default rule); without it, the stack's or the default.

    ``input_model``: a pydantic model every job's (and batch item's) ``input`` must validate
    against at submission, so bad input is a typed 400 then, not a job that fails later.
    The function receives the input as sent.

    ``limiter``: the app's :class:`~aimiddleware.RateLimiter`; what job functions report
    with ``ctx.record_usage`` is then charged to the submitter's token and cost limits
    (:meth:`~aimiddleware.RateLimiter.charge`), so jobs and batches are not a way around
    them. Build it the same way in every process that runs jobs. ``ledger``: the usage
    layer's ledger; each finished job or batch that used something is then a row of the
    caller's usage history, under its id (``finish_reason`` from its status).
    """

    def __init__(
        self,
        fn: JobFunction,
        *,
        storage: Storage | str = "memory://",
        store: JobStore | None = None,
        webhook_secrets: str | Iterable[str] | None = None,
        callback_policy: CallbackPolicy | None = None,
        webhook_schedule: Sequence[float] = DEFAULT_SCHEDULE,
        webhook_poll_interval: float = 0.25,
        webhook_timeout: float = 15.0,
        webhook_concurrency: int = 16,
        webhook_host_concurrency: int = 4,
        max_steps: int | None = None,
        max_cost: Decimal | float | str | None = None,
        timeout: float | None = None,
        max_concurrent_jobs: int | None = None,
        batch_concurrency: int = 8,
        heartbeat_interval: float = 15.0,
        cancel_wait: float = 5.0,
        cancel_poll: float = 0.1,
        shutdown_grace: float = 5.0,
        principal: Callable[[Request], str | Awaitable[str | None] | None] | None = None,
        lease: float = 30.0,
        retention: float = 7 * 86400,
        queue: TaskiqQueue | None = None,
        prefix: str = "",
        input_model: type[BaseModel] | None = None,
        limiter: RateLimiter | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ValueError("prefix must start with '/' and not end with it, e.g. '/v1'")
        self.prefix = prefix
        if heartbeat_interval <= 0 or cancel_wait < 0:
            raise ValueError("heartbeat_interval must be > 0 and cancel_wait >= 0")
        self._owns_storage = not isinstance(storage, Storage)
        self.storage = Storage.coerce(storage)
        self.store = store or make_store(self.storage, ttl=retention)
        self.policy = callback_policy or CallbackPolicy()
        self.dispatcher = (
            WebhookDispatcher(self.store, WebhookSigner(webhook_secrets), policy=self.policy,
                              schedule=webhook_schedule, poll_interval=webhook_poll_interval,
                              timeout=webhook_timeout, concurrency=webhook_concurrency,
                              host_concurrency=webhook_host_concurrency)
            if webhook_secrets
            else None
        )
        self.runner = JobRunner(
            fn, self.store, dispatcher=self.dispatcher, max_steps=max_steps, max_cost=max_cost,
            timeout=timeout, max_concurrent_jobs=max_concurrent_jobs,
            batch_concurrency=batch_concurrency, cancel_poll=cancel_poll,
            shutdown_grace=shutdown_grace, lease=lease, limiter=limiter, ledger=ledger,
        )
        self.queue = queue
        if queue is not None:
            if self.storage.is_memory and store is None:
                raise ValueError("a task queue needs a shared store: pass a redis:// storage")
            queue.bind(self.runner)
        self.heartbeat_interval = heartbeat_interval
        self.cancel_wait = cancel_wait
        self.timeout = timeout
        self.input_model = input_model
        self._principal = principal
        # With a limiter, a submission takes no tokens: its jobs' calls are charged instead.
        submit = functools.partial(typed_errors, no_tokens=limiter is not None)
        wrap = typed_errors
        routes = [
            Route(prefix + "/jobs", submit(self.submit_job), methods=["POST"]),
            Route(prefix + "/jobs/{id}", wrap(self.get_job), methods=["GET"]),
            Route(prefix + "/jobs/{id}", wrap(self.cancel_job), methods=["DELETE"]),
            Route(prefix + "/jobs/{id}/events", wrap(self.job_events), methods=["GET"]),
            Route(prefix + "/batches", submit(self.submit_batch), methods=["POST"]),
            Route(prefix + "/batches/{id}", wrap(self.get_batch), methods=["GET"]),
            Route(prefix + "/batches/{id}", wrap(self.cancel_batch), methods=["DELETE"]),
            Route(
                prefix + "/batches/{id}/results", wrap(self.batch_results), methods=["GET"]
            ),
            Route(
                prefix + "/batches/{id}/events", wrap(self.batch_events), methods=["GET"]
            ),
        ]
        self.reap = Reaper(self.store, self.runner, queued=self.queue is None)
        super().__init__(routes=routes, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """Runs jobs and delivers webhooks while the app lives; use as the app's lifespan."""
        try:
            async with self.runner.running():
                if self.queue is not None:
                    await self.queue.startup()
                try:
                    yield
                finally:
                    if self.queue is not None:
                        with anyio.CancelScope(shield=True):
                            await self.queue.shutdown()
        finally:
            if self._owns_storage and not self.storage.is_memory:
                with anyio.CancelScope(shield=True):
                    await self.storage.aclose()

    def openapi_paths(self, prefix: str = "") -> dict[str, Any]:
        """The routes' OpenAPI path items and component schemas (pure); ``prefix``: where
        the router is mounted (``""`` when its routes join the app's). Merge into a FastAPI
        app's document with :func:`aimiddleware.openapi.add_paths`."""
        return openapi_paths(prefix + self.prefix, self.input_model)

    # -- helpers ---------------------------------------------------------------------

    async def principal_of(self, request: Request) -> str:
        """The caller's principal: ``principal=``'s answer, as the stack's resolver is read
        (sync or async; ``None``: the default rule), else the stack's, else the default."""
        if self._principal is not None:
            found = self._principal(request)
            if inspect.isawaitable(found):
                found = await found
            if found is not None:
                return str(found)
        ctx = current_or_none()
        return ctx.principal if ctx is not None else default_principal(request.scope)

    async def _load(self, request: Request, kind: type[Job] | type[Batch]) -> Job | Batch:
        principal = await self.principal_of(request)
        rec_id = request.path_params["id"]
        prefix = "job_" if kind is Job else "batch_"
        # Only an id shaped like ours reaches the store (an id with a ":" suffix would name
        # another of the record's keys there).
        ours = rec_id.startswith(prefix) and is_id(rec_id[len(prefix):])
        raw = await self.store.get(principal, rec_id) if ours else None
        if raw is None:
            raise NotFound(f"No {kind.__name__.lower()} with id {shown(rec_id)!r}.")
        rec = await self.reap(kind.model_validate_json(raw))
        if not rec.terminal and await self.store.cancel_requested(principal, rec.id):
            rec = rec.model_copy(update={"status": "cancelling"})
        return rec

    async def _create(
        self, request: Request, record: Job | Batch, location: str
    ) -> Response:
        key = idempotency_key(request)
        if key is not None:
            key = f"{record.object}:{key}"  # POST /jobs and POST /batches keep separate keys
        owner_id, raw = await self.store.create(record.principal, record.id, record.stored(), key)
        if owner_id != record.id:
            existing = type(record).model_validate_json(raw)
            if existing.fingerprint != record.fingerprint:
                raise IdempotencyKeyReused()
            return JSONResponse(
                {"id": existing.id, "status": existing.status, "object": existing.object},
                status_code=202,
                headers={"location": f"{location}/{existing.id}", "idempotent-replayed": "true"},
            )
        if self.queue is not None:
            try:
                await self.queue.submit(record)
            except Exception as exc:  # (the broker is down: no worker will ever take it)
                with anyio.CancelScope(shield=True):
                    await self._not_queued(record)
                raise StoreUnavailable("The job queue is unavailable; retry.",
                                       retry_after=1) from exc
        else:
            self.runner.submit(record)
        return JSONResponse({"id": record.id, "status": record.status, "object": record.object},
                            status_code=202, headers={"location": f"{location}/{record.id}"})

    async def _not_queued(self, record: Job | Batch) -> None:
        """A stored record its task queue did not take: failed (retryable), as a worker
        would end it, rather than queued for its retention (a retry under its
        Idempotency-Key answers with it)."""
        err = JobError(code="queue_unavailable", retryable=True,
                       message="The job could not be queued; submit it again.")
        update: dict[str, Any] = {"status": "failed", "error": err, "finished_at": time.time()}
        if isinstance(record, Batch):
            update["counts"] = await fail_unfinished(self.store, record, err)
        final = record.model_copy(update=update)
        await self.store.append_event(final.principal, final.id, f"{final.object}.failed",
                                      json.dumps(final.public()))
        await self.store.put(final.principal, final.id, final.stored())

    def _base(self, request: Request, what: str) -> str:
        root = request.scope.get("root_path", "")
        return f"{root}{self.prefix}/{what}"

    # -- jobs ------------------------------------------------------------------------

    async def submit_job(self, request: Request) -> Response:
        body, fingerprint = await parse_body(request, SubmitJob)
        self._check_input(body.input, "input")
        await self._check_callback(body.callback_url)
        now = time.time()
        job = Job(
            id=new_id("job"), principal=await self.principal_of(request), input=body.input,
            callback_url=body.callback_url, fingerprint=fingerprint, created_at=now,
            expires_at=now + self.timeout if self.timeout else None,
        )
        return await self._create(request, job, self._base(request, "jobs"))

    async def _check_callback(self, url: str | None) -> None:
        if url is None:
            return
        if self.dispatcher is None:  # (it would be accepted, shown, and never called)
            raise InvalidRequest(
                "Callbacks are not enabled on this server (it has no webhook secrets): "
                "omit callback_url, and poll the job or stream its events.",
                param="callback_url",
            )
        await self.policy.check(url)

    def _check_input(self, value: Any, param: str) -> None:
        if self.input_model is None:
            return
        try:
            self.input_model.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = shown(".".join([param, *(str(p) for p in first.get("loc", ()))]))
            raise InvalidRequest(f"Invalid job input: {first.get('msg')}.", param=where) from exc

    async def get_job(self, request: Request) -> Response:
        return JSONResponse((await self._load(request, Job)).public())

    async def cancel_job(self, request: Request) -> Response:
        return JSONResponse((await self._cancel(request, Job)).public())

    async def _cancel(self, request: Request, kind: type[Job] | type[Batch]) -> Job | Batch:
        rec = await self._load(request, kind)
        if rec.terminal:
            return rec  # idempotent: the same final object every time
        await self.store.request_cancel(rec.principal, rec.id)
        self.runner.cancel_local(rec.id)
        with anyio.move_on_after(self.cancel_wait):
            while True:
                rec = await self._load(request, kind)
                if rec.terminal:
                    break
                await anyio.sleep(0.05)
        return rec

    async def job_events(self, request: Request) -> Response:
        return await self._events(request, Job)

    async def batch_events(self, request: Request) -> Response:
        return await self._events(request, Batch)

    async def _events(self, request: Request, kind: type[Job] | type[Batch]) -> Response:
        rec = await self._load(request, kind)
        last = request.headers.get("last-event-id") or request.query_params.get("after")
        if last is not None:  # (one this log has no place for replays from the start)
            last = await self.store.resume_point(rec.principal, rec.id, last)
        if rec.terminal and not await self.store.read_events(
            rec.principal, rec.id, last, wait=_FINAL_EVENT_WAIT
        ):
            # Resumed at the final event: 204 tells an EventSource not to reconnect.
            return Response(status_code=204)
        stream = event_stream(self.store, rec, last, heartbeat_interval=self.heartbeat_interval,
                              reap=self.reap)
        # Quiet periods get job.heartbeat events (dispatched, unlike comment heartbeats).
        return EventStreamResponse(stream, dialect=JobEventsDialect(), heartbeat=None)

    # -- batches ---------------------------------------------------------------------

    async def submit_batch(self, request: Request) -> Response:
        body, fingerprint = await parse_body(request, SubmitBatch)
        ids = [i.custom_id for i in body.items]
        if len(set(ids)) != len(ids):
            raise InvalidRequest("custom_id values must be unique in a batch.", param="items")
        for i, item in enumerate(body.items):
            self._check_input(item.input, f"items.{i}.input")
        await self._check_callback(body.callback_url)
        now = time.time()
        batch = Batch(
            id=new_id("batch"), principal=await self.principal_of(request), items=body.items,
            total=len(body.items), counts=BatchCounts(processing=len(body.items)),
            callback_url=body.callback_url, fingerprint=fingerprint, created_at=now,
            expires_at=now + self.timeout if self.timeout else None,
        )
        return await self._create(request, batch, self._base(request, "batches"))

    async def get_batch(self, request: Request) -> Response:
        return JSONResponse((await self._load(request, Batch)).public())

    async def cancel_batch(self, request: Request) -> Response:
        return JSONResponse((await self._cancel(request, Batch)).public())

    async def batch_results(self, request: Request) -> Response:
        rec = await self._load(request, Batch)
        lines = await result_lines(self.store, rec.principal, rec.id)
        return Response(results_jsonl(lines), media_type="application/jsonl")
