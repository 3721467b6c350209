"""The examples run as users would run them: under a real uvicorn server."""

from __future__ import annotations

import httpx

from examples.app import app as fastapi_app
from examples.starlette_app import app as starlette_app
from tests.live_server import live_server


def test_fastapi_example_answers() -> None:
    with live_server(fastapi_app) as url:
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 200 and r.headers["x-request-id"]
        assert r.json()["object"] == "chat.completion"
        bad = httpx.post(
            url + "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"


def test_starlette_example_answers() -> None:
    with live_server(starlette_app) as url:
        assert httpx.post(url + "/classify", json={"text": "hello"}).json()["label"] == "short"
        r = httpx.post(url + "/classify", json={"text": ""})
        assert r.status_code == 400 and r.json()["error"]["param"] == "text"
        r = httpx.post(url + "/classify", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
        r = httpx.post(url + "/classify", content=b"x" * 70_000)
        assert r.status_code == 413
