"""Jobs on a taskiq worker process: the web process only enqueues (real Redis, real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.jobs_servers import ProcessServer
from tests.live_server import end_process_group

KEY = {"authorization": "Bearer taskiq-tenant"}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {"AIMW_JOBS_REDIS": redis_url, "AIMW_JOBS_MARKERS": str(tmp_path)}


@pytest.fixture
def worker(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with taskiq_worker(env) as proc:
        yield proc


@contextmanager
def taskiq_worker(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``taskiq worker`` for tests.jobs_taskiq_app (one process, in a group of its own)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskiq", "worker", "tests.jobs_taskiq_app:broker",
         "--workers", "1", "--log-level", "WARNING", "--shutdown-timeout", "2",
         "--wait-tasks-timeout", "1"],
        env={**os.environ, **env}, cwd=ROOT, start_new_session=True,
    )
    try:
        yield proc
    finally:
        # taskiq's supervisor waits on its children's blocking reads for a long time after
        # SIGTERM; the test owns this process group, so end it briskly (unless it killed it).
        end_process_group(proc, 3)


async def status_of(client: httpx.AsyncClient, url: str) -> str:
    return str((await client.get(url, headers=KEY)).json()["status"])


async def test_jobs_run_on_the_taskiq_worker(
    env: dict[str, str], worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    with ProcessServer("tests.jobs_taskiq_app:app", env) as web:
        async with httpx.AsyncClient(base_url=web.url, timeout=10) as client:
            web_pid = (await client.get("/health")).text
            r = await client.post("/v1/jobs", json={"input": {"steps": 4}}, headers=KEY)
            assert r.status_code == 202
            job_id = r.json()["id"]
            events = []
            async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/events",
                                    headers=KEY) as es:
                async for sse in es.aiter_sse():
                    events.append(sse.event)
            assert events[-1] == "job.completed" and events.count("job.partial") == 4
            body = (await client.get(f"/v1/jobs/{job_id}", headers=KEY)).json()
            assert body["status"] == "completed"
            ran_in = (tmp_path / f"{job_id}.ran-in").read_text()
            assert ran_in != web_pid  # ran in taskiq's worker process, not the web process
            assert body["result"] == {"pid": int(ran_in)}

            r = await client.post("/v1/jobs", json={"input": {"steps": 300}}, headers=KEY)
            job_id = r.json()["id"]
            with anyio.fail_after(15):
                while await status_of(client, f"/v1/jobs/{job_id}") != "in_progress":  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            cancelled = (await client.delete(f"/v1/jobs/{job_id}", headers=KEY)).json()
            assert cancelled["status"] == "cancelled"
            assert (tmp_path / f"{job_id}.cancelled").read_text() == ran_in  # it stopped there


async def test_a_message_handed_out_again_does_not_run_its_job_again(
    env: dict[str, str], tmp_path: Path
) -> None:
    # taskiq-redis hands a message unacknowledged for its idle timeout to a worker again
    # (XAUTOCLAIM), also while its task still runs: the redelivered message found the record
    # in_progress, not ended, and ran the job a second time beside the first (two model
    # calls, two writers of one record); a crashed worker's job likewise ran again, where
    # the README says it is reported lost, never re-run.
    env = {**env, "AIMW_TASKIQ_IDLE_MS": "300"}
    with taskiq_worker(env) as first, ProcessServer("tests.jobs_taskiq_app:app", env) as web:
        async with httpx.AsyncClient(base_url=web.url, timeout=10) as client:
            long = (await client.post("/v1/jobs", json={"input": {"steps": 15}},
                                      headers=KEY)).json()["id"]
            with anyio.fail_after(15):
                while await status_of(client, f"/v1/jobs/{long}") != "in_progress":  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            await anyio.sleep(0.5)  # (past the idle timeout: the next read claims it back)
            short = (await client.post("/v1/jobs", json={"input": {"steps": 1}},
                                       headers=KEY)).json()["id"]
            with anyio.fail_after(15):
                while await status_of(client, f"/v1/jobs/{long}") != "completed":  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            assert await status_of(client, f"/v1/jobs/{short}") == "completed"
            assert len((tmp_path / f"{long}.runs").read_text().split()) == 1
            # A worker killed mid-job; the next worker is handed its message again.
            lost = (await client.post("/v1/jobs", json={"input": {"steps": 300}},
                                      headers=KEY)).json()["id"]
            with anyio.fail_after(15):
                while await status_of(client, f"/v1/jobs/{lost}") != "in_progress":  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(5)
            with taskiq_worker(env):
                await anyio.sleep(0.5)
                nudge = (await client.post("/v1/jobs", json={"input": {"steps": 1}},
                                           headers=KEY)).json()["id"]
                with anyio.fail_after(15):
                    while await status_of(client, f"/v1/jobs/{nudge}") != "completed":  # noqa: ASYNC110
                        await anyio.sleep(0.05)
                await anyio.sleep(0.5)
            assert len((tmp_path / f"{lost}.runs").read_text().split()) == 1


async def test_a_job_the_queue_did_not_take_fails_visibly_and_the_submit_is_a_503(
    redis_url: str,
) -> None:
    # The record was stored, then handed to the broker; when the broker was down the
    # submission was a 500 and the record stayed queued for its whole retention (no worker
    # would ever take it, and a queued record on a task queue is not the reaper's to judge),
    # a retry with the same Idempotency-Key answering 202 for that job that never ran.
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from taskiq_redis import RedisStreamBroker

    from aimiddleware import install
    from aimiddleware.jobs import JobsRouter, TaskiqQueue
    from tests.jobs_servers import ThreadServer
    from tests.redis_server import RedisServer

    async def never_run(ctx: object, input: object) -> None:
        raise AssertionError("no worker runs it")

    broker_server = RedisServer().start()
    try:
        broker = RedisStreamBroker(broker_server.url, consumer_id="0")
        jobs = JobsRouter(never_run, storage=redis_url, queue=TaskiqQueue(broker))
        app = Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)
        install(app)
        with ThreadServer(app) as srv:
            broker_server.stop()  # (the broker goes down after the app started)
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
                headers = {**KEY, "idempotency-key": "submit-once"}
                r = await client.post("/v1/jobs", json={"input": {"steps": 1}}, headers=headers)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "store_unavailable"
                assert r.headers["retry-after"] == "1"
                again = await client.post("/v1/jobs", json={"input": {"steps": 1}},
                                          headers=headers)
                assert again.status_code == 202
                job = (await client.get(again.headers["location"], headers=KEY)).json()
                assert job["status"] == "failed"
                assert job["error"]["code"] == "queue_unavailable" and job["error"]["retryable"]
                async with aconnect_sse(client, "GET", again.headers["location"] + "/events",
                                        headers=KEY) as es:
                    seen = [sse.event async for sse in es.aiter_sse()]
                assert seen[-1] == "job.failed"  # (a stream of it ends)
                batch_body = {"items": [{"custom_id": "a", "input": {}}]}
                r = await client.post("/v1/batches", json=batch_body, headers=headers)
                assert r.status_code == 503
                again = await client.post("/v1/batches", json=batch_body, headers=headers)
                batch = (await client.get(again.headers["location"], headers=KEY)).json()
                assert batch["status"] == "failed" and batch["counts"]["errored"] == 1
                lines = await client.get(again.headers["location"] + "/results", headers=KEY)
                assert '"queue_unavailable"' in lines.text
    finally:
        broker_server.stop()


async def test_one_message_delivered_twice_at_once_runs_its_job_once(redis_url: str) -> None:
    # Each delivery read the record, saw it queued with no live lease, and ran it: two
    # deliveries of one message within milliseconds (a broker handing it out again, a
    # redelivery racing the first) both called the model. The run is now claimed in the
    # store, atomically, before it starts.
    from taskiq_redis import RedisStreamBroker

    from aimiddleware.jobs import Job, JobContext, JobsRouter, TaskiqQueue

    calls: list[str] = []

    async def model(ctx: JobContext, input: object) -> dict[str, int]:
        calls.append(ctx.id)
        await anyio.sleep(0.05)
        return {"calls": len(calls)}

    queue = TaskiqQueue(RedisStreamBroker(redis_url, consumer_id="0"))
    jobs = JobsRouter(model, storage=redis_url, queue=queue, lease=1.0)
    deliver = queue._task.original_func  # what a taskiq worker calls for each delivery

    async def submitted(rec_id: str) -> str:
        raw = Job(id=rec_id, principal="p", input={}, created_at=time.time()).stored()
        await jobs.store.create("p", rec_id, raw, None)
        return raw

    def runs(rec_id: str) -> int:
        return calls.count(rec_id)

    try:
        await submitted("job_twice")
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(deliver, "job", "p", "job_twice")
        assert runs("job_twice") == 1
        raw = await jobs.store.get("p", "job_twice")
        assert raw is not None and Job.model_validate_json(raw).status == "completed"
        events = await jobs.store.read_events("p", "job_twice", None, wait=0)
        assert [e[1] for e in events] == ["job.status", "job.completed"]
        await deliver("job", "p", "job_twice")  # (ended: handed out again, not run)
        assert runs("job_twice") == 1

        # A worker that claimed a job and died before starting it: while its lease holds,
        # a delivery leaves the job to it; once the lease lapses the next one runs it, once.
        # (a lease long enough for a loaded box, then waited out, not slept past)
        raw = await submitted("job_orphan")
        assert await jobs.store.claim_run("p", "job_orphan", raw, 2.0)
        assert not await jobs.store.claim_run("p", "job_orphan", raw, 2.0)
        await deliver("job", "p", "job_orphan")
        assert runs("job_orphan") == 0
        for _ in range(200):  # (at most 10 s)
            if not await jobs.store.alive("p", "job_orphan"):
                break
            await anyio.sleep(0.05)
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(deliver, "job", "p", "job_orphan")
        assert runs("job_orphan") == 1
        # A worker lost mid-run (in_progress, its lease lapsed): reported lost, never re-run.
        lost = Job(id="job_lost", principal="p", input={}, status="in_progress",
                   created_at=time.time(), started_at=time.time())
        await jobs.store.create("p", "job_lost", lost.stored(), None)
        await deliver("job", "p", "job_lost")
        assert runs("job_lost") == 0
    finally:
        await jobs.storage.aclose()
