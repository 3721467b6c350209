"""JobsRouter end to end through a real uvicorn server (httpx, httpx-sse)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from httpx_sse import aconnect_sse
from starlette.applications import Starlette
from starlette.routing import Mount

from aimiddleware import Storage, install
from aimiddleware.jobs import Job, JobContext, JobsRouter
from tests.jobs_servers import ThreadServer
from tests.redis_server import RedisServer

A = {"authorization": "Bearer key-of-tenant-a"}
B = {"authorization": "Bearer key-of-tenant-b"}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.cancelled: list[str] = []
        self.lock = threading.Lock()
        # A job whose input says "hold" stays in its first step until the test opens this
        # (the server runs in another thread): what the test must see while the job runs
        # does not depend on how fast the machine is.
        self.gate = threading.Event()

    async def fn(self, ctx: JobContext, input: Any) -> Any:
        with self.lock:
            self.calls.append(input)
        steps = int(input.get("steps", 3))
        try:
            for i in range(steps):
                await ctx.step()
                while i == 0 and input.get("hold") and not self.gate.is_set():  # noqa: ASYNC110 - set from another thread
                    await anyio.sleep(0.01)
                await anyio.sleep(float(input.get("delay", 0.05)))
                await ctx.partial(f"chunk-{i}")
                await ctx.record_usage({"input_tokens": 10, "output_tokens": 5}, cost="0.01")
                await ctx.progress((i + 1) / steps)
        except anyio.get_cancelled_exc_class():
            with self.lock:
                self.cancelled.append(ctx.id)
            raise
        if input.get("fail"):
            raise ValueError("secret internal detail")
        return {"echo": input.get("text"), "steps": ctx.steps}


def make_app(rec: Recorder, **options: Any) -> tuple[Starlette, JobsRouter]:
    options.setdefault("heartbeat_interval", 0.3)
    jobs = JobsRouter(rec.fn, **options)
    app = Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)
    install(app)
    return app, jobs


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def server(recorder: Recorder) -> Iterator[ThreadServer]:
    app, _ = make_app(recorder, max_steps=50)
    with ThreadServer(app) as srv:
        yield srv


async def wait_status(client: httpx.AsyncClient, path: str, statuses: set[str],
                      headers: dict[str, str] = A) -> dict[str, Any]:
    with anyio.fail_after(10):
        while True:
            body: dict[str, Any] = (await client.get(path, headers=headers)).json()
            if body["status"] in statuses:
                return body
            await anyio.sleep(0.03)


async def test_submit_poll_stream_resume(server: ThreadServer, recorder: Recorder) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        job = {"text": "hi", "steps": 6, "delay": 0.1, "hold": True}
        r = await client.post("/v1/jobs", json={"input": job}, headers=A)
        assert r.status_code == 202
        job_id = r.json()["id"]
        assert r.json()["status"] == "queued" and job_id.startswith("job_") and len(job_id) > 20
        assert r.headers["location"] == f"/v1/jobs/{job_id}"
        assert r.headers["x-request-id"]  # the stack is installed around the router

        running = await wait_status(client, r.headers["location"], {"in_progress"})
        assert running["started_at"] is not None
        recorder.gate.set()  # (held until seen running, however slow the machine)

        # Stream, drop the connection after a few events, resume with Last-Event-ID.
        first: list[Any] = []
        async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/events", headers=A) as es:
            async for sse in es.aiter_sse():
                first.append(sse)
                if len(first) == 4:
                    break
        second: list[Any] = []
        headers = {**A, "last-event-id": first[-1].id}
        async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as es:
            async for sse in es.aiter_sse():
                second.append(sse)
        # (a quiet spell, e.g. a stalled machine, adds job.heartbeat events: they carry no id,
        # and an SSE client reports the last id seen for them)
        ids = [e.id for e in first + second if e.id and e.event != "job.heartbeat"]
        assert len(ids) == len(set(ids))  # nothing replayed twice
        assert [int(i) for i in ids] == list(range(1, len(ids) + 1))  # nothing lost
        assert second[-1].event == "job.completed"
        events = first + second
        partials = [json.loads(e.data)["output"] for e in events if e.event == "job.partial"]
        assert partials == [f"chunk-{i}" for i in range(6)]

        final = (await client.get(f"/v1/jobs/{job_id}", headers=A)).json()
        assert final["status"] == "completed"
        assert final["result"] == {"echo": "hi", "steps": 6}
        assert final["progress"] == 1.0
        assert final["usage"]["total_tokens"] == 90 and final["cost"] == "0.06"
        assert final["partial_output"] == partials
        assert final["finished_at"] >= final["started_at"] >= final["created_at"]
        assert "principal" not in final


async def test_heartbeat_during_long_step(server: ThreadServer, recorder: Recorder) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        # The step lasts until the stream has shown a heartbeat (0.3 s of quiet).
        r = await client.post("/v1/jobs", json={"input": {"steps": 1, "hold": True}}, headers=A)
        job_id = r.json()["id"]
        seen: list[str] = []
        with anyio.fail_after(10):
            async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/events",
                                    headers=A) as es:
                async for sse in es.aiter_sse():
                    seen.append(sse.event)
                    if sse.event == "job.heartbeat":
                        recorder.gate.set()
        assert "job.heartbeat" in seen
        assert seen.index("job.heartbeat") < seen.index("job.completed") == len(seen) - 1


async def test_a_resume_at_the_final_event_ends_at_once(
    server: ThreadServer, recorder: Recorder
) -> None:
    # An EventSource reconnects with the last id it saw: after the final event that must
    # not hang (it did: the stream waited for events that would never come).
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.post("/v1/jobs", json={"input": {"steps": 2}}, headers=A)
        job_id = r.json()["id"]
        await wait_status(client, f"/v1/jobs/{job_id}", {"completed"})
        events = f"/v1/jobs/{job_id}/events"
        async with aconnect_sse(client, "GET", events, headers=A) as es:
            log = [sse async for sse in es.aiter_sse()]
        assert log[-1].event == "job.completed"
        with anyio.fail_after(5):
            resumed = await client.get(events, headers={**A, "last-event-id": log[-1].id})
            assert resumed.status_code == 204 and resumed.content == b""
            after = await client.get(events + f"?after={log[-1].id}", headers=A)
            assert after.status_code == 204
            # before the final event: the rest is replayed, ending with it
            async with aconnect_sse(
                client, "GET", events, headers={**A, "last-event-id": log[-3].id}
            ) as es:
                rest = [sse async for sse in es.aiter_sse()]
        assert [(e.id, e.event) for e in rest] == [(e.id, e.event) for e in log[-2:]]


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_resume_past_the_end_of_the_log_replays_it_from_the_start(
    recorder: Recorder, store: str, request: pytest.FixtureRequest
) -> None:
    # A Last-Event-ID past a job's last event (another job's, mistyped, from a log since
    # lost) is none this log sent: it waited for an event after it, so a running job's
    # stream showed only heartbeats until the job ended (an ended one was a 204). It now
    # replays from the start, as a malformed id does.
    storage = "memory://" if store == "memory" else request.getfixturevalue("redis_url")
    app, _ = make_app(recorder, storage=storage)
    past = "1000" if store == "memory" else f"{int(time.time() + 3600) * 1000}-0"
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            r = await client.post("/v1/jobs", json={"input": {"steps": 2, "hold": True}},
                                  headers=A)
            job = r.headers["location"]
            await wait_status(client, job, {"in_progress"})  # (its status event is logged)
            seen: list[Any] = []
            try:
                with anyio.fail_after(10):
                    async with aconnect_sse(client, "GET", job + "/events",
                                            headers={**A, "last-event-id": past}) as es:
                        async for sse in es.aiter_sse():
                            seen.append(sse)
                            if len(seen) == 1:
                                assert sse.event == "job.status"  # not a heartbeat
                                recorder.gate.set()
            finally:
                recorder.gate.set()
            assert (await client.get(job, headers=A)).json()["status"] == "completed"
            async with aconnect_sse(client, "GET", job + "/events", headers=A) as es:
                log = [(e.id, e.event) async for e in es.aiter_sse()]
            assert log[-1][1] == "job.completed"
            assert [(e.id, e.event) for e in seen if e.event != "job.heartbeat"] == log
            # ended: the same id replays the whole log, the final event's own id is a 204
            for resume in ({"headers": {**A, "last-event-id": past}},
                           {"headers": A, "params": {"after": past}}):
                got = await client.get(job + "/events", **resume)  # type: ignore[arg-type]
                assert got.status_code == 200, got.text
                assert [ln for ln in got.text.splitlines() if ln.startswith("id:")] == [
                    f"id: {i}" for i, _ in log
                ]
            done = await client.get(job + "/events", headers={**A, "last-event-id": log[-1][0]})
            assert done.status_code == 204


async def test_cancel_mid_run_is_observed_and_idempotent(
    server: ThreadServer, recorder: Recorder
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.post("/v1/jobs", json={"input": {"steps": 40, "delay": 0.25}}, headers=A)
        job_id = r.json()["id"]
        body = await wait_status(client, f"/v1/jobs/{job_id}", {"in_progress"})
        assert body["status"] == "in_progress"
        await anyio.sleep(0.3)
        first = await client.delete(f"/v1/jobs/{job_id}", headers=A)
        assert first.status_code == 200
        assert first.json()["status"] == "cancelled"
        assert recorder.cancelled == [job_id]  # the function received the cancellation
        again = await client.delete(f"/v1/jobs/{job_id}", headers=A)
        assert again.json() == first.json()
        partial_count = len(first.json()["partial_output"])
        await anyio.sleep(0.5)
        after = (await client.get(f"/v1/jobs/{job_id}", headers=A)).json()
        assert after["status"] == "cancelled" and len(after["partial_output"]) == partial_count


async def test_idempotent_submit(server: ThreadServer, recorder: Recorder) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        body = {"input": {"text": "once", "steps": 1}}
        key = {**A, "idempotency-key": "7c1f3a52-5d2b-4b3e-9a53-0c6f1b2f9d11"}
        first = await client.post("/v1/jobs", json=body, headers=key)
        again = await client.post("/v1/jobs", json=body, headers=key)
        assert first.status_code == again.status_code == 202
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["idempotent-replayed"] == "true"
        quoted = {**A, "idempotency-key": '"7c1f3a52-5d2b-4b3e-9a53-0c6f1b2f9d11"'}
        assert (await client.post("/v1/jobs", json=body, headers=quoted)).json()["id"] == \
            first.json()["id"]
        await wait_status(client, f"/v1/jobs/{first.json()['id']}", {"completed"})
        assert recorder.calls == [{"text": "once", "steps": 1}]  # one job ran, once

        other = await client.post("/v1/jobs", json={"input": {"text": "different"}}, headers=key)
        assert other.status_code == 422
        assert other.json()["error"]["code"] == "idempotency_key_reused"

        # The same key from another principal is a different key.
        mine = await client.post("/v1/jobs", json=body, headers={**B, "idempotency-key":
                                                                  key["idempotency-key"]})
        assert mine.status_code == 202 and mine.json()["id"] != first.json()["id"]

        bad = await client.post("/v1/jobs", json=body, headers={**A, "idempotency-key": "x" * 300})
        assert bad.status_code == 400


async def test_concurrent_identical_submits_start_one_job(
    server: ThreadServer, recorder: Recorder
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        body = {"input": {"text": "race", "steps": 1}}
        headers = {**A, "idempotency-key": "race-key-0001"}
        ids: list[str] = []

        async def submit() -> None:
            ids.append((await client.post("/v1/jobs", json=body, headers=headers)).json()["id"])

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(submit)
        assert len(set(ids)) == 1
        await wait_status(client, f"/v1/jobs/{ids[0]}", {"completed"})
        assert recorder.calls == [{"text": "race", "steps": 1}]


async def test_other_principal_gets_404_everywhere(server: ThreadServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.post("/v1/jobs", json={"input": {"steps": 2}}, headers=A)
        job_id = r.json()["id"]
        for method, path in [("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/events"),
                             ("DELETE", f"/v1/jobs/{job_id}")]:
            r = await client.request(method, path, headers=B)
            assert r.status_code == 404, (method, path)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["error"]["code"] == "not_found"
        done = await wait_status(client, f"/v1/jobs/{job_id}", {"completed"})
        assert done["status"] == "completed"  # B's DELETE did not touch A's job
        missing = await client.get("/v1/jobs/job_doesnotexist", headers=A)
        assert missing.status_code == 404


async def test_failures_are_typed_and_leak_nothing(
    server: ThreadServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        job_id = (await client.post("/v1/jobs", json={"input": {"steps": 1, "fail": True}},
                                    headers=A)).json()["id"]
        body = await wait_status(client, f"/v1/jobs/{job_id}", {"failed"})
        assert body["error"]["code"] == "internal"
        assert "secret" not in json.dumps(body)
        # the client sees "internal"; the server log has the exception, with the job id
        logged = [r for r in caplog.records if r.name == "aimiddleware.jobs"]
        assert [r.getMessage() for r in logged] == [f"{job_id}: the job function raised"]
        assert logged[0].exc_info and "secret internal detail" in str(logged[0].exc_info[1])
        bad = await client.post("/v1/jobs", json={"inptu": 1}, headers=A)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
        notjson = await client.post("/v1/jobs", content=b"{nope", headers=A)
        assert notjson.status_code == 400


async def test_max_steps_and_max_cost_end_the_job(recorder: Recorder) -> None:
    app, _ = make_app(recorder, max_steps=3, max_cost="0.025")
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            steps = (await client.post("/v1/jobs", json={"input": {"steps": 10, "delay": 0}},
                                       headers=A)).json()["id"]
            body = await wait_status(client, f"/v1/jobs/{steps}", {"failed"})
            # cost cap (0.025) trips at the third 0.01 before the fourth step would
            assert body["error"]["code"] == "max_cost_exceeded"
            assert body["cost"] == "0.03" and len(body["partial_output"]) == 3

    app, _ = make_app(recorder, max_steps=3)
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            job = (await client.post("/v1/jobs", json={"input": {"steps": 10, "delay": 0}},
                                     headers=A)).json()["id"]
            body = await wait_status(client, f"/v1/jobs/{job}", {"failed"})
            assert body["error"]["code"] == "max_steps_exceeded"
            assert body["steps"] == 3 and body["partial_output"] == ["chunk-0", "chunk-1",
                                                                     "chunk-2"]


async def test_timeout_expires_the_job(recorder: Recorder) -> None:
    app, _ = make_app(recorder, timeout=0.3)
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            job = (await client.post("/v1/jobs", json={"input": {"steps": 50, "delay": 0.1}},
                                     headers=A)).json()["id"]
            body = await wait_status(client, f"/v1/jobs/{job}", {"expired"})
            assert body["error"]["code"] == "job_expired"


async def blocking_call(ctx: JobContext, input: Any) -> Any:
    """A job whose model call runs in a thread (a blocking SDK): cancelling it does not stop
    the call, so the job holds its max_concurrent_jobs slot for the call's whole length."""
    await anyio.to_thread.run_sync(time.sleep, float(input["seconds"]))
    return {"slept": input["seconds"]}


