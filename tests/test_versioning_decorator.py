from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import http_sfv
import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from aimiddleware import DeprecationMonitor, Lifecycle, VersioningConfig, deprecated, install
from aimiddleware.headers import parse_http_date
from aimiddleware.storage import Storage
from tests.live_server import serve
from tests.versioning_app import NEW, OLD, FakeClock, at, make_registry

POLICY = dict(
    deprecated="2026-01-01",
    sunset="2026-07-01",
    replacement="/v2/summarize",
    deprecation_link="https://docs.example/summarize",
    successor_link="https://docs.example/v2/summarize",
)


def sf_date(value: str) -> datetime:
    item = http_sfv.Item()
    item.parse(value.encode())
    assert isinstance(item.value, datetime)
    return item.value.replace(tzinfo=UTC)


class Doc(BaseModel):
    text: str


def tenant() -> str:
    return "acme"


def fastapi_app(clock: FakeClock, monitor: DeprecationMonitor | None = None) -> FastAPI:
    app = FastAPI()

    @app.post("/summarize/{doc_id}")
    @deprecated(**POLICY, clock=clock, monitor=monitor)  # type: ignore[arg-type]
    async def summarize(doc_id: int, doc: Doc, who: str = Depends(tenant)) -> dict[str, Any]:
        return {"id": doc_id, "summary": doc.text[:5], "tenant": who}

    @app.get("/legacy-sync")
    @deprecated(deprecated="2026-01-01", clock=clock)
    def legacy_sync(q: int = 1) -> dict[str, int]:
        return {"q": q}

    @app.get("/plain")
    @deprecated(Lifecycle.of(deprecated="2026-02-01", sunset="2026-12-01"), clock=clock)
    async def plain() -> PlainTextResponse:
        return PlainTextResponse("ok")

    install(app)
    return app


async def test_fastapi_endpoint_of_any_signature_keeps_validation_and_gets_headers() -> None:
    app = fastapi_app(FakeClock(at("2026-03-01")))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/summarize/7", json={"text": "hello world"})
        invalid = await c.post("/summarize/x", json={"text": 1})
        sync = await c.get("/legacy-sync", params={"q": 3})
        plain = await c.get("/plain")
        schema = (await c.get("/openapi.json")).json()
    assert r.status_code == 200 and r.json() == {"id": 7, "summary": "hello", "tenant": "acme"}
    assert sf_date(r.headers["deprecation"]) == at("2026-01-01")
    assert parse_http_date(r.headers["sunset"]) == at("2026-07-01")
    assert r.links["successor-version"]["url"] == "https://docs.example/v2/summarize"
    assert r.links["deprecation"]["url"] == "https://docs.example/summarize"
    assert invalid.status_code == 422  # FastAPI still validates the real parameters
    assert sync.json() == {"q": 3} and sf_date(sync.headers["deprecation"]) == at("2026-01-01")
    assert plain.text == "ok" and parse_http_date(plain.headers["sunset"]) == at("2026-12-01")
    params = schema["paths"]["/summarize/{doc_id}"]["post"]["parameters"]
    assert [p["name"] for p in params] == ["doc_id"]  # the hidden parameter is not exposed


async def test_after_sunset_the_endpoint_is_410_and_not_called() -> None:
    clock = FakeClock(at("2026-07-01"))
    app = fastapi_app(clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/summarize/7", json={"text": "hello"})
    assert r.status_code == 410
    body = r.json()
    assert body["error"]["code"] == "model_retired" and body["replacement"] == "/v2/summarize"
    assert body["retired_route"] == "summarize"


async def test_starlette_endpoint_and_the_registry_lifecycle(storage: Storage) -> None:
    clock = FakeClock(at("2026-03-01"))
    registry = make_registry(clock)
    monitor = DeprecationMonitor(storage)

    @deprecated(registry.snapshot(OLD).lifecycle, name="old-echo", clock=clock, monitor=monitor)
    async def old_echo(request: Request) -> JSONResponse:
        return JSONResponse({"path": request.url.path})

    app = install(Starlette(routes=[Route("/old", old_echo)]))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t",
        headers={"x-api-key": "k1"},
    ) as c:
        r = await c.get("/old")
        r2 = await c.get("/old")
        clock.now = at("2026-07-02")
        gone = await c.get("/old")
    assert r.json() == {"path": "/old"}
    assert sf_date(r.headers["deprecation"]) == at("2026-01-01")
    assert r.links["successor-version"]["url"].endswith(NEW)
    assert r2.status_code == 200 and gone.status_code == 410 and gone.json()["replacement"] == NEW
    principal = "key_" + hashlib.sha256(b"k1").hexdigest()[:32]
    assert await monitor.counts(principal) == {"route:old-echo": 2}


