"""Idempotency across real uvicorn worker processes sharing one real Valkey server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import httpx
import redis

from tests.live_server import end_process_group
from tests.redis_server import free_port, project_root

KEY = {"Idempotency-Key": "b1f2c3d4-0000-4000-8000-000000000001"}


@contextmanager
def uvicorn_server(redis_url: str, workers: int, lease: float = 60.0) -> Iterator[
    tuple[str, subprocess.Popen[bytes]]
]:
    port = free_port()
    env = {**os.environ, "AIMW_TEST_REDIS": redis_url, "AIMW_TEST_LEASE": str(lease)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "tests.idempotency_app:create_app",
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
         "--log-level", "warning"],
        cwd=project_root(), env=env, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 40
        pids: set[int] = set()
        while len(pids) < workers:  # every worker answers before the test starts
            assert time.monotonic() < deadline, f"only {len(pids)} workers came up"
            assert proc.poll() is None, "uvicorn exited"
            try:
                pids.add(httpx.get(base + "/pid", timeout=2).json()["pid"])  # new connection
            except httpx.TransportError:
                time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            end_process_group(proc, 15)


def count(redis_url: str, name: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.get(f"test:count:{name}") or 0)
    finally:
        client.close()


async def test_50_concurrent_requests_across_4_workers_run_once(redis_url: str) -> None:
    with uvicorn_server(redis_url, workers=4) as (base, _):
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30,
                                     headers={"Authorization": "Bearer w"}) as c:
            sent = [asyncio.ensure_future(c.post("/chat?hold=1", content=b'{"q":"x"}',
                                                 headers=KEY)) for _ in range(50)]
            # The run that won the claim holds until the duplicates have been answered (not
            # for a fixed time, which a stalled machine could outlast): then it is released.
            deadline = time.monotonic() + 30
            while sum(r.done() for r in sent) < 49 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            client = redis.Redis.from_url(redis_url)
            try:
                client.set("test:release", 1)
            finally:
                client.close()
            responses = await asyncio.gather(*sent)
            replay = await c.post("/chat?hold=1", content=b'{"q":"x"}', headers=KEY)
    assert count(redis_url, "chat") == 1
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {201, 409}
    fresh = [
        r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    assert len(fresh) == 1
    assert all(r.content == fresh[0].content for r in responses if r.status_code == 201)
    assert statuses.count(409) == 49  # the duplicates all came while the first was in flight
    assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    assert replay.content == fresh[0].content


async def test_sigkilled_worker_frees_the_key_after_the_lease(redis_url: str) -> None:
    lease = 2.0  # heartbeat every 2/3 s: at least 4/3 s of lease is left at the kill
    path = "/chat?hang_first=1"
    headers = {"Authorization": "Bearer k", **KEY}
    with uvicorn_server(redis_url, workers=1, lease=lease) as (other, _), uvicorn_server(
        redis_url, workers=1, lease=lease
    ) as (doomed, proc):
        async with httpx.AsyncClient(timeout=30) as c:
            first = asyncio.ensure_future(c.post(doomed + path, content=b"{}", headers=headers))
            deadline = time.monotonic() + 10
            while count(redis_url, "chat") < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await asyncio.sleep(lease * 1.5)  # the heartbeat keeps the lease past one TTL
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
            killed_at = time.monotonic()
            with suppress(httpx.TransportError):
                await first
            during = await c.post(other + path, content=b"{}", headers=headers)
            await asyncio.sleep(max(0.0, killed_at + lease + 0.2 - time.monotonic()))
            retry = await c.post(other + path, content=b"{}", headers=headers)
    assert during.status_code == 409 and during.json()["error"]["code"] == "conflict"
    assert retry.status_code == 201 and retry.json()["run"] == 2
    assert "idempotent-replayed" not in retry.headers
    assert count(redis_url, "chat") == 2
