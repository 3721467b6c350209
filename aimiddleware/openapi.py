"""What the stack adds to a FastAPI app's OpenAPI document.

Middleware is invisible to FastAPI's schema generation, so generated clients and schema
checkers would not know about the problem+json errors, the rate-limit headers or the
``Idempotency-Key`` header. :func:`patch_openapi` adds them to a schema dict (pure);
:func:`document_stack` makes a FastAPI app serve the patched document.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["PROBLEM_SCHEMA", "document_stack", "patch_openapi"]

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
IDEMPOTENCY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Makes a retry of this request safe: the first result is replayed "
    "(`Idempotent-Replayed: true`), a concurrent duplicate gets 409, a reused key with a "
    "different body gets 422. At most 255 printable ASCII characters.",
    "schema": {"type": "string", "maxLength": 257},
}


def _problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": _REF}},
    }
    if headers:
        response["headers"] = headers
    return response


def patch_openapi(
    schema: dict[str, Any],
    *,
    rate_limit_headers: bool = True,
    idempotency_methods: Iterable[str] = ("post", "patch"),
) -> dict[str, Any]:
    """Add the stack's errors, headers and parameters to every operation of ``schema``."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = PROBLEM_SCHEMA
    idem = {m.lower() for m in idempotency_methods}
    for path_item in schema.get("paths", {}).values():
        for method, op in path_item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses: dict[str, Any] = op["responses"]
            for code, response in responses.items():
                if code.startswith("2"):
                    headers = response.setdefault("headers", {})
                    headers.update(REQUEST_ID_HEADER)
                    if rate_limit_headers:
                        headers.update(RATE_LIMIT_HEADERS)
            if "422" in responses:
                responses["422"] = _problem("Request validation failed.", REQUEST_ID_HEADER)
            limited: dict[str, Any] = {**REQUEST_ID_HEADER, **RETRY_HEADERS}
            if rate_limit_headers:
                limited.update(RATE_LIMIT_HEADERS)
            responses.setdefault("429", _problem("Rate limited or quota exceeded.", limited))
            responses.setdefault(
                "default", _problem("Any other error, as problem+json.", REQUEST_ID_HEADER)
            )
            if method.lower() in idem:
                params = op.setdefault("parameters", [])
                if not any(p.get("name", "").lower() == "idempotency-key" for p in params):
                    params.append(IDEMPOTENCY_PARAMETER)
    # FastAPI's validation-error schemas are no longer used by any response.
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


def document_stack(app: Any, **options: Any) -> None:
    """Make a FastAPI app's ``/openapi.json`` describe what the stack adds."""
    original: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = patch_openapi(original(), **options)
        return app.openapi_schema  # type: ignore[no-any-return]

    app.openapi = openapi