async def test_a_job_is_expired_at_the_expires_at_it_shows() -> None:
    # A job's expires_at is its submission plus timeout, but the deadline was counted from
    # when it started: one waiting for a max_concurrent_jobs slot ran (and completed) past
    # the expires_at its client was shown, and one a task-queue worker took late ran at all.
    jobs = JobsRouter(blocking_call, timeout=0.4, max_concurrent_jobs=1)
    app = Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            holder = (await client.post("/v1/jobs", json={"input": {"seconds": 1.2}},
                                        headers=A)).json()["id"]
            waiter = (await client.post("/v1/jobs", json={"input": {"seconds": 0.01}},
                                        headers=A)).json()["id"]
            body = await wait_status(client, f"/v1/jobs/{waiter}", {"completed", "expired"})
            assert body["status"] == "expired" and body["error"]["code"] == "job_expired"
            assert body["started_at"] is None and body["result"] is None
            assert body["finished_at"] < body["expires_at"] + 0.3  # (not at 1.2 s)
            # (the holder's thread ran on past its deadline: it ends when the call returns)
            await wait_status(client, f"/v1/jobs/{holder}", {"completed", "expired"})
    # A record taken after its expires_at (a task queue's worker, late): expired, not run.
    ran: list[Any] = []

    async def record_call(ctx: JobContext, input: Any) -> Any:
        ran.append(input)

    late = JobsRouter(record_call, timeout=60)
    job = Job(id="job_taken_late", principal="p", input={}, created_at=time.time() - 61,
              expires_at=time.time() - 1)
    await late.store.create("p", job.id, job.stored(), None)
    await late.runner.execute(job)
    raw = await late.store.get("p", job.id)
    assert raw is not None and json.loads(raw)["status"] == "expired" and ran == []


