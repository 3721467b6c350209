from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

import aimiddleware.storage
from aimiddleware.storage import Storage
from tests.redis_server import ClusterServer, RedisServer


@pytest.fixture(autouse=True)
def _store_failures_logged_afresh() -> Iterator[None]:
    """Each test sees the store-failure log as a new process does: a failure logged by an
    earlier test is not counted as a repeat (``storage._unavailable`` throttles repeats)."""
    aimiddleware.storage._logged.clear()
    yield


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real Redis/Valkey server for the whole run."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[ClusterServer]:
    """One real three-node Redis Cluster for the whole run."""
    cluster = ClusterServer().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: ClusterServer) -> str:
    """The clean cluster's ``redis+cluster://`` URL."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database on the shared real server."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture(params=["memory", "redis", "cluster"])
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
    """Runs a test body against every backend: in-process, a real Redis/Valkey, a real Cluster."""
    if request.param == "memory":
        yield Storage("memory://")
        return
    url = request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")
    store = Storage(url)
    yield store
    await store.aclose()
