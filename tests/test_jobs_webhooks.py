"""Signed webhooks: Standard Webhooks interop, retries, 410, restart without loss, SSRF guard."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Mount, Route

from aimiddleware.errors import InvalidRequest, UpstreamUnavailable
from aimiddleware.jobs import (
    CallbackPolicy,
    JobContext,
    JobsRouter,
    JobStore,
    WebhookDispatcher,
    WebhookSigner,
    make_store,
)
from aimiddleware.storage import Storage
from tests.jobs_servers import ProcessServer, ThreadServer

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = WebhookSigner.generate_secret()
LOCAL = CallbackPolicy(schemes=["http"], allow_hosts=["127.0.0.1"])


class Receiver:
    """A real HTTP receiver that answers from a script of statuses (then 200). A ``"trickle"``
    step answers 200 at once, then its body a byte every 0.25 s (50 s for all of it); a
    ``"flood"`` step, 200 and a body of a megabyte every 10 ms."""

    def __init__(self, script: list[int | tuple[int, dict[str, str]] | str]) -> None:
        self.script = list(script)
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        self.flooded = 0
        self.lock = threading.Lock()
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        with self.lock:
            step = self.script.pop(0) if self.script else 200
            if step == "trickle":
                self.received.append((dict(request.headers), body, 200))
                return StreamingResponse(self.trickle(), headers={"content-length": "200"})
            if step == "flood":
                self.received.append((dict(request.headers), body, 200))
                return StreamingResponse(self.flood())
            assert not isinstance(step, str)
            status, headers = step if isinstance(step, tuple) else (step, {})
            self.received.append((dict(request.headers), body, status))
        return Response(status_code=status, headers=headers)

    @staticmethod
    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(200):  # each byte well inside any per-read timeout (stops on disconnect)
            yield b"x"
            await anyio.sleep(0.25)

    async def flood(self) -> AsyncIterator[bytes]:
        """A megabyte every 10 ms (a gigabyte in all), counted in ``flooded`` as sent."""
        chunk = b"x" * 1_000_000
        for _ in range(1000):
            self.flooded += 1
            yield chunk
            await anyio.sleep(0.01)

    def successes(self) -> list[tuple[dict[str, str], bytes, int]]:
        return [r for r in self.received if 200 <= r[2] < 300]


async def job_fn(ctx: JobContext, input: Any) -> Any:
    await ctx.partial("working")
    return {"answer": input["q"] * 2}


def jobs_app(storage: str = "memory://", **options: Any) -> Starlette:
    options.setdefault("webhook_schedule", (0.2, 0.2, 0.2))
    jobs = JobsRouter(job_fn, storage=storage, webhook_secrets=[SECRET, OLD_SECRET],
                      callback_policy=LOCAL, webhook_poll_interval=0.05, **options)
    return Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)


async def wait_for(pred: Any, timeout_s: float = 10) -> None:
    with anyio.fail_after(timeout_s):
        while not pred():  # noqa: ASYNC110 - polling a server in another thread
            await anyio.sleep(0.02)


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[JobStore]:
    """A job store on the real Valkey server, for tests that run a dispatcher directly."""
    storage = Storage(redis_url)
    yield make_store(storage)
    await storage.aclose()


async def settle(dispatcher: WebhookDispatcher, ids: list[str], timeout_s: float = 10) -> None:
    """Runs ``dispatcher`` until every message in ``ids`` has succeeded or failed for good."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(dispatcher.run)
        with anyio.fail_after(timeout_s):
            for msg_id in ids:
                while True:  # polling the store (a dispatcher has no event to wait on)
                    d = await dispatcher.get(msg_id)
                    if d is not None and d.state != "pending":
                        break
                    await anyio.sleep(0.02)
        tg.cancel_scope.cancel()