async def test_the_routers_principal_resolver_is_read_as_the_stacks(recorder: Recorder) -> None:
    # principal= took only a sync callable returning a str: the stack's kind of resolver
    # (async, or None for "the default rule") made every job route a 500.
    async def tenant(request: Any) -> str | None:
        await anyio.lowlevel.checkpoint()
        return dict(request["headers"]).get(b"x-tenant", b"").decode() or None

    jobs = JobsRouter(recorder.fn, principal=tenant)
    app = Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            t1, t2 = {"x-tenant": "t1"}, {"x-tenant": "t2"}
            r = await client.post("/v1/jobs", json={"input": {"steps": 1}}, headers=t1)
            assert r.status_code == 202
            await wait_status(client, r.headers["location"], {"completed"}, headers=t1)
            assert (await client.get(r.headers["location"], headers=t2)).status_code == 404
            # None: the default principal (the API key's here), as under the stack
            r = await client.post("/v1/jobs", json={"input": {"steps": 1}}, headers=A)
            assert r.status_code == 202
            await wait_status(client, r.headers["location"], {"completed"})
            assert (await client.get(r.headers["location"], headers=B)).status_code == 404
            assert (await client.get(r.headers["location"], headers=t1)).status_code == 404


async def test_shutdown_marks_unfinished_jobs(recorder: Recorder) -> None:
    app, jobs = make_app(recorder, shutdown_grace=0.1)
    srv = ThreadServer(app)
    with srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            job = (await client.post("/v1/jobs", json={"input": {"steps": 100, "delay": 0.1}},
                                     headers=A)).json()["id"]
            await wait_status(client, f"/v1/jobs/{job}", {"in_progress"})
    principal = next(p for (p, rid) in jobs.store._records if rid == job)  # type: ignore[attr-defined]
    raw = await jobs.store.get(principal, job)
    assert raw is not None
    stored = json.loads(raw)
    assert stored["status"] == "failed" and stored["error"]["code"] == "shutdown"
    assert stored["error"]["retryable"] is True
    assert recorder.cancelled == [job]


