"""Foreign exceptions mapped onto the taxonomy of :mod:`aimiddleware.errors`.

Starlette/FastAPI, pydantic, httpx, the ``openai`` and ``anthropic`` SDKs and timeouts are
matched by (top-level package, class name) along the exception's MRO, so none of those
packages is imported unless the app already uses it; an exception nobody maps becomes an
``InternalError`` carrying nothing of the original. Imported from :mod:`aimiddleware.errors`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from aimiddleware._problem import shown
from aimiddleware.errors import (
    AIError,
    AuthenticationFailed,
    Conflict,
    HTTPStatusError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    ModelRetired,
    NotFound,
    Overloaded,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
    Timeout,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    ValidationFailed,
)

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
    """``("body", "messages", 0, "role")`` -> ``messages.0.role`` (cut as :func:`shown`:
    a dict's keys are the client's)."""
    loc = list(error.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    return shown(".".join(str(p) for p in loc))


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
