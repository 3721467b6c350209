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

The body and its headers are rendered by :func:`render_problem` (pure; its parts
:func:`problem_body` and :func:`error_headers`), in ``aimiddleware._problem``.

Foreign exceptions (Starlette/FastAPI, pydantic, httpx, the ``openai`` and ``anthropic``
SDKs, timeouts) are mapped at the boundary by :class:`ExceptionMapper`, matched by class
name so none of those packages is imported unless the app already uses it; it lives in
``aimiddleware._error_mapping``. This module re-exports both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from aimiddleware._problem import DEFAULT_TYPE_BASE, error_headers, problem_body, render_problem
from aimiddleware._problem import MAX_RETRY_AFTER as MAX_RETRY_AFTER
from aimiddleware._problem import PROBLEM_JSON as PROBLEM_JSON

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
        if status >= 500:  # the server's fault, as OpenAI's error.type says it
            self.openai_type = "server_error"  # type: ignore[misc]

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


# The mapping builds the classes above, so it is imported once they exist.
from aimiddleware._error_mapping import (  # noqa: E402
    ExceptionMapper,
    upstream_error,
)
from aimiddleware._error_mapping import Mapper as Mapper  # noqa: E402