def test_runner_needs_lifespan(recorder: Recorder) -> None:
    jobs = JobsRouter(recorder.fn)
    app = Starlette(routes=[Mount("/v1", jobs)])  # lifespan not wired
    from starlette.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/jobs", json={"input": {}})
    # A typed error, not a crash; and a deployment error, not retried (a server without
    # lifespan support, daphne, got a retryable 500 "internal" that SDKs retried).
    assert r.status_code == 503 and r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["code"] == "not_configured" and r.json()["retryable"] is False
    assert "lifespan" in r.json()["detail"]


async def test_a_job_whose_worker_died_is_reported_failed(recorder: Recorder) -> None:
    """In-process mode: a worker that crashes stops renewing the lease; readers see it."""
    # Renewed every lease/3 (0.5 s): a live job survives its server stalling for 1 s.
    app, jobs = make_app(recorder, lease=1.5)
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            live = (await client.post("/v1/jobs", json={"input": {
                "steps": 3, "delay": 0.05, "hold": True}}, headers=A)).json()["id"]
            await wait_status(client, f"/v1/jobs/{live}", {"in_progress"})
            await anyio.sleep(1.6)  # longer than the lease: a live worker keeps renewing it
            assert (await client.get(f"/v1/jobs/{live}", headers=A)).json()["status"] == \
                "in_progress"
            # A record some crashed worker left in_progress, with no lease behind it.
            principal = next(p for (p, rid) in jobs.store._records if rid == live)  # type: ignore[attr-defined]
            dead = Job(id="job_from_a_dead_worker", principal=principal, status="in_progress",
                       started_at=time.time())
            await jobs.store.put(principal, dead.id, dead.stored())
            body = (await client.get(f"/v1/jobs/{dead.id}", headers=A)).json()
            assert body["status"] == "failed" and body["error"]["code"] == "worker_lost"
            assert body["error"]["retryable"] is True
            async with aconnect_sse(client, "GET", f"/v1/jobs/{dead.id}/events",
                                    headers=A) as es:
                assert [e.event async for e in es.aiter_sse()] == ["job.failed"]
            recorder.gate.set()
            done = await wait_status(client, f"/v1/jobs/{live}", {"completed"})
            assert done["result"]["steps"] == 3


