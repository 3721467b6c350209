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
from aimiddleware.errors import InvalidRequest
from aimiddleware.idempotency.key import MAX_KEY_LENGTH, parse_key
from aimiddleware.openapi import IDEMPOTENCY_PARAMETER, PROBLEM_SCHEMA, patch_openapi


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
