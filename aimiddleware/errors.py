"""The error taxonomy: every failure the stack can produce, and how it goes on the wire.

::

    AIError                                  (500 internal root; never raised bare)
    ├── InvalidRequest              400  invalid_request
    │   ├── ValidationFailed        422  validation_failed        (request validation)
    │   ├── ContentFiltered         400  content_filtered
    │   ├── PolicyRefusal           400  policy_refusal
    │   ├── PromptInjectionDetected 400  prompt_injection_detected
    │   └── UnsupportedApiVersion   400  unsupported_api_version
    ├── AuthenticationFailed        401  authentication
    ├── PermissionDenied            403  permission
    ├── NotFound                    404  not_found
    ├── MethodNotAllowed            405  method_not_allowed
    ├── Conflict                    409  conflict                 (retryable: in flight)
    ├── ModelRetired                410  model_retired
    ├── RequestTooLarge             413  request_too_large
    ├── IdempotencyKeyReused        422  idempotency_key_reused
    ├── RateLimited                 429  rate_limited             (retryable; names the dimension)
    ├── QuotaExceeded               429  quota_exceeded           (not retryable: budgets)
    ├── HTTPStatusError             4xx/5xx http_error            (other foreign statuses)
    ├── InternalError               500  internal
    ├── OutputSchemaInvalid         502  output_schema_invalid    (retryable: outputs vary)
    ├── UpstreamError               502  upstream_error
    │   ├── UpstreamUnavailable     503  upstream_unavailable     (retryable)
    │   ├── UpstreamTimeout         504  upstream_timeout         (retryable)
    │   └── UpstreamRateLimited     429  upstream_rate_limited    (retryable)
    ├── Overloaded                  503  overloaded               (retryable; 529 if configured)
    ├── StoreUnavailable            503  store_unavailable        (retryable; a store is down)
    ├── NotConfigured               503  not_configured           (a deployment error)
    └── Timeout                     504  timeout                  (retryable; a timeout tier)

One body serves RFC 9457 clients and OpenAI SDK clients at once: the problem members
(``type``, ``title``, ``status``, ``detail``, ``instance``) plus ``request_id``, ``retryable``
and an ``error: {type, code, message, param}`` object. ``error.type`` is the OpenAI-style
category (``invalid_request_error``, ``rate_limit_error``, ``insufficient_quota``...) so
existing client code keeps working; ``error.code`` is this taxonomy's stable name.

Foreign exceptions (Starlette/FastAPI, pydantic, httpx, the ``openai`` and ``anthropic``
SDKs, timeouts) are mapped at the boundary by :class:`ExceptionMapper`, matched by class
name so none of those packages is imported unless the app already uses it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

__all__ = [
    "DEFAULT_TYPE_BASE",
    "AIError",
    "AuthenticationFailed",
    "Conflict",
    "ContentFiltered",
    "ExceptionMapper",
    "HTTPStatusError",
    "IdempotencyKeyReused",
    "InternalError",
    "InvalidRequest",
    "MethodNotAllowed",
    "ModelRetired",
    "NotConfigured",
    "NotFound",
    "OutputSchemaInvalid",
    "Overloaded",
    "PermissionDenied",
    "PolicyRefusal",
    "PromptInjectionDetected",
    "QuotaExceeded",
    "RateLimited",
    "RequestTooLarge",
    "StoreUnavailable",
    "Timeout",
    "UnsupportedApiVersion",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "ValidationFailed",
    "error_headers",
    "problem_body",
    "render_problem",
    "upstream_error",
]

logger = logging.getLogger("aimiddleware")

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

DEFAULT_TYPE_BASE = "urn:aimiddleware:error:"
PROBLEM_JSON = b"application/problem+json"
MAX_RETRY_AFTER = 60.0  # official SDKs ignore longer server delays (reference: errors, section 2)


class AIError(Exception):
    """Root of the taxonomy. Subclasses set the class attributes; instances carry the details.

    ``detail`` is shown to the client: it must never contain a prompt, a secret or a stack.
    ``extra`` adds problem extension members (for example ``dimension`` on a 429).
    """

    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"
    default_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = True
    openai_type: ClassVar[str] = "server_error"
    default_detail: ClassVar[str] = "The server failed to complete the request."

    def __init__(
        self,
        detail: str | None = None,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        headers: Iterable[tuple[str, str]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.detail = detail if detail is not None else self.default_detail
        self.param = param
        self.retry_after = retry_after
        self.headers: list[tuple[str, str]] = list(headers or ())
        self.extra: dict[str, Any] = dict(extra or {})
        super().__init__(self.detail)

    @property
    def status(self) -> int:
        return self.default_status

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail!r}, status={self.status})"


class InvalidRequest(AIError):
    code = "invalid_request"
    title = "Invalid request"
    default_status = 400
    retryable = False
    openai_type = "invalid_request_error"
    default_detail = "The request is invalid."


class ValidationFailed(InvalidRequest):
    code = "validation_failed"
    title = "Request validation failed"
    default_status = 422
    default_detail = "The request body or parameters failed validation."


class ContentFiltered(InvalidRequest):
    code = "content_filtered"
    title = "Content filtered"
    default_detail = "The request or the generated output was blocked by a content filter."


class PolicyRefusal(InvalidRequest):
    code = "policy_refusal"
    title = "Refused by policy"
    default_detail = "The model refused the request under its usage policy."


class PromptInjectionDetected(InvalidRequest):
    code = "prompt_injection_detected"
    title = "Prompt injection detected"
    default_detail = "The input was rejected as a likely prompt injection."


class UnsupportedApiVersion(InvalidRequest):
    code = "unsupported_api_version"
    title = "Unsupported API version"
    default_detail = "The requested API version is not supported."


class AuthenticationFailed(AIError):
    code = "authentication"
    title = "Authentication failed"
    default_status = 401
    retryable = False
    openai_type = "authentication_error"
    default_detail = "Missing or invalid credentials."


class PermissionDenied(AIError):
    code = "permission"
    title = "Permission denied"
    default_status = 403
    retryable = False
    openai_type = "permission_error"
    default_detail = "The caller may not perform this operation."


class NotFound(AIError):
    code = "not_found"
    title = "Not found"
    default_status = 404
    retryable = False
    openai_type = "not_found_error"
    default_detail = "The requested resource does not exist."


class MethodNotAllowed(AIError):
    code = "method_not_allowed"
    title = "Method not allowed"
    default_status = 405
    retryable = False
    openai_type = "invalid_request_error"
    default_detail = "The method is not allowed on this resource."


class Conflict(AIError):
    code = "conflict"
    title = "Conflict"
    default_status = 409
    retryable = True
    openai_type = "conflict_error"
    default_detail = "A conflicting request is in progress."


class ModelRetired(AIError):
    code = "model_retired"
    title = "Model retired"
    default_status = 410
    retryable = False
    openai_type = "invalid_request_error"
    default_detail = "The requested model or API version has been retired."


class RequestTooLarge(AIError):
    code = "request_too_large"
    title = "Request too large"
    default_status = 413
    retryable = False
    openai_type = "invalid_request_error"
    default_detail = "The request body exceeds the configured size limit."


class IdempotencyKeyReused(AIError):
    code = "idempotency_key_reused"
    title = "Idempotency key reused"
    default_status = 422
    retryable = False
    openai_type = "invalid_request_error"
    default_detail = "This Idempotency-Key was already used with a different request."


class RateLimited(AIError):
    code = "rate_limited"
    title = "Rate limit exceeded"
    default_status = 429
    retryable = True
    openai_type = "rate_limit_error"
    default_detail = "Rate limit exceeded."


class QuotaExceeded(AIError):
    code = "quota_exceeded"
    title = "Quota exceeded"
    default_status = 429
    retryable = False
    openai_type = "insufficient_quota"
    default_detail = "A budget or quota is exhausted; retrying will not help until it resets."


class HTTPStatusError(AIError):
    """A foreign HTTP error whose status has no more specific class."""

    code = "http_error"
    title = "HTTP error"
    retryable = False
    openai_type = "invalid_request_error"

    def __init__(self, status: int, detail: str | None = None, **kwargs: Any) -> None:
        self._status = status
        super().__init__(detail if detail is not None else f"HTTP {status}", **kwargs)

    @property
    def status(self) -> int:
        return self._status


class InternalError(AIError):
    code = "internal"
    title = "Internal error"


class OutputSchemaInvalid(AIError):
    code = "output_schema_invalid"
    title = "Output failed schema validation"
    default_status = 502
    default_detail = "The model output did not match the requested schema."


class UpstreamError(AIError):
    code = "upstream_error"
    title = "Upstream error"
    default_status = 502
    openai_type = "server_error"
    default_detail = "The upstream model provider returned an error."


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"
    title = "Upstream unavailable"
    default_status = 503
    default_detail = "The upstream model provider is unavailable."


class UpstreamTimeout(UpstreamError):
    code = "upstream_timeout"
    title = "Upstream timeout"
    default_status = 504
    openai_type = "timeout_error"
    default_detail = "The upstream model provider did not answer in time."


class UpstreamRateLimited(UpstreamError):
    code = "upstream_rate_limited"
    title = "Upstream rate limited"
    default_status = 429
    openai_type = "rate_limit_error"
    default_detail = "The upstream model provider is rate limiting this service."


class Overloaded(AIError):
    """Temporary overload. ``status=529`` gives Anthropic's code instead of 503."""

    code = "overloaded"
    title = "Overloaded"
    default_status = 503
    openai_type = "overloaded_error"
    default_detail = "The service is temporarily overloaded."

    def __init__(self, detail: str | None = None, *, status: int = 503, **kwargs: Any) -> None:
        if status not in (503, 529):
            raise ValueError("Overloaded status must be 503 or 529")
        self._status = status
        super().__init__(detail, **kwargs)

    @property
    def status(self) -> int:
        return self._status


