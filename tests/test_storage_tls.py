"""The Redis/Valkey stores over TLS (``rediss://``, ``rediss+cluster://``), for real.

Managed services (ElastiCache with in-transit encryption, Upstash, Azure Cache, Memorystore)
take only TLS, often with a private CA. Here a TLS terminator (``tests/tls_proxy.py``) stands
in front of the shared Valkey and of a three-node cluster whose nodes announce their TLS
ports; the certificates come from a private CA made for the run. The stack is driven through
httpx as a user runs it, the CA given in the storage URL as redis-py reads it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aimiddleware import (
    IdempotencyConfig,
    Policy,
    RateLimiter,
    StackConfig,
    UsageConfig,
    UsageRoutes,
    install,
)
from aimiddleware.storage import Storage
from tests.ratelimit_helpers import PRICES, counters, principal_of
from tests.redis_server import RedisServer
from tests.tls_proxy import PrivateCA, TLSCluster, TLSProxy

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3000}
ANSWER = {"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
          "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": "hi"}}],
          "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}}


@pytest.fixture(scope="session")
def tls_ca() -> Iterator[PrivateCA]:
    with PrivateCA() as ca:
        yield ca


@pytest.fixture(scope="session")
def tls_server(redis_server: RedisServer, tls_ca: PrivateCA) -> Iterator[TLSProxy]:
    """A TLS port in front of the session's real Valkey."""
    proxy = TLSProxy(redis_server.port, tls_ca.server_context())
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def tls_cluster(tls_ca: PrivateCA) -> Iterator[TLSCluster]:
    """A real three-node cluster reached over TLS only (~2 s to start, once)."""
    cluster = TLSCluster(tls_ca).start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["rediss", "rediss+cluster"])
def tls(request: pytest.FixtureRequest, redis_server: RedisServer) -> tuple[str, list[TLSProxy]]:
    """A clean TLS store: its URL (no CA given yet) and the TLS ports behind it."""
    if request.param == "rediss":
        proxy: TLSProxy = request.getfixturevalue("tls_server")
        redis_server.flush()
        return proxy.url, [proxy]
    cluster: TLSCluster = request.getfixturevalue("tls_cluster")
    cluster.cluster.flush()
    return cluster.url, cluster.proxies


def with_query(url: str, **params: Any) -> str:
    return url + "?" + "&".join(f"{k}={quote(str(v))}" for k, v in params.items())


def chat_app(storage: Storage) -> tuple[Starlette, RateLimiter, list[int]]:
    """The installed stack with a rate limit, idempotency and a usage ledger on ``storage``."""
    calls: list[int] = []

    async def chat(request: Request) -> Response:
        calls.append(1)
        return JSONResponse(ANSWER)

    app = Starlette(routes=[Route(CHAT, chat, methods=["POST"]), *UsageRoutes().routes])
    limiter = RateLimiter(Policy(tokens="100000/minute", requests="100/minute"),
                          storage=storage, prices=PRICES)
    install(app, StackConfig(
        storage=storage, ratelimit=limiter, ratelimit_exempt=["/usage"],
        idempotency=IdempotencyConfig(secret="tls-test-secret-tls-test-secret!"),
        usage=UsageConfig(prices=PRICES)))
    return app, limiter, calls


