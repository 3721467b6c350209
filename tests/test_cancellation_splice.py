"""The asyncio fast path enters no cancel scope per request: one is spliced in only when
the app must be cancelled. Every scenario runs each way (``spliced``: no time limit;
``entered``: a time limit, so a scope from the start; ``fallback``: no limit, but no
splicing, as with another anyio layout) and must behave the same."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
from anyio._backends._asyncio import _task_states

from aimiddleware import CancellationMiddleware, cleanup_scope
from aimiddleware._scope_splice import _CAN_SPLICE

CANCELLED = asyncio.CancelledError


@pytest.fixture(params=["spliced", "entered", "fallback"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def middleware(app: Any, mode: str) -> CancellationMiddleware:
    limit = 30 if mode == "entered" else None  # a limit: a scope entered with the app
    # fallback: splicing turned off (a scope entered per request without a limit, as with
    # another anyio layout)
    return CancellationMiddleware(
        app, default_timeout=limit, watch_after=0.01, splice_scopes=mode != "fallback"
    )


def server(gone: anyio.Event) -> tuple[Any, Any, list[Any]]:
    """The body, then ``http.disconnect`` once ``gone`` is set."""
    sent: list[Any] = []
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    return receive, send, sent


def http_scope() -> dict[str, Any]:
    return {"type": "http", "path": "/", "method": "POST", "headers": [], "state": {}}


async def leave_after(gone: anyio.Event, seconds: float) -> None:
    await anyio.sleep(seconds)
    gone.set()


async def disconnect_during(asgi: Any, seconds: float) -> None:
    """Run one request through ``asgi`` whose client leaves ``seconds`` in; 3 s at most."""
    gone = anyio.Event()
    receive, send, _sent = server(gone)
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(leave_after, gone, seconds)
            await asgi(http_scope(), receive, send)


def test_the_fast_path_is_available_here() -> None:
    assert _CAN_SPLICE  # (else these tests would only check the entered scope)


async def test_no_scope_is_entered_for_a_request_that_is_not_cancelled(mode: str) -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        state = _task_states.get(asyncio.current_task())  # type: ignore[arg-type]
        seen["scope"] = state.cancel_scope if state is not None else None
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def one_request() -> list[Any]:  # a fresh task, as a server runs each request
        receive, send, sent = server(anyio.Event())
        await middleware(app, mode)(http_scope(), receive, send)
        return sent

    sent = await asyncio.create_task(one_request())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert (seen["scope"] is None) is (mode == "spliced")


async def test_a_disconnect_never_cuts_a_shielded_cleanup_in_the_app(mode: str) -> None:
    record: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            with cleanup_scope(2):
                await anyio.sleep(0.15)  # e.g. a shielded settle on Redis
                record.append("shielded work done")
            await anyio.sleep(10)
        except CANCELLED:
            record.append("cancelled")
            raise

    await disconnect_during(middleware(app, mode), 0.03)  # mid-cleanup, after the watcher started
    assert record == ["shielded work done", "cancelled"]


async def test_cancellation_is_level_triggered_inside_the_app(mode: str) -> None:
    """An unshielded await after the cancellation is cancelled again, as anyio does."""
    record: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await anyio.sleep(10)
        except CANCELLED:
            record.append("cancelled")
            try:
                await anyio.sleep(5)  # not shielded: cut too
            except CANCELLED:
                record.append("cancelled again")
            with cleanup_scope(1):
                await anyio.sleep(0.01)
                record.append("shielded cleanup ran")
            raise

    await disconnect_during(middleware(app, mode), 0.05)
    assert record == ["cancelled", "cancelled again", "shielded cleanup ran"]


@pytest.mark.parametrize("inside", ["no scope", "own scope", "task group"])
async def test_the_app_and_its_tasks_are_cancelled_wherever_it_waits(
    mode: str, inside: str
) -> None:
    record: list[str] = []

    async def child() -> None:
        try:
            await anyio.sleep(10)
        except CANCELLED:
            record.append("child cancelled")
            raise

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            if inside == "own scope":
                with anyio.move_on_after(20):
                    await anyio.sleep(10)
            elif inside == "task group":
                async with anyio.create_task_group() as tg:
                    tg.start_soon(child)
                    await anyio.sleep(10)
            else:
                await anyio.sleep(10)
        except CANCELLED:
            record.append("app cancelled")
            raise
        record.append("app not cancelled")

    await disconnect_during(middleware(app, mode), 0.05)
    expected = ["app cancelled"]
    if inside == "task group":
        expected = ["child cancelled", "app cancelled"]
    assert record == expected


async def test_the_task_and_its_outer_scopes_are_intact_after_a_cancelled_request(
    mode: str,
) -> None:
    """The request runs inside an outer anyio scope and task group (as behind a
    ``BaseHTTPMiddleware``); once it is cancelled, the same task goes on normally."""
    record: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await anyio.sleep(10)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    requests_done = anyio.Event()

    async def sibling() -> None:
        # Waits through both requests (a cancellation leaking out of the first would end it
        # here); an event, not a sleep: a stalled machine cannot reorder it.
        await requests_done.wait()
        record.append("sibling finished")

    mw = middleware(app, mode)
    with anyio.fail_after(3):
        with anyio.CancelScope() as outer:
            deadline = anyio.current_effective_deadline()
            async with anyio.create_task_group() as tg:
                tg.start_soon(sibling)
                gone = anyio.Event()
                receive, send, _sent = server(gone)
                tg.start_soon(leave_after, gone, 0.05)
                await mw({**http_scope(), "path": "/slow"}, receive, send)
                record.append("slow request cancelled")
                assert anyio.current_effective_deadline() == deadline
                await anyio.sleep(0.01)  # this task is not cancelled any more
                receive, send, sent = server(anyio.Event())
                await mw(http_scope(), receive, send)  # the next request, same task
                assert [m["type"] for m in sent][-1] == "http.response.body"
                with anyio.move_on_after(0.01) as inner:
                    await anyio.sleep(1)
                assert inner.cancelled_caught
                requests_done.set()
        assert not outer.cancel_called
    assert record == ["slow request cancelled", "sibling finished"]


async def test_a_cancellation_from_outside_is_not_swallowed(mode: str) -> None:
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        await anyio.sleep(10)

    receive, send, _sent = server(anyio.Event())
    task = asyncio.create_task(middleware(app, mode)(http_scope(), receive, send))
    await started.wait()
    await asyncio.sleep(0.03)  # the watcher has started
    task.cancel()  # e.g. the server shutting down
    with pytest.raises(CANCELLED):
        await task


async def test_an_outside_cancellation_during_a_disconnect_is_not_swallowed(mode: str) -> None:
    cancelled = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await anyio.sleep(10)
        except CANCELLED:
            cancelled.set()
            with cleanup_scope(1):
                await anyio.sleep(0.05)
            raise

    gone = anyio.Event()
    receive, send, _sent = server(gone)
    task = asyncio.create_task(middleware(app, mode)(http_scope(), receive, send))
    await asyncio.sleep(0.03)
    gone.set()
    await cancelled.wait()  # cancelled by the disconnect, now in its shielded cleanup
    task.cancel()  # and the server cancels the task too
    with pytest.raises(CANCELLED):
        await task


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_both_backends_keep_shields_under_a_disconnect_and_a_time_limit(backend: str) -> None:
    from aimiddleware.errors import Timeout

    async def main() -> list[str]:
        record: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            try:
                with cleanup_scope(1):
                    await anyio.sleep(0.1)
                    record.append("shielded work done")
                await anyio.sleep(10)
            except anyio.get_cancelled_exc_class():
                record.append("cancelled")
                raise

        gone = anyio.Event()
        receive, send, _sent = server(gone)
        with anyio.fail_after(3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(leave_after, gone, 0.03)
                await CancellationMiddleware(app)(http_scope(), receive, send)
            receive, send, _sent = server(anyio.Event())
            try:
                await CancellationMiddleware(app, default_timeout=0.05)(
                    http_scope(), receive, send
                )
            except Timeout as exc:
                record.append(f"timeout {exc.extra['timeout_seconds']}")
        return record

    assert anyio.run(main, backend=backend) == [
        "shielded work done",
        "cancelled",
        "shielded work done",
        "cancelled",
        "timeout 0.05",
    ]
