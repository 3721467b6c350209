"""How long one tenant's webhook waits behind another tenant's bad receiver.

``python -m benchmarks.webhook_fairness [--backend memory|redis] [--bad 100] [--bad-host
hang|refused] [--timeout 15]``: ``--bad`` deliveries to a bad receiver are put in the outbox
first, then one to a good receiver (a real uvicorn app that verifies the Standard Webhooks
signature with the ``standardwebhooks`` package); a real dispatcher with its defaults
(``concurrency=16``, ``poll_interval=0.25``) sends them. Printed: the seconds until the good
one landed, and the most connections the bad receiver held at once. A ``hang`` receiver
accepts the connection, reads the request and never answers (a blackholed endpoint);
``refused`` is a closed port (a receiver that fails fast). Not part of ``python -m
benchmarks`` (its runs take up to minutes, and the figure is a wait, not an overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from typing import Any

import anyio
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aimiddleware.jobs import CallbackPolicy, WebhookDispatcher, WebhookSigner, make_store
from aimiddleware.storage import Storage
from tests.jobs_servers import ThreadServer
from tests.redis_server import RedisServer, free_port

SECRET = WebhookSigner.generate_secret()


class HangingReceiver:
    """Accepts, reads, never answers; counts the connections it holds at once."""

    def __init__(self) -> None:
        self.open = 0
        self.most = 0
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.accepted += 1
        self.most = max(self.most, self.open)
        try:
            while await reader.read(65536):  # until the sender gives up and closes
                pass
        except OSError:
            pass
        finally:
            self.open -= 1
            writer.close()

    async def __aenter__(self) -> HangingReceiver:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


class GoodReceiver:
    """Verifies each message's signature; notes when the first one landed."""

    def __init__(self) -> None:
        self.landed = threading.Event()
        self.at = 0.0
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        Webhook(SECRET).verify(await request.body(), dict(request.headers))
        if not self.landed.is_set():
            self.at = time.monotonic()
            self.landed.set()
        return Response(status_code=204)


async def measure(url: str, bad: int, bad_host: str, deadline: float, **options: Any) -> None:
    storage = Storage(url)
    store = make_store(storage)
    good = GoodReceiver()
    policy = CallbackPolicy(schemes=["http"], allow_hosts=["127.0.0.1"])
    dispatcher = WebhookDispatcher(store, WebhookSigner(SECRET), policy=policy,
                                   timeout=deadline, **options)
    async with HangingReceiver() as hanging:
        port = hanging.port if bad_host == "hang" else free_port()
        with ThreadServer(good.app) as good_srv:
            for n in range(bad):
                await dispatcher.enqueue(f"http://127.0.0.1:{port}/hook", f'{{"n":{n}}}')
            await dispatcher.enqueue(f"{good_srv.url}/hook", '{"n":"good"}')
            started = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(dispatcher.run)
                await anyio.to_thread.run_sync(good.landed.wait)
                tg.cancel_scope.cancel()
            waited = good.at - started
    await storage.aclose()
    print(f"{url.split(':')[0]:7} bad={bad} ({bad_host}) timeout={deadline:g}s "
          f"{options or ''}: the good webhook landed after {waited:.2f} s; "
          f"the bad receiver held at most {hanging.most} connections at once")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.webhook_fairness")
    parser.add_argument("--backend", choices=["memory", "redis"], default="memory")
    parser.add_argument("--bad", type=int, default=100)
    parser.add_argument("--bad-host", choices=["hang", "refused"], default="hang")
    parser.add_argument("--timeout", type=float, default=15.0)
    parser.add_argument("--host-concurrency", type=int, default=None)
    args = parser.parse_args()
    options = {} if args.host_concurrency is None else {
        "host_concurrency": args.host_concurrency}
    server = RedisServer().start() if args.backend == "redis" else None
    try:
        url = server.url if server is not None else "memory://"
        anyio.run(lambda: measure(url, args.bad, args.bad_host, args.timeout, **options))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
