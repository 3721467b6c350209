from __future__ import annotations

import pytest

from aimiddleware.errors import StoreUnavailable
from aimiddleware.storage import Storage
from aimiddleware.versioning import DeprecatedCall, DeprecationMonitor
from tests.redis_server import RedisServer
from tests.versioning_app import OLD, at


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
