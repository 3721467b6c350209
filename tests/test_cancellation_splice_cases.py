"""The spliced cancel scope (asyncio), harder cases: where splicing a scope in later
must behave exactly as one entered when the app started. Each scenario runs with a
spliced scope, an entered one (a time limit) and the fallback (no splicing), against
real anyio (no mocks), and all three must agree."""

from __future__ import annotations

import asyncio
import math
from contextlib import nullcontext
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio._backends._asyncio import _task_states

from aimiddleware import _scope_splice, cleanup_scope
from tests.test_cancellation_splice import http_scope, leave_after, middleware, server

CANCELLED = asyncio.CancelledError


@pytest.fixture(params=["spliced", "entered", "fallback"])  # (as test_cancellation_splice)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def current_scope() -> Any:
    state = _task_states.get(asyncio.current_task())  # type: ignore[arg-type]
    return state.cancel_scope if state is not None else None


async def test_two_nested_middlewares_both_cancel_cleanly(mode: str) -> None:
    """Two layers (e.g. the stack's and a router's): the outer one sees the disconnect
    first and splices first; the inner one's scope must still nest inside it."""
    record: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await anyio.sleep(10)
        except CANCELLED:
            record.append("app cancelled")
            raise

    inner = middleware(app, mode)
    outer = middleware(inner, mode)
    gone = anyio.Event()
    receive, send, _sent = server(gone)
    with anyio.fail_after(3):
        before = current_scope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(leave_after, gone, 0.05)
            await outer(http_scope(), receive, send)
            record.append("returned")
            assert current_scope() is tg.cancel_scope
        assert current_scope() is before
    assert record == ["app cancelled", "returned"]


@pytest.mark.parametrize("app_scopes", [0, 1, 3])
async def test_two_nested_middlewares_with_the_app_in_its_own_scopes(
    mode: str, app_scopes: int
) -> None:
    record: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:

            async def nest(n: int) -> None:
                if n == 0:
                    await anyio.sleep(10)
                    return
                with anyio.CancelScope():
                    await nest(n - 1)

            await nest(app_scopes)
        except CANCELLED:
            record.append("app cancelled")
            raise

    outer = middleware(middleware(app, mode), mode)
    gone = anyio.Event()
    receive, send, _sent = server(gone)
    with anyio.fail_after(3):
        with anyio.CancelScope() as around:
            async with anyio.create_task_group() as tg:
                tg.start_soon(leave_after, gone, 0.05)
                await outer(http_scope(), receive, send)
                record.append("returned")
                await anyio.sleep(0.01)  # not cancelled any more
            assert current_scope() is around
    assert record == ["app cancelled", "returned"]


@pytest.mark.parametrize("order", ["disconnect first", "outer first"])
async def test_an_outer_scope_cancelled_around_a_splice_propagates(mode: str, order: str) -> None:
    """A scope entered outside the middleware (a test's ``move_on_after``) that cancels
    while the app is being cancelled for a disconnect is never swallowed by ours."""
    record: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await anyio.sleep(10)
        except CANCELLED:
            record.append("app cancelled")
            with cleanup_scope(1):
                await anyio.sleep(0.1)  # both cancellations land while shielded here
            raise

    gone = anyio.Event()
    receive, send, _sent = server(gone)
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as around:
                if order == "disconnect first":
                    tg.start_soon(leave_after, gone, 0.03)
                    tg.start_soon(lambda: cancel_after(around, 0.08))
                else:
                    tg.start_soon(lambda: cancel_after(around, 0.03))
                    tg.start_soon(leave_after, gone, 0.08)
                await middleware(app, mode)(http_scope(), receive, send)
                record.append("went on inside the cancelled scope")  # must not happen
            record.append(f"caught by the outer scope: {around.cancelled_caught}")
            await anyio.sleep(0.01)
    assert record == ["app cancelled", "caught by the outer scope: True"]


async def cancel_after(scope: anyio.CancelScope, seconds: float) -> None:
    await anyio.sleep(seconds)
    scope.cancel()


async def test_a_shielded_scope_around_the_middleware_still_swallows_only_ours(
    mode: str,
) -> None:
    """A shielded scope around the request (the server's): a disconnect ends the
    request normally; a cancel outside the shield waits for the shield."""
    record: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await anyio.sleep(10)
        except CANCELLED:
            record.append("app cancelled")
            raise

    gone = anyio.Event()
    receive, send, _sent = server(gone)
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as outside:
                with anyio.CancelScope(shield=True):
                    tg.start_soon(leave_after, gone, 0.05)
                    tg.start_soon(lambda: cancel_after(outside, 0.02))
                    await middleware(app, mode)(http_scope(), receive, send)
                    record.append("returned inside the shield")
                await anyio.sleep(1)
                record.append("not cancelled outside the shield")  # must not happen
            assert outside.cancelled_caught
    assert record == ["app cancelled", "returned inside the shield"]


