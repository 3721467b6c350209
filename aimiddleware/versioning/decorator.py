"""``deprecated(...)``: deprecation signalling and sunset for single endpoints.

Works on FastAPI endpoints of any signature (no ``request`` parameter needed: a hidden
``Response`` parameter is added to the signature FastAPI reads, and its headers are merged
into the reply) and on Starlette endpoints (which return a ``Response``, whose headers are
added to directly). It reads the same :class:`Lifecycle` objects as the middleware, and
counts calls on the same :class:`DeprecationMonitor`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from aimiddleware.context import current_or_none
from aimiddleware.errors import render_problem
from aimiddleware.versioning.lifecycle import (
    Clock,
    DateLike,
    Lifecycle,
    retired_error,
    utc_now,
)
from aimiddleware.versioning.monitor import DeprecatedCall, DeprecationMonitor

__all__ = ["deprecated"]

F = TypeVar("F", bound=Callable[..., Any])
_PARAM = "aimiddleware_deprecation_response"


def deprecated(
    lifecycle: Lifecycle | None = None,
    *,
    deprecated: DateLike | None = None,
    sunset: DateLike | None = None,
    replacement: str | None = None,
    deprecation_link: str | None = None,
    sunset_link: str | None = None,
    successor_link: str | None = None,
    name: str | None = None,
    monitor: DeprecationMonitor | None = None,
    clock: Clock | None = None,
) -> Callable[[F], F]:
    """Mark one endpoint deprecated.

    Pass a :class:`Lifecycle` (for instance ``registry.snapshot(id).lifecycle`` or an
    ``ApiVersion``'s) or the same fields as keywords; Sunset earlier than Deprecation is a
    ``ValueError`` at decoration time. Responses carry ``Deprecation``, ``Sunset`` and
    ``Link``; from the sunset on, the endpoint is not called and the request ends in a 410
    ``model_retired`` naming ``replacement``. ``monitor`` counts calls per principal
    (e.g. ``versioning_middleware.monitor``).
    """
    if lifecycle is None:
        if deprecated is None and sunset is None:
            raise ValueError("deprecated(...) needs a deprecation date, a sunset date, or both")
        lifecycle = Lifecycle.of(
            deprecated=deprecated,
            sunset=sunset,
            replacement=replacement,
            deprecation_link=deprecation_link,
            sunset_link=sunset_link,
            successor_link=successor_link,
        )
    elif any(
        v is not None
        for v in (deprecated, sunset, replacement, deprecation_link, sunset_link, successor_link)
    ):
        raise TypeError("pass a Lifecycle or its fields as keywords, not both")
    if clock is not None and not callable(clock):
        raise TypeError("clock must be a callable returning an aware datetime")
    lc: Lifecycle = lifecycle
    now_fn: Clock = clock or utc_now
    headers = lc.headers()

    def decorate(fn: F) -> F:
        if not callable(fn):
            raise TypeError("deprecated(...) decorates a callable endpoint")
        route: str = name or str(getattr(fn, "__name__", "endpoint"))
        is_async = inspect.iscoroutinefunction(fn)

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            reply: Response | None = kwargs.pop(_PARAM, None)
            now = now_fn()
            ctx = current_or_none()
            if lc.status(now) == "retired":
                err = retired_error("route", route, lc, param=None)
                if ctx is None:  # no stack around the app to render it: the 410 is sent here
                    status, raw, body = render_problem(err, request_id=None)
                    gone = Response(body, status_code=status)
                    gone.raw_headers = raw
                    return gone
                raise err
            if monitor is not None and ctx is not None:
                await monitor.record_later(ctx, (DeprecatedCall.of(ctx, "route", route, lc, now),))
            if is_async:
                result = await fn(*args, **kwargs)
            else:
                result = await run_in_threadpool(fn, *args, **kwargs)
            target = result if isinstance(result, Response) else reply
            if target is not None:
                for key, value in headers:
                    if key not in target.headers or key == "link":
                        target.headers.append(key, value)
            return result

        try:
            sig = inspect.signature(fn, eval_str=True)
        except (NameError, TypeError, SyntaxError):
            sig = inspect.signature(fn)
        if _PARAM not in sig.parameters:
            params = list(sig.parameters.values())
            hidden = inspect.Parameter(_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Response)
            if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
                params.insert(len(params) - 1, hidden)
            else:
                params.append(hidden)
            wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__aimiddleware_deprecation__ = lc  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
