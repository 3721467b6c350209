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
    rate_limit_exempt: Iterable[str] = (),
    usage_headers: bool = False,
    version_headers: bool = False,
) -> dict[str, Any]:
    """Add the stack's errors, headers and parameters to every operation of ``schema``.

    ``rate_limit_exempt``: the paths (or ``"/prefix/*"``) the rate limiter skips, as given to
    it: their operations get no rate-limit headers and no 429. ``usage_headers`` /
    ``version_headers``: document the usage layer's ``x-usage-*`` headers and the
    versioning layer's headers on success responses.
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = PROBLEM_SCHEMA
    idem = {m.lower() for m in idempotency_methods}
    exempt = tuple(rate_limit_exempt)
    success: dict[str, Any] = dict(REQUEST_ID_HEADER)
    if usage_headers:
        success.update(USAGE_HEADERS)
    if version_headers:
        success.update(VERSION_HEADERS)
    for path, path_item in schema.get("paths", {}).items():
        limited_path = rate_limit_headers and not _exempt(path, exempt)
        for method, op in path_item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            keyed = method.lower() in idem
            responses: dict[str, Any] = op["responses"]
            for code, response in responses.items():
                if code.startswith("2"):
                    headers = response.setdefault("headers", {})
                    headers.update(success)
                    if limited_path:
                        headers.update(RATE_LIMIT_HEADERS)
                    if keyed:
                        headers.update(REPLAYED_HEADER)
            if "422" in responses:
                responses["422"] = _problem("Request validation failed.", REQUEST_ID_HEADER)
            if limited_path:
                limited = {**REQUEST_ID_HEADER, **RETRY_HEADERS, **RATE_LIMIT_HEADERS}
                responses.setdefault("429", _problem("Rate limited or quota exceeded.", limited))
            if keyed:
                responses.setdefault("400", _problem(
                    "Invalid request, such as a malformed Idempotency-Key.", REQUEST_ID_HEADER
                ))
                responses.setdefault("409", _problem(
                    "A request with this Idempotency-Key is still in progress: retry later.",
                    {**REQUEST_ID_HEADER, **RETRY_HEADERS},
                ))
            responses.setdefault(
                "default", _problem("Any other error, as problem+json.", REQUEST_ID_HEADER)
            )
            if keyed:
                params = op.setdefault("parameters", [])
                if not any(p.get("name", "").lower() == "idempotency-key" for p in params):
                    params.append(IDEMPOTENCY_PARAMETER)
    # FastAPI's validation-error schemas are no longer used by any response.
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


def _exempt(path: str, exempt: tuple[str, ...]) -> bool:
    """``path`` (an OpenAPI path template) is one the rate limiter never limits."""
    return any(
        path.startswith(p[:-1]) if p.endswith("*") else path == p for p in exempt
    )


def document_stack(app: Any, **options: Any) -> None:
    """Make a FastAPI app's ``/openapi.json`` describe what the stack adds."""
    original: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = patch_openapi(original(), **options)
        return app.openapi_schema  # type: ignore[no-any-return]

    app.openapi = openapi
