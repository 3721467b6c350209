import asyncio
import os
import signal
import time
from datetime import UTC, datetime

import anyio
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


@pytest.mark.parametrize(
    ("url", "tls"),
    [
        ("redis+cluster://127.0.0.1:7000", False),
        ("valkey+cluster://127.0.0.1:7000", False),
        ("rediss+cluster://127.0.0.1:7000", True),
        ("valkeys+cluster://127.0.0.1:7000", True),
    ],
)
async def test_a_cluster_url_over_tls_builds_a_tls_cluster_client(url: str, tls: bool) -> None:
    """A managed cluster that takes only TLS was out of reach: no URL gave a TLS cluster client
    (``rediss+cluster://`` was an unsupported scheme). No connection is made here."""
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.connection import SSLConnection

    s = Storage(url)
    assert s.cluster
    client = s.redis
    assert isinstance(client, RedisCluster)
    assert (client.connection_kwargs.get("connection_class") is SSLConnection) is tls
    await s.aclose()


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("rediss+cluster://127.0.0.1:7000?ssl_ca_path=/etc/ssl/certs", "ssl_ca_path"),
        ("rediss://127.0.0.1:6379/0?ssl_ca_cert=/ca.pem", "ssl_ca_cert"),  # (misspelt)
        ("redis://127.0.0.1:6379/0?ssl_ca_certs=/ca.pem", "ssl_ca_certs"),  # (not TLS)
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
        ("redis+cluster://127.0.0.1:7000/1", "db"),
    ],
)
def test_a_url_redis_py_refuses_is_an_error_at_startup(url: str, named: str) -> None:
    """redis-py's client was built on first use: an option it does not take (the cluster
    client takes fewer TLS options than a single node's), a value it cannot read or a
    database on a cluster failed every request with a 500 (an exception inside redis-py).
    Nothing connects here."""
    from starlette.applications import Starlette

    from aimiddleware import install

    with pytest.raises(ValueError, match=f"redis-py does not take .*{named}"):
        Storage(url)
    with pytest.raises(ValueError, match=named):
        install(Starlette(), storage=url)


@pytest.mark.parametrize("scheme", ["rediss", "rediss+cluster", "valkeys", "valkeys+cluster"])
def test_the_tls_options_of_a_url_are_taken(scheme: str) -> None:
    """What a managed service's private CA and client certificate need, on every TLS scheme
    (``tests/test_storage_tls.py`` connects with them)."""
    options = ("ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/c.key"
               "&ssl_cert_reqs=required&ssl_check_hostname=true")
    assert Storage(f"{scheme}://127.0.0.1:6379?{options}").kind == "redis"


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
    at = datetime(2026, 1, 1, tzinfo=UTC)
    await monitor.record(DeprecatedCall("a", "model", "m-1", at, None, None, "req_1", at))
    assert await monitor.counts("a") == {"model:m-1": 1}
    assert 0 < await s.redis.ttl(s.key("deprecations", "a")) <= 60
    await s.aclose()