class StoreUnavailable(AIError):
    code = "store_unavailable"
    title = "Backing store unavailable"
    default_status = 503
    default_detail = "A backing store is unavailable."


class NotConfigured(AIError):
    """What the route needs is not set up in this deployment (a job runner whose lifespan
    never ran: a server without lifespan support); retrying cannot help."""

    code = "not_configured"
    title = "Service not configured"
    default_status = 503
    retryable = False
    openai_type = "server_error"
    default_detail = "This service is not configured to answer this request."


class Timeout(AIError):
    code = "timeout"
    title = "Request timed out"
    default_status = 504
    openai_type = "timeout_error"
    default_detail = "The request did not complete within its time limit."


# -- rendering (pure) ---------------------------------------------------------------------------


def problem_body(
    err: AIError, *, request_id: str | None, type_base: str = DEFAULT_TYPE_BASE
) -> dict[str, Any]:
    """The JSON body: RFC 9457 members, extensions, and the OpenAI-compatible ``error``."""
    body: dict[str, Any] = {
        "type": type_base + err.code,
        "title": err.title,
        "status": err.status,
        "detail": err.detail,
    }
    if request_id:
        body["instance"] = f"urn:request:{request_id}"
        body["request_id"] = request_id
    body["retryable"] = err.retryable
    for key, value in err.extra.items():
        body.setdefault(key, value)
    body["error"] = {
        "type": err.openai_type,
        "code": err.code,
        "message": err.detail,
        "param": err.param,
    }
    return body


