from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from aimiddleware.storage import Storage
from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real Redis/Valkey server for the whole run."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database on the shared real server."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture(params=["memory", "redis"])
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
    """Runs a test body against every backend: in-process and a real Redis/Valkey."""
    if request.param == "memory":
        yield Storage("memory://")
        return
    url = request.getfixturevalue("redis_url")
    store = Storage(url)
    yield store
    await store.aclose()
