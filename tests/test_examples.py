"""The small examples run as users would run them: under a real uvicorn server."""

from __future__ import annotations

import httpx

from examples.decorators_app import app as decorators_app
from examples.existing_app import app as existing_app
from examples.starlette_app import app as starlette_app
from tests.live_server import live_server


def test_existing_app_gets_the_stack_in_a_few_lines() -> None:
    with live_server(existing_app) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": []})
        assert r.status_code == 200 and r.headers["x-request-id"]
        assert r.headers["x-ratelimit-limit-requests"] == "60"
        assert r.headers["x-usage-total-tokens"] == "6"
        bad = httpx.post(
            url + "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}
        )
        assert bad.status_code in (400, 422)
        assert bad.headers["content-type"] == "application/problem+json"


def test_starlette_app_with_the_middleware_added_directly() -> None:
    with live_server(starlette_app) as url:
        assert httpx.post(url + "/classify", json={"text": "hello"}).json()["label"] == "short"
        r = httpx.post(url + "/classify", json={"text": ""})
        assert r.status_code == 400 and r.json()["error"]["param"] == "text"
        r = httpx.post(url + "/classify", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
        r = httpx.post(url + "/classify", content=b"x" * 70_000)
        assert r.status_code == 413
        for r, status in ((httpx.get(url + "/classify"), 405), (httpx.get(url + "/nope"), 404)):
            assert r.status_code == status  # (the router's own answers, as problem+json)
            assert r.headers["content-type"] == "application/problem+json"


def test_decorators_on_a_plain_starlette_app() -> None:
    with live_server(decorators_app) as url:
        headers = {"idempotency-key": "k1", "authorization": "Bearer a"}
        first = httpx.post(url + "/summarize", json={"text": "hello world"}, headers=headers)
        again = httpx.post(url + "/summarize", json={"text": "hello world"}, headers=headers)
        assert first.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert first.headers["x-ratelimit-limit-requests"] == "5"
        statuses = [
            httpx.post(
                url + "/summarize", json={"text": str(i)}, headers={"authorization": "Bearer a"}
            ).status_code
            for i in range(6)
        ]
        assert statuses[-1] == 429
        env = httpx.post(url + "/answer", json={"question": "why?"}).json()
        assert env["finish_reason"] == "stop" and env["raw_finish_reason"] == "end_turn"
        assert env["usage"]["output_tokens"] == 4 and env["request_id"]
        missing = httpx.post(url + "/nope", json={})
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        old = httpx.post(url + "/v1/classify", json={})
        assert (
            old.headers["deprecation"].startswith("@")
            and "successor-version" in old.headers["link"]
        )
