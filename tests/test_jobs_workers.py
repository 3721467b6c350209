"""Two uvicorn worker processes sharing one real Redis: submit on one, use the other."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
from httpx_sse import aconnect_sse

from tests.jobs_servers import ProcessServer

KEY = {"authorization": "Bearer shared-tenant-key"}


async def test_submit_on_one_worker_poll_stream_cancel_on_the_other(
    redis_url: str, tmp_path: Path
) -> None:
    env = {"AIMW_JOBS_REDIS": redis_url, "AIMW_JOBS_MARKERS": str(tmp_path)}
    with ProcessServer("tests.jobs_worker_app:app", {**env, "AIMW_JOBS_WORKER": "a"}) as a, \
            ProcessServer("tests.jobs_worker_app:app", {**env, "AIMW_JOBS_WORKER": "b"}) as b:
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(a.url + "/health")).text == "a"
            assert (await client.get(b.url + "/health")).text == "b"

            # completes: submitted on A, polled and streamed (with resume) on B
            r = await client.post(a.url + "/v1/jobs", json={"input": {"steps": 5}}, headers=KEY)
            assert r.status_code == 202
            done_id = r.json()["id"]
            events = []
            async with aconnect_sse(client, "GET", f"{b.url}/v1/jobs/{done_id}/events",
                                    headers=KEY) as es:
                async for sse in es.aiter_sse():
                    events.append(sse)
                    if len(events) == 2:
                        break
            async with aconnect_sse(client, "GET", f"{b.url}/v1/jobs/{done_id}/events",
                                    headers={**KEY, "last-event-id": events[-1].id}) as es:
                async for sse in es.aiter_sse():
                    events.append(sse)
            partials = [json.loads(e.data)["output"] for e in events if e.event == "job.partial"]
            assert partials == [0, 1, 2, 3, 4]
            assert events[-1].event == "job.completed"
            polled = (await client.get(f"{b.url}/v1/jobs/{done_id}", headers=KEY)).json()
            assert polled["status"] == "completed"
            assert polled["result"] == {"done": True, "worker": "a"}

            # cancelled: submitted on A (runs there), cancelled through B
            r = await client.post(a.url + "/v1/jobs", json={"input": {"steps": 300}}, headers=KEY)
            job_id = r.json()["id"]
            with anyio.fail_after(10):
                status = ""
                while status != "in_progress":
                    await anyio.sleep(0.05)
                    got = await client.get(f"{b.url}/v1/jobs/{job_id}", headers=KEY)
                    status = got.json()["status"]
            assert (tmp_path / f"{job_id}.ran-on").read_text() == "a"
            cancelled = await client.delete(f"{b.url}/v1/jobs/{job_id}", headers=KEY)
            assert cancelled.json()["status"] == "cancelled"
            assert (tmp_path / f"{job_id}.cancelled").read_text() == "a"  # A's function stopped
            seen_on_a = (await client.get(f"{a.url}/v1/jobs/{job_id}", headers=KEY)).json()
            assert seen_on_a == cancelled.json()

            # another principal sees nothing on either worker
            for url in (a.url, b.url):
                other = await client.get(f"{url}/v1/jobs/{job_id}",
                                         headers={"authorization": "Bearer other"})
                assert other.status_code == 404
