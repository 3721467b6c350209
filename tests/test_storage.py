import pytest

from aimiddleware.errors import StoreUnavailable
from aimiddleware.storage import Storage, redis_errors
from tests.redis_server import RedisServer


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
