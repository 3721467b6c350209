"""The OpenAPI document describes what the stack adds."""

from __future__ import annotations

import copy
import re
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import aimiddleware
from aimiddleware import (
    IdempotencyConfig,
    ModelRegistry,
    Policy,
    StackConfig,
    UsageRoutes,
    VersioningConfig,
)
from aimiddleware.errors import InvalidRequest
from aimiddleware.idempotency.key import MAX_KEY_LENGTH, parse_key
from aimiddleware.jobs import JobsRouter
from aimiddleware.openapi import (
    IDEMPOTENCY_PARAMETER,
    PROBLEM_SCHEMA,
    SECURITY,
    add_paths,
    merge_paths,
    patch_openapi,
)
from aimiddleware.versioning.openapi import openapi_paths as versioning_paths


class Item(BaseModel):
    name: str


def make_app() -> FastAPI:
    app = FastAPI()

    @app.post("/items")
    async def create(item: Item) -> dict[str, Any]:
        return {"name": item.name}

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        return {"id": item_id}

    return app


def test_patch_adds_problem_errors_headers_and_idempotency() -> None:
    schema = patch_openapi(copy.deepcopy(make_app().openapi()))
    assert schema["components"]["schemas"]["Problem"] == PROBLEM_SCHEMA
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    post = schema["paths"]["/items"]["post"]
    assert post["responses"]["422"]["content"] == {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
    }
    assert "retry-after" in post["responses"]["429"]["headers"]
    assert "x-ratelimit-remaining-tokens" in post["responses"]["200"]["headers"]
    assert "application/problem+json" in post["responses"]["default"]["content"]
    assert [p["name"] for p in post["parameters"]] == ["Idempotency-Key"]
    get = schema["paths"]["/items/{item_id}"]["get"]
    assert all(p["name"] != "Idempotency-Key" for p in get["parameters"])


def test_patch_is_idempotent_and_optional_parts_can_be_off() -> None:
    once = patch_openapi(
        copy.deepcopy(make_app().openapi()), rate_limit_headers=False, idempotency_methods=()
    )
    twice = patch_openapi(copy.deepcopy(once), rate_limit_headers=False, idempotency_methods=())
    assert once == twice
    post = once["paths"]["/items"]["post"]
    assert "parameters" not in post
    assert "x-ratelimit-limit-requests" not in post["responses"]["200"]["headers"]


async def test_installed_app_serves_the_patched_document() -> None:
    app = aimiddleware.install(make_app())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        doc = (await c.get("/openapi.json")).json()
        bad = await c.post("/items", json={"name": 3})
    assert "Problem" in doc["components"]["schemas"]
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"


def test_exempt_paths_promise_no_rate_limit_headers_and_keyed_operations_document_conflicts(
) -> None:
    # Routes the limiter skips were documented with rate-limit headers and a 429 they never
    # send; a keyed operation's 409 (with Retry-After) and 400 were undocumented.
    schema = patch_openapi(
        copy.deepcopy(make_app().openapi()), rate_limit_exempt=["/items/*"],
        usage_headers=True, version_headers=True,
    )
    post, get = schema["paths"]["/items"]["post"], schema["paths"]["/items/{item_id}"]["get"]
    assert "x-ratelimit-remaining-requests" in post["responses"]["200"]["headers"]
    assert "x-ratelimit-remaining-requests" not in get["responses"]["200"]["headers"]
    assert "429" in post["responses"] and "429" not in get["responses"]
    assert "retry-after" in post["responses"]["409"]["headers"]
    assert "400" in post["responses"] and "409" not in get["responses"]
    assert "idempotent-replayed" in post["responses"]["200"]["headers"]
    for name in ("x-usage-total-tokens", "x-usage-estimated-cost", "api-version", "sunset"):
        assert name in get["responses"]["200"]["headers"]


@settings(max_examples=300, deadline=None)
@given(st.from_regex(IDEMPOTENCY_PARAMETER["schema"]["pattern"], fullmatch=True))  # type: ignore[index]
def test_every_key_the_schema_allows_is_accepted(key: str) -> None:
    # The schema said only maxLength 257: an empty key, a bare key with a space or a tab,
    # or 256 characters were valid by the schema and a 400 on the wire.
    assert 1 <= len(parse_key(key)) <= MAX_KEY_LENGTH


