"""``@rate_limit(...)``: the same policies on a single endpoint.

Works on FastAPI endpoints of any signature (no ``request`` parameter needed: hidden
``Response`` and ``Request`` parameters are added to the signature FastAPI reads, to carry
the headers and to read the request's content type) and
on Starlette endpoints (``async def endpoint(request)``). Needs the request context and the
error layer, i.e. ``install(app)``. Each decorated endpoint counts on its own.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from aimiddleware._asgi import WrappedResponse, get_header, is_async_callable, with_hidden_params
from aimiddleware.context import RequestContext, after_response, current
from aimiddleware.ratelimit._run import (
    failed_response,
    is_success,
    run_admitted,
    send_then_settle,
    settle,
)
from aimiddleware.ratelimit.limiter import Admission, RateLimiter
from aimiddleware.ratelimit.policy import Policy
from aimiddleware.sse.response import EventStreamResponse
from aimiddleware.types import Receive, Scope, Send
from aimiddleware.usage.extract import from_response, parse_json

__all__ = ["rate_limit"]

F = TypeVar("F", bound=Callable[..., Any])
_RESPONSE_PARAM = "aimw_rate_limit_response"
_REQUEST_PARAM = "aimw_rate_limit_request"


def rate_limit(
    policy: Policy | Mapping[str, Policy] | str,
    *,
    limiter: RateLimiter | None = None,
    **options: Any,
) -> Callable[[F], F]:
    """``policy``: a :class:`Policy`, ``{tier: Policy}``, or a requests limit string
    (``"5/minute"``). ``options`` are :class:`RateLimiter` options (``storage``, ``tier``...).
    """
    if isinstance(policy, str):
        policy = Policy(requests=policy)
    if limiter is not None and options:
        raise TypeError("pass either a limiter or its options, not both")

    def decorate(func: F) -> F:
        name = f"{func.__module__}.{func.__qualname__}".replace("{", "(").replace("}", ")")
        lim = limiter or RateLimiter(policy, namespace=f"rl-ep:{name}", **options)
        sig = _signature(func)
        params = list(sig.parameters.values())
        own = next((p.name for p in params if p.annotation is Response), None)
        own_request = next((p.name for p in params if p.annotation is Request), None)
        is_async = is_async_callable(func)

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            response: Response | None = kwargs.pop(_RESPONSE_PARAM, None)
            if own is not None:
                response = kwargs.get(own)
            request: Request | None = kwargs.pop(_REQUEST_PARAM, None)
            if own_request is not None:
                request = kwargs.get(own_request)
            if request is None:  # a Starlette endpoint: the request is passed positionally
                request = next((a for a in args if isinstance(a, Request)), None)
            ctx = current()
            # The content type, as the middleware passes it: a body that is not JSON (a form,
            # an upload) is estimated from its size, not refused as malformed JSON.
            content_type = (
                get_header(request.scope["headers"], b"content-type")
                if request is not None
                else None
            )
            admission = await lim.admit(ctx, content_type=content_type)

            async def call() -> Any:
                if is_async:
                    result = await func(*args, **kwargs)
                else:
                    result = await run_in_threadpool(func, *args, **kwargs)
                if ctx.usage is None and not _streams(result):
                    _take_usage(ctx, result)
                return result

            def failure(result: Any) -> bool:  # (refunded, as the middleware does)
                return isinstance(result, Response) and not is_success(result.status_code)

            def hold(result: Any) -> bool:
                # A stream is settled once sent (below). A plain value is rendered by FastAPI
                # after this returns, and may fail there (a ResponseValidationError is a
                # 500): settled by the response it became, once the context layer has it.
                if _streams(result):
                    return True
                return not isinstance(result, Response) and after_response(
                    ctx, lambda: _settle_by_response(lim, admission, ctx)
                )

            result = await run_admitted(lim, admission, ctx, call, failure, hold=hold)
            target = result if isinstance(result, Response) else response
            if target is not None:
                for key, value in admission.headers:
                    target.headers[key] = value
            if _streams(result) and is_success(result.status_code):  # (held: settled when sent)
                held = _SettledWhenSent(result, lim, admission, ctx)
                after_response(ctx, held.settle_unsent)  # (a stream never sent: settled then)
                return held
            return result

        wrapper.__signature__ = with_hidden_params(  # type: ignore[attr-defined]
            sig, [(_REQUEST_PARAM, Request, own_request), (_RESPONSE_PARAM, Response, own)]
        )
        wrapper.rate_limiter = lim  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


async def _settle_by_response(lim: RateLimiter, admission: Admission, ctx: RequestContext) -> None:
    """Settle a plain value's admission by the response it became (refunded unless 2xx)."""
    failed = failed_response(ctx)
    if not lim.settled(admission, ctx, failed=failed):
        await settle(lim, admission, ctx, failed)


def _signature(func: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(func, eval_str=True)
    except (NameError, TypeError):
        return inspect.signature(func)


def _take_usage(ctx: RequestContext, result: Any) -> None:
    """The usage a JSON result reports (an OpenAI/Anthropic/Gemini ``usage``, an Envelope),
    read before it is settled: it is serialized, and read by the usage layer, only after the
    endpoint has returned, so the reservation would otherwise stand (as the middleware would
    not let it: it settles after the response has been sent)."""
    if isinstance(result, Response):
        body = getattr(result, "body", None)  # (rendered at construction)
        found = from_response(parse_json(body)) if isinstance(body, bytes) and body else None
    elif isinstance(result, BaseModel):
        found = from_response(result.model_dump(mode="json", by_alias=True))
    else:
        found = from_response(result)
    if found is not None and found.usage is not None:
        ctx.usage = found.usage


def _streams(result: Any) -> bool:
    """A response whose body (and usage) is produced while it is sent."""
    return isinstance(result, (StreamingResponse, EventStreamResponse))


class _SettledWhenSent(WrappedResponse):
    """Sends ``inner`` (a stream) holding the admission's lease, then settles it with the
    stream's usage, as the middleware does at the end of a stream."""

    def __init__(
        self, inner: Response, limiter: RateLimiter, admission: Admission, ctx: RequestContext
    ) -> None:
        super().__init__(inner)
        self.limiter = limiter
        self.admission = admission
        self.ctx = ctx
        self.sent = False

    async def send_inner(self, scope: Scope, receive: Receive, send: Send) -> None:
        inner = self.inner
        self.sent = True
        await send_then_settle(
            self.limiter, self.admission, self.ctx, lambda: inner(scope, receive, send)
        )

    async def settle_unsent(self) -> None:
        """Settle a stream the request ended without sending (an endpoint that called the
        decorated one and answered with something else): it never ran, so it is refunded in
        full and its lease released. (On the in-process store a lease never expires: kept,
        it would hold a concurrency slot for the life of the process.)"""
        if not self.sent and not self.limiter.settled(self.admission, self.ctx, failed=True):
            await settle(self.limiter, self.admission, self.ctx, True)