def error_headers(err: AIError) -> list[tuple[str, str]]:
    """Retry signalling that real SDKs obey, then the error's own headers."""
    headers: list[tuple[str, str]] = []
    if err.retryable:
        headers.append(("x-should-retry", "true"))
        if err.retry_after is not None:
            delay = min(max(err.retry_after, 0.0), MAX_RETRY_AFTER)
            headers.append(("retry-after", str(max(1, math.ceil(delay)))))
            headers.append(("retry-after-ms", str(max(1, math.ceil(delay * 1000)))))
    else:
        headers.append(("x-should-retry", "false"))
    taken = {name for name, _ in headers}
    headers.extend((k, v) for k, v in err.headers if k.lower() not in taken)
    return headers


def render_problem(
    err: AIError, *, request_id: str | None, type_base: str = DEFAULT_TYPE_BASE
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, raw ASGI headers and body bytes for ``err``."""
    body = json.dumps(
        problem_body(err, request_id=request_id, type_base=type_base),
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    ).encode()
    raw = [
        (b"content-type", PROBLEM_JSON),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    for name, value in error_headers(err):
        if _BAD_HEADER.search(name) or _BAD_HEADER.search(value):
            # (say an app's HTTPException header with non-Latin-1 text): the error still goes
            # out, without the header it cannot carry
            logger.warning("dropped an error header that is not a valid header: %r", name)
            continue
        raw.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    return err.status, raw, body


_BAD_HEADER = re.compile(r"[^\x20-\x7e\x80-\xff\t]")  # outside Latin-1, or a control character


# -- mapping foreign exceptions -----------------------------------------------------------------

Mapper = Callable[[BaseException], "AIError | None"]

_STATUS_CLASSES: dict[int, type[AIError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    410: ModelRetired,
    413: RequestTooLarge,
    422: ValidationFailed,
    429: RateLimited,
    500: InternalError,
    502: UpstreamError,
    503: Overloaded,
    504: Timeout,
}


def _from_http_exception(exc: BaseException) -> AIError:
    status = int(getattr(exc, "status_code", 500))
    detail = getattr(exc, "detail", None)
    text = detail if isinstance(detail, str) else None
    headers = list((getattr(exc, "headers", None) or {}).items())
    cls = _STATUS_CLASSES.get(status)
    if cls is None or status >= 500:
        # A 5xx raised by app code says nothing safe to show; keep its status only.
        if cls is None:
            return HTTPStatusError(status, text if status < 500 else None, headers=headers)
        return cls(headers=headers)
    return cls(text, headers=headers)


def _loc(error: Mapping[str, Any]) -> str:
    """``("body", "messages", 0, "role")`` -> ``messages.0.role``."""
    loc = list(error.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    return ".".join(str(p) for p in loc)


def _from_validation_error(exc: BaseException) -> AIError:
    errors_fn = getattr(exc, "errors", None)
    items: list[Any] = list(errors_fn()) if callable(errors_fn) else []
    if not items:
        return ValidationFailed()
    first = items[0]
    param = _loc(first) or None
    # Never echo ``input``: it can hold the prompt.
    msg = str(first.get("msg", "invalid value"))
    detail = f"{param}: {msg}" if param else msg
    if len(items) > 1:
        detail += f" (and {len(items) - 1} more)"
    fields = [
        {"param": _loc(e), "msg": str(e.get("msg", ""))}
        for e in items[:20]
    ]
    return ValidationFailed(detail, param=param, extra={"invalid_params": fields})


def _upstream_status(exc: BaseException) -> AIError:
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    upstream_code = None
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            upstream_code = inner.get("code") or inner.get("type")
    extra = {"upstream_status": status}
    if isinstance(upstream_code, str):
        extra["upstream_code"] = upstream_code
    return upstream_error(status, extra)


def upstream_error(
    status: int | None, extra: dict[str, Any], retry_after: float | None = None
) -> AIError:
    """The taxonomy's error for an upstream model provider's HTTP ``status``: its 429 a
    retryable ``upstream_rate_limited``, 408/504 ``upstream_timeout``, 500/502/503/529
    ``upstream_unavailable``, a rejected request (400/404/413/422) ``invalid_request``,
    anything else ``upstream_error``. ``retry_after``: the upstream's wait, kept on the
    retryable ones. ``extra`` is the body's extra members (never the upstream's message)."""
    if status == 429:
        return UpstreamRateLimited(extra=extra, retry_after=retry_after)
    if status in (408, 504):
        return UpstreamTimeout(extra=extra, retry_after=retry_after)
    if status in (500, 502, 503, 529):
        return UpstreamUnavailable(extra=extra, retry_after=retry_after)
    if status in (400, 404, 413, 422):
        return InvalidRequest("The upstream model rejected the request.", extra=extra)
    return UpstreamError(extra=extra)


# (top-level package, class name) -> converter. Matched along the MRO, so subclasses map too.
_BY_NAME: dict[tuple[str, str], Mapper] = {
    ("starlette", "HTTPException"): _from_http_exception,
    ("fastapi", "HTTPException"): _from_http_exception,
    ("fastapi", "RequestValidationError"): _from_validation_error,
    ("httpx", "TimeoutException"): lambda e: UpstreamTimeout(),
    ("httpx", "TransportError"): lambda e: UpstreamUnavailable(),
    ("openai", "APITimeoutError"): lambda e: UpstreamTimeout(),
    ("openai", "APIConnectionError"): lambda e: UpstreamUnavailable(),
    ("openai", "APIStatusError"): _upstream_status,
    ("anthropic", "APITimeoutError"): lambda e: UpstreamTimeout(),
    ("anthropic", "APIConnectionError"): lambda e: UpstreamUnavailable(),
    ("anthropic", "APIStatusError"): _upstream_status,
}


class ExceptionMapper:
    """Turns any exception into the most specific :class:`AIError`.

    User mappings (``register``) win over the built-in ones; both are matched along the
    exception's MRO, most specific class first. An exception nobody maps becomes
    :class:`InternalError` carrying nothing of the original.
    """

    def __init__(self, mappings: Mapping[type[BaseException], Mapper] | None = None) -> None:
        self._by_type: dict[type[BaseException], Mapper] = dict(mappings or {})

    def register(self, exc_type: type[BaseException], mapper: Mapper) -> None:
        self._by_type[exc_type] = mapper

    def map(self, exc: BaseException) -> AIError:
        exc = _unwrap_group(exc)
        if isinstance(exc, AIError):
            return exc
        for cls in type(exc).__mro__:
            user = self._by_type.get(cls)
            if user is not None:
                mapped = user(exc)
                if mapped is not None:
                    return mapped
            builtin = _BY_NAME.get((cls.__module__.partition(".")[0], cls.__name__))
            if builtin is not None:
                mapped = builtin(exc)
                if mapped is not None:
                    return mapped
        if isinstance(exc, TimeoutError):
            return Timeout()
        return InternalError()


def _unwrap_group(exc: BaseException) -> BaseException:
    """A task group that failed with one exception reports that exception."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
