"""``RateLimitMiddleware``: admit every request on all its limits before the app runs.

Sits inside Idempotency and outside Usage (``install()`` puts it there). Reads the body the
context layer already read (``ctx.json()``), reserves requests, tokens, cost and a
concurrency lease in one backend step, adds the rate-limit headers to every response it
lets through (replacing any the app set, so none is duplicated), and after the app returns
(stream finished, error, cancellation or disconnect) reconciles with ``ctx.usage``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from aimiddleware._asgi import get_header
from aimiddleware.context import SCOPE_KEY, RequestContext
from aimiddleware.errors import AIError
from aimiddleware.ratelimit._run import add_headers, run_admitted, settle
from aimiddleware.ratelimit.headers import HEADER_NAMES
from aimiddleware.ratelimit.limiter import RateLimiter
from aimiddleware.ratelimit.policy import Policy
from aimiddleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["RateLimitMiddleware"]

logger = logging.getLogger("aimiddleware.ratelimit")

_OURS = {name.encode() for name in HEADER_NAMES}


class RateLimitMiddleware:
    """Whole-app limits. Pass a :class:`RateLimiter`, or its options (``policies`` first).

    ``exempt``: paths (or ``"/prefix/*"``) never limited, such as health checks.
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
        self.app = app
        self.limiter = limiter
        self.exact = frozenset(p for p in exempt if not p.endswith("*"))
        self.prefixes = tuple(p[:-1] for p in exempt if p.endswith("*"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in self.exact or path.startswith(self.prefixes or ("\0",)):
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
        status = 0

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if not status and message["type"] == "http.response.start":
                status = message["status"]
                if extra:
                    kept = [h for h in message.get("headers", ()) if h[0].lower() not in _OURS]
                    message = {**message, "headers": kept + extra}
            await send(message)

        if admission.lease is not None and limiter.refreshes:  # a lease to keep alive

            async def call() -> None:
                await self.app(scope, receive, send_with_headers)

            await run_admitted(limiter, admission, ctx, call, lambda _: not 0 < status < 400)
            return
        # No lease refresh to run beside the app: the same steps as run_admitted, inline.
        failed = True
        try:
            await self.app(scope, receive, send_with_headers)
            failed = not 0 < status < 400
        except AIError as err:
            add_headers(err, admission)
            raise
        finally:
            if limiter.settled(admission, ctx, failed=failed):
                pass
            elif limiter.refreshes:  # a shared store: shielded I/O
                await settle(limiter, admission, ctx, failed)
            else:  # in-process: completes without a checkpoint, so it cannot be interrupted
                try:
                    await limiter.finish(admission, ctx, failed=failed)
                except Exception:  # never let bookkeeping hide the response or the real error
                    logger.exception("rate-limit reconciliation failed")
