from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import http_sfv
import httpx
import openai
import pytest
from fastapi import FastAPI
from starlette.responses import StreamingResponse

from aimiddleware import (
    DeprecatedCall,
    DeprecationMonitor,
    RequestContextMiddleware,
    StackConfig,
    VersioningConfig,
    VersioningMiddleware,
    current,
    install,
)
from aimiddleware.headers import parse_http_date
from aimiddleware.storage import Storage
from aimiddleware.types import Message
from tests.versioning_app import NEW, OLD, FakeClock, at, build_app, make_registry, serve

NOW = "2026-03-01"


def principal_of(key: str) -> str:
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:32]


def client(app: Any, key: str = "sk-test") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://test",
        headers={"authorization": f"Bearer {key}"},
    )


def sf_date(value: str) -> datetime:
    item = http_sfv.Item()
    item.parse(value.encode())
    assert isinstance(item.value, datetime)
    return item.value.replace(tzinfo=UTC)


async def test_alias_is_resolved_and_echoed_without_deprecation() -> None:
    async with client(build_app(FakeClock(at(NOW)))) as c:
        r = await c.post("/chat", json={"model": "my-model"})
    assert r.status_code == 200
    assert r.headers["x-model"] == "my-model"
    assert r.headers["x-model-version"] == NEW
    assert r.headers["x-api-version"] == "2026-06-01"
    assert "deprecation" not in r.headers and "sunset" not in r.headers
    body = r.json()
    assert (body["model"], body["model_version"]) == ("my-model", NEW)


async def test_deprecated_snapshot_headers_parse_as_structured_fields_and_dates() -> None:
    async with client(build_app(FakeClock(at(NOW)))) as c:
        r = await c.post("/chat", json={"model": OLD})
    assert r.status_code == 200 and r.headers["x-model-version"] == OLD
    deprecation = sf_date(r.headers["deprecation"])  # RFC 9745: an sf-date Item
    sunset = parse_http_date(r.headers["sunset"])  # RFC 8594: an HTTP-date
    assert deprecation == at("2026-01-01") and sunset == at("2026-07-01")
    assert sunset >= deprecation
    assert r.headers["sunset"] == "Wed, 01 Jul 2026 00:00:00 GMT"  # IMF-fixdate exactly
    links = r.links
    assert links["deprecation"]["url"].startswith("https://docs.example/deprecations")
    assert links["sunset"]["url"] == "https://docs.example/sunset-policy"
    assert links["successor-version"]["url"] == f"https://docs.example/models/{NEW}"


async def test_410_after_sunset_names_the_replacement() -> None:
    clock = FakeClock(at(NOW))
    app = build_app(clock)
    async with client(app) as c:
        assert (await c.post("/chat", json={"model": OLD})).status_code == 200
        clock.now = at("2026-07-01T00:00:01")
        r = await c.post("/chat", json={"model": OLD})
        still = await c.post("/chat", json={"model": "my-model"})
    assert r.status_code == 410
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["error"]["code"] == "model_retired" and body["replacement"] == NEW
    assert NEW in body["detail"] and body["retryable"] is False
    assert r.headers["x-should-retry"] == "false"
    assert parse_http_date(r.headers["sunset"]) == at("2026-07-01")
    assert sf_date(r.headers["deprecation"]) == at("2026-01-01")
    assert r.links["successor-version"]["url"].endswith(NEW)
    assert still.status_code == 200 and still.headers["x-model-version"] == NEW


async def test_one_endpoint_two_schemas_by_api_version_header() -> None:
    async with client(build_app(FakeClock(at(NOW)))) as c:
        v1 = await c.post("/chat", json={"model": NEW}, headers={"x-api-version": "2025-01-01"})
        v2 = await c.post("/chat", json={"model": NEW}, headers={"x-api-version": "2026-06-01"})
    assert v1.json() == {"model": NEW, "text": f"Hello from {NEW}!", "tokens": 16}
    assert "choices" in v2.json() and "text" not in v2.json()
    assert v1.headers["x-api-version"] == "2025-01-01"
    assert sf_date(v1.headers["deprecation"]) == at("2026-02-01")  # the version is deprecated
    assert "deprecation" not in v2.headers