def one_key_per_node() -> list[str]:
    """API keys whose principals' slots fall on each of the three nodes' thirds."""
    from redis.crc import key_slot

    found: dict[int, str] = {}
    for i in itertools.count():
        key = f"k-tls-{i}"
        found.setdefault(key_slot(principal_of(key).encode()) * 3 // 16384, key)
        if len(found) == 3:
            return sorted(found.values())
    raise AssertionError  # (unreachable)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


@pytest.mark.parametrize("client_cert", [False, True], ids=["ca", "ca+client-cert"])
async def test_the_stores_run_over_tls_with_a_private_ca(
    tls: tuple[str, list[TLSProxy]], tls_ca: PrivateCA, client_cert: bool
) -> None:
    """An admission and its reconciliation, an idempotency record and its replay, a usage
    ledger row, on a TLS-only store whose certificate a private CA signed, the CA (and a
    client certificate, for services that ask for one) given in the URL's query."""
    url, proxies = tls
    params: dict[str, Any] = {"ssl_ca_certs": tls_ca.ca_file}
    if client_cert:
        params.update(ssl_certfile=tls_ca.client_cert, ssl_keyfile=tls_ca.client_key)
    before = [(p.handshakes, len(p.client_certs)) for p in proxies]
    storage = Storage(with_query(url, **params))
    app, limiter, calls = chat_app(storage)
    keys = one_key_per_node()
    try:
        async with client(app) as c:
            for key in keys:
                auth = {"authorization": f"Bearer {key}", "idempotency-key": "op-1"}
                first = await c.post(CHAT, json=BODY, headers=auth)
                assert first.status_code == 200, first.text
                assert first.json() == ANSWER
                assert int(first.headers["x-ratelimit-remaining-tokens"]) < 100000 - 3000
                held = await counters(limiter, key)
                assert held["tokens:60"] == 15  # reserved 3,000+, reconciled to the usage
                again = await c.post(CHAT, json=BODY, headers=auth)
                assert again.status_code == 200 and again.json() == ANSWER
                assert again.headers["idempotent-replayed"] == "true"
                history = await c.get("/usage", headers=auth)
                [row] = history.json()["data"]
                assert (row["requests"], row["input_tokens"], row["output_tokens"]) == (1, 11, 4)
        assert len(calls) == len(keys)  # every retry a replay
    finally:
        await storage.aclose()
    # Every TLS port served (the cluster's client followed the announced ports), and a
    # client certificate was presented exactly when the URL named one.
    for proxy, (handshakes, certs) in zip(proxies, before, strict=True):
        assert proxy.handshakes > handshakes
        assert (len(proxy.client_certs) > certs) is client_cert


@pytest.mark.parametrize("mistake", ["wrong-ca", "system-ca", "plain-port"])
async def test_a_tls_store_the_client_cannot_trust_is_a_typed_503(
    tls: tuple[str, list[TLSProxy]], tls_ca: PrivateCA, mistake: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The CA of another deployment, or none (the system's, which does not know a private
    CA): every request is a typed, retryable 503 at once, not a 500. A ``rediss://`` URL
    naming the server's plain port waits for a handshake that never comes: the 503 then
    comes after the socket timeout, not later. The client is told which store failed; the
    server's log says why."""
    caplog.set_level(logging.WARNING, logger="aimiddleware")
    url, proxies = tls
    other = PrivateCA() if mistake == "wrong-ca" else None  # (another deployment's)
    if other is not None:
        url = with_query(url, ssl_ca_certs=other.ca_file)
    elif mistake == "plain-port":
        plain = url.replace(f":{proxies[0].port}", f":{proxies[0].backend_port}")
        url = with_query(plain, ssl_ca_certs=tls_ca.ca_file)
    timeout = 0.5 if mistake == "plain-port" else 2.0
    storage = Storage(url, socket_timeout=timeout)
    app, _, calls = chat_app(storage)
    try:
        async with client(app) as c:
            started = time.monotonic()
            r = await c.post(CHAT, json=BODY, headers={"authorization": "Bearer k-wrong",
                                                         "idempotency-key": "op-1"})
            took = time.monotonic() - started
    finally:
        await storage.aclose()
        if other is not None:
            other.close()
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["error"]["code"] == "store_unavailable" and body["retryable"] is True
    assert r.headers["retry-after"] == "1" and r.headers["x-should-retry"] == "true"
    assert "certificate" not in r.text and "127.0.0.1" not in r.text  # (no store details)
    assert not calls
    why = "Timeout connecting" if mistake == "plain-port" else "certificate verify failed"
    logged = [rec.getMessage() for rec in caplog.records if rec.name.startswith("aimiddleware")]
    assert len(logged) == 1, logged
    assert logged[0].startswith("the idempotency store is unavailable: ") and why in logged[0]
    if mistake == "plain-port":
        assert timeout * 0.9 < took < timeout + 1.0
    else:
        assert took < timeout
