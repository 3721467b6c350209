"""``RateLimitMiddleware``: admit every request on all its limits before the app runs.

Sits inside Idempotency and outside Usage (``install()`` puts it there). Reads the body the
context layer already read (``ctx.json()``), reserves requests, tokens, cost and a
concurrency lease in one backend step, adds the rate-limit headers to every response it
lets through (replacing any the app set, so none is duplicated), and reconciles with
``ctx.usage`` once the response has gone out whole, or else when the app returns (error,
cancellation or disconnect).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aimiddleware._asgi import get_header, is_preflight, route_path
from aimiddleware.context import SCOPE_KEY, RequestContext
from aimiddleware.ratelimit._run import failed_response, is_last_body, run_request, settle_once
from aimiddleware.ratelimit.headers import merge_rate_headers
from aimiddleware.ratelimit.limiter import RateLimiter
from aimiddleware.ratelimit.policy import Policy
from aimiddleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["RateLimitMiddleware", "exempt_paths"]


def exempt_paths(paths: Sequence[str]) -> tuple[str, ...]:
    """``paths`` checked as exempt paths: each a str starting with ``/`` (or ``*``). A bare str
    is refused: taken for its characters, it would exempt ``/`` and limit the path meant."""
    if isinstance(paths, str):
        raise TypeError(f"exempt paths must be a sequence of paths, e.g. ({paths!r},)")
    found = tuple(paths)
    for path in found:
        if not isinstance(path, str) or not path.startswith(("/", "*")):
            raise ValueError(f"an exempt path must start with '/', got {path!r}")
    return found


class RateLimitMiddleware:
    """Whole-app limits. Pass a :class:`RateLimiter`, or its options (``policies`` first).

    ``exempt``: paths (or ``"/prefix/*"``) never limited, such as health checks; matched
    as the app's routes are, without the root path.
    """

    def __init__(
        self,
        app: ASGIApp,
        policies: Policy | dict[str, Policy] | None = None,
        *,
        limiter: RateLimiter | None = None,
        exempt: Sequence[str] = (),
        **options: Any,
    ) -> None:
        if limiter is None:
            if policies is None:
                raise TypeError("RateLimitMiddleware needs policies or a limiter")
            limiter = RateLimiter(policies, **options)
        elif policies is not None or options:
            raise TypeError("pass either a limiter or its options, not both")
        exempt = exempt_paths(exempt)
        self.app = app
        self.limiter = limiter
        self.exact = frozenset(p for p in exempt if not p.endswith("*"))
        self.prefixes = tuple(p[:-1] for p in exempt if p.endswith("*"))
        self.has_exempt = bool(self.exact or self.prefixes)  # (callers skip is_exempt without)

    def is_exempt(self, path: str) -> bool:
        return path in self.exact or (bool(self.prefixes) and path.startswith(self.prefixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if (self.has_exempt and self.is_exempt(route_path(scope))) or (
            scope["method"] == "OPTIONS" and is_preflight(scope)
        ):
            await self.app(scope, receive, send)
            return
        ctx: RequestContext | None = scope.get("state", {}).get(SCOPE_KEY)
        if ctx is None:
            raise RuntimeError("RateLimitMiddleware needs RequestContextMiddleware (install())")
        limiter = self.limiter
        admission = await limiter.admit(
            ctx, content_type=get_header(scope["headers"], b"content-type")
        )
        extra = admission.raw_headers
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if not started and message["type"] == "http.response.start":
                started = True
                if extra:
                    headers = merge_rate_headers(message.get("headers", ()), extra)
                    message = {**message, "headers": headers}
            await send(message)
            if is_last_body(message):  # sent whole: settle now, not after background tasks
                await settle_once(limiter, admission, ctx, failed_response(ctx))

        await run_request(limiter, admission, ctx, self.app, scope, receive, send_with_headers)

