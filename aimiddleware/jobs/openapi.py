"""The OpenAPI description of the jobs and batches routes (pure)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from aimiddleware.jobs.http import SubmitBatch, SubmitJob
from aimiddleware.jobs.models import Batch, BatchItemResult, Job
from aimiddleware.openapi import (
    IDEMPOTENCY_PARAMETER,
    component_schemas,
    fragment,
    json_body,
    json_response,
    problem_response,
    ref,
)

__all__ = ["openapi_paths"]


def openapi_paths(prefix: str = "", input_model: type[BaseModel] | None = None) -> dict[str, Any]:
    """The jobs and batches routes' OpenAPI path items and component schemas (pure).

    ``prefix``: what precedes ``/jobs``; ``input_model``: the schema of a job's ``input``."""
    components = {
        **component_schemas(SubmitJob, SubmitBatch, *([input_model] if input_model else ())),
        **component_schemas(Job, Batch, mode="serialization"),
    }
    if input_model is not None:  # validated at submission: required, of that shape
        for name in ("SubmitJob", "BatchItem"):
            components[name]["properties"]["input"] = ref(input_model.__name__)
            components[name]["required"] = sorted({*components[name].get("required", ()),
                                                   "input"})
    components["Batch"]["properties"]["results_url"] = {
        "type": ["string", "null"],
        "description": "Once the batch has ended: its JSON-lines results, relative to the "
        "batch's URL.",
    }
    paths: dict[str, Any] = {}
    for kind, model, body in (("job", "Job", "SubmitJob"), ("batch", "Batch", "SubmitBatch")):
        base = f"{prefix}/{kind}es" if kind == "batch" else f"{prefix}/{kind}s"
        item = f"{base}/{{id}}"
        id_param = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
                    "description": f"The {kind}'s id (`{kind}_...`)."}
        not_found = problem_response(f"No such {kind} for this caller.")
        paths[base] = {"post": {
            "summary": f"Submit a {kind}",
            "operationId": f"create_{kind}",
            "parameters": [IDEMPOTENCY_PARAMETER],
            "requestBody": json_body(ref(body)),
            "responses": {
                "202": json_response(f"Accepted: the {kind} is queued.", _accepted(kind), {
                    "location": {"required": True, "schema": {"type": "string"},
                                 "description": f"The {kind}'s URL."},
                }),
                "400": problem_response("Invalid body, input or callback URL."),
                "422": problem_response("The Idempotency-Key was used with another body."),
            },
        }}
        paths[item] = {
            "get": {"summary": f"Read a {kind}", "operationId": f"get_{kind}",
                    "parameters": [id_param],
                    "responses": {"200": json_response(f"The {kind}.", ref(model)),
                                  "404": not_found}},
            "delete": {"summary": f"Cancel a {kind} (idempotent)",
                       "operationId": f"cancel_{kind}", "parameters": [id_param],
                       "responses": {"200": json_response(f"The {kind}, cancelled or as it "
                                                          "ended.", ref(model)),
                                     "404": not_found}},
        }
        paths[f"{item}/events"] = {"get": {
            "summary": f"The {kind}'s events, replayed then followed (SSE)",
            "operationId": f"stream_{kind}_events",
            "parameters": [
                id_param,
                {"name": "Last-Event-ID", "in": "header", "required": False,
                 "schema": {"type": "string"}, "description": "Resume after this event."},
                {"name": "after", "in": "query", "required": False,
                 "schema": {"type": "string"}, "description": "Last-Event-ID, as a query."},
            ],
            "responses": {
                "200": {
                    "description": f"`{kind}.*` events; the final one carries the whole {kind}.",
                    "content": {"text/event-stream": {"itemSchema": _event(kind)}},
                },
                "204": {"description": "Resumed at or past the final event: nothing more."},
                "404": not_found,
            },
        }}
    paths[f"{prefix}/batches/{{id}}/results"] = {"get": {
        "summary": "A batch's results, one JSON line per finished item",
        "operationId": "get_batch_results",
        "parameters": list(paths[f"{prefix}/batches/{{id}}"]["get"]["parameters"]),
        "responses": {
            "200": {
                "description": "JSON lines `{custom_id, type, output, error}`.",
                "content": {"application/jsonl": {
                    "schema": {"type": "string"}, "itemSchema": ref("BatchItemResult"),
                }},
            },
            "404": problem_response("No such batch for this caller."),
        },
    }}
    components.update(component_schemas(BatchItemResult, mode="serialization"))
    return fragment(paths, components)


def _accepted(kind: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "status", "object"],
        "properties": {"id": {"type": "string"}, "status": {"type": "string"},
                       "object": {"const": kind}},
    }


def _event(kind: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string", "pattern": rf"^({kind}\.[a-z_]+|error)$"},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": {"type": "object"}},
            "id": {"type": "string"},
        },
    }
