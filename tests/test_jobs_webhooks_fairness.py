"""One receiver that is slow or never answers must not hold up the other tenants' webhooks.

Real receivers over real sockets: a TCP server that accepts, reads and never answers (a
blackholed endpoint), counting the connections it holds at once; a uvicorn app that
verifies each message with the ``standardwebhooks`` package. Against memory, a real Valkey
and a real Cluster.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aimiddleware.jobs import (
    CallbackPolicy,
    JobContext,
    JobsRouter,
    JobStore,
    WebhookDispatcher,
    WebhookSigner,
    make_store,
)
from aimiddleware.jobs.dispatcher import _receiver_host
from aimiddleware.storage import Storage
from tests.jobs_servers import ThreadServer

SECRET = WebhookSigner.generate_secret()
LOCAL = CallbackPolicy(schemes=["http"], allow_hosts=["127.0.0.1"])


class Hanging:
    """Accepts, reads the request, never answers; notes when each connection ends."""

    def __init__(self) -> None:
        self.open = 0
        self.most = 0
        self.accepted = 0
        self.closed_at: list[float] = []
        self.url = ""

    async def hold(self, stream: SocketStream) -> None:
        self.open += 1
        self.accepted += 1
        self.most = max(self.most, self.open)
        try:
            async with stream:
                while True:
                    await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass
        finally:
            self.open -= 1
            self.closed_at.append(time.monotonic())


@contextlib.asynccontextmanager
async def hanging_receiver() -> AsyncIterator[Hanging]:
    server = Hanging()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    server.url = f"http://127.0.0.1:{port}/hook"
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server.hold)
        yield server
        tg.cancel_scope.cancel()


class Good:
    """Verifies every message; notes when each landed and the most it handled at once."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.landed: dict[str, float] = {}
        self.open = 0
        self.most = 0
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        self.open += 1
        self.most = max(self.most, self.open)
        try:
            body = await request.body()
            Webhook(SECRET).verify(body, dict(request.headers))  # (raises: a 500, no landing)
            await anyio.sleep(self.delay)
            self.landed[request.headers["webhook-id"]] = time.monotonic()
            return Response(status_code=204)
        finally:
            self.open -= 1


@pytest.fixture
def store(storage: Storage) -> JobStore:
    return make_store(storage)


async def test_a_receiver_that_never_answers_does_not_hold_up_the_others(
    store: JobStore,
) -> None:
    """100 messages due for a receiver that never answers, then one for a good one. Every
    one of the 16 slots went to the first: the good message waited for ceil(100 / 16) - 1
    rounds of the whole attempt deadline (measured: 90 s with the default 15 s). Now that
    receiver holds ``host_concurrency`` (4) slots and the good one lands at the next claim,
    before any attempt at the bad one reaches its deadline."""
    dispatcher = WebhookDispatcher(store, WebhookSigner(SECRET), policy=LOCAL, schedule=(60,),
                                   jitter=0, timeout=2.0, poll_interval=0.05)
    good = Good()
    async with hanging_receiver() as hanging:
        with ThreadServer(good.app) as good_srv:
            bad = [await dispatcher.enqueue(hanging.url, '{"n":1}') for _ in range(100)]
            good_id = await dispatcher.enqueue(f"{good_srv.url}/hook", '{"n":2}')
            async with anyio.create_task_group() as tg:
                tg.start_soon(dispatcher.run)
                with anyio.fail_after(30):  # the first attempts' deadline, then the next ones
                    while len(hanging.closed_at) < 4 or hanging.accepted < 8:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                tg.cancel_scope.cancel()
    assert good_id in good.landed
    assert good.landed[good_id] < min(hanging.closed_at)  # before any bad attempt ended
    assert hanging.most == dispatcher.host_concurrency == 4  # never more in flight at once
    delivered = await dispatcher.get(good_id)
    assert delivered is not None and delivered.state == "succeeded"
    # The first attempts ended at their deadline and are rescheduled; the messages behind
    # them waited in the outbox with no attempt made (none used up, none recorded).
    first = await dispatcher.get(bad[0])
    assert first is not None and [a.error for a in first.attempts] == ["TimeoutError"]
    waiting = await dispatcher.get(bad[-1])
    assert waiting is not None and waiting.state == "pending" and waiting.attempts == []


async def test_run_until_idle_sends_every_message_within_the_cap(store: JobStore) -> None:
    """A shutdown's ``run(until_idle=True)`` returns once the outbox is sent, even when a
    host's due messages outnumber its cap (a claim that finds only those returns none while
    they are in flight: not idle)."""
    dispatcher = WebhookDispatcher(store, WebhookSigner(SECRET), policy=LOCAL, schedule=(0.1,),
                                   poll_interval=0.05, host_concurrency=2)
    good = Good(delay=0.2)
    with ThreadServer(good.app) as srv:
        ids = [await dispatcher.enqueue(f"{srv.url}/hook", '{"n":1}') for _ in range(10)]
        with anyio.fail_after(30):
            await dispatcher.run(until_idle=True)
    assert set(good.landed) == set(ids)
    assert good.most == 2
    for msg_id in ids:
        delivery = await dispatcher.get(msg_id)
        assert delivery is not None and [a.status for a in delivery.attempts] == [204]


async def test_a_cancelled_attempt_is_due_again_and_frees_its_hosts_slot(
    store: JobStore,
) -> None:
    dispatcher = WebhookDispatcher(store, WebhookSigner(SECRET), policy=LOCAL, timeout=30,
                                   poll_interval=0.05, host_concurrency=2)
    async with hanging_receiver() as hanging, anyio.create_task_group() as tg:
        ids = [await dispatcher.enqueue(hanging.url, '{"n":1}') for _ in range(3)]
        tg.start_soon(dispatcher.run)
        with anyio.fail_after(10):
            while hanging.open < 2:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()  # a shutdown mid-attempt
    for msg_id in ids:  # due again, no attempt counted
        delivery = await dispatcher.get(msg_id)
        assert delivery is not None and delivery.state == "pending" and delivery.attempts == []
    # The host's slots came back with them: the next claim gets as many as the cap allows.
    claimed = await store.outbox_claim(time.time(), 60, 16, 2)
    assert len(claimed) == 2


def test_the_receiver_host_is_its_host_and_port() -> None:
    assert _receiver_host("https://Hooks.Example.com/a?b") == "hooks.example.com:443"
    assert _receiver_host("http://hooks.example.com/a") == "hooks.example.com:80"
    assert _receiver_host("https://hooks.example.com:8443/a") == "hooks.example.com:8443"
    assert _receiver_host("https://[2001:DB8::1]/a") == "[2001:db8::1]:443"
    assert _receiver_host("https://[::1/x") == "https://[::1/x"  # (refused at the attempt)


def test_the_router_takes_the_dispatcher_concurrency() -> None:
    async def fn(ctx: JobContext, input: Any) -> Any:
        return input

    jobs = JobsRouter(fn, webhook_secrets=[SECRET], webhook_concurrency=32,
                      webhook_host_concurrency=2)
    assert jobs.dispatcher is not None
    assert (jobs.dispatcher.concurrency, jobs.dispatcher.host_concurrency) == (32, 2)
    for bad in ({"webhook_concurrency": 0}, {"webhook_host_concurrency": 0}):
        with pytest.raises(ValueError, match="concurrency"):
            JobsRouter(fn, webhook_secrets=[SECRET], **bad)
