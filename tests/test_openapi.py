"""The OpenAPI document describes what the stack adds."""

from __future__ import annotations

import copy
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import BaseModel

import aimiddleware
from aimiddleware.openapi import PROBLEM_SCHEMA, patch_openapi


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
