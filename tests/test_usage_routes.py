"""Usage routes: /usage history scoped to the caller, count_tokens, feedback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from aimiddleware import (
    MemoryLedger,
    PriceTable,
    SQLiteLedger,
    StackConfig,
    TokenCounter,
    UsageConfig,
    UsageRoutes,
    install,
    report_usage,
)
from aimiddleware.usage.ledger import Ledger

PRICES = PriceTable({"gpt-4o": {"input": "2.5", "output": "10"}})
COUNTER = TokenCounter()
ALICE = {"authorization": "Bearer alice-key"}
BOB = {"authorization": "Bearer bob-key"}


async def chat(request: Request) -> Response:
    body = await request.json()
    report_usage({"input_tokens": body["n"], "output_tokens": 1}, finish_reason="stop")
    return JSONResponse({"ok": True})


def starlette_app(ledger: Ledger) -> Any:
    usage = UsageRoutes(count_tokens_path="/v1/chat/count_tokens")
    app = Starlette(routes=[Route("/v1/chat", chat, methods=["POST"]), *usage.routes])
    return install(app, StackConfig(usage=UsageConfig(prices=PRICES, ledger=ledger,
                                                      counter=COUNTER)))


def fastapi_app(ledger: Ledger) -> Any:
    app = FastAPI()
    app.router.routes.append(Route("/v1/chat", chat, methods=["POST"]))
    app.router.routes.append(Mount("/account", app=UsageRoutes().router))
    return install(app, StackConfig(usage=UsageConfig(prices=PRICES, ledger=ledger,
                                                      counter=COUNTER)))


@pytest.fixture(params=["memory", "sqlite"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    led = MemoryLedger() if request.param == "memory" else SQLiteLedger(tmp_path / "u.db")
    yield led
    await led.aclose()  # (Python 3.13 warns of a SQLite connection left to the collector)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_usage_never_shows_another_principals_usage(ledger: Ledger) -> None:
    async with client(starlette_app(ledger)) as c:
        for n in (10, 20):
            assert (await c.post("/v1/chat", json={"model": "gpt-4o", "n": n},
                                 headers=ALICE)).status_code == 200
        await c.post("/v1/chat", json={"model": "gpt-4o", "n": 999}, headers=BOB)
        alice = (await c.get("/usage", headers=ALICE)).json()
        bob = (await c.get("/usage", headers=BOB)).json()
        carol = (await c.get("/usage", headers={"authorization": "Bearer carol"})).json()
    today = datetime.now(UTC).date().isoformat()
    [row] = alice["data"]
    assert (row["day"], row["model"], row["requests"]) == (today, "gpt-4o", 2)
    assert row["input_tokens"] == 30 and alice["totals"]["input_tokens"] == 30
    assert Decimal(alice["totals"]["estimated_cost"]) == (30 * Decimal("2.5") + 2 * 10) / 10**6
    assert [r["input_tokens"] for r in bob["data"]] == [999]
    assert carol["data"] == [] and carol["totals"]["requests"] == 0
    assert "999" not in str(alice) and "alice" not in str(bob)


async def test_usage_date_filters(ledger: Ledger) -> None:
    async with client(starlette_app(ledger)) as c:
        await c.post("/v1/chat", json={"model": "gpt-4o", "n": 1}, headers=ALICE)
        past = await c.get("/usage?start=2000-01-01&end=2000-12-31", headers=ALICE)
        model = await c.get("/usage?model=other", headers=ALICE)
        bad = await c.get("/usage?start=yesterday", headers=ALICE)
        backwards = await c.get("/usage?start=2026-02-02&end=2026-01-01", headers=ALICE)
    assert past.json()["data"] == [] and model.json()["data"] == []
    assert bad.status_code == 400 and bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["error"]["param"] == "start"
    assert backwards.status_code == 400


async def test_feedback_is_scoped_and_readable(ledger: Ledger) -> None:
    async with client(starlette_app(ledger)) as c:
        r = await c.post("/v1/chat", json={"model": "gpt-4o", "n": 5}, headers=ALICE)
        rid = r.headers["x-request-id"]
        stolen = await c.post("/feedback", json={"request_id": rid, "rating": -1}, headers=BOB)
        unknown = await c.post("/feedback", json={"request_id": "req_nope", "rating": 1},
                               headers=ALICE)
        invalid = await c.post("/feedback", json={"request_id": rid, "rating": 99},
                               headers=ALICE)
        not_json = await c.post("/feedback", content=b"{", headers=ALICE)
        ok = await c.post("/feedback", json={"request_id": rid, "rating": 5, "comment": "great",
                                             "labels": ["accurate"]}, headers=ALICE)
        mine = await c.get(f"/usage/requests/{rid}", headers=ALICE)
        theirs = await c.get(f"/usage/requests/{rid}", headers=BOB)
        history = (await c.get("/usage", headers=ALICE)).json()
    assert stolen.status_code == 404 and unknown.status_code == 404
    assert invalid.status_code == 422 and invalid.json()["error"]["param"] == "rating"
    assert not_json.status_code == 400
    assert ok.status_code == 201 and ok.json()["recorded"] is True
    assert mine.status_code == 200
    data = mine.json()
    assert data["feedback"]["rating"] == 5 and data["feedback"]["labels"] == ["accurate"]
    assert data["record"]["usage"]["input_tokens"] == 5 and "principal" not in data["record"]
    assert theirs.status_code == 404
    assert history["data"][0]["feedback_count"] == 1 and history["data"][0]["rating_sum"] == 5


async def test_count_tokens(ledger: Ledger) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello world"}]}
    async with client(starlette_app(ledger)) as c:
        r = await c.post("/v1/chat/count_tokens", json=body, headers=ALICE)
        unknown = await c.post("/v1/chat/count_tokens", json={**body, "model": "mystery"})
        bad = await c.post("/v1/chat/count_tokens", json=[1, 2])
        bad_shape = await c.post("/v1/chat/count_tokens", json={"model": "gpt-4o",
                                                                "messages": "oops"})
    assert r.status_code == 200
    data = r.json()
    assert data["input_tokens"] == COUNTER.count_request(body).tokens == 3 + 1 + 2 + 3
    assert data["exact"] is True and data["encoding"] == "o200k_base"
    assert Decimal(data["estimated_cost"]) == 9 * Decimal("2.5") / 10**6
    u = unknown.json()
    assert u["exact"] is False and u["estimated_cost"] is None and u["input_tokens"] > 0
    assert bad.status_code == 400 and bad_shape.status_code == 400


async def test_routes_mount_in_fastapi(ledger: Ledger) -> None:
    async with client(fastapi_app(ledger)) as c:
        await c.post("/v1/chat", json={"model": "gpt-4o", "n": 4}, headers=ALICE)
        r = await c.get("/account/usage", headers=ALICE)
        count = await c.post("/account/count_tokens", json={"model": "gpt-4", "prompt": "hi"})
    assert r.status_code == 200 and r.json()["data"][0]["input_tokens"] == 4
    assert count.json()["input_tokens"] == 1


async def test_routes_without_a_ledger_say_so() -> None:
    app = install(Starlette(routes=UsageRoutes().routes), StackConfig())
    async with client(app) as c:
        r = await c.get("/usage")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_paths_are_validated() -> None:
    with pytest.raises(ValueError):
        UsageRoutes(usage_path="usage")


async def test_a_body_nested_too_deep_is_a_400_not_a_500(ledger: Ledger) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000  # past what json.loads recurses (RecursionError)
    async with client(starlette_app(ledger)) as c:
        feedback = await c.post("/feedback", content=deep, headers=ALICE)
        count = await c.post("/v1/chat/count_tokens", content=deep, headers=ALICE)
    for r in (feedback, count):
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


async def test_content_blocks_nested_deep_are_a_400_not_a_500(ledger: Ledger) -> None:
    # 600 levels parse (json.loads allows ~1000) but cost the counter two frames a level.
    n = 600
    deep = '{"content":' * n + '"x"' + "}" * n
    body = '{"model":"gpt-4o","messages":[{"role":"user","content":' + deep + "}]}"
    async with client(starlette_app(ledger)) as c:
        r = await c.post("/v1/chat/count_tokens", content=body, headers=ALICE)
        shallow = await c.post("/v1/chat/count_tokens", headers=ALICE, json={
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": [{"content": [{"content": "x"}]}]}],
        })
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    assert "nested" in r.json()["error"]["message"]
    assert shallow.status_code == 200 and shallow.json()["input_tokens"] == 3 + 1 + 1 + 3
