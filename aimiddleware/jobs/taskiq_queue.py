"""Run jobs on taskiq workers instead of in the web process (many workers, many hosts).

::

    from taskiq_redis import RedisStreamBroker
    broker = RedisStreamBroker("redis://localhost:6379/0")
    jobs = JobsRouter(summarize, storage="redis://localhost:6379/0", queue=TaskiqQueue(broker))
    app = Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)
    # web:     uvicorn myapp:app --workers 4
    # workers: taskiq worker myapp:broker

The web process only stores the job and sends ``(kind, principal, id)`` to the broker; a
taskiq worker (importing the same module, so the same job function and store) loads the
record and runs it with :class:`~aimiddleware.jobs.runner.JobRunner`. State, events,
cancellation and webhooks go through the shared store exactly as in-process, so any web
worker answers for any job. taskiq over arq: arq 0.28 pins ``redis<6``, which would hold
the whole app back on an old redis-py; taskiq-redis works with current redis-py and its
stream broker acknowledges a message only after the task ran (at-least-once delivery).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aimiddleware.jobs.models import Batch, Job

if TYPE_CHECKING:
    from aimiddleware.jobs.runner import JobRunner

__all__ = ["TaskiqQueue"]

TASK_NAME = "aimiddleware.jobs.run"


class TaskiqQueue:
    """A :class:`JobsRouter` ``queue`` that enqueues on a taskiq broker."""

    def __init__(self, broker: Any, *, task_name: str = TASK_NAME) -> None:
        self.broker = broker
        self.task_name = task_name
        self._runner: JobRunner | None = None
        self._task: Any = None

    def bind(self, runner: JobRunner) -> None:
        """Register the task that runs records with ``runner`` (called by JobsRouter)."""
        self._runner = runner

        async def run_record(kind: str, principal: str, rec_id: str) -> None:
            await self._run(kind, principal, rec_id)

        self._task = self.broker.register_task(run_record, task_name=self.task_name)

    async def startup(self) -> None:
        if not getattr(self.broker, "is_worker_process", False):
            await self.broker.startup()

    async def shutdown(self) -> None:
        if not getattr(self.broker, "is_worker_process", False):
            await self.broker.shutdown()

    async def submit(self, record: Job | Batch) -> None:
        if self._task is None:
            raise RuntimeError("TaskiqQueue is not bound to a JobsRouter")
        await self._task.kiq(record.object, record.principal, record.id)

    async def _run(self, kind: str, principal: str, rec_id: str) -> None:
        if self._runner is None:
            raise RuntimeError("TaskiqQueue is not bound to a JobsRouter")
        raw = await self._runner.store.get(principal, rec_id)
        if raw is None:
            return
        record: Job | Batch = (
            Job.model_validate_json(raw) if kind == "job" else Batch.model_validate_json(raw)
        )
        if record.status != "queued" or not await self._runner.store.claim_run(
            principal, rec_id, raw, self._runner.lease
        ):
            # A message handed out again (at-least-once: taskiq-redis gives one back once
            # it has gone unacknowledged for its idle timeout, also while its task runs) or
            # delivered twice at once: the record ended, runs on a live worker (its lease,
            # taken with the claim, atomically), or was started by a worker since lost,
            # which its readers report (never run twice).
            return
        await self._runner.execute(record)