async def test_mounts_in_a_fastapi_app(recorder: Recorder) -> None:
    from fastapi import FastAPI

    jobs = JobsRouter(recorder.fn)
    api = FastAPI(lifespan=jobs.lifespan_context)
    api.mount("/api", jobs)
    install(api)
    with ThreadServer(api) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            r = await client.post("/api/jobs", json={"input": {"text": "f", "steps": 1}},
                                  headers=A)
            assert r.status_code == 202 and r.headers["location"].startswith("/api/jobs/job_")
            done = await wait_status(client, r.headers["location"], {"completed"})
            assert done["result"] == {"echo": "f", "steps": 1}


async def test_max_concurrent_jobs_keeps_the_rest_queued(recorder: Recorder) -> None:
    app, _ = make_app(recorder, max_concurrent_jobs=1)
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            # the first job runs until the second has been seen queued and cancelled
            first = (await client.post("/v1/jobs", json={"input": {
                "steps": 4, "delay": 0.1, "hold": True}}, headers=A)).json()["id"]
            second = (await client.post("/v1/jobs", json={"input": {"steps": 1}},
                                        headers=A)).json()["id"]
            await wait_status(client, f"/v1/jobs/{first}", {"in_progress"})
            assert (await client.get(f"/v1/jobs/{second}", headers=A)).json()["status"] == "queued"
            # a queued job can be cancelled before it ever starts
            cancelled = (await client.delete(f"/v1/jobs/{second}", headers=A)).json()
            assert cancelled["status"] == "cancelled" and cancelled["started_at"] is None
            recorder.gate.set()
            done = await wait_status(client, f"/v1/jobs/{first}", {"completed"})
            assert done["result"]["steps"] == 4
    assert len(recorder.calls) == 1


