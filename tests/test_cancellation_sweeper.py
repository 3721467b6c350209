"""The per-loop sweeper that starts the disconnect watcher of slow requests (asyncio)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import anyio

from aimiddleware import CancellationMiddleware
from tests.stalls import steady


def http_scope() -> dict[str, Any]:
    return {"type": "http", "path": "/", "method": "POST", "headers": [], "state": {}}


def client_gone() -> tuple[Any, Any]:
    """A server whose client has left: the body, then ``http.disconnect`` at once."""
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"{}", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        raise AssertionError("the slow app sends nothing")

    return receive, send


def test_one_middleware_on_successive_event_loops() -> None:
    """The sweeper kept for the last loop is not reused on another one."""
    cancelled: list[float] = []

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        t0 = time.perf_counter()
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled.append(time.perf_counter() - t0)
            raise

    mw = CancellationMiddleware(slow, watch_after=0.02)

    async def main() -> None:
        async def request() -> None:
            receive, send = client_gone()
            before = len(cancelled)
            with anyio.fail_after(2):
                await mw(http_scope(), receive, send)
            assert len(cancelled) == before + 1
            assert 0.015 <= cancelled[-1] < 0.5  # after watch_after, and not much later

        # (an attempt whose event loop stalled is run again, on the same loop: tests.stalls)
        await steady(request)
        await asyncio.sleep(0.05)  # the sweeper's next tick finds nothing: it retires

    for _ in range(3):
        asyncio.run(main())
    assert len(cancelled) >= 3
    assert mw._sweepers == {} and mw._last_sweeper is None


async def test_a_watcher_starts_after_watch_after_under_steady_traffic() -> None:
    """Requests arriving all the time keep the sweeper ticking; each slow one's watcher
    still starts no earlier than ``watch_after`` after it began, and not much later."""
    started: dict[int, float] = {}
    cancelled: dict[int, float] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started[scope["i"]] = time.perf_counter()
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled[scope["i"]] = time.perf_counter()
            raise

    mw = CancellationMiddleware(app, watch_after=0.04)

    async def one(i: int) -> None:
        receive, send = client_gone()
        await mw({**http_scope(), "i": i}, receive, send)

    async def traffic() -> None:
        started.clear()
        cancelled.clear()
        with anyio.fail_after(3):
            async with anyio.create_task_group() as tg:
                for i in range(15):
                    tg.start_soon(one, i)
                    await anyio.sleep(0.007)
        waits = [cancelled[i] - started[i] for i in range(15)]
        assert min(waits) >= 0.035  # (the loop's clock vs perf_counter: a little slack)
        assert max(waits) < 0.5  # (an attempt whose event loop stalled is run again)
        assert mw._sweepers == {}

    await steady(traffic)


async def test_receive_after_the_app_returned_reports_a_disconnect() -> None:
    kept: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        kept.append(receive)  # e.g. a background task that outlives the request
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message["type"])

    mw = CancellationMiddleware(app, watch_after=0.05)
    with anyio.fail_after(1):
        await mw(http_scope(), receive, send)
        assert await kept[0]() == {"type": "http.disconnect"}  # at once, no watcher
    assert sent == ["http.response.start", "http.response.body"]


def test_one_middleware_on_many_event_loops_in_threads() -> None:
    """One middleware shared by event loops in several threads (sync tests, an app under
    several loops). A loop that ends with a request in flight leaves its sweeper behind;
    past 8, the next new loop drops those of closed loops. That was done with no lock:
    a thread walking the dict while another added to it failed the request with
    ``RuntimeError: dictionary changed size during iteration`` (seen in about 5 runs of 6),
    and two threads dropping the same closed loop could with a ``KeyError``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = CancellationMiddleware(app, watch_after=0.05)
    failures: list[BaseException] = []

    async def request() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            pass

        await mw(http_scope(), receive, send)  # (the loop closes before the sweeper's tick)

    def worker() -> None:
        try:
            for _ in range(300):
                asyncio.run(request())  # a new loop each time: a new entry, then pruning
        except BaseException as exc:  # (reported below)
            failures.append(exc)

    # Nine loops kept open with their sweepers (a request ran on each; the loop stopped
    # before the sweeper's tick): past 8, every new loop walks the dict, keeping these.
    idle = [asyncio.new_event_loop() for _ in range(9)]
    for loop in idle:
        loop.run_until_complete(request())
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: races show at once
    try:
        threads = [threading.Thread(target=worker) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(interval)
        for loop in idle:
            loop.close()
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    assert len(mw._sweepers) <= len(idle) + len(threads) + 1  # closed loops are dropped