@pytest.mark.parametrize("value", ["2027-01-01", "banana", "2026-13-01"])
async def test_unknown_or_malformed_version_is_400_listing_supported(value: str) -> None:
    async with client(build_app(FakeClock(at(NOW)))) as c:
        r = await c.post("/chat", json={"model": NEW}, headers={"x-api-version": value})
    assert r.status_code == 400
    body = r.json()
    assert body["error"]["code"] == "unsupported_api_version"
    assert body["supported_versions"] == ["2025-01-01", "2026-06-01"]
    assert "2025-01-01, 2026-06-01" in body["detail"]


async def test_per_principal_default_pin() -> None:
    legacy = principal_of("sk-legacy")
    app = build_app(FakeClock(at(NOW)), pins={legacy: "2025-01-01"})
    async with client(app, "sk-legacy") as old, client(app, "sk-new") as new:
        pinned = await old.post("/chat", json={"model": NEW})
        override = await old.post("/chat", json={"model": NEW},
                                  headers={"x-api-version": "2026-06-01"})
        default = await new.post("/chat", json={"model": NEW})
    assert pinned.headers["x-api-version"] == "2025-01-01" and "text" in pinned.json()
    assert override.headers["x-api-version"] == "2026-06-01"
    assert default.headers["x-api-version"] == "2026-06-01" and "choices" in default.json()


async def test_path_prefix_versions_share_one_endpoint() -> None:
    app = build_app(FakeClock(at(NOW)), path_prefix=True)
    async with client(app) as c:
        v1 = await c.post("/v1/chat", json={"model": NEW})
        v2 = await c.post("/v2/chat", json={"model": NEW})
        bad = await c.post("/v9/chat", json={"model": NEW})
        who = await c.get("/v1/whoami", headers={"x-model": "latest"})
    assert "text" in v1.json() and "choices" in v2.json()
    assert v1.headers["api-version"] == "v1" and v2.headers["api-version"] == "v2"
    assert v1.links["successor-version"]["url"] == "https://docs.example/v2"
    assert bad.status_code == 400 and bad.json()["supported_versions"] == ["v1", "v2"]
    assert who.json() == {"api_version": "v1", "model": "latest", "path": "/v1/whoami"}
    assert who.headers["x-model-version"] == NEW


async def test_unknown_and_invalid_models() -> None:
    async with client(build_app(FakeClock(at(NOW)))) as c:
        unknown = await c.post("/chat", json={"model": "gpt-17"})
        wrong_type = await c.post("/chat", json={"model": 42})
        no_model = await c.get("/whoami")
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "model"
    assert no_model.status_code == 200 and no_model.json()["model"] is None
    assert "x-model-version" not in no_model.headers


async def test_a_method_without_a_body_is_routed_before_its_body_is_read_for_a_model() -> None:
    # A GET (or TRACE) carrying {"model": "nope"} was a 404 "model does not exist" before the
    # app could answer 405; only POST, PUT and PATCH name a model in their body.
    async with client(build_app(FakeClock(at(NOW)))) as c:
        wrong_method = await c.request("GET", "/chat", json={"model": "gpt-17"})
        read = await c.request("GET", "/whoami", json={"model": "gpt-17"})
        put = await c.request("PUT", "/chat", json={"model": "gpt-17"})
    assert wrong_method.status_code == 405
    assert read.status_code == 200 and read.json()["model"] is None
    assert put.status_code == 404 and put.json()["error"]["param"] == "model"


async def test_deprecated_calls_are_counted_per_principal_and_hooked(storage: Storage) -> None:
    seen: list[DeprecatedCall] = []
    monitor = DeprecationMonitor(storage, hook=seen.append)
    app = build_app(FakeClock(at(NOW)), monitor=monitor)
    async with client(app, "sk-a") as a, client(app, "sk-b") as b:
        await a.post("/chat", json={"model": OLD})
        await a.post("/chat", json={"model": OLD}, headers={"x-api-version": "2025-01-01"})
        await a.post("/chat", json={"model": NEW})
        await b.post("/chat", json={"model": "my-model"})
    assert await monitor.counts(principal_of("sk-a")) == {
        f"model:{OLD}": 2,
        "api_version:2025-01-01": 1,
    }
    assert await monitor.counts(principal_of("sk-b")) == {}
    assert [(c.kind, c.name) for c in seen] == [
        ("model", OLD), ("api_version", "2025-01-01"), ("model", OLD),
    ]
    assert seen[0].replacement == NEW and seen[0].request_id


