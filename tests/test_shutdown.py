"""A graceful shutdown finishes what the stack still has in flight (real uvicorn worker
processes, real Valkey, SIGTERM): idempotency records and usage rows waiting for the store,
and the cleanups of requests the server cancels."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from tests.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
PRO = {"authorization": "Bearer sk-demo-pro"}
CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 64, "stream": True}


class Worker:
    """One uvicorn worker process; its log (stderr and stdout) in ``log``."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log

    def stop(self, timeout: float = 30) -> float:
        """SIGTERM; the seconds until the process ended."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return time.monotonic() - started


@contextmanager
def worker(app: list[str], env: dict[str, str], *args: str, ready: str) -> Iterator[Worker]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "worker.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", *app, "--host", "127.0.0.1", "--port",
                 str(port), "--log-level", "info", *args],
                env={**os.environ, **env}, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    httpx.get(url + ready, timeout=0.5)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the worker did not start"
                    time.sleep(0.05)
            yield Worker(proc, url, log)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def reference_app(store: RedisServer) -> Iterator[Worker]:
    env = {"AIMW_STORAGE": store.url, "AIMW_IDEMPOTENCY_SECRET": "s" * 32}
    return worker(["examples.app:app"], env, ready="/v1/models")


def stream_through_an_outage(w: Worker, store: RedisServer, key: str) -> list[str]:
    """A keyed streamed completion whose store goes down (its data kept, as AOF or RDB
    would) once the request is claimed; the answer still arrives, its record and usage
    row wait for the store."""
    with httpx.stream("POST", w.url + "/v1/chat/completions", json=CHAT,
                      headers={**PRO, "idempotency-key": key}, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(lines)  # claimed and admitted: the store goes away now
        store.command("SAVE")
        store.stop()
        return [first, *lines]


@pytest.fixture
def store() -> Iterator[RedisServer]:
    server = RedisServer().start()  # (its own: these tests stop it)
    yield server
    server.stop()


def test_a_record_and_a_usage_row_waiting_for_the_store_are_written_before_the_worker_stops(
    store: RedisServer,
) -> None:
    # A response delivered while the store was down has its record written in the
    # background once the store answers, but a worker stopped then (a deploy) cancelled
    # that write with its event loop: the key stayed claimed (409s for the lease, 60 s), then
    # the client's retry ran the model again, billed twice. The usage row, kept in the
    # ledger's retry buffer for the next write, was lost too. Both are now tried at once on
    # shutdown, before the app closes the store.
    with reference_app(store) as w:
        body = stream_through_an_outage(w, store, "order-1")
        assert "data: [DONE]" in body
        time.sleep(1.8)  # (the background write backs off: next try ~3 s after the first)
        store.start()
        seconds = w.stop()
    assert seconds < 5.0, seconds
    with reference_app(store) as again:
        with httpx.stream("POST", again.url + "/v1/chat/completions", json=CHAT,
                          headers={**PRO, "idempotency-key": "order-1"}, timeout=30) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["idempotent-replayed"] == "true"
            assert list(r.iter_lines()) == body  # the first answer, not a second run
        usage = httpx.get(again.url + "/v1/usage", headers=PRO).json()
        assert usage["totals"]["requests"] == 1, usage  # (a replay has no row of its own)
        again.stop()


def test_a_record_the_store_never_takes_by_the_grace_leaves_its_key_claimed(
    store: RedisServer,
) -> None:
    # What the store still refuses after shutdown_grace (5 s) is given up and logged, and
    # the key is not released: a retry is refused (409) until the lease lapses, never run
    # again while the first answer may still be on its way.
    with reference_app(store) as w:
        stream_through_an_outage(w, store, "order-2")
        seconds = w.stop()  # (the store still down)
        log = w.log.read_text()
    assert 4.5 <= seconds < 12.0, seconds
    assert "shutdown: 1 idempotent response(s) not stored" in log, log
    assert "shutdown: 1 usage row(s) not written" in log, log
    store.start()
    with reference_app(store) as again:
        r = httpx.post(again.url + "/v1/chat/completions", json=CHAT,
                       headers={**PRO, "idempotency-key": "order-2"}, timeout=30)
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "conflict"
        again.stop()


def test_requests_the_server_cancels_finish_their_cleanups_before_the_store_closes(
    store: RedisServer,
) -> None:
    # uvicorn cancels what still runs past --timeout-graceful-shutdown and at once sends
    # lifespan.shutdown, without waiting for those requests to unwind; the app's lifespan
    # closed the store and the process ended while their cleanups were still waiting for it
    # (a store slow for a moment, here paused for 1 s): the client got no answer at all (not
    # the 503 "shutting down"), the idempotency key stayed claimed and the rate-limit
    # reservation and concurrency slot stayed taken. The lifespan now waits for them.
    env = {"AIMW_TEST_REDIS": store.url}
    answers: list[httpx.Response | Exception] = []

    def call(url: str) -> None:
        try:
            answers.append(httpx.post(url + "/v1/slow", json={}, timeout=30, headers={
                "authorization": "Bearer k", "idempotency-key": "slow-1"}))
        except httpx.TransportError as exc:
            answers.append(exc)

    with worker(["--factory", "tests.shutdown_app:create_app"], env,
                "--timeout-graceful-shutdown", "1", ready="/docs") as w:
        assert store.proc is not None
        client = threading.Thread(target=call, args=(w.url,))
        client.start()
        time.sleep(0.5)  # (claimed, admitted, waiting in the endpoint)
        w.proc.send_signal(signal.SIGTERM)
        time.sleep(0.8)
        store.proc.send_signal(signal.SIGSTOP)  # (slow while the request unwinds)
        time.sleep(1.1)
        store.proc.send_signal(signal.SIGCONT)
        client.join(30)
        w.proc.wait(15)
    answer = answers[0]
    assert isinstance(answer, httpx.Response), answer
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "overloaded"
    r = redis.Redis(port=store.port)
    try:
        assert list(r.scan_iter("aimw:idem:*")) == []  # released: a retry runs once
        leases = list(r.scan_iter("aimw:rl:*:leases"))
        assert all(r.zcard(k) == 0 for k in leases), leases  # the slot given back
    finally:
        r.close()
