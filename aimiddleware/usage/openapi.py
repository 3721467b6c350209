"""The OpenAPI description of the usage routes (pure)."""

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
from aimiddleware.usage.records import TOKEN_FIELDS, Feedback, RequestRecord, UsageAggregate

__all__ = ["openapi_paths"]

_INT = {"type": "integer"}
_USAGE_LIST = {
    "type": "object",
    "required": ["object", "data", "totals"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": ref("UsageAggregate")},
        "totals": {
            "type": "object",
            "properties": {
                "requests": _INT,
                **dict.fromkeys(TOKEN_FIELDS, _INT),
                "estimated_cost": {"type": "string", "description": "A decimal."},
                "unpriced_requests": _INT,
            },
        },
    },
}
_COUNT_REQUEST = {
    "type": "object",
    "description": "A request as it would be sent to the model: OpenAI Chat (`messages`, "
    "`tools`), Anthropic Messages (`system`, `messages`), Responses (`input`, "
    "`instructions`), Gemini (`contents`) or a legacy `prompt`.",
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "messages": {"type": "array", "items": {"type": "object", "properties": {
            "role": {"type": "string"},
            "content": {"type": ["string", "array", "null"], "items": {"type": "object"}},
        }}},
        "tools": {"type": "array", "items": {"type": "object"}},
        "system": {"type": ["string", "array"], "items": {"type": "object"}},
        "input": {"type": ["string", "array"]},
        "instructions": {"type": "string"},
        "contents": {"type": "array", "items": {"type": "object"}},
        "prompt": {"type": ["string", "array"], "items": {"type": "string"}},
    },
}
_NULLABLE_STR = {"type": ["string", "null"]}
_TOKEN_COUNT = {
    "type": "object",
    "required": ["object", "model", "input_tokens", "exact", "encoding", "estimated_cost"],
    "properties": {
        "object": {"const": "token_count"},
        "model": _NULLABLE_STR,
        "input_tokens": {"type": "integer", "minimum": 0},
        "exact": {"type": "boolean", "description": "False: estimated (no known encoding)."},
        "encoding": _NULLABLE_STR,
        "estimated_cost": {**_NULLABLE_STR, "description": "A decimal; null if unpriced."},
    },
}
_FEEDBACK_RECORDED = {
    "type": "object",
    "required": ["object", "request_id", "recorded"],
    "properties": {
        "object": {"const": "feedback"},
        "request_id": {"type": "string"},
        "recorded": {"const": True},
    },
}


def openapi_paths(usage_path: str, count_path: str, feedback_path: str) -> dict[str, Any]:
    """The path items of :class:`~aimiddleware.usage.routes.UsageRoutes` at these paths, and
    the component schemas they use."""
    components = component_schemas(UsageAggregate, RequestRecord, mode="serialization")
    record = components["UsageRecord"]  # as answered: without the caller's identity
    for hidden in ("principal", "record_id"):
        record["properties"].pop(hidden, None)
        record["required"] = [f for f in record.get("required", []) if f != hidden]
    not_found = problem_response("No such request in your usage history.")
    feedback = Feedback.model_json_schema()
    feedback["properties"].pop("created")  # (set by the server)
    day = {"type": "string", "format": "date"}
    return fragment(
        {
            usage_path: {"get": {
                "summary": "The caller's usage by UTC day and model",
                "operationId": "get_usage",
                "parameters": [
                    {"name": "start", "in": "query", "required": False, "schema": day,
                     "description": "First day (YYYY-MM-DD), inclusive."},
                    {"name": "end", "in": "query", "required": False, "schema": day,
                     "description": "Last day (YYYY-MM-DD), inclusive."},
                    {"name": "model", "in": "query", "required": False,
                     "schema": {"type": "string"}, "description": "Only this model."},
                ],
                "responses": {
                    "200": json_response("Usage rows and their totals.", _USAGE_LIST),
                    "400": problem_response("A date is malformed, or start is after end."),
                    "404": problem_response("Usage history is not enabled."),
                },
            }},
            usage_path.rstrip("/") + "/requests/{request_id}": {"get": {
                "summary": "One of the caller's requests, with its feedback",
                "operationId": "get_usage_request",
                "parameters": [{"name": "request_id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {
                    "200": json_response("The request's usage record.",
                                         ref("RequestRecord")),
                    "404": not_found,
                },
            }},
            count_path: {"post": {
                "summary": "Count a request's input tokens and price them",
                "operationId": "count_tokens",
                "requestBody": json_body(_COUNT_REQUEST),
                "responses": {
                    "200": json_response("The input token count.", _TOKEN_COUNT),
                    "400": problem_response("Not a JSON object, or an unsupported shape."),
                },
            }},
            feedback_path: {"post": {
                "summary": "Rate one of the caller's requests",
                "operationId": "create_feedback",
                "requestBody": json_body(feedback),
                "responses": {
                    "201": json_response("Recorded.", _FEEDBACK_RECORDED),
                    "400": problem_response("The body is not a JSON object."),
                    "404": not_found,
                    "422": problem_response("Invalid feedback."),
                },
            }},
        },
        components,
    )
