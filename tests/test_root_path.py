"""Under a root path (``uvicorn --root-path /api``) the scope's path starts with it
(``/api/health``): the configured paths (rate-limit exemptions, per-route policies, timeout
tiers, the versioning layer's routes) match the path the app's routes see, ``/health``, as
Starlette's router does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
from fastapi import FastAPI, Request

import aimiddleware
from aimiddleware import (
    CancellationConfig,
    ModelRegistry,
    Policy,
    RateLimiter,
    StackConfig,
    VersioningConfig,
)
from aimiddleware._asgi import route_path
from aimiddleware.stack_middleware import StackMiddleware
from aimiddleware.storage import Storage
from tests.live_server import serve

ROOT = "/api"


def build(storage: Storage, *, chained: bool) -> FastAPI:
    """A FastAPI app with the stack: ``/health`` exempt, a ``/v1/*`` route policy of one
    request a minute (the app's is two), a 100 ms tier on ``/slow``, ``/v1/models``."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat")
    async def chat() -> dict[str, str]:
        return {"text": "hi"}

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await anyio.sleep(3)
        return {"text": "too late"}

    registry = ModelRegistry()
    registry.add_snapshot("m-2024")
    limiter = RateLimiter(
        Policy(requests="2/minute"), routes={"/v1/*": Policy(requests="1/minute")},
        storage=storage,
    )
    aimiddleware.install(app, StackConfig(
        storage=storage,
        ratelimit=limiter,
        ratelimit_exempt=("/health",),
        cancellation=CancellationConfig(timeouts={"/slow": 0.1}),
        versioning=VersioningConfig(registry=registry, models_path="/v1/models"),
    ))
    if chained:  # the same layers as one middleware each
        (stack,) = app.user_middleware
        assert stack.cls is StackMiddleware  # type: ignore[comparison-overlap]
        app.user_middleware.clear()
        for cls, options in reversed(stack.kwargs["layers"]):
            app.add_middleware(cls, **options)
    return app


@pytest.fixture(params=["fused", "chained"])
def chained(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "chained")


@asynccontextmanager
async def client(storage: Storage, chained: bool) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app in a scope with ``root_path`` (its paths start with it)."""
    transport = httpx.ASGITransport(app=build(storage, chained=chained), root_path=ROOT)
    async with httpx.AsyncClient(transport=transport, base_url="http://t" + ROOT) as c:
        yield c


def test_the_route_path_is_the_path_without_the_root_path() -> None:
    def path(path: str, root: str = ROOT) -> str:
        return route_path({"path": path, "root_path": root})

    assert path("/api/health") == "/health"
    assert path("/health") == "/health"  # (a proxy that already took the prefix off)
    assert path("/api") == ""  # (as Starlette: "/api" redirects to "/api/")
    assert path("/apix/health") == "/apix/health"  # not under /api
    assert path("/api/health", "") == "/api/health"
    assert route_path({"path": "/health"}) == "/health"


async def test_an_exempt_path_stays_exempt_under_a_root_path(
    storage: Storage, chained: bool
) -> None:
    async with client(storage, chained) as c:
        answers = [await c.get("/health") for _ in range(3)]  # the app's limit is 2/minute
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert all("x-ratelimit-limit-requests" not in r.headers for r in answers)


async def test_a_route_policy_applies_under_a_root_path(storage: Storage, chained: bool) -> None:
    async with client(storage, chained) as c:
        first = await c.post("/v1/chat", json={})
        second = await c.post("/v1/chat", json={})
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-requests"] == "1"
    assert second.status_code == 429


async def test_a_per_path_timeout_fires_under_a_root_path(storage: Storage, chained: bool) -> None:
    async with client(storage, chained) as c:
        with anyio.fail_after(2):
            r = await c.get("/slow")
    assert r.status_code == 504 and r.json()["timeout_seconds"] == 0.1


async def test_the_models_route_answers_under_a_root_path(storage: Storage, chained: bool) -> None:
    async with client(storage, chained) as c:
        listed = await c.get("/v1/models")
        one = await c.get("/v1/models/m-2024")
    assert listed.status_code == 200 and [m["id"] for m in listed.json()["data"]] == ["m-2024"]
    assert one.status_code == 200 and one.json()["id"] == "m-2024"


async def test_uvicorn_root_path_keeps_exemptions_route_policies_and_timeouts(
    storage: Storage, chained: bool
) -> None:
    app = build(storage, chained=chained)
    async with serve(app, root_path=ROOT) as url, httpx.AsyncClient(base_url=url) as c:
        health = [(await c.get("/health")).status_code for _ in range(3)]
        chat = [(await c.post("/v1/chat", json={})).status_code for _ in range(2)]
        with anyio.fail_after(2):
            slow = await c.get("/slow")
    assert health == [200, 200, 200]
    assert chat == [200, 429]
    assert slow.status_code == 504


async def test_a_migration_check_side_sees_the_root_path(storage: Storage) -> None:
    # The check's sub-requests kept the scope's root_path but took a path without it, so
    # the route saw /v1/echo under a root path of /api: its URLs (request.url,
    # url_for) lost the prefix the client's requests have.
    app = FastAPI()

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict[str, str]:
        return {"url": str(request.url.path), "route": request.url_for("echo").path}

    registry = ModelRegistry()
    registry.add_snapshot("m-2024")
    aimiddleware.install(app, StackConfig(storage=storage, versioning=VersioningConfig(
        registry=registry, migration_path="/v1/migration-check")))
    transport = httpx.ASGITransport(app=app, root_path=ROOT)
    async with httpx.AsyncClient(transport=transport, base_url="http://t" + ROOT) as c:
        direct = await c.post("/v1/echo", json={})
        check = await c.post("/v1/migration-check", json={
            "path": "/v1/echo", "body": {},
            "baseline": {"model": "m-2024"}, "candidate": {"model": "m-2024"},
        })
    assert direct.json() == {"url": "/api/v1/echo", "route": "/api/v1/echo"}
    assert check.status_code == 200, check.text
    for side in ("baseline", "candidate"):
        assert check.json()[side]["body"] == direct.json()