async def test_models_route() -> None:
    async with client(build_app(FakeClock(at(NOW)))) as c:
        r = await c.get("/v1/models")
        post = await c.post("/v1/models")
    assert r.status_code == 200 and r.json()["object"] == "list"
    by_id = {m["id"]: m for m in r.json()["data"]}
    assert by_id[OLD]["shutdown_date"] == "2026-07-01"
    assert by_id["latest"]["alias_for"] == NEW
    assert post.status_code == 405


async def test_streaming_response_gets_headers_on_the_single_start() -> None:
    clock = FakeClock(at(NOW))
    app = FastAPI()

    @app.post("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {i}\n\n".encode()

        return StreamingResponse(chunks(), media_type="text/event-stream")

    wrapped = RequestContextMiddleware(
        VersioningMiddleware(app, registry=make_registry(clock))
    )
    sent: list[Message] = []
    body = b'{"model": "%s"}' % OLD.encode()
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/stream", "raw_path": b"/stream", "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("test", 80),
    }
    await wrapped(scope, receive, send)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    bodies = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
    assert len(starts) == 1
    headers = dict(starts[0]["headers"])
    assert headers[b"x-model-version"] == OLD.encode() and headers[b"deprecation"]
    assert len(bodies) == 3  # still streamed chunk by chunk


def test_configuration_errors() -> None:
    app = FastAPI()
    with pytest.raises(ValueError, match="versions, a registry"):
        VersioningMiddleware(app)
    registry = make_registry(FakeClock(at(NOW)))
    with pytest.raises(ValueError, match="start with"):
        VersioningMiddleware(app, registry=registry, models_path="models")
    for root in ("/", "//"):  # every GET under it would be a model id
        with pytest.raises(ValueError, match="must name a path"):
            VersioningMiddleware(app, registry=registry, models_path=root)
    with pytest.raises(ValueError, match="model_field or model_header"):
        VersioningMiddleware(app, registry=registry, model_field=None, model_header=None)
    with pytest.raises(TypeError):
        VersioningMiddleware(app, registry="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        VersioningMiddleware(app, registry=registry, monitor=DeprecationMonitor(),
                             storage="memory://")