async def test_store_down_is_a_typed_503(recorder: Recorder) -> None:
    from tests.redis_server import free_port

    jobs = JobsRouter(recorder.fn, storage=f"redis://127.0.0.1:{free_port()}/0")
    app = Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            r = await client.post("/v1/jobs", json={"input": {}}, headers=A)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "store_unavailable"
            assert r.headers["retry-after"] == "1"
            g = await client.get("/v1/jobs/job_whatever", headers=A)
            assert g.status_code == 503


async def progress_then_stuck(ctx: JobContext, input: Any) -> Any:
    await ctx.progress(0.5)
    await anyio.sleep(60)


async def test_a_job_write_on_the_wire_at_cancel_lands_before_the_final_one() -> None:
    # The job's progress write was cancelled with the job, but a command already sent
    # still lands: after the final record, it put the job back in_progress.
    from tests.test_jobs_batches import WireStore, cancel_when_in_flight

    store = WireStore()
    store.slow_put = lambda data: '"progress":0.5' in data and '"in_progress"' in data
    job = Job(id="job_wire", principal="p", input={})
    final = await cancel_when_in_flight(store, job, progress_then_stuck)
    assert final["status"] == "cancelled"


@asynccontextmanager
async def pausable(
    recorder: Recorder, **options: Any
) -> AsyncIterator[tuple[RedisServer, httpx.AsyncClient]]:
    """The jobs router on a Valkey of its own (which the test may pause: ``paused``) under
    uvicorn, and a client of it; commands to the store time out after 0.5 s."""
    store = RedisServer().start()
    try:
        storage = Storage(store.url, socket_timeout=0.5)  # (ours to close: passed built)
        jobs = JobsRouter(recorder.fn, storage=storage, cancel_poll=0.05, **options)

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with jobs.lifespan_context(app):
                yield
            await storage.aclose()

        app = Starlette(routes=[Mount("/v1", jobs)], lifespan=lifespan)
        with ThreadServer(app) as srv:
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
                yield store, client
    finally:
        store.stop()


@contextmanager
def paused(store: RedisServer) -> Iterator[None]:
    """The store hung (SIGSTOP: every command times out), then resumed, connections intact."""
    assert store.proc is not None
    store.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        store.proc.send_signal(signal.SIGCONT)


async def test_the_runner_survives_a_store_outage(recorder: Recorder) -> None:
    # A job's cancel watcher and the webhook dispatcher met the outage, their errors ended
    # the runner's task group, and every later submission on that worker was a 500 ("The
    # job runner is not running") until the process restarted.
    async with pausable(recorder, webhook_secrets=["whsec_" + "A" * 32],
                        webhook_poll_interval=0.05) as (store, client):
        held = {"input": {"steps": 1, "hold": True}}
        job_id = (await client.post("/v1/jobs", json=held, headers=A)).json()["id"]
        await wait_status(client, f"/v1/jobs/{job_id}", {"in_progress"})
        with paused(store):
            await anyio.sleep(1.5)  # (the watcher and the dispatcher time out meanwhile)
            down = await client.post("/v1/jobs", json={"input": {}}, headers=A)
            assert down.status_code == 503
            assert down.json()["error"]["code"] == "store_unavailable"
        recorder.gate.set()
        r = await client.post("/v1/jobs", json={"input": {"steps": 1}}, headers=A)
        assert r.status_code == 202, r.text
        done = await wait_status(client, f"/v1/jobs/{r.json()['id']}", {"completed"})
        assert done["result"] == {"echo": None, "steps": 1}
        held_end = await wait_status(client, f"/v1/jobs/{job_id}", {"completed"})
        assert held_end["result"] == {"echo": None, "steps": 1}


