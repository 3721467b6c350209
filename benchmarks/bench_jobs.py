"""Jobs API overhead: polling a job and submitting one, against a bare Starlette JSON route.

In-process ASGI, memory store, the jobs lifespan running (submitted jobs really run: the
job function returns at once). The anchor is a plain Starlette route answering a small
JSON body, i.e. the least any framework route costs.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from aimiddleware.jobs import JobContext, JobsRouter
from benchmarks.harness import as_json, call, compare, make_request, table


async def _fn(ctx: JobContext, input: Any) -> Any:
    return {"ok": True}


async def _bare(request: Request) -> JSONResponse:
    return JSONResponse({"id": "job_x", "status": "completed"})


async def run(quick: bool) -> tuple[str, dict[str, Any]]:
    jobs = JobsRouter(_fn)
    app = Starlette(routes=[Route("/bare", _bare), Mount("/v1", jobs)])
    auth = [(b"authorization", b"Bearer bench")]
    submit = make_request("POST", "/v1/jobs", b'{"input": {"q": 1}}',
                          [(b"content-type", b"application/json"), *auth])
    async with jobs.lifespan_context(app):
        _, msgs = await call(app, submit)
        job_id = json.loads(next(m["body"] for m in msgs if m.get("body")))["id"]
        contenders = {
            "starlette JSON route": (app, make_request("GET", "/bare")),
            "GET /jobs/{id}": (app, make_request("GET", f"/v1/jobs/{job_id}", headers=auth)),
            "POST /jobs (runs the job)": (app, submit),
        }
        results = await compare(contenders, requests=200 if quick else 1000,
                                rounds=3 if quick else 7, warmup=50, expect_status=None)
    text = table(results, "starlette JSON route", "Jobs API (memory store), per request")
    return text, as_json(results, "starlette JSON route")