async def test_a_cluster_node_that_stops_answering_is_a_typed_503_within_the_timeout() -> None:
    """redis-py retried a call three times, each time mapping the cluster again (a connect
    to the stopped node): 22 s with the 2 s timeout. Requests that other nodes serve go on,
    and no failure escapes as anything but a 503 (redis-py closes connections that other
    requests are using when a node fails or returns; those failed as an AttributeError, a
    500), during the outage or after it."""
    cluster = ClusterServer().start()
    s = Storage(cluster.url, socket_timeout=0.5)
    count = s.script("return redis.call('INCR', KEYS[1])")
    await s.redis.ping()
    victim = cluster.servers[2]
    tags: dict[int, str] = {}
    for i in range(10_000):
        tags.setdefault(s.redis.get_node_from_key(f"{{t{i}}}").port, f"t{i}")
    down, up = tags.pop(victim.port), list(tags.values())
    outcomes: list[str] = []

    async def caller(tag: str, stop: anyio.Event) -> None:
        while not stop.is_set():
            try:
                async with redis_errors("test"):
                    await count(keys=[f"{{{tag}}}"])
                outcomes.append("ok")
            except StoreUnavailable:
                outcomes.append("503")
            except Exception as exc:  # (any other is the failure under test)
                outcomes.append(repr(exc))
            await anyio.sleep(0.01)

    try:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            for i in range(24):
                tg.start_soon(caller, down if i % 2 else up[i % len(up)], stop)
            await anyio.sleep(0.5)
            os.kill(victim.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                async with redis_errors("test"):
                    await count(keys=[f"{{{down}}}"])
            given_up = time.monotonic() - started
            await anyio.sleep(2)
            os.kill(victim.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
            await anyio.sleep(2)
            stop.set()
        assert given_up < 3  # (the 0.5 s timeout once, not a retry loop of re-mappings)
        assert set(outcomes) <= {"ok", "503"}, {o for o in outcomes if o not in ("ok", "503")}
        async with redis_errors("test"):  # (back without a restart)
            assert await count(keys=[f"{{{down}}}"]) > 0
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        await s.aclose()
        cluster.stop()


async def test_keys_of_one_command_in_two_slots_are_a_bug_not_a_503(cluster_url: str) -> None:
    s = Storage(cluster_url)
    both = s.script("return redis.call('MSET', KEYS[1], 1, KEYS[2], 2)")
    with pytest.raises(Exception, match="same key slot") as caught:
        async with redis_errors("test"):
            await both(keys=["{a}:1", "{b}:2"])
    assert not isinstance(caught.value, StoreUnavailable)
    await s.aclose()


@pytest.mark.parametrize(
    "message",
    [
        "startup_nodes could not agree on a valid slots cache: a vs b on slot: 1",
        "Redis Cluster cannot be connected. Please provide at least one reachable node",
        "Cluster mode is not enabled on this node",
    ],
)
async def test_a_cluster_that_cannot_be_mapped_is_a_503(message: str) -> None:
    from redis.exceptions import RedisClusterException

    with pytest.raises(StoreUnavailable):
        async with redis_errors("test"):
            raise RedisClusterException(message)


async def test_a_cluster_that_is_down_is_a_typed_503() -> None:
    cluster = ClusterServer().start()
    s = Storage(cluster.url, socket_timeout=0.5)
    await s.redis.set(s.key("t", "a"), "1")
    cluster.stop()
    with pytest.raises(StoreUnavailable):
        async with redis_errors("test"):
            await s.redis.get(s.key("t", "a"))
    await s.aclose()


def test_a_store_failure_is_logged_once_per_reason_while_it_lasts(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outage fails every request alike: the reason is logged once, and the same failure
    again within ``_LOG_EVERY`` seconds is counted, then reported with the next line. Another
    reason (or store) has its own line at once."""
    import logging

    from aimiddleware import storage

    caplog.set_level(logging.WARNING, logger="aimiddleware.storage")
    down = ConnectionRefusedError(111, "Connection refused")
    for _ in range(3):
        err = storage._unavailable("idempotency", down)
        assert err.status == 503 and "refused" not in str(err.detail)  # (the client: no reason)
    storage._unavailable("rate limit", down)
    storage._unavailable("idempotency", TimeoutError("Timeout reading from 127.0.0.1:6379"))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "the idempotency store is unavailable: ConnectionRefusedError: "
        "[Errno 111] Connection refused",
        "the rate limit store is unavailable: ConnectionRefusedError: "
        "[Errno 111] Connection refused",
        "the idempotency store is unavailable: TimeoutError: "
        "Timeout reading from 127.0.0.1:6379",
    ]
    monkeypatch.setattr(storage, "_LOG_EVERY", 0.0)  # (the window has passed)
    storage._unavailable("idempotency", down)
    assert caplog.records[-1].getMessage().endswith(
        "Connection refused (2 more since the last such line)")


def test_a_cycle_of_causes_does_not_hang_the_failure_log() -> None:
    from aimiddleware import storage

    a, b = OSError("a"), OSError("b")
    a.__cause__, b.__cause__ = b, a
    assert storage._unavailable("usage", a).status == 503
