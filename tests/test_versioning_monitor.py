from __future__ import annotations

import signal

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aimiddleware import VersioningConfig, deprecated, install
from aimiddleware.context import key_principal
from aimiddleware.errors import StoreUnavailable
from aimiddleware.storage import Storage
from aimiddleware.versioning import DeprecatedCall, DeprecationMonitor
from tests.live_server import serve
from tests.redis_server import RedisServer
from tests.versioning_app import OLD, FakeClock, at, make_registry


def call(principal: str, kind: str = "model", name: str = OLD) -> DeprecatedCall:
    return DeprecatedCall(principal, kind, name, at("2026-01-01"), at("2026-07-01"),  # type: ignore[arg-type]
                          None, "req_1", at("2026-03-01"))


async def test_counts_per_principal_on_every_backend(storage: Storage) -> None:
    hooked: list[str] = []

    async def hook(c: DeprecatedCall) -> None:
        hooked.append(c.principal)

    monitor = DeprecationMonitor(storage, hook=hook)
    await monitor.record(call("a"))
    await monitor.record(call("a"))
    await monitor.record(call("a", "api_version", "v1"))
    await monitor.record(call("b"))
    assert await monitor.counts("a") == {f"model:{OLD}": 2, "api_version:v1": 1}
    assert await monitor.counts("b") == {f"model:{OLD}": 1}
    assert await monitor.counts("nobody") == {}
    assert hooked == ["a", "a", "a", "b"]
    if not storage.is_memory:  # shared: a second monitor (another worker) sees the same counts
        other = DeprecationMonitor(Storage(storage.url))
        assert await other.counts("a") == {f"model:{OLD}": 2, "api_version:v1": 1}
        assert 0 < await storage.redis.ttl(storage.key("deprecations", "a")) <= 90 * 86400
        await other.storage.aclose()


async def test_a_store_outage_never_fails_the_call_but_reading_is_a_typed_503() -> None:
    server = RedisServer().start()
    storage = Storage(server.url, socket_timeout=5)  # (stopped, it refuses at once)
    failing_hook: list[int] = []

    def hook(c: DeprecatedCall) -> None:
        failing_hook.append(1)
        raise RuntimeError("hook bug")

    monitor = DeprecationMonitor(storage, hook=hook)
    await monitor.record(call("a"))
    server.stop()
    try:
        await monitor.record(call("a"))  # logged, not raised
        assert failing_hook == [1, 1]
        with pytest.raises(StoreUnavailable):
            await monitor.counts("a")
    finally:
        await storage.aclose()


def test_configuration() -> None:
    with pytest.raises(TypeError):
        DeprecationMonitor(hook="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DeprecationMonitor(ttl_seconds=0)


async def test_memory_counts_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("aimiddleware.versioning.monitor._MAX_MEMORY_PRINCIPALS", 2)
    monitor = DeprecationMonitor()
    for principal in ("a", "b", "c"):
        await monitor.record(call(principal))
    assert await monitor.counts("a") == {}  # the least recent caller went first
    assert await monitor.counts("c") == {f"model:{OLD}": 1}


async def counted(monitor: DeprecationMonitor, principal: str, field: str, n: int) -> None:
    """Wait until ``principal`` has ``n`` calls of ``field`` (counted after the response)."""
    with anyio.fail_after(10):
        while True:
            if (await monitor.counts(principal)).get(field) == n:
                return
            await anyio.sleep(0.02)


@pytest.mark.parametrize("route", ["/model", "/route"])
@pytest.mark.parametrize("outage", ["hung", "dead"])
async def test_a_store_outage_never_holds_a_deprecated_call_back(route: str, outage: str) -> None:
    """Counting is telemetry: it runs once the response is out. It ran before the endpoint,
    so a hung store (stopped with SIGSTOP: every command waits for the socket timeout, 30 s
    here) held each call to a deprecated model or route back that long. A dead store
    (killed) answers at once: the call is served the same, its count lost and logged."""
    store = RedisServer().start()
    assert store.proc is not None
    storage = Storage(store.url, socket_timeout=30)
    monitor = DeprecationMonitor(storage)
    clock = FakeClock(at("2026-03-01"))  # both deprecated, neither retired

    async def answer(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    old_route = deprecated(deprecated="2026-01-01", sunset="2026-07-01", monitor=monitor,
                           clock=clock, name="old")(answer)
    app = Starlette(routes=[Route("/model", answer, methods=["POST"]),
                            Route("/route", old_route, methods=["POST"])])
    install(app, storage=storage,
            versioning=VersioningConfig(registry=make_registry(clock), monitor=monitor))
    field = f"model:{OLD}" if route == "/model" else "route:old"
    try:
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
            body = {"model": OLD} if route == "/model" else {}
            r = await c.post(route, json=body, headers={"authorization": "Bearer k"})
            assert r.status_code == 200 and "deprecation" in r.headers
            principal = key_principal(b"k")
            await counted(monitor, principal, field, 1)
            if outage == "hung":
                store.proc.send_signal(signal.SIGSTOP)
            else:
                store.stop()
            with anyio.fail_after(10):  # (a third of the socket timeout)
                r = await c.post(route, json=body, headers={"authorization": "Bearer k"})
            assert r.status_code == 200 and r.json() == {"ok": True}
            assert "deprecation" in r.headers
            if outage == "hung":  # the count waited, and lands when the store is back
                store.proc.send_signal(signal.SIGCONT)
                await counted(monitor, principal, field, 2)
    finally:
        if store.proc is not None:
            store.proc.send_signal(signal.SIGCONT)
        await storage.aclose()
        store.stop()