def test_signatures_verify_with_standardwebhooks_including_rotation() -> None:
    signer = WebhookSigner([SECRET, OLD_SECRET])
    body = b'{"type":"job.completed","data":{"id":"job_1"}}'
    headers = signer.headers("msg_abc", body)
    assert headers["webhook-signature"].count("v1,") == 2
    for secret in (SECRET, OLD_SECRET):  # a receiver on either secret verifies
        assert Webhook(secret).verify(body, headers) == json.loads(body)
    with pytest.raises(Exception, match="signature"):
        Webhook(WebhookSigner.generate_secret()).verify(body, headers)
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(body + b" ", headers)
    with pytest.raises(ValueError):
        WebhookSigner("whsec_dG9vc2hvcnQ=")  # 8 bytes: too short


@pytest.fixture
def receiver_factory() -> Iterator[Any]:
    servers: list[ThreadServer] = []

    def make(script: list[Any]) -> tuple[Receiver, ThreadServer]:
        rec = Receiver(script)
        srv = ThreadServer(rec.app).__enter__()
        servers.append(srv)
        return rec, srv

    yield make
    for srv in servers:
        srv.__exit__()


async def test_receiver_failing_twice_gets_exactly_one_delivery(receiver_factory: Any) -> None:
    rec, rsrv = receiver_factory([500, (503, {"retry-after": "0"})])
    with ThreadServer(jobs_app()) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            r = await client.post("/v1/jobs", json={"input": {"q": 21},
                                                    "callback_url": f"{rsrv.url}/hook"})
            assert r.status_code == 202
            await wait_for(lambda: rec.successes())
            await anyio.sleep(0.5)  # nothing else arrives after the success
    assert [status for _, _, status in rec.received] == [500, 503, 200]
    assert len(rec.successes()) == 1
    ids = {h["webhook-id"] for h, _, _ in rec.received}
    assert len(ids) == 1  # the same message id on every retry (receivers dedupe on it)
    headers, body, _ = rec.successes()[0]
    payload = Webhook(SECRET).verify(body, headers)
    assert payload["type"] == "job.completed"
    # self-contained: the receiver needs no further call
    assert payload["data"]["id"] == r.json()["id"]
    assert payload["data"]["result"] == {"answer": 42}
    assert payload["data"]["partial_output"] == ["working"]


async def test_410_stops_retries_and_attempts_are_recorded(receiver_factory: Any) -> None:
    rec, rsrv = receiver_factory([500, 410, 500, 500])
    app = jobs_app()
    jobs: JobsRouter = app.routes[0].app  # type: ignore[attr-defined]
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            await client.post("/v1/jobs", json={"input": {"q": 1},
                                                "callback_url": f"{rsrv.url}/hook"})
            await wait_for(lambda: len(rec.received) >= 2)
            await anyio.sleep(0.6)  # room for a (wrong) third attempt
            assert jobs.dispatcher is not None
            with anyio.fail_after(10):  # the 410 is recorded just after the receiver answers
                while True:
                    delivery = await jobs.dispatcher.get(rec.received[0][0]["webhook-id"])
                    if delivery is not None and delivery.state != "pending":
                        break
                    await anyio.sleep(0.02)
    assert [s for _, _, s in rec.received] == [500, 410]
    assert delivery is not None and delivery.state == "failed"
    assert [a.status for a in delivery.attempts] == [500, 410]


def started_later(app: Starlette, seconds: float = 60) -> Starlette:
    """The jobs app of a worker whose webhook dispatcher lives ``seconds`` in the future: a
    retry the first worker scheduled ~30 s ahead (so that it is surely gone, however slow
    the machine) is due for this one at once."""
    jobs: JobsRouter = app.routes[0].app  # type: ignore[attr-defined]
    assert jobs.dispatcher is not None
    jobs.dispatcher.clock = lambda: time.time() + seconds
    return app


