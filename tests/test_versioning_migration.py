from __future__ import annotations

import hashlib
from typing import Any

import httpx

from aimiddleware import DeprecationMonitor
from aimiddleware.versioning import compare
from tests.versioning_app import NEW, OLD, FakeClock, at, build_app

PATH = "/_versioning/migration-check"


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t",
        headers={"authorization": "Bearer sk-team"},
    )


async def test_two_snapshots_side_by_side() -> None:
    monitor = DeprecationMonitor()
    app = build_app(FakeClock(at("2026-03-01")), monitor=monitor)
    check = {
        "path": "/chat",
        "body": {"model": "ignored", "messages": [{"role": "user", "content": "hi"}]},
        "baseline": {"model": OLD},
        "candidate": {"model": "my-model"},
    }
    async with client(app) as c:
        r = await c.post(PATH, json=check)
    assert r.status_code == 200, r.text
    out = r.json()
    base, cand, diff = out["baseline"], out["candidate"], out["diff"]
    assert (base["model"], base["model_version"]) == (OLD, OLD)
    assert (cand["model"], cand["model_version"]) == ("my-model", NEW)
    assert base["status"] == cand["status"] == 200
    assert "deprecation" in base["headers"] and "deprecation" not in cand["headers"]
    assert base["output"] == f"Hello from {OLD}." and cand["output"] == f"Hello from {NEW}!"
    assert diff["usage"]["output_tokens"] == {"baseline": 6, "candidate": 4, "delta": -2}
    assert diff["usage"]["input_tokens"]["delta"] == 0
    assert diff["finish_reason"] == {"baseline": "length", "candidate": "stop", "changed": True}
    assert diff["output"]["changed"] is True and 0 < diff["output"]["similarity"] < 1
    assert any(line.startswith("+Hello") for line in diff["output"]["diff"])
    # the sub-requests ran as the caller: the deprecated snapshot was counted for them
    principal = "key_" + hashlib.sha256(b"sk-team").hexdigest()[:32]
    assert await monitor.counts(principal) == {f"model:{OLD}": 1}


async def test_two_api_versions_by_header() -> None:
    app = build_app(FakeClock(at("2026-03-01")))
    check = {
        "path": "/chat",
        "body": {"model": NEW},
        "baseline": {"api_version": "2025-01-01"},
        "candidate": {"api_version": "2026-06-01"},
    }
    async with client(app) as c:
        r = await c.post(PATH, json=check)
    out = r.json()
    assert out["baseline"]["api_version"] == "2025-01-01"
    assert out["candidate"]["api_version"] == "2026-06-01"
    assert "text" in out["baseline"]["body"] and "choices" in out["candidate"]["body"]
    assert out["diff"]["output"]["changed"] is False  # same model: same text, new schema
    assert out["diff"]["status"]["changed"] is False


async def test_two_api_versions_by_path_prefix() -> None:
    app = build_app(FakeClock(at("2026-03-01")), path_prefix=True)
    check = {"path": "/v1/chat", "body": {"model": NEW},
             "baseline": {"api_version": "v1"}, "candidate": {"api_version": "v2"}}
    async with client(app) as c:
        r = await c.post(PATH, json=check)
    out = r.json()
    assert out["baseline"]["api_version"] == "v1" and "text" in out["baseline"]["body"]
    assert out["candidate"]["api_version"] == "v2" and "choices" in out["candidate"]["body"]


async def test_a_retired_side_shows_its_410() -> None:
    app = build_app(FakeClock(at("2026-08-01")))
    check = {"path": "/chat", "body": {}, "baseline": {"model": OLD},
             "candidate": {"model": NEW}}
    async with client(app) as c:
        r = await c.post(PATH, json=check)
    out = r.json()
    assert out["baseline"]["status"] == 410
    assert out["baseline"]["body"]["error"]["code"] == "model_retired"
    assert out["candidate"]["status"] == 200
    assert out["diff"]["status"] == {"baseline": 410, "candidate": 200, "changed": True}


