"""``@idempotent(...)``: the middleware's policy on one endpoint.

Works on FastAPI endpoints of any signature (a hidden ``Request`` parameter is added when
the endpoint has none, so FastAPI injects it) and on Starlette endpoints ``(request)``.
The endpoint runs under the lease; its result becomes a response (FastAPI's own
``response_model``, ``status_code`` and ``response_class`` are applied for plain return
values) that is recorded while it is sent, exactly as the middleware records it.
Needs :class:`~aimiddleware.context_middleware.RequestContextMiddleware` (``install()``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from aimiddleware._asgi import WrappedResponse, is_async_callable, with_hidden_params
from aimiddleware.errors import DEFAULT_TYPE_BASE
from aimiddleware.idempotency.config import IdempotencyConfig
from aimiddleware.idempotency.engine import Begin, IdempotencyEngine, Lease, answer
from aimiddleware.idempotency.middleware import context_of
from aimiddleware.idempotency.models import LiveStream
from aimiddleware.idempotency.replay import STORED
from aimiddleware.idempotency.store import IdempotencyStore
from aimiddleware.storage import Storage
from aimiddleware.types import Receive, Scope, Send

__all__ = ["idempotent"]

F = TypeVar("F", bound=Callable[..., Any])
_INJECTED = "aimw_idempotency_request"
_SUB_RESPONSE = "aimw_idempotency_response"


def idempotent(
    *,
    storage: Storage | str = "memory://",
    config: IdempotencyConfig | None = None,
    store: IdempotencyStore | None = None,
    error_type_base: str = DEFAULT_TYPE_BASE,
    **options: Any,
) -> Callable[[F], F]:
    """Same options as :class:`~aimiddleware.idempotency.middleware.IdempotencyMiddleware`.

    The decorated endpoint applies idempotency whatever its method unless ``methods`` is
    given explicitly.
    """
    config = config or IdempotencyConfig()
    if "methods" not in options and config.methods == IdempotencyConfig().methods:
        options["methods"] = ("POST", "PATCH", "PUT", "DELETE", "GET")
    if options:
        config = replace(config, **options)
    engine = IdempotencyEngine(config, storage, store)

    def decorate(func: F) -> F:
        signature = _signature(func)
        request_param = _request_param(signature)
        # FastAPI's sub-response: what the endpoint (or @rate_limit under this decorator)
        # sets on a ``Response`` parameter, merged into the response FastAPI renders. The
        # response rendered here must carry it too: FastAPI merges nothing into a Response.
        own_response = next(
            (n for n, p in signature.parameters.items() if p.annotation is Response), None
        )
        is_async = is_async_callable(func)

        async def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if is_async:
                return await func(*args, **kwargs)
            return await run_in_threadpool(func, *args, **kwargs)

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            sub: Response | None = kwargs.pop(_SUB_RESPONSE, None)
            if own_response is not None:
                sub = kwargs.get(own_response)
            if request_param is None:
                request = kwargs.pop(_INJECTED)
            elif request_param in kwargs:
                request = kwargs[request_param]
            else:
                request = args[0]
            scope = request.scope
            if not engine.applies(scope["method"]):
                return await call(args, kwargs)
            ctx = context_of(scope)
            begin = await engine.begin(ctx, scope["headers"], scope.get("query_string", b""))
            if begin.lease is None:
                if begin.follow is not None:
                    return _Follow(engine, *begin.follow)
                if begin.replay is not None or begin.error is not None:
                    return _Answer(begin, ctx.request_id, error_type_base)
                result = await call(args, kwargs)
                if begin.unstored:
                    response = await _to_response(result, request, sub)
                    response.raw_headers.append(STORED)
                    return response
                return result
            lease = begin.lease
            result = await engine.call_leased(lease, lambda: call(args, kwargs))
            try:
                response = await _to_response(result, request, sub)
            except Exception:
                await engine.release(lease)
                raise
            return _Recorded(response, engine, lease)

        # Annotations evaluated in the endpoint's module: FastAPI would otherwise resolve
        # string annotations (``from __future__ import annotations``) in this module.
        wrapper.__signature__ = with_hidden_params(  # type: ignore[attr-defined]
            signature,
            [(_INJECTED, Request, request_param), (_SUB_RESPONSE, Response, own_response)],
        )
        return wrapper  # type: ignore[return-value]

    return decorate


def _signature(func: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(func, eval_str=True)
    except (NameError, TypeError, SyntaxError):  # a name only imported under TYPE_CHECKING
        return inspect.signature(func)


def _request_param(signature: inspect.Signature) -> str | None:
    for name, param in signature.parameters.items():
        ann = param.annotation
        if (isinstance(ann, type) and issubclass(ann, Request)) or ann in ("Request",):
            return name
    params = list(signature.parameters)
    if params and params[0] == "request":
        return "request"
    return None


async def _to_response(result: Any, request: Request, sub: Response | None) -> Response:
    """The endpoint's result as a Response, the way FastAPI would have rendered it: with
    the status code and headers (cookies...) set on FastAPI's sub-response ``sub``."""
    if isinstance(result, Response):
        return result
    response = await _render(result, request, sub)
    if sub is not None:
        response.raw_headers.extend(sub.headers.raw)  # (FastAPI's own sub-response has no
        # content-length; a Response passed by a Starlette caller is not a sub-response)
    return response