async def test_restart_mid_retry_loses_no_delivery(redis_url: str, receiver_factory: Any) -> None:
    rec, rsrv = receiver_factory([500])
    with ThreadServer(jobs_app(redis_url, webhook_schedule=(30.0, 0.2))) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            r = await client.post("/v1/jobs", json={"input": {"q": 5},
                                                    "callback_url": f"{rsrv.url}/hook"})
            job_id = r.json()["id"]
            await wait_for(lambda: len(rec.received) == 1)
    # The first worker is gone with the retry still pending; a fresh one takes over.
    assert len(rec.successes()) == 0
    with ThreadServer(started_later(jobs_app(redis_url, webhook_schedule=(30.0, 0.2)))):
        await wait_for(lambda: rec.successes())
        await anyio.sleep(0.5)
    assert [s for _, _, s in rec.received] == [500, 200]
    headers, body, _ = rec.successes()[0]
    payload = Webhook(OLD_SECRET).verify(body, headers)
    assert payload["data"]["id"] == job_id and payload["data"]["result"] == {"answer": 10}


async def test_cancellation_and_failure_are_notified(receiver_factory: Any) -> None:
    rec, rsrv = receiver_factory([])

    async def slow(ctx: JobContext, input: Any) -> Any:
        await anyio.sleep(30)

    jobs = JobsRouter(slow, webhook_secrets=SECRET, callback_policy=LOCAL,
                      webhook_poll_interval=0.05)
    app = Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            r = await client.post("/v1/jobs", json={"callback_url": f"{rsrv.url}/hook"})
            assert (await client.delete(f"/v1/jobs/{r.json()['id']}")).json()["status"] == \
                "cancelled"
            await wait_for(lambda: rec.successes())
    payload = Webhook(SECRET).verify(rec.received[0][1], rec.received[0][0])
    assert payload["type"] == "job.cancelled"


def held_jobs_app(storage: str) -> Starlette:
    """A jobs app whose jobs and batch items run until cancelled (a shutdown ends them)."""

    async def held(ctx: JobContext, input: Any) -> Any:
        await anyio.sleep(60)

    jobs = JobsRouter(held, storage=storage, webhook_secrets=SECRET, callback_policy=LOCAL,
                      webhook_poll_interval=0.05, shutdown_grace=0.1)
    return Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)