@pytest.mark.parametrize("where", ["in tg.start", "children running", "nested shield"])
async def test_splice_with_the_app_deep_in_scopes_and_task_groups(mode: str, where: str) -> None:
    record: list[str] = []

    async def worker(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            if where == "in tg.start":
                await anyio.sleep(10)  # never reports started
            task_status.started()
            await anyio.sleep(10)
        except CANCELLED:
            record.append("worker cancelled")
            raise

    async def app(scope: Any, receive: Any, send: Any) -> None:
        with anyio.CancelScope():  # entered and exited before the splice
            await anyio.lowlevel.checkpoint()
        try:
            async with anyio.create_task_group() as tg:
                if where == "in tg.start":
                    await tg.start(worker)
                elif where == "children running":
                    tg.start_soon(worker)
                    await tg.start(worker)
                    await anyio.sleep(10)
                else:
                    with anyio.CancelScope():
                        with cleanup_scope(1):
                            await anyio.sleep(0.1)
                            record.append("shielded done")
                        await anyio.sleep(10)
        except CANCELLED:
            record.append("app cancelled")
            raise

    gone = anyio.Event()
    receive, send, _sent = server(gone)
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(leave_after, gone, 0.05)
            await middleware(app, mode)(http_scope(), receive, send)
            record.append("returned")
            assert current_scope() is tg.cancel_scope
    expected = {
        "in tg.start": ["worker cancelled", "app cancelled", "returned"],
        "children running": ["worker cancelled", "worker cancelled", "app cancelled", "returned"],
        "nested shield": ["shielded done", "app cancelled", "returned"],
    }[where]
    assert record == expected


async def test_a_request_ending_in_the_loop_iteration_of_the_disconnect(mode: str) -> None:
    """The disconnect is seen (and the scope spliced) in the same iteration as the app
    wakes up to return: the request ends normally, the task is left clean."""
    outcome: list[str] = []
    app_wake = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await app_wake.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})  # (no checkpoint)

    gone = anyio.Event()
    receive, send, sent = server(gone)

    async def both_at_once() -> None:
        await anyio.sleep(0.05)
        gone.set()  # the watcher wakes first ...
        app_wake.set()  # ... and the app in the same iteration

    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(both_at_once)
            try:
                await middleware(app, mode)(http_scope(), receive, send)
                outcome.append("returned")
            except CANCELLED:
                outcome.append("cancelled")
            await anyio.sleep(0.01)  # the task is not cancelled
            assert current_scope() is tg.cancel_scope
    assert outcome == ["returned"]
    assert sent[-1]["body"] == b"ok"