async def test_a_batch_whose_items_finish_during_a_store_outage_completes(
    recorder: Recorder,
) -> None:
    # A batch's result lines were written once: items finishing while the store was paused
    # raised out of the batch, which stayed in_progress until the reaper reported its worker
    # lost (a lease later) though it was alive and every item had run. Each write is now
    # tried again, and a line the store received twice (sent before a timeout, run when
    # the server resumed) is read once.
    items = [{"custom_id": f"item-{i}", "input": {"steps": 1, "hold": True, "delay": 0}}
             for i in range(4)]
    async with pausable(recorder) as (store, client):
        r = await client.post("/v1/batches", json={"items": items}, headers=A)
        assert r.status_code == 202, r.text
        batch_id = r.json()["id"]
        await wait_status(client, f"/v1/batches/{batch_id}", {"in_progress"})
        with paused(store):
            recorder.gate.set()  # (every item finishes while the store is paused)
            await anyio.sleep(1.5)
        done = await wait_status(client, f"/v1/batches/{batch_id}", {"completed", "failed"})
        assert done["status"] == "completed", done
        assert done["counts"]["succeeded"] == 4, done
        res = await client.get(f"/v1/batches/{batch_id}/results", headers=A)
    assert res.status_code == 200, res.text
    ids = sorted(json.loads(line)["custom_id"] for line in res.text.splitlines())
    assert ids == [item["custom_id"] for item in items]


async def test_a_callback_is_refused_where_no_webhook_is_ever_sent(recorder: Recorder) -> None:
    # Without webhook_secrets there is no dispatcher: a callback_url was accepted (202, and
    # shown on the job), and nothing was ever sent or logged.
    jobs = JobsRouter(recorder.fn, prefix="/v1")
    app = Starlette(routes=jobs.routes, lifespan=jobs.lifespan_context)
    hook = "https://hooks.example.com/done"
    async with jobs.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://test"
    ) as client:
        for path, body in (
            ("/v1/jobs", {"input": {"steps": 1}, "callback_url": hook}),
            ("/v1/batches", {"items": [{"custom_id": "a", "input": {}}], "callback_url": hook}),
        ):
            r = await client.post(path, json=body)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "invalid_request" and error["param"] == "callback_url"
            assert "not enabled" in error["message"]
            del body["callback_url"]
            assert (await client.post(path, json=body)).status_code == 202
    assert recorder.calls == [{"steps": 1}, {}]  # (only the ones without a callback ran)



async def test_a_resume_id_redis_cannot_parse_replays_from_the_start(
    recorder: Recorder, redis_url: str
) -> None:
    # A Last-Event-ID (or ?after=) shaped like a stream id but past 64 bits, or written in
    # non-ASCII digits, reached XREAD, whose "Invalid stream ID" error was a 500.
    app, _ = make_app(recorder, storage=redis_url)
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            r = await client.post("/v1/jobs", json={"input": {"steps": 1, "delay": 0}},
                                  headers=A)
            events = f"/v1/jobs/{r.json()['id']}/events"
            await wait_status(client, events.removesuffix("/events"), {"completed"})
            for resume in ({"headers": {**A, "last-event-id": "99999999999999999999-0"}},
                           {"headers": A, "params": {"after": "\u0661-\u0661"}}):
                got = await client.get(events, **resume)  # type: ignore[arg-type]
                assert got.status_code == 200, got.text
                assert "event: job.completed" in got.text


class NotJSON:
    """What a job function may return by mistake: no JSON form."""


async def returns_what_it_is_told(ctx: JobContext, input: Any) -> Any:
    value = {"object": NotJSON(), "bytes": b"\xff\xfe", "set": {1, 2}}[input["kind"]]
    if input.get("message"):
        await ctx.progress(0.5, message=value)
    if input.get("partial"):
        await ctx.partial(value)
    return value


async def test_a_result_with_no_json_form_fails_the_job_not_hangs_it() -> None:
    # The result (or a partial output) was stored as JSON only when the job ended: one
    # with no JSON form (an object, bytes that are not UTF-8) raised there, and the job
    # stayed in_progress, its stream open, until its lease ran out and it was "lost".
    jobs = JobsRouter(returns_what_it_is_told, lease=60)
    app = Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            for input in ({"kind": "object"}, {"kind": "bytes"},
                          {"kind": "object", "partial": True},
                          {"kind": "object", "message": True}):
                r = await client.post("/v1/jobs", json={"input": input}, headers=A)
                done = await wait_status(client, f"/v1/jobs/{r.json()['id']}",
                                         {"completed", "failed"})
                assert done["status"] == "failed", input
                assert done["error"]["code"] == "internal"
            r = await client.post("/v1/jobs", json={"input": {"kind": "set"}}, headers=A)
            done = await wait_status(client, f"/v1/jobs/{r.json()['id']}", {"completed"})
            assert done["result"] == [1, 2]  # (what has a JSON form keeps working)
            r = await client.post("/v1/batches", headers=A, json={"items": [
                {"custom_id": "a", "input": {"kind": "object"}},
                {"custom_id": "b", "input": {"kind": "set"}}]})
            batch = await wait_status(client, f"/v1/batches/{r.json()['id']}",
                                      {"completed", "failed"})
            assert batch["status"] == "completed"
            assert batch["counts"]["errored"] == 1 and batch["counts"]["succeeded"] == 1
            lines = (await client.get(f"/v1/batches/{batch['id']}/results", headers=A)).text
            results = {x["custom_id"]: x for x in map(json.loads, lines.splitlines())}
            assert results["a"]["error"]["code"] == "internal"
            assert results["b"]["output"] == [1, 2]


