"""The OpenAPI objects the stack is documented with (pure data and builders).

The ``Problem`` schema of every error body, the response headers each layer adds (request
id, retry, rate-limit, usage, version, replay), the ``Idempotency-Key`` parameter, the
security schemes of the default principal, and small builders of response, request-body
and fragment objects that ``UsageRoutes``, ``JobsRouter`` and the versioning layer describe
their routes with. Imported from :mod:`aimiddleware.openapi`, which applies them to a
document.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details plus an OpenAI-compatible `error` object.",
    "type": "object",
    "required": ["type", "title", "status", "detail", "retryable", "error"],
    "properties": {
        "type": {"type": "string", "description": "Stable URI of the error type."},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "request_id": {"type": "string"},
        "retryable": {"type": "boolean"},
        "error": {
            "type": "object",
            "required": ["type", "code", "message"],
            "properties": {
                "type": {"type": "string"},
                "code": {"type": "string"},
                "message": {"type": "string"},
                "param": {"type": ["string", "null"]},
            },
        },
    },
    "additionalProperties": True,
}

_REF = {"$ref": "#/components/schemas/Problem"}
_INT = {"schema": {"type": "integer"}}
_STR = {"schema": {"type": "string"}}

REQUEST_ID_HEADER = {"x-request-id": {"description": "The request id.", **_STR}}
RETRY_HEADERS = {
    "retry-after": {"description": "Seconds to wait before retrying.", **_INT},
    "retry-after-ms": {"description": "Milliseconds to wait before retrying.", **_INT},
    "x-should-retry": {"description": "Whether a retry can succeed.", **_STR},
}
RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": _INT,
    "x-ratelimit-remaining-requests": _INT,
    "x-ratelimit-reset-requests": {"description": "Go-style duration, e.g. 6m0s.", **_STR},
    "x-ratelimit-limit-tokens": _INT,
    "x-ratelimit-remaining-tokens": _INT,
    "x-ratelimit-reset-tokens": {"description": "Go-style duration, e.g. 6m0s.", **_STR},
    "ratelimit-policy": {"description": "IETF RateLimit-Policy structured field.", **_STR},
    "ratelimit": {"description": "IETF RateLimit structured field.", **_STR},
}
USAGE_HEADERS = {
    f"x-usage-{name}": {"description": description, **schema}
    for name, description, schema in (
        ("duration-ms", "Time spent, in milliseconds.", _STR),
        ("input-tokens", "Input (prompt) tokens.", _INT),
        ("output-tokens", "Output (completion) tokens.", _INT),
        ("total-tokens", "Input plus output tokens.", _INT),
        ("cached-input-tokens", "Input tokens read from the provider's cache.", _INT),
        ("reasoning-tokens", "Output tokens spent on reasoning.", _INT),
        ("estimated-cost", "Estimated cost, in the price table's currency.", _STR),
        ("finish-reason", "Normalized finish reason (stop, length, ...).", _STR),
    )
}
VERSION_HEADERS = {
    "api-version": {"description": "The API version that served the request.", **_STR},
    "x-model-version": {"description": "The model snapshot that served it.", **_STR},
    "deprecation": {"description": "RFC 9745: when the version or model was deprecated.",
                    **_STR},
    "sunset": {"description": "RFC 8594: when it stops being served.", **_STR},
}
REPLAYED_HEADER = {
    "idempotent-replayed": {"description": "`true` on a replayed answer.", **_STR},
}
# A bare token (what most SDKs send) or an RFC 8941 sf-string (the IETF draft's form); the
# key itself is 1 to 255 printable ASCII characters either way.
_KEY_PATTERN = r'^(?:[!#-\[\]-~]{1,255}|"(?:[ !#-\[\]-~]|\\["\\]){1,255}")$'
IDEMPOTENCY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Makes a retry of this request safe: the first result is replayed "
    "(`Idempotent-Replayed: true`), a concurrent duplicate gets 409, a reused key with a "
    "different body gets 422. 1 to 255 printable ASCII characters: a bare token (no spaces, "
    "quotes or backslashes) or a quoted string.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 512, "pattern": _KEY_PATTERN},
}


# The API key, as the default principal rule reads it; optional (`{}`): a caller without
# one is told apart by address.
SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "description": "The API key."},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key",
                     "description": "The API key, instead of a bearer token."},
}
SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyHeader": []}, {}]
REF_TEMPLATE = "#/components/schemas/{model}"


def problem_response(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """An OpenAPI response object: a problem+json body (the ``Problem`` schema)."""
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": _REF}},
    }
    if headers:
        response["headers"] = headers
    return response


def component_schemas(
    *models: type[BaseModel], mode: Literal["validation", "serialization"] = "validation"
) -> dict[str, dict[str, Any]]:
    """The component schemas of ``models`` (and the models they use), by name; refer to
    one as ``{"$ref": "#/components/schemas/<Name>"}``. ``mode``: ``"validation"`` for
    request bodies, ``"serialization"`` for responses."""
    out: dict[str, dict[str, Any]] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF_TEMPLATE, mode=mode)
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def ref(name: str) -> dict[str, str]:
    """A reference to the component schema ``name``."""
    return {"$ref": REF_TEMPLATE.format(model=name)}


def json_response(
    description: str, schema: Mapping[str, Any], headers: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """An OpenAPI response object with an ``application/json`` body."""
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": dict(schema)}},
    }
    if headers:
        response["headers"] = dict(headers)
    return response


def fragment(paths: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """An ``openapi_paths()`` result: ``paths`` and the component ``schemas`` they use (with
    ``Problem``, which :func:`problem_response` refers to)."""
    return {"paths": paths, "components": {"schemas": {**schemas, "Problem": PROBLEM_SCHEMA}}}


def json_body(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A required ``application/json`` request body."""
    return {"required": True, "content": {"application/json": {"schema": dict(schema)}}}