@pytest.mark.parametrize("key", ["", "a b", "a\tb", "x" * 256, '"unclosed', '"a\\x"', '""'])
def test_keys_the_server_refuses_are_outside_the_schema(key: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_key(key)
    assert re.fullmatch(IDEMPOTENCY_PARAMETER["schema"]["pattern"], key) is None  # type: ignore[index]


# -- routes FastAPI cannot see: openapi_paths() fragments ---------------------------------


class SummaryInput(BaseModel):
    text: str


async def _job(ctx: Any, input: Any) -> Any:
    return input


def _refs(value: Any) -> set[str]:
    if isinstance(value, dict):
        found = {value["$ref"]} if isinstance(value.get("$ref"), str) else set()
        return found.union(*(_refs(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_refs(v) for v in value))
    return set()


def _resolvable(doc: dict[str, Any]) -> bool:
    names = set(doc.get("components", {}).get("schemas", {}))
    return {r.removeprefix("#/components/schemas/") for r in _refs(doc)} <= names


def test_usage_routes_document_their_paths_parameters_and_bodies() -> None:
    doc = UsageRoutes(count_tokens_path="/count").openapi_paths(prefix="/v1")
    paths = doc["paths"]
    assert set(paths) == {"/v1/usage", "/v1/usage/requests/{request_id}", "/v1/count",
                          "/v1/feedback"}
    usage = paths["/v1/usage"]["get"]
    assert [p["name"] for p in usage["parameters"]] == ["start", "end", "model"]
    assert usage["parameters"][0]["schema"]["format"] == "date"
    feedback = paths["/v1/feedback"]["post"]
    assert "201" in feedback["responses"] and "200" not in feedback["responses"]
    body = feedback["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["request_id", "rating"] and "created" not in body["properties"]
    record = doc["components"]["schemas"]["UsageRecord"]  # as answered: no identity
    assert "principal" not in record["properties"] and "principal" not in record["required"]
    assert _resolvable(doc)


def test_jobs_router_documents_status_codes_content_types_and_its_input_model() -> None:
    jobs = JobsRouter(_job, prefix="/v1", input_model=SummaryInput)
    doc = jobs.openapi_paths()
    paths, schemas = doc["paths"], doc["components"]["schemas"]
    assert set(paths) == {"/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/events", "/v1/batches",
                          "/v1/batches/{id}", "/v1/batches/{id}/events",
                          "/v1/batches/{id}/results"}
    submit = paths["/v1/jobs"]["post"]
    assert submit["responses"]["202"]["headers"]["location"]["required"] is True
    assert [p["name"] for p in submit["parameters"]] == ["Idempotency-Key"]
    assert schemas["SubmitJob"]["properties"]["input"] == {
        "$ref": "#/components/schemas/SummaryInput"}
    assert all("input" in schemas[name]["required"] for name in ("SubmitJob", "BatchItem"))
    assert set(paths["/v1/jobs/{id}"]) == {"get", "delete"}
    events = paths["/v1/jobs/{id}/events"]["get"]
    assert {p["name"] for p in events["parameters"]} == {"id", "Last-Event-ID", "after"}
    assert "204" in events["responses"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    results = paths["/v1/batches/{id}/results"]["get"]["responses"]["200"]["content"]
    assert list(results) == ["application/jsonl"]
    assert "results_url" in schemas["Batch"]["properties"]  # added by Batch.public()
    assert "principal" not in schemas["Job"]["properties"]
    assert _resolvable(doc)
    # Mounted under a prefix, without an input model.
    mounted = JobsRouter(_job).openapi_paths(prefix="/api")
    assert "/api/jobs/{id}" in mounted["paths"] and "SummaryInput" not in str(mounted)


def test_versioning_paths_follow_the_configured_helper_routes() -> None:
    assert versioning_paths()["paths"] == {}
    models = versioning_paths(models_path="/v1/models/")
    assert set(models["paths"]) == {"/v1/models/", "/v1/models/{model}"}
    both = versioning_paths("/models", "/check")
    check = both["paths"]["/check"]["post"]
    assert check["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/MigrationRequest"}
    assert "MigrationSide" in both["components"]["schemas"] and _resolvable(both)


def test_merge_keeps_the_apps_operations_and_renames_clashing_components() -> None:
    schema = {
        "paths": {"/jobs": {"post": {"summary": "the app's own"}}},
        "components": {"schemas": {"Job": {"type": "string"}}},
    }
    fragment = JobsRouter(_job).openapi_paths()
    merged = merge_paths(copy.deepcopy(schema), fragment)
    assert merged["paths"]["/jobs"]["post"] == {"summary": "the app's own"}
    assert merged["components"]["schemas"]["Job"] == {"type": "string"}
    get = merged["paths"]["/jobs/{id}"]["get"]["responses"]["200"]
    assert get["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/aimiddleware.Job"}
    assert _resolvable(merged)
    assert merge_paths(copy.deepcopy(merged), fragment) == merged  # idempotent


async def test_installed_app_documents_the_library_routes_with_the_stack_additions() -> None:
    app = make_app()
    usage, jobs = UsageRoutes(), JobsRouter(_job)
    app.router.routes.extend([*usage.routes, *jobs.routes])
    add_paths(app, usage.openapi_paths(), jobs.openapi_paths())
    registry = ModelRegistry()
    registry.add_snapshot("m-2026-01-01")
    aimiddleware.install(app, StackConfig(
        idempotency=IdempotencyConfig(), ratelimit_exempt=("/jobs/*",), ratelimit=Policy(
            requests="100/minute"),
        versioning=VersioningConfig(registry=registry, models_path="/models",
                                    migration_path="/migration-check"),
    ))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        doc = (await c.get("/openapi.json")).json()
        models = (await c.get("/models")).json()
    paths = doc["paths"]
    for path in ("/items", "/usage", "/feedback", "/jobs", "/jobs/{id}/events", "/models",
                 "/models/{model}", "/migration-check"):
        assert path in paths, path
    submit = paths["/jobs"]["post"]  # the stack's additions reach the library's operations
    assert [p["name"] for p in submit["parameters"]] == ["Idempotency-Key"]  # (once)
    assert {"409", "429", "default"} <= set(submit["responses"])
    assert "x-request-id" in submit["responses"]["202"]["headers"]
    assert "429" not in paths["/jobs/{id}"]["get"]["responses"]  # rate-limit exempt
    assert paths["/feedback"]["post"]["responses"]["422"]["content"] == {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert paths["/usage"]["get"]["security"] == SECURITY
    assert _resolvable(doc)
    assert {m["id"] for m in models["data"]} == {"m-2026-01-01"}
    entry = doc["components"]["schemas"]["Model"]
    assert set(entry["required"]) <= set(models["data"][0])