async def _render(result: Any, request: Request, sub: Response | None) -> Response:
    status = sub.status_code if sub is not None and sub.status_code else None
    route = request.scope.get("route")
    if route is not None and hasattr(route, "response_field"):
        from fastapi.routing import serialize_response

        content = await serialize_response(
            field=route.response_field,
            response_content=result,
            include=route.response_model_include,
            exclude=route.response_model_exclude,
            by_alias=route.response_model_by_alias,
            exclude_unset=route.response_model_exclude_unset,
            exclude_defaults=route.response_model_exclude_defaults,
            exclude_none=route.response_model_exclude_none,
        )
        status = status or route.status_code or 200
        if not _body_allowed(status):  # (a 204, 304, 1xx: as FastAPI renders it, no body)
            return Response(status_code=status)
        cls = getattr(route.response_class, "value", route.response_class)
        response: Response = cls(content, status_code=status)
        return response
    from fastapi.encoders import jsonable_encoder

    if status is not None and not _body_allowed(status):
        return Response(status_code=status)
    return JSONResponse(jsonable_encoder(result), status_code=status or 200)


def _body_allowed(status: int) -> bool:
    """RFC 9110: no content in a 1xx, 204 or 304 (a body there breaks the connection)."""
    return status >= 200 and status not in (204, 304)


class _Answer(Response):
    """A replay or a typed error, sent as raw ASGI messages."""

    def __init__(self, begin: Begin, request_id: str | None, type_base: str) -> None:
        super().__init__(status_code=(begin.replay.status if begin.replay else 0) or 200)
        self.begin = begin
        self.request_id = request_id
        self.type_base = type_base

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await answer(self.begin, send, self.request_id, self.type_base, scope["headers"])


class _Follow(Response):
    def __init__(self, engine: IdempotencyEngine, key: str, live: LiveStream) -> None:
        super().__init__(status_code=live.status)
        self.engine = engine
        self.key = key
        self.live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.engine.follow(self.key, self.live, send, scope["headers"])


class _Recorded(WrappedResponse):
    """Sends ``inner`` through the recorder, then runs its background tasks as usual."""

    def __init__(self, inner: Response, engine: IdempotencyEngine, lease: Lease) -> None:
        super().__init__(inner)
        self.engine = engine
        self.lease = lease

    async def send_inner(self, scope: Scope, receive: Receive, send: Send) -> None:
        inner = self.inner
        await self.engine.run(self.lease, lambda rec: inner(scope, receive, rec), send)