async def started(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> str:
    """Submit ``body`` at ``path``; the new record's id once it is in progress."""
    rec_id: str = (await client.post(path, json=body)).json()["id"]
    with anyio.fail_after(10):
        while (await client.get(f"{path}/{rec_id}")).json()["status"] != "in_progress":  # noqa: ASYNC110 - polling a server in another thread
            await anyio.sleep(0.02)
    return rec_id


async def test_a_shutdown_sends_the_webhooks_of_the_job_and_the_batch_it_ended(
    redis_url: str, receiver_factory: Any
) -> None:
    """A graceful stop ends a running batch ``failed``/``shutdown`` as it does a job: its
    webhook goes out too (it went out for the job only)."""
    rec, rsrv = receiver_factory([])
    hook = f"{rsrv.url}/hook"
    with ThreadServer(held_jobs_app(redis_url)) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            job = await started(client, "/v1/jobs", {"callback_url": hook})
            batch = await started(client, "/v1/batches", {
                "items": [{"custom_id": "a", "input": {}}], "callback_url": hook})
    # Stopped; the next worker on the store sends whatever the first one left in the outbox.
    with ThreadServer(held_jobs_app(redis_url)):
        await wait_for(lambda: len(rec.successes()) >= 2)
        await anyio.sleep(0.3)  # nothing else arrives
    payloads = [Webhook(SECRET).verify(body, headers) for headers, body, _ in rec.successes()]
    ended = {(p["type"], p["data"]["id"], p["data"]["error"]["code"]) for p in payloads}
    assert ended == {("job.failed", job, "shutdown"), ("batch.failed", batch, "shutdown")}
    # Two messages. (Delivery is at least once: one the first worker sends as its 0.1 s grace
    # runs out, before it can record it, is sent again by the next under the same webhook-id,
    # for the receiver to drop. A loaded full run once received the job's message twice.)
    assert len({headers["webhook-id"] for headers, _, _ in rec.successes()}) == 2
    batch_payload = next(p for p in payloads if p["type"] == "batch.failed")
    assert [r["type"] for r in batch_payload["data"]["results"]] == ["cancelled"]


@pytest.mark.parametrize("stop", ["while-the-claim-answers", "before-the-attempt"])
async def test_a_message_a_stopping_dispatcher_claimed_is_sent_by_the_next_one_at_once(
    storage: Storage, receiver_factory: Any, stop: str
) -> None:
    """The order the test above met once, pinned: a dispatcher is stopped (its shutdown
    grace runs out) once the store has leased it a message, and before it attempts it:
    ``while-the-claim-answers``, the stop lands while the claim's answer is on the way (the
    store leased the message, the dispatcher never learns of it); ``before-the-attempt``,
    right after the claim returned. The first left the message leased for the attempt's
    timeout + 30 s (here 60 s): the next dispatcher could only send it then. Now the claim
    is shielded, so the dispatcher gets its answer, and a delivery it claimed is handed
    back due now by its task, which the stop cancels before the attempt (the second order:
    held before): the next dispatcher sends it at once, in one attempt. (A claim on
    memory:// never waits: the hook makes it.)"""
    store = make_store(storage)
    rec, srv = receiver_factory([])
    first = WebhookDispatcher(store, WebhookSigner(SECRET), policy=LOCAL, timeout=30,
                              poll_interval=0.05)
    msg_id = await first.enqueue(f"{srv.url}/hook", '{"type":"job.completed"}')
    claim = store.outbox_claim

    with anyio.fail_after(5), anyio.CancelScope() as stopping:

        async def claim_then_stop(*args: Any) -> list[str]:
            claimed = await claim(*args)
            if claimed:  # the store leased the message: the dispatcher is stopped now
                stopping.cancel()
                if stop == "while-the-claim-answers":
                    await anyio.lowlevel.checkpoint()  # (the stop reaches it first)
            return claimed

        store.outbox_claim = claim_then_stop  # type: ignore[method-assign]
        await first.run()
    del store.outbox_claim  # (the store's own again)
    assert stopping.cancelled_caught and rec.received == []  # stopped, never attempted

    started = time.monotonic()
    second = WebhookDispatcher(store, WebhookSigner(SECRET), policy=LOCAL, poll_interval=0.05)
    with anyio.fail_after(5):
        await second.run(until_idle=True)  # (returns at once if nothing is due)
    assert [h["webhook-id"] for h, _, _ in rec.successes()] == [msg_id]
    assert time.monotonic() - started < 2
    delivery = await second.get(msg_id)
    assert delivery is not None and delivery.state == "succeeded"
    assert [a.status for a in delivery.attempts] == [200]


async def test_a_shutdown_delivers_its_own_last_webhooks_on_memory(
    receiver_factory: Any,
) -> None:
    """On memory:// the outbox dies with the process: the webhooks of the jobs a graceful
    stop ended are sent before it goes (the dispatcher was cancelled with the jobs, so they
    were never sent)."""
    rec, rsrv = receiver_factory([])
    hook = f"{rsrv.url}/hook"
    with ThreadServer(held_jobs_app("memory://")) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            job = await started(client, "/v1/jobs", {"callback_url": hook})
            batch = await started(client, "/v1/batches", {
                "items": [{"custom_id": "a", "input": {}}], "callback_url": hook})
    # The server has stopped: whatever it sent has arrived.
    payloads = [Webhook(SECRET).verify(body, headers) for headers, body, _ in rec.successes()]
    assert sorted((p["type"], p["data"]["id"]) for p in payloads) == [
        ("batch.failed", batch), ("job.failed", job)]


async def test_a_resolver_that_cannot_answer_now_is_a_retryable_503_at_submission(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Any failed lookup was a 400 "does not resolve": a resolver timeout or SERVFAIL refused
    # a good callback for good. (The OS resolver is stood in for: this box's gives only
    # EAI_NONAME; a name that does not exist is still the caller's mistake, a 400.)
    async def try_again(host: str, port: int, **_: Any) -> Any:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(anyio, "getaddrinfo", try_again)
    with pytest.raises(UpstreamUnavailable) as caught:
        await CallbackPolicy().check("https://hooks.example.com/x")
    assert caught.value.status == 503 and caught.value.retryable
    assert caught.value.param == "callback_url"


async def test_callback_policy_blocks_ssrf() -> None:
    default = CallbackPolicy()
    for url in ("http://example.com/hook", "ftp://example.com/x", "https://user:pw@example.com/",
                "https://127.0.0.1/hook", "https://10.0.0.8/hook", "https://[::1]/hook",
                "https://169.254.169.254/latest/meta-data", "https://localhost/hook", "/relative",
                # malformed: a typed 400, not a ValueError (a 500)
                "https://[::1/hook", "https://example.com:99999/hook", "https://example.com:x/",
                # IPv6 addresses that embed a private IPv4 one (NAT64, IPv4-compatible, 6to4)
                "https://[64:ff9b::7f00:1]/hook", "https://[::127.0.0.1]/hook",
                "https://[2002:a00:8::]/hook", "https://[::ffff:10.0.0.8]/hook",
                "https://[64:ff9b:1::7f00:1]/hook", "https://[::ffff:0:7f00:1]/hook"):
        with pytest.raises(InvalidRequest):
            await default.check(url)
    allow = CallbackPolicy(allow_hosts=[".example.com"], deny_hosts=["bad.example.com"])
    allow.check_syntax("https://hooks.example.com/x")
    for url in ("https://bad.example.com/x", "https://example.org/x"):
        with pytest.raises(InvalidRequest):
            allow.check_syntax(url)
    await LOCAL.check("http://127.0.0.1:9/hook")  # explicitly permitted for tests
    # A name that does not resolve: refused at submit; before an attempt, the lookup's own
    # error (the dispatcher retries it), while a private address stays a refusal.
    with pytest.raises(InvalidRequest, match="does not resolve"):
        await default.check("https://hooks.invalid/x")
    with pytest.raises(OSError):
        await default.check_resolved("https://hooks.invalid/x")
    with pytest.raises(InvalidRequest, match="private"):
        await default.check_resolved("https://localhost/hook")
    with pytest.raises(ValueError):
        CallbackPolicy(schemes=["gopher"])


async def test_submit_rejects_a_private_callback_url() -> None:
    jobs = JobsRouter(job_fn, webhook_secrets=SECRET)  # default policy: https, public only
    app = Starlette(routes=[Mount("/v1", jobs)], lifespan=jobs.lifespan_context)
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            for url in ("https://127.0.0.1/x", "http://example.com/x", "https://10.1.2.3/x"):
                r = await client.post("/v1/jobs", json={"input": {"q": 1}, "callback_url": url})
                assert r.status_code == 400
                assert r.json()["error"]["param"] == "callback_url"


async def test_batch_webhook_carries_its_results(receiver_factory: Any) -> None:
    rec, rsrv = receiver_factory([])
    with ThreadServer(jobs_app()) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            items = [{"custom_id": f"i{n}", "input": {"q": n}} for n in range(5)]
            items.append({"custom_id": "bad", "input": {}})
            r = await client.post("/v1/batches", json={"items": items,
                                                       "callback_url": f"{rsrv.url}/hook"})
            assert r.status_code == 202
            await wait_for(lambda: rec.successes())
    headers, body, _ = rec.successes()[0]
    payload = Webhook(SECRET).verify(body, headers)
    assert payload["type"] == "batch.completed"
    assert payload["data"]["counts"]["succeeded"] == 5
    assert payload["data"]["counts"]["errored"] == 1
    results = {x["custom_id"]: x for x in payload["data"]["results"]}
    assert results["i4"]["output"] == {"answer": 8} and results["bad"]["type"] == "errored"


async def test_a_killed_worker_mid_retry_loses_no_delivery(
    redis_url: str, tmp_path: Path, receiver_factory: Any
) -> None:
    """SIGKILL, not a graceful stop: the pending retry is in Redis, the next worker sends it."""
    from aimiddleware.jobs import Delivery, make_store
    from aimiddleware.storage import Storage

    rec, rsrv = receiver_factory([500])
    env = {"AIMW_JOBS_REDIS": redis_url, "AIMW_JOBS_MARKERS": str(tmp_path),
           "AIMW_JOBS_WHSEC": SECRET, "AIMW_JOBS_WORKER": "first"}
    storage = Storage(redis_url)
    store = make_store(storage)
    try:
        with ProcessServer("tests.jobs_worker_app:app", env) as first:
            async with httpx.AsyncClient(base_url=first.url) as client:
                r = await client.post("/v1/jobs", json={"input": {"steps": 1},
                                                        "callback_url": f"{rsrv.url}/hook"})
                job_id = r.json()["id"]
                await wait_for(lambda: len(rec.received) == 1)
                msg_id = rec.received[0][0]["webhook-id"]
                with anyio.fail_after(5):  # the failed attempt is recorded in the store
                    while True:
                        raw = await store.outbox_get(msg_id)
                        if raw and Delivery.model_validate_json(raw).attempts:
                            break
                        await anyio.sleep(0.02)
            assert first.proc is not None
            first.proc.kill()  # crash: no shutdown hooks run
            first.proc.wait(5)
        assert rec.successes() == []
        # The first worker scheduled the retry ~30 s ahead; the next one starts "a minute
        # later" (its dispatcher's clock), so the retry is due for it at once.
        second = {**env, "AIMW_JOBS_WORKER": "second", "AIMW_JOBS_CLOCK_AHEAD": "60"}
        with ProcessServer("tests.jobs_worker_app:app", second):
            await wait_for(lambda: rec.successes())
            with anyio.fail_after(10):  # the receiver answered; the attempt is recorded after
                while True:
                    delivery = Delivery.model_validate_json(await store.outbox_get(msg_id) or "")
                    if delivery.state != "pending":
                        break
                    await anyio.sleep(0.02)
            await anyio.sleep(0.4)  # nothing else arrives after the success
    finally:
        await storage.aclose()
    assert [s for _, _, s in rec.received] == [500, 200]
    assert {h["webhook-id"] for h, _, _ in rec.received} == {msg_id}
    assert delivery.state == "succeeded" and [a.status for a in delivery.attempts] == [500, 200]
    payload = Webhook(SECRET).verify(rec.successes()[0][1], rec.successes()[0][0])
    assert payload["data"]["id"] == job_id and payload["data"]["status"] == "completed"


async def test_retry_after_is_honoured(receiver_factory: Any) -> None:
    rec, rsrv = receiver_factory([(429, {"retry-after": "1"})])
    app = jobs_app(webhook_schedule=(0.05, 0.05))
    jobs: JobsRouter = app.routes[0].app  # type: ignore[attr-defined]
    with ThreadServer(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as client:
            await client.post("/v1/jobs", json={"input": {"q": 2},
                                                "callback_url": f"{rsrv.url}/hook"})
            await wait_for(lambda: rec.successes())
            assert jobs.dispatcher is not None
            webhook_id = rec.received[0][0]["webhook-id"]
            with anyio.fail_after(10):  # the receiver answered; the attempt is recorded after
                while True:
                    delivery = await jobs.dispatcher.get(webhook_id)
                    if delivery is not None and len(delivery.attempts) >= 2:
                        break
                    await anyio.sleep(0.02)
    assert delivery is not None and [a.status for a in delivery.attempts] == [429, 200]
    # the schedule said 0.05 s; the receiver asked for 1 s
    assert delivery.attempts[1].at - delivery.attempts[0].at >= 0.95


async def test_a_trickling_receiver_is_cut_off_at_the_deadline_and_retried(
    redis_store: JobStore, receiver_factory: Any
) -> None:
    """Headers at once, then a byte every 0.25 s: httpx's per-read timeout never trips, the
    attempt's deadline does. Before it, the attempt ran for the whole body (50 s), outlived
    its lease (so the message went out again beside it) and held its slot all along."""
    slow, slow_srv = receiver_factory(["trickle"])
    other, other_srv = receiver_factory([])
    dispatcher = WebhookDispatcher(redis_store, WebhookSigner(SECRET), policy=LOCAL,
                                   schedule=(0.3,), jitter=0, timeout=1.0, poll_interval=0.05,
                                   concurrency=1)
    slow_id = await dispatcher.enqueue(f"{slow_srv.url}/hook", '{"type":"job.completed"}')
    other_id = await dispatcher.enqueue(f"{other_srv.url}/hook", '{"type":"job.completed"}')
    started = time.monotonic()
    await settle(dispatcher, [slow_id, other_id], timeout_s=8)
    # The one slot came free at the deadline: the other receiver waited ~1 s, not 50.
    assert len(other.successes()) == 1 and time.monotonic() - started < 8
    delivery = await dispatcher.get(slow_id)
    assert delivery is not None and delivery.state == "succeeded"
    first, second = delivery.attempts
    assert (first.status, first.error) == (None, "TimeoutError")  # a failed attempt...
    assert 900 <= first.duration_ms < 3000  # ...ended by the deadline (timeout=1.0)
    assert (second.status, second.error) == (200, None)  # ...and retried on the schedule
    assert second.at - first.at >= 1.0 + 0.3 - 0.05
    assert [h["webhook-id"] for h, _, _ in slow.received] == [slow_id, slow_id]  # two, in turn
    await anyio.sleep(0.3)
    assert len(slow.received) == 2


async def test_a_name_that_does_not_resolve_is_retried_a_private_one_is_final(
    redis_store: JobStore,
) -> None:
    """A lookup that fails may succeed later (a resolver timeout, SERVFAIL): retried on the
    schedule like a network error. A name that resolves to a private address is refused for
    good, as before: the SSRF guard is as strict at delivery as at submit."""
    dispatcher = WebhookDispatcher(redis_store, WebhookSigner(SECRET),
                                   policy=CallbackPolicy(schemes=["http"]),  # public only
                                   schedule=(0.1, 0.1), jitter=0, poll_interval=0.05)
    # .invalid never resolves (RFC 6761): here, a lookup that fails at every attempt.
    unresolved = await dispatcher.enqueue("http://hooks.invalid/hook", '{"type":"x"}')
    private = await dispatcher.enqueue("http://localhost/hook", '{"type":"x"}')
    await settle(dispatcher, [unresolved, private])
    delivery = await dispatcher.get(unresolved)
    assert delivery is not None and delivery.state == "failed"  # once the schedule ran out
    assert [(a.status, a.error) for a in delivery.attempts] == [(None, "gaierror")] * 3
    refused = await dispatcher.get(private)
    assert refused is not None and refused.state == "failed"
    assert [(a.status, a.error) for a in refused.attempts] == [
        (None, "callback_url resolves to a private or reserved address.")
    ]


async def test_dispatcher_rejects_a_timeout_that_is_no_deadline(redis_store: JobStore) -> None:
    for timeout in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            WebhookDispatcher(redis_store, WebhookSigner(SECRET), timeout=timeout)


async def test_the_router_takes_the_webhook_deadline() -> None:
    # JobsRouter built its dispatcher with the 15 s default: no way to shorten or lengthen
    # an attempt's deadline short of building the dispatcher by hand.
    async def fn(ctx: JobContext, input: Any) -> Any:
        return input

    jobs = JobsRouter(fn, webhook_secrets=[SECRET], webhook_timeout=2.5)
    assert jobs.dispatcher is not None and jobs.dispatcher.timeout == 2.5
    with pytest.raises(ValueError, match="timeout"):
        JobsRouter(fn, webhook_secrets=[SECRET], webhook_timeout=0)


def test_a_denied_host_is_denied_however_it_is_spelled() -> None:
    # The lists were matched against the URL's host as written, while the resolver and
    # httpx read "bad.example.com." (a fully qualified name) and "bad。example。com"
    # (ideographic full stops, IDNA label separators) as bad.example.com: a denied
    # receiver was reached by writing its name so.
    deny = CallbackPolicy(deny_hosts=["bad.example.com", ".internal.example", "bäd.example",
                                      ".ünternal.example"])
    for url in ("https://bad.example.com./x", "https://bad\u3002example\u3002com/x",
                "https://BAD.example.com\uff0e/x", "https://db.internal.example./x",
                "https://xn--bd-via.example/x", "https://b\u00e4d.example./x",
                "https://db.xn--nternal-m2a.example/x"):
        with pytest.raises(InvalidRequest):
            deny.check_syntax(url)
    assert deny.check_syntax("https://good.example.com./x")
    allow = CallbackPolicy(allow_hosts=["hooks.example.com."])
    assert allow.check_syntax("https://hooks.example.com/x")
    assert allow.check_syntax("https://hooks\u3002example.com./x")


def test_a_policy_given_one_host_as_a_str_is_refused() -> None:
    # A bare str was taken for its letters: deny_hosts="bad.example.com" denied the hosts
    # "b", "a", "d", "." ... and so let bad.example.com through, silently.
    with pytest.raises(TypeError, match=r"\['bad.example.com'\]"):
        CallbackPolicy(deny_hosts="bad.example.com")
    with pytest.raises(TypeError, match="allow_hosts must be a collection"):
        CallbackPolicy(allow_hosts="hooks.example.com")
    with pytest.raises(TypeError, match="schemes must be a collection"):
        CallbackPolicy(schemes="https")
    with pytest.raises(ValueError, match="deny_hosts must hold non-empty names"):
        CallbackPolicy(deny_hosts=["bad.example.com", "."])
    deny = CallbackPolicy(deny_hosts=("bad.example.com",), schemes=("https",))
    with pytest.raises(InvalidRequest):
        deny.check_syntax("https://bad.example.com/x")


async def test_a_receiver_answering_an_endless_body_is_not_read_to_its_end(
    redis_store: JobStore, receiver_factory: Any
) -> None:
    """The answer's body was read whole into memory: a receiver (any caller's callback_url)
    answering 200 with a body of a megabyte every 10 ms held ~100 MB per attempt in flight
    per second (the deadline cut it, and its 200 counted as a failed attempt). Now a
    little of it is read, the rest dropped with the connection: the 200 is the answer."""
    flood, srv = receiver_factory(["flood"])
    dispatcher = WebhookDispatcher(redis_store, WebhookSigner(SECRET), policy=LOCAL,
                                   schedule=(0.1,), jitter=0, timeout=3.0, poll_interval=0.05)
    msg_id = await dispatcher.enqueue(f"{srv.url}/hook", '{"type":"job.completed"}')
    await settle(dispatcher, [msg_id])
    delivery = await dispatcher.get(msg_id)
    assert delivery is not None and delivery.state == "succeeded"
    assert [(a.status, a.error) for a in delivery.attempts] == [(200, None)]
    assert delivery.attempts[0].duration_ms < 1500
    await anyio.sleep(0.3)  # (the receiver stops once it sees the connection gone)
    assert flood.flooded < 50
    assert len(flood.received) == 1