def test_openai_sdk_against_a_real_server() -> None:
    """The official SDK lists the models, sees the headers, and gets a 410 after sunset."""
    clock = FakeClock(at(NOW))
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(body: dict[str, Any]) -> dict[str, Any]:
        ctx = current()
        return {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0,
            "model": ctx.model_version,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }

    install(app, StackConfig(versioning=VersioningConfig(
        registry=make_registry(clock), models_path="/v1/models")))
    with serve(app) as url:
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
        ids = {m.id for m in sdk.models.list()}
        assert ids == {OLD, NEW, "my-model", "latest"}
        one = sdk.models.retrieve(OLD)  # GET /v1/models/{id}: the list's entry
        assert one.id == OLD and one.model_dump() == next(
            m.model_dump() for m in sdk.models.list() if m.id == OLD)
        assert sdk.models.retrieve("latest").id == "latest"
        with pytest.raises(openai.NotFoundError):
            sdk.models.retrieve("no-such-model")
        raw = sdk.chat.completions.with_raw_response.create(
            model=OLD, messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.parse().model == OLD
        assert sf_date(raw.headers["deprecation"]) == at("2026-01-01")
        clock.now = at("2026-08-01")
        with pytest.raises(openai.APIStatusError) as exc:
            sdk.chat.completions.create(model=OLD, messages=[{"role": "user", "content": "hi"}])
        assert exc.value.status_code == 410
        assert isinstance(exc.value.body, dict)
        assert exc.value.body["code"] == "model_retired"


async def test_path_prefix_under_a_root_path_and_vary() -> None:
    app = build_app(FakeClock(at(NOW)), path_prefix=True)
    transport = httpx.ASGITransport(app=app, root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        who = await c.get("/api/v1/whoami")
    assert who.status_code == 200 and who.json()["api_version"] == "v1"
    async with client(build_app(FakeClock(at(NOW)))) as c:
        r = await c.post("/chat", json={"model": NEW})
    assert "x-api-version" in r.headers.get_list("vary")


async def test_registry_changes_after_traffic_are_seen_and_clock_is_read_only_when_needed() -> None:
    clock = FakeClock(at(NOW))
    reads = 0

    def counting() -> datetime:
        nonlocal reads
        reads += 1
        return clock()

    registry = make_registry(clock)
    registry.add_snapshot("my-model-2026-09-01")
    app = FastAPI()

    @app.post("/chat")
    async def chat() -> dict[str, Any]:
        return {"model_version": current().model_version}

    install(app, StackConfig(versioning=VersioningConfig(registry=registry, clock=counting)))
    async with client(app) as c:
        first = await c.post("/chat", json={"model": "my-model"})
        assert reads == 0  # an active snapshot never needs the time
        registry.alias("my-model", "my-model-2026-09-01")
        moved = await c.post("/chat", json={"model": "my-model"})
        registry.deprecate(NEW, deprecated="2026-02-01", sunset="2026-04-01")
        pinned = await c.post("/chat", json={"model": NEW})
        clock.now = at("2026-04-02")
        retired = await c.post("/chat", json={"model": NEW})
    assert first.headers["x-model-version"] == NEW and "deprecation" not in first.headers
    assert moved.headers["x-model-version"] == "my-model-2026-09-01"
    assert moved.json()["model_version"] == "my-model-2026-09-01"
    assert parse_http_date(pinned.headers["sunset"]) == at("2026-04-01")
    assert sf_date(pinned.headers["deprecation"]) == at("2026-02-01")
    assert retired.status_code == 410 and reads >= 2


async def test_headers_the_endpoint_set_itself_are_kept_once() -> None:
    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"X-Model", b"mine"), (b"vary", b"accept"), (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    clock = FakeClock(at(NOW))
    from tests.versioning_app import make_versions

    wrapped = RequestContextMiddleware(
        VersioningMiddleware(endpoint, registry=make_registry(clock), versions=make_versions(clock))
    )
    async with client(wrapped) as c:
        r = await c.post("/chat", json={"model": "my-model"})
    assert r.headers.get_list("x-model") == ["mine"]
    assert r.headers["x-model-version"] == NEW
    assert r.headers.get_list("vary") == ["accept", "x-api-version"]


async def test_a_migration_path_under_the_models_path_is_still_the_migration_check() -> None:
    # GET {models_path}/{id} made the whole subtree the models route's: the migration check
    # at /v1/models/migration-check answered 405 (allow: GET) to every POST.
    app = FastAPI()
    install(app, StackConfig(versioning=VersioningConfig(
        registry=make_registry(FakeClock(at(NOW))), models_path="/v1/models",
        migration_path="/v1/models/migration-check")))
    async with client(app) as c:
        check = await c.post("/v1/models/migration-check", json={"path": "/v1/models"})
        one = await c.get(f"/v1/models/{OLD}")
    assert check.status_code == 422, check.text
    assert check.json()["error"]["param"] in {"baseline", "candidate"}
    assert one.status_code == 200 and one.json()["id"] == OLD


async def test_other_methods_under_the_models_path_are_the_apps() -> None:
    # Only GET {models_path}/{id} is the models route's: the app's own DELETE /v1/models/{id}
    # (OpenAI's, for a fine-tuned model) answered 405 (allow: GET) once that route came.
    app = FastAPI()

    @app.delete("/v1/models/{model_id}")
    async def delete_model(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "deleted": True, "by": current().principal}

    install(app, StackConfig(versioning=VersioningConfig(
        registry=make_registry(FakeClock(at(NOW))), models_path="/v1/models")))
    async with client(app) as c:
        deleted = await c.delete("/v1/models/ft:my-model:org:abc")
        listed = await c.post("/v1/models")
        one = await c.get(f"/v1/models/{OLD}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["deleted"] is True and deleted.json()["by"] == principal_of("sk-test")
    assert listed.status_code == 405  # (the list itself is still GET only)
    assert one.status_code == 200 and one.json()["id"] == OLD