async def test_native_cancel_after_a_spliced_request_on_the_same_task(mode: str) -> None:
    """After a cancelled request the task's cancel count is back where it was, so a
    later ``Task.cancel()`` (server shutdown) is seen as such, and one arriving during the
    cancelled request's cleanup is never swallowed."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(10)

    async def requests() -> list[int]:
        task = asyncio.current_task()
        assert task is not None
        counts = [task.cancelling()]
        for _ in range(2):
            gone = anyio.Event()
            receive, send, _sent = server(gone)
            asyncio.get_running_loop().call_later(0.03, gone.set)
            await middleware(app, mode)(http_scope(), receive, send)
            counts.append(task.cancelling())
        await asyncio.sleep(10)  # cancelled natively below
        return counts

    task = asyncio.create_task(requests())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(CANCELLED):
        await task
    assert task.cancelled()


def test_the_splice_guard_rejects_a_changed_anyio() -> None:
    """The guard must turn splicing off for any anyio whose scope layout differs from
    the one it was written against, not only for one missing a slot: a new slot set by
    ``__enter__`` (one more piece of state) would otherwise be silently left unset."""
    from anyio._backends._asyncio import CancelScope, TaskState

    class Grown(CancelScope):  # anyio N+1: one more slot in its scope
        __slots__ = ("_depth",)

    Grown.__slots__ = (*CancelScope.__slots__, "_depth")  # (the layout as one class)
    assert _scope_splice._splice_supported(CancelScope, TaskState, _task_states)
    assert not _scope_splice._splice_supported(Grown, TaskState, _task_states)


# A field-by-field comparison with anyio's own ``__enter__``: every slot of every scope
# around the task, at the splice and after the exit. It is what tells a newer anyio with
# the same layout but other state from the one _splice was written against.


def _snapshot(task: asyncio.Task[Any], ours: Any, base: Any) -> list[dict[str, Any]]:
    from anyio._backends._asyncio import CancelScope

    chain: list[Any] = []
    state = _task_states.get(task)
    node = state.cancel_scope if state is not None else None
    while node is not None and node is not base:  # (the scopes around base: shared)
        chain.append(node)
        node = node._parent_scope
    for extra in (ours, base):
        if extra is not None and extra not in chain:
            chain.append(extra)

    def norm(value: Any) -> Any:
        if isinstance(value, CancelScope):
            return f"scope {chain.index(value)}" if value in chain else "another scope"
        if isinstance(value, asyncio.Task):
            return "host" if value is task else "another task"
        if isinstance(value, set):
            return sorted(str(norm(v)) for v in value)
        if isinstance(value, float):
            return value if value in (math.inf, -math.inf) else "a deadline"
        if isinstance(value, asyncio.Handle | str):
            return "set"  # (a handle; a reason with ids in it)
        return value

    slots = CancelScope.__slots__
    task_state = {"state": None if state is None else (state.parent_id, norm(state.cancel_scope))}
    return [task_state] + [{slot: norm(getattr(s, slot, None)) for slot in slots} for s in chain]


@pytest.mark.parametrize(
    "structure", ["no scope", "own scopes", "shielded", "task group", "exited before"]
)
@pytest.mark.parametrize("around", ["server scope", "bare task"])
async def test_a_spliced_scope_is_indistinguishable_from_an_entered_one(
    structure: str, around: str
) -> None:
    from anyio._backends._asyncio import CancelScope

    async def child() -> None:
        await anyio.sleep(10)

    async def app(ready: anyio.Event) -> None:
        if structure == "exited before":
            with anyio.CancelScope():
                await anyio.lowlevel.checkpoint()
        if structure == "own scopes":
            with anyio.CancelScope(), anyio.move_on_after(20):
                ready.set()
                await anyio.sleep(10)
        elif structure == "shielded":
            with anyio.CancelScope(), anyio.CancelScope(shield=True):
                ready.set()
                await anyio.sleep(0.05)
            await anyio.sleep(10)
        elif structure == "task group":
            async with anyio.create_task_group() as tg:
                tg.start_soon(child)
                ready.set()
                await anyio.sleep(10)
        else:
            ready.set()
            await anyio.sleep(10)

    holders: dict[str, dict[str, Any]] = {"entered": {}, "spliced": {}}

    async def request(kind: str) -> None:
        held = holders[kind]
        task = asyncio.current_task()
        assert task is not None
        held["task"] = task
        # The server's scope around the request, or none: a bare task (uvicorn's)
        around_cm = anyio.CancelScope() if around == "server scope" else nullcontext()
        with around_cm as base:
            held["base"] = base
            if kind == "entered":
                with CancelScope() as ours:
                    held["ours"] = ours
                    await app(held["ready"])
            else:
                held["splice"] = (task, base, task.cancelling(), -1)
                try:
                    await app(held["ready"])
                except BaseException as exc:
                    if not held["ours"].__exit__(type(exc), exc, exc.__traceback__):
                        raise
            held["caught"] = held["ours"].cancelled_caught
            held["cancelling"] = task.cancelling()
            held["after"] = _snapshot(task, held["ours"], base)

    with anyio.fail_after(3):
        tasks = []
        for kind, held in holders.items():
            held["ready"] = anyio.Event()
            tasks.append(asyncio.create_task(request(kind)))  # (no anyio task state)
        for held in holders.values():
            await held["ready"].wait()
        spliced = holders["spliced"]
        spliced["ours"] = _scope_splice._splice(*spliced["splice"])
        at_splice = [_snapshot(h["task"], h["ours"], h["base"]) for h in holders.values()]
        assert at_splice[0] == at_splice[1]
        for held in holders.values():
            held["ours"].cancel()
        await asyncio.gather(*tasks)
    entered, spliced = holders["entered"], holders["spliced"]
    assert entered["after"] == spliced["after"]
    assert entered["caught"] is spliced["caught"] is True
    assert entered["cancelling"] == spliced["cancelling"] == 0


@pytest.mark.parametrize(
    ("outer_mode", "inner_mode"),
    [("spliced", "spliced"), ("spliced", "entered"), ("entered", "spliced")],
)
@pytest.mark.parametrize("layers", [2, 3])
async def test_nested_layers_in_any_mix_of_modes(
    outer_mode: str, inner_mode: str, layers: int
) -> None:
    record: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            with anyio.CancelScope():
                await anyio.sleep(10)
        except CANCELLED:
            record.append("app cancelled")
            raise

    stack: Any = middleware(app, inner_mode)
    for _ in range(layers - 2):
        stack = middleware(stack, "spliced")
    stack = middleware(stack, outer_mode)
    gone = anyio.Event()
    receive, send, _sent = server(gone)
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(leave_after, gone, 0.05)
            await stack(http_scope(), receive, send)
            record.append("returned")
            assert current_scope() is tg.cancel_scope
            await anyio.sleep(0.01)
    assert record == ["app cancelled", "returned"]


async def test_a_native_cancel_folded_into_the_splice_is_not_swallowed(mode: str) -> None:
    """``Task.cancel()`` in the very iteration the scope is spliced and cancelled
    (asyncio folds both into one CancelledError): it must still end the task."""
    host: list[asyncio.Task[Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(10)

    gone = anyio.Event()
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await gone.wait()
        asyncio.get_running_loop().call_soon(host[0].cancel)  # the server shutting down
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        pass

    async def request() -> str:
        await middleware(app, mode)(http_scope(), receive, send)
        return "returned"

    task = asyncio.create_task(request())
    host.append(task)
    await asyncio.sleep(0.05)
    gone.set()
    with anyio.fail_after(3):
        with pytest.raises(CANCELLED):
            await task
