"""Web app and taskiq broker for test_jobs_taskiq.py: the same module in both processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from taskiq_redis import RedisStreamBroker

from aimiddleware.jobs import JobContext, JobsRouter, TaskiqQueue

MARKERS = Path(os.environ["AIMW_JOBS_MARKERS"])
REDIS = os.environ["AIMW_JOBS_REDIS"]


async def work(ctx: JobContext, input: Any) -> Any:
    (MARKERS / f"{ctx.id}.ran-in").write_text(str(os.getpid()))
    with (MARKERS / f"{ctx.id}.runs").open("a") as runs:  # (one line per run of the job)
        runs.write(f"{os.getpid()}\n")
    try:
        for i in range(int(input["steps"])):
            await ctx.partial(i)
            await anyio.sleep(0.1)
    except anyio.get_cancelled_exc_class():
        (MARKERS / f"{ctx.id}.cancelled").write_text(str(os.getpid()))
        raise
    return {"pid": os.getpid()}


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(os.getpid()))


# A message unacknowledged this long is handed out again (taskiq-redis: 10 minutes).
IDLE_MS = int(os.environ.get("AIMW_TASKIQ_IDLE_MS", "600000"))
broker = RedisStreamBroker(REDIS, consumer_id="0", idle_timeout=IDLE_MS)
jobs = JobsRouter(work, storage=REDIS, queue=TaskiqQueue(broker))
app = Starlette(routes=[Route("/health", health), Mount("/v1", jobs)],
                lifespan=jobs.lifespan_context)
