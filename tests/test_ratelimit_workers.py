"""Rate limits across real uvicorn worker processes sharing one real Valkey server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis as redis_sync

from tests.redis_server import RedisServer, free_port, project_root

pytestmark = pytest.mark.slow


@contextmanager
def workers(n: int, env: dict[str, str]) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """``n`` single-worker uvicorn processes (each its own PID) on their own ports."""
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    full_env = {**os.environ, **env, "PYTHONPATH": str(project_root())}
    try:
        for _ in range(n):
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "tests.ratelimit_app:app", "--port", str(port),
                 "--log-level", "warning", "--backlog", "4096"],
                cwd=project_root(), env=full_env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            procs.append((f"http://127.0.0.1:{port}", proc))
        deadline = time.monotonic() + 30
        for url, proc in procs:
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("a uvicorn worker did not start")
                time.sleep(0.1)
        yield procs
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def env_for(redis_url: str, policy: dict[str, object], **extra: str) -> dict[str, str]:
    return {"AIMW_RL_STORAGE": redis_url, "AIMW_RL_POLICY": json.dumps(policy), **extra}


async def fire(urls: list[str], bodies: list[dict[str, object]], key: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        headers = {"authorization": f"Bearer {key}"}
        return await asyncio.gather(*(
            client.post(urls[i % len(urls)] + "/v1/chat/completions", json=b, headers=headers)
            for i, b in enumerate(bodies)
        ))


async def test_exactly_l_requests_admitted_across_four_workers(redis_url: str) -> None:
    limit = 137
    body = {"model": "gpt-4o", "max_tokens": 1}
    with workers(4, env_for(redis_url, {"requests": f"{limit}/day"})) as procs:
        urls = [u for u, _ in procs]
        # One admission on each worker first (in the burst alone, a worker the machine left
        # idle for a moment can find the budget gone), then the other 996 all at once.
        responses = [(await fire([url], [body], "k-req"))[0] for url in urls]
        responses += await fire(urls, [body] * 996, "k-req")
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == limit
    assert statuses.count(429) == 1000 - limit
    pids = {r.json()["pid"] for r in responses if r.status_code == 200}
    assert len(pids) == 4  # every worker admitted some: the limit is global, not per process
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["dimension"] == "requests"
    assert refused.json()["error"]["code"] == "quota_exceeded"  # a daily window


async def test_token_budget_never_exceeded_with_varied_sizes(redis_url: str) -> None:
    limit = 50_000
    bodies: list[dict[str, object]] = [
        {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "hello there " * (i % 37)}],
            "max_tokens": 20 + (i * 97) % 400,
        }
        for i in range(1000)
    ]
    with workers(4, env_for(redis_url, {"tokens": f"{limit}/day"})) as procs:
        responses = await fire([u for u, _ in procs], bodies, "k-tok")
    admitted = [r.json() for r in responses if r.status_code == 200]
    assert {r.status_code for r in responses} <= {200, 429}
    total = sum(a["input"] + a["output"] for a in admitted)
    assert total <= limit
    assert total > limit - 500  # it filled up: refusals are for lack of room, not errors
    principal = "key_" + hashlib.sha256(b"k-tok").hexdigest()[:32]
    raw = redis_sync.Redis.from_url(redis_url).hget(f"aimw:rl:{{{principal}}}", "tokens:86400")
    assert raw is not None
    assert int(raw.split()[2]) == total  # the shared counter holds exactly what was admitted


async def admitted_within(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str],
    seconds: float,
) -> httpx.Response:
    """Send ``body`` until it is admitted: 429s only, and within ``seconds`` (from a SIGKILL:
    the TTL, a refresh apart, and slack for a busy box)."""
    since = time.monotonic()
    while True:
        r = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
        if r.status_code == 200:
            return r
        assert r.status_code == 429
        assert time.monotonic() - since < seconds
        await asyncio.sleep(0.05)


async def test_sigkilled_worker_leases_come_back_within_ttl(redis_url: str) -> None:
    ttl = 3.0  # refreshed every ttl/3: leaves room for a loaded CI box to be late
    env = env_for(redis_url, {"concurrency": 3}, AIMW_RL_LEASE_TTL=str(ttl))
    with workers(2, env) as procs:
        (url_a, proc_a), (url_b, _) = procs
        async with httpx.AsyncClient(timeout=60) as client:
            headers = {"authorization": "Bearer k-lease"}
            body = {"model": "gpt-4o", "max_tokens": 1, "sleep": 60}

            def held() -> asyncio.Task[httpx.Response]:
                return asyncio.create_task(
                    client.post(url_a + "/v1/chat/completions", json=body, headers=headers)
                )

            hold = [held() for _ in range(3)]
            quick = {"model": "gpt-4o", "max_tokens": 1}
            # Wait until the three are in flight, then past two TTLs: refreshes keep them held.
            deadline = time.monotonic() + 30
            while True:
                # A quick request in flight as a long one arrives can take its place (the long
                # one is refused at once): send that one again.
                hold = [held() if task.done() else task for task in hold]
                r = await client.post(url_b + "/v1/chat/completions", json=quick, headers=headers)
                if r.status_code == 429 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert r.status_code == 429 and r.json()["dimension"] == "concurrency"
            await asyncio.sleep(2 * ttl)
            r = await client.post(url_b + "/v1/chat/completions", json=quick, headers=headers)
            assert r.status_code == 429  # leases were refreshed while the requests ran
            proc_a.send_signal(signal.SIGKILL)
            r = await admitted_within(client, url_b, quick, headers, ttl + 4.0)
            for task in hold:
                with pytest.raises(httpx.HTTPError):
                    await task


async def test_sigkilled_worker_reservations_come_back_within_ttl(redis_url: str) -> None:
    """Streams that held a day's tokens when their worker was SIGKILLed: once their leases
    lapse, the next admission of the principal (on another worker) refunds them."""
    ttl = 3.0
    env = env_for(redis_url, {"tokens": "2000/day"}, AIMW_RL_LEASE_TTL=str(ttl))
    with workers(2, env) as procs:
        (url_a, proc_a), (url_b, _) = procs
        async with httpx.AsyncClient(timeout=60) as client:
            headers = {"authorization": "Bearer k-held"}
            long = {"model": "gpt-4o", "max_tokens": 600, "stream": 60}
            streams = []
            for _ in range(3):  # 3 x ~610 tokens held: no room for a fourth
                req = client.build_request("POST", url_a + "/v1/chat/completions", json=long,
                                           headers=headers)
                resp = await client.send(req, stream=True)
                assert resp.status_code == 200
                chunks = resp.aiter_raw()  # (kept: collected, it would close the stream)
                await chunks.__anext__()  # mid-stream
                streams.append((resp, chunks))
            quick = {"model": "gpt-4o", "max_tokens": 600}
            r = await client.post(url_b + "/v1/chat/completions", json=quick, headers=headers)
            assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
            await asyncio.sleep(2 * ttl)
            r = await client.post(url_b + "/v1/chat/completions", json=quick, headers=headers)
            assert r.status_code == 429  # the streams' leases were refreshed: still held
            principal = "key_" + hashlib.sha256(b"k-held").hexdigest()[:32]
            store = redis_sync.Redis.from_url(redis_url)
            assert store.zcard(f"aimw:rl:{{{principal}}}:held") == 3  # all still streaming
            proc_a.send_signal(signal.SIGKILL)
            r = await admitted_within(client, url_b, quick, headers, ttl + 4.0)
            used = r.json()["input"] + r.json()["output"]
            # The three leases lapse a refresh apart: the first refund can make room. Once
            # all have lapsed, the next admission refunds the rest.
            await asyncio.sleep(ttl + 0.5)
            r = await client.post(url_b + "/v1/chat/completions", json=quick, headers=headers)
            assert r.status_code == 200
            used += r.json()["input"] + r.json()["output"]
            for resp, _ in streams:
                await resp.aclose()
    raw = store.hget(f"aimw:rl:{{{principal}}}", "tokens:86400")
    assert raw is not None
    assert int(raw.split()[2]) == used  # only the two answers after the kill
    assert store.zcard(f"aimw:rl:{{{principal}}}:held") == 0


async def test_redis_stopped_mid_run_fail_closed_and_fail_open() -> None:
    server = RedisServer().start()
    try:
        policy = {"requests": "3/day"}
        closed_env = env_for(server.url, policy)
        open_env = env_for(server.url, policy, AIMW_RL_FAIL_OPEN="1")
        with workers(1, closed_env) as closed, workers(1, open_env) as opened:
            c_url, o_url = closed[0][0], opened[0][0]
            body = {"model": "gpt-4o", "max_tokens": 1}
            async with httpx.AsyncClient(timeout=30) as client:

                async def post(url: str, key: str) -> httpx.Response:
                    return await client.post(url + "/v1/chat/completions", json=body,
                                             headers={"authorization": f"Bearer {key}"})

                assert [(await post(c_url, "a")).status_code for _ in range(4)] == [200] * 3 + [429]
                assert [(await post(o_url, "b")).status_code for _ in range(4)] == [200] * 3 + [429]
                server.stop()
                down_closed = [await post(c_url, "c") for _ in range(3)]
                down_open = [await post(o_url, "d") for _ in range(5)]
                assert {r.status_code for r in down_closed} == {503}
                problem = down_closed[0].json()
                assert problem["error"]["code"] == "store_unavailable"
                assert "rate limit" in problem["detail"]
                assert down_closed[0].headers["retry-after"] == "1"
                assert {r.status_code for r in down_open} == {200}  # admitted, logged
                server.start()  # same port, empty: scripts reload by themselves (NOSCRIPT)
                back_closed = [(await post(c_url, "e")).status_code for _ in range(4)]
                back_open = [(await post(o_url, "f")).status_code for _ in range(4)]
                assert back_closed == [200] * 3 + [429]
                assert back_open == [200] * 3 + [429]
    finally:
        server.stop()