def test_decoration_time_errors() -> None:
    with pytest.raises(ValueError, match="must not be earlier than Deprecation"):
        deprecated(deprecated="2026-06-01", sunset="2026-01-01")
    with pytest.raises(ValueError, match="needs a deprecation date"):
        deprecated()
    with pytest.raises(TypeError, match="not both"):
        deprecated(Lifecycle.of(deprecated="2026-01-01"), sunset="2026-07-01")


async def test_a_retired_endpoint_without_the_stack_still_answers_410() -> None:
    # With no error layer to render it, the retired endpoint's error was a bare 500 (the
    # server's "Internal Server Error"), where the client must learn it is gone for good.
    clock = FakeClock(at("2026-07-02"))

    @deprecated(**POLICY, clock=clock)  # type: ignore[arg-type]
    async def plain(request: Request) -> PlainTextResponse:
        return PlainTextResponse("called")

    api = FastAPI()

    @api.get("/doc")
    @deprecated(**POLICY, clock=clock)  # type: ignore[arg-type]
    async def doc() -> Doc:
        return Doc(text="called")

    for app, path in ((Starlette(routes=[Route("/plain", plain)]), "/plain"), (api, "/doc")):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            gone = await c.get(path)
        assert gone.status_code == 410, (path, gone.text)
        assert gone.headers["content-type"] == "application/problem+json"
        body = gone.json()
        assert body["error"]["code"] == "model_retired" and body["replacement"] == "/v2/summarize"
        assert sf_date(gone.headers["deprecation"]) == at("2026-01-01")
        assert parse_http_date(gone.headers["sunset"]) == at("2026-07-01")


async def test_a_deprecated_route_serving_a_deprecated_model_announces_the_earliest_dates() -> None:
    # The route's own Deprecation and Sunset (from @deprecated) were kept and the model's
    # dropped: a route sunset in 2027 serving a model retired (410) on 2026-07-01 told the
    # client "Sunset: 2027", though its calls fail half a year sooner. As for a model and
    # an API version together, each header is now the earliest of the two.
    clock = FakeClock(at("2026-03-01"))
    app = FastAPI()

    @app.post("/later")
    @deprecated(deprecated="2026-02-01", sunset="2027-01-01", clock=clock)
    async def later() -> dict[str, str]:
        return {"ok": "yes"}

    @app.post("/sooner")
    @deprecated(deprecated="2025-06-01", sunset="2026-05-01", clock=clock)
    async def sooner() -> dict[str, str]:
        return {"ok": "yes"}

    install(app, versioning=VersioningConfig(registry=make_registry(clock)))
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as c:
        later_old = await c.post("/later", json={"model": OLD})
        later_new = await c.post("/later", json={"model": NEW})
        sooner_old = await c.post("/sooner", json={"model": OLD})
    # the model (deprecated 2026-01-01, sunset 2026-07-01) is the earlier of both
    assert later_old.headers.get_list("deprecation") == [later_old.headers["deprecation"]]
    assert sf_date(later_old.headers["deprecation"]) == at("2026-01-01")
    assert later_old.headers.get_list("sunset") == [later_old.headers["sunset"]]
    assert parse_http_date(later_old.headers["sunset"]) == at("2026-07-01")
    # an active model: the route's own dates
    assert sf_date(later_new.headers["deprecation"]) == at("2026-02-01")
    assert parse_http_date(later_new.headers["sunset"]) == at("2027-01-01")
    # the route is the earlier of both
    assert sf_date(sooner_old.headers["deprecation"]) == at("2025-06-01")
    assert parse_http_date(sooner_old.headers["sunset"]) == at("2026-05-01")
    assert sooner_old.links["sunset"]["url"] == "https://docs.example/sunset-policy"