async def test_bad_checks_are_typed_4xx_and_the_route_is_off_by_default() -> None:
    app = build_app(FakeClock(at("2026-03-01")))
    async with client(app) as c:
        missing = await c.post(PATH, json={"path": "/chat", "baseline": {"model": NEW}})
        empty_side = await c.post(PATH, json={"path": "/chat", "baseline": {},
                                              "candidate": {"model": NEW}})
        loop = await c.post(PATH, json={"path": PATH, "baseline": {"model": NEW},
                                        "candidate": {"model": NEW}})
        auth = await c.post(PATH, json={"path": "/chat", "headers": {"Authorization": "x"},
                                        "baseline": {"model": NEW}, "candidate": {"model": NEW}})
        not_json = await c.post(PATH, content=b"nope")
        get = await c.get(PATH)
    for r in (missing, empty_side, loop, auth, not_json):
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "validation_failed"
    assert get.status_code == 405
    async with client(build_app(FakeClock(at("2026-03-01")), migration=False)) as c:
        off = await c.post(PATH, json={"path": "/chat", "baseline": {"model": NEW},
                                       "candidate": {"model": NEW}})
    assert off.status_code == 404


def test_compare_is_pure_and_handles_missing_usage() -> None:
    base = {"status": 200, "usage": None, "estimated_cost": "0.0010", "output": "a",
            "finish_reason": "stop"}
    cand = {"status": 200, "usage": {"input_tokens": 3, "output_tokens": 2},
            "estimated_cost": "0.0004", "output": "a", "finish_reason": "stop"}
    diff = compare(base, cand)
    assert diff["usage"]["input_tokens"] == {"baseline": None, "candidate": 3, "delta": None}
    assert diff["estimated_cost"]["delta"] == "-0.0006"
    assert diff["output"] == {"changed": False, "similarity": 1.0, "diff": []}
    assert diff["finish_reason"]["changed"] is False


async def test_values_that_cannot_be_headers_are_a_422_not_a_500() -> None:
    app = build_app(FakeClock(at("2026-03-01")))
    sides = {"baseline": {"model": NEW}, "candidate": {"model": NEW}}
    checks = [
        {"path": "/chat", "headers": {"x-note": "\u2713"}, **sides},
        {"path": "/chat", "headers": {"x-note": "a\r\nx-injected: 1"}, **sides},
        {"path": "/chat?q=\u2713", **sides},
        {"path": "/chat", "baseline": {"api_version": "\u2713"}, "candidate": {"model": NEW}},
    ]
    async with client(app) as c:
        for check in checks:
            r = await c.post(PATH, json=check)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "validation_failed"


async def test_a_header_name_that_is_not_a_token_is_a_422() -> None:
    # RFC 9110 5.1: a field name is a token. A name with a space (or a colon, a tab) was
    # passed to the app in-process as it was, a header no server would have let through.
    app = build_app(FakeClock(at("2026-03-01")))
    sides = {"baseline": {"model": NEW}, "candidate": {"model": NEW}}
    async with client(app) as c:
        for name in ("x note", "x:note", "x\tnote", " x-note", "x-note ", ""):
            r = await c.post(PATH, json={"path": "/chat", "headers": {name: "1"}, **sides})
            assert r.status_code == 422, (name, r.text)
            problem = r.json()
            assert problem["error"]["code"] == "validation_failed"
            assert problem["error"]["param"] == "headers"
        ok = await c.post(PATH, json={"path": "/chat", "headers": {"X-Note_1.~": "1"}, **sides})
    assert ok.status_code == 200, ok.text


async def test_a_side_answering_json_nested_too_deep_is_shown_as_text() -> None:
    from starlette.requests import Request
    from starlette.responses import Response

    deep = b"[" * 100_000 + b"]" * 100_000

    async def nested(request: Request) -> Response:
        return Response(deep, media_type="text/plain")  # not read by the usage layer

    app = build_app(FakeClock(at("2026-03-01")))
    app.add_route("/nested", nested, methods=["POST"])
    async with client(app) as c:
        r = await c.post(PATH, json={"path": "/nested", "baseline": {"model": NEW},
                                     "candidate": {"model": NEW}})
    assert r.status_code == 200, r.text
    assert r.json()["baseline"]["body"] == deep.decode()
