"""The versioning layer's helper routes (models list, migration check) as OpenAPI paths.

The layer answers them itself, before the app's routing, so FastAPI cannot document them;
``install()`` merges :func:`openapi_paths` of its configuration into the app's document.
"""

from __future__ import annotations

from typing import Any

from aimiddleware.openapi import (
    component_schemas,
    fragment,
    json_body,
    json_response,
    problem_response,
    ref,
)
from aimiddleware.versioning.migration import MigrationRequest

__all__ = ["openapi_paths"]

_DAY = {"type": ["string", "null"], "description": "YYYY-MM-DD, or null."}
_MODEL: dict[str, Any] = {
    "title": "Model",
    "description": "OpenAI's model object plus its lifecycle. A snapshot lists its `aliases`; "
    "an alias names its snapshot in `alias_for`.",
    "type": "object",
    "required": ["id", "object", "created", "owned_by", "status"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
        "status": {"type": "string", "description": "active, deprecated or retired."},
        "deprecation_date": _DAY,
        "shutdown_date": _DAY,
        "replacement": {"type": ["string", "null"]},
        "aliases": {"type": "array", "items": {"type": "string"}},
        "alias_for": {"type": "string"},
    },
}
_SIDE = {
    "type": "object",
    "description": "One side's answer, as the caller would have had it.",
    "required": ["status", "headers", "body"],
    "properties": {
        "status": {"type": "integer"},
        "model": {"type": ["string", "null"]},
        "model_version": {"type": ["string", "null"]},
        "api_version": {"type": ["string", "null"]},
        "usage": {"type": ["object", "null"]},
        "estimated_cost": {"type": ["string", "null"]},
        "finish_reason": {"type": ["string", "null"]},
        "output": {"type": ["string", "null"]},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "body": {},
    },
}
_MIGRATION_RESULT: dict[str, Any] = {
    "title": "MigrationCheck",
    "type": "object",
    "required": ["object", "method", "path", "baseline", "candidate", "diff"],
    "properties": {
        "object": {"const": "migration_check"},
        "method": {"type": "string"},
        "path": {"type": "string"},
        "baseline": _SIDE,
        "candidate": _SIDE,
        "diff": {
            "type": "object",
            "description": "Status, usage and cost deltas, finish_reason change, output "
            "similarity and unified diff.",
            "required": ["status", "usage", "estimated_cost", "finish_reason", "output"],
        },
    },
}


def openapi_paths(
    models_path: str | None = None, migration_path: str | None = None
) -> dict[str, Any]:
    """The OpenAPI path items of the helper routes turned on (pure): ``GET models_path``,
    ``GET models_path/{model}`` and ``POST migration_path``, with their schemas."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    if models_path is not None:
        schemas["Model"] = _MODEL
        schemas["ModelList"] = {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"},
                           "data": {"type": "array", "items": ref("Model")}},
        }
        paths[models_path] = {"get": {
            "summary": "List the models: snapshots and aliases, with their lifecycle",
            "operationId": "list_models",
            "responses": {"200": json_response("The models.", ref("ModelList"))},
        }}
        paths[models_path.rstrip("/") + "/{model}"] = {"get": {
            "summary": "One model (a snapshot or an alias)",
            "operationId": "retrieve_model",
            "parameters": [{"name": "model", "in": "path", "required": True,
                            "schema": {"type": "string"}, "description": "The model id."}],
            "responses": {
                "200": json_response("The model.", ref("Model")),
                "404": problem_response("No such model."),
            },
        }}
    if migration_path is not None:
        schemas.update(component_schemas(MigrationRequest))
        schemas["MigrationCheck"] = _MIGRATION_RESULT
        paths[migration_path] = {"post": {
            "summary": "Run one request against two snapshots or API versions, side by side",
            "operationId": "migration_check",
            "requestBody": json_body(ref("MigrationRequest")),
            "responses": {
                "200": json_response("Both answers and their differences.",
                                     ref("MigrationCheck")),
                "422": problem_response("Invalid migration check."),
            },
        }}
    return fragment(paths, schemas)