async def records_the_cost_it_is_told(ctx: JobContext, input: Any) -> Any:
    await ctx.record_usage({"input_tokens": 1}, cost=input["cost"])
    return "done"


async def test_a_cost_that_is_no_amount_fails_the_job_and_leaves_it_readable() -> None:
    # record_usage took cost="NaN" or "Infinity" (Decimal parses them): the job's record
    # was stored with it, and every GET of the job was then a 500 (the record no longer
    # validates: a cost must be finite) for as long as it was kept.
    jobs = JobsRouter(records_the_cost_it_is_told)
    app = Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            for cost in ("NaN", "Infinity", "-Infinity", "-1"):
                r = await client.post("/v1/jobs", json={"input": {"cost": cost}}, headers=A)
                done = await wait_status(client, f"/v1/jobs/{r.json()['id']}",
                                         {"completed", "failed"})
                assert done["status"] == "failed" and done["cost"] == "0", cost
            r = await client.post("/v1/jobs", json={"input": {"cost": "0.25"}}, headers=A)
            done = await wait_status(client, f"/v1/jobs/{r.json()['id']}", {"completed"})
            assert done["cost"] == "0.25"


async def test_a_long_id_is_not_echoed_whole(server: ThreadServer) -> None:
    """The 404 for an unknown id repeated it whole, in its detail and its error message: a
    10 KB id came back as a 20 KB body. It now repeats the id's first 64 characters and
    "..."; a short id is shown as it is."""
    long = "job_" + "x" * 10_000
    async with httpx.AsyncClient(base_url=server.url, headers=A) as client:
        for method, path in [
            ("GET", f"/v1/jobs/{long}"), ("DELETE", f"/v1/jobs/{long}"),
            ("GET", f"/v1/jobs/{long}/events"), ("GET", f"/v1/batches/{long}"),
            ("DELETE", f"/v1/batches/{long}"), ("GET", f"/v1/batches/{long}/results"),
            ("GET", f"/v1/batches/{long}/events"),
        ]:
            r = await client.request(method, path)
            assert r.status_code == 404, (method, path)
            assert r.json()["error"]["code"] == "not_found"
            assert len(r.content) < 1000, (method, path, len(r.content))
            kind = "batch" if "batches" in path else "job"
            assert r.json()["detail"] == f"No {kind} with id '{long[:64]}...'."
        r = await client.get("/v1/jobs/job_doesnotexist")
        assert r.json()["detail"] == "No job with id 'job_doesnotexist'."


async def test_a_long_field_name_is_not_echoed_whole(recorder: Recorder) -> None:
    """A 400 for a body field the API does not take (the submission's and a batch item's
    models forbid extras, as may the app's input_model) named it whole in its param: a
    field named with 10 KB came back in a 10 KB body. The param now shows its first 64
    characters and "..."; a short one is as before."""
    from pydantic import BaseModel, ConfigDict

    class Question(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: str = ""

    app, _ = make_app(recorder, input_model=Question)
    long = "f" * 10_000
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url, headers=A) as client:
            for path, body, param in [
                ("/v1/jobs", {long: 1}, long),
                ("/v1/jobs", {"input": {long: 1}}, f"input.{long}"),
                ("/v1/batches", {"items": [{"custom_id": "a", "input": {}, long: 1}]},
                 f"items.0.{long}"),
                ("/v1/batches", {"items": [{"custom_id": "a", "input": {long: 1}}]},
                 f"items.0.input.{long}"),
            ]:
                r = await client.post(path, json=body)
                assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
                assert len(r.content) < 1000, (path, param[:20], len(r.content))
                assert r.json()["error"]["param"] == param[:64] + "..."
            r = await client.post("/v1/jobs", json={"inptu": 1})
            assert r.json()["error"]["param"] == "inptu"
    assert recorder.calls == []
