"""The app each worker process of test_jobs_workers.py runs (``tests.jobs_worker_app:app``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from aimiddleware import install
from aimiddleware.jobs import CallbackPolicy, JobContext, JobsRouter

MARKERS = Path(os.environ["AIMW_JOBS_MARKERS"])
WORKER = os.environ["AIMW_JOBS_WORKER"]


async def work(ctx: JobContext, input: Any) -> Any:
    (MARKERS / f"{ctx.id}.ran-on").write_text(WORKER)
    try:
        for i in range(int(input["steps"])):
            await ctx.partial(i)
            await anyio.sleep(0.1)
    except anyio.get_cancelled_exc_class():
        (MARKERS / f"{ctx.id}.cancelled").write_text(WORKER)
        raise
    return {"done": True, "worker": WORKER}


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse(WORKER)


jobs = JobsRouter(
    work, storage=os.environ["AIMW_JOBS_REDIS"], heartbeat_interval=0.5,
    webhook_secrets=os.environ.get("AIMW_JOBS_WHSEC"), webhook_schedule=(30.0, 0.2),
    webhook_poll_interval=0.05,
    callback_policy=CallbackPolicy(schemes=["http"], allow_hosts=["127.0.0.1"]),
)
# A worker "started later": its webhook dispatcher's clock runs this many seconds ahead, so
# a retry an earlier worker scheduled ~30 s out is due for it at once.
AHEAD = float(os.environ.get("AIMW_JOBS_CLOCK_AHEAD", "0"))
if jobs.dispatcher is not None and AHEAD:
    jobs.dispatcher.clock = lambda: time.time() + AHEAD
app = Starlette(routes=[Route("/health", health), Mount("/v1", jobs)],
                lifespan=jobs.lifespan_context)
install(app)
