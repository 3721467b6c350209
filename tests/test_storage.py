import asyncio
from datetime import datetime, timezone

import pytest

from aimiddleware.errors import StoreUnavailable
from aimiddleware.storage import Storage, redis_errors
from aimiddleware.versioning import DeprecatedCall, DeprecationMonitor
from tests.redis_server import ClusterServer, RedisServer


def test_memory_is_default() -> None:
    assert Storage().is_memory
    assert Storage.coerce(None).is_memory
    s = Storage("redis://localhost:6379/0")
    assert Storage.coerce(s) is s and not s.is_memory


@pytest.mark.parametrize("url", ["http://x", "sqlite:///a.db", "memcached://x"])
def test_unknown_scheme_is_a_clear_error(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported storage URL"):
        Storage(url)


def test_keys_are_hash_tagged_per_principal() -> None:
    s = Storage("memory://", key_prefix="p")
    assert s.key("rl", "key_abc", "tokens") == "p:rl:{key_abc}:tokens"
    assert s.key("rl", "key_abc") == "p:rl:{key_abc}"


def test_repr_hides_credentials() -> None:
    assert "secret" not in repr(Storage("redis://user:secret@h:6379/0"))


async def test_real_server_roundtrip(redis_url: str) -> None:
    s = Storage(redis_url)
    await s.redis.set("a", "1")
    assert await s.redis.get("a") == b"1"
    await s.aclose()


async def test_store_down_is_a_typed_503() -> None:
    server = RedisServer().start()
    # A stopped server refuses at once: no short socket timeout needed (a short one would
    # fail the ping below on a stalled machine, with the server still up).
    s = Storage(server.url, socket_timeout=5)
    await s.redis.ping()
    server.stop()
    with pytest.raises(StoreUnavailable) as info:
        async with redis_errors("test"):
            await s.redis.ping()
    assert info.value.status == 503 and info.value.retryable
    await s.aclose()


async def test_a_full_store_is_a_typed_503() -> None:
    server = RedisServer().start()
    s = Storage(server.url)
    try:
        await s.redis.config_set("maxmemory-policy", "noeviction")
        await s.redis.config_set("maxmemory", "1")  # every write is refused: OOM
        with pytest.raises(StoreUnavailable) as info:
            async with redis_errors("test"):
                await s.redis.set("k", "v")
        assert info.value.status == 503 and info.value.retryable
    finally:
        await s.aclose()
        server.stop()


# -- Redis Cluster: a real three-node cluster ------------------------------------------------------


async def test_a_fresh_cluster_client_routes_a_burst_of_first_commands(cluster_url: str) -> None:
    """redis-py's asyncio cluster sends keyed commands to a random node until it has mapped the
    cluster; enough MOVED replies and it closes the connections other requests are using."""
    s = Storage(cluster_url)
    count = s.script("return redis.call('INCR', KEYS[1])")
    keys = [s.key("test", f"p{i % 40}", "n") for i in range(200)]  # 40 callers, 5 each
    counted = await asyncio.gather(*(count(keys=[k]) for k in keys))
    assert sorted(counted) == sorted(1 + i // 40 for i in range(200))
    assert [int(await s.redis.get(k)) for k in keys[:40]] == [5] * 40
    await s.aclose()


async def test_a_cluster_client_whose_first_write_counts_a_deprecation_stays_usable(
    cluster_url: str,
) -> None:
    """Writes are Lua scripts: a MULTI pipeline would have mapped the cluster on a thread's
    event loop and left every connection bound to that loop."""
    s = Storage(cluster_url)
    monitor = DeprecationMonitor(s, ttl_seconds=60)
    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    await monitor.record(DeprecatedCall("a", "model", "m-1", at, None, None, "req_1", at))
    assert await monitor.counts("a") == {"model:m-1": 1}
    assert 0 < await s.redis.ttl(s.key("deprecations", "a")) <= 60
    await s.aclose()


async def test_a_cluster_that_is_down_is_a_typed_503() -> None:
    cluster = ClusterServer().start()
    s = Storage(cluster.url, socket_timeout=0.5)
    await s.redis.set(s.key("t", "a"), "1")
    cluster.stop()
    with pytest.raises(StoreUnavailable):
        async with redis_errors("test"):
            await s.redis.get(s.key("t", "a"))
    await s.aclose()
