"""``IdempotencyMiddleware``: exactly-once handling of requests carrying ``Idempotency-Key``.

Sits outside rate limiting (a replay costs no quota and runs no model) and inside the
context and error layers, whose :class:`~aimiddleware.context.RequestContext` (principal,
body read once) it needs. See :class:`~aimiddleware.idempotency.config.IdempotencyConfig`
for the options.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aimiddleware._asgi import get_header
from aimiddleware.context import SCOPE_KEY, RequestContext
from aimiddleware.errors import DEFAULT_TYPE_BASE
from aimiddleware.idempotency.config import IdempotencyConfig
from aimiddleware.idempotency.engine import IdempotencyEngine, answer
from aimiddleware.idempotency.replay import STORED
from aimiddleware.idempotency.store import IdempotencyStore
from aimiddleware.storage import Storage
from aimiddleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["IdempotencyMiddleware", "context_of"]


def context_of(scope: Scope) -> RequestContext:
    ctx = scope.get("state", {}).get(SCOPE_KEY)
    if not isinstance(ctx, RequestContext):
        raise RuntimeError(
            "idempotency needs the request context: add RequestContextMiddleware outside it "
            "(install() does)"
        )
    return ctx


class IdempotencyMiddleware:
    """``IdempotencyMiddleware(app, storage="redis://...", config=None, **options)``.

    ``options`` are :class:`IdempotencyConfig` fields and override ``config``; ``store``
    replaces the backend that ``storage`` would pick.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        storage: Storage | str = "memory://",
        config: IdempotencyConfig | None = None,
        store: IdempotencyStore | None = None,
        error_type_base: str = DEFAULT_TYPE_BASE,
        **options: Any,
    ) -> None:
        config = config or IdempotencyConfig()
        if options:
            config = replace(config, **options)
        self.app = app
        self.engine = IdempotencyEngine(config, storage, store)
        self.type_base = error_type_base
        self._methods = self.engine.config.methods
        self._header = self.engine.header
        self._required = self.engine.config.required

    def applies(self, scope: Scope) -> bool:
        """Does this request go through the engine? (Its method is covered, and it carries
        the key header or keys are required.) The hot path: no key, one header scan."""
        if scope["method"] not in self._methods and not self.engine.applies(scope["method"]):
            return False
        if self._required:
            return True
        return get_header(scope["headers"], self._header) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.applies(scope):
            await self.app(scope, receive, send)
            return
        ctx = context_of(scope)
        begin = await self.engine.begin(ctx, scope["headers"], scope.get("query_string", b""))
        if begin.lease is not None:
            await self.engine.run(
                begin.lease, lambda recording: self.app(scope, receive, recording), send
            )
        elif begin.follow is not None:
            await self.engine.follow(*begin.follow, send, scope["headers"])
        elif begin.replay is not None or begin.error is not None:
            await answer(begin, send, ctx.request_id, self.type_base, scope["headers"])
        elif begin.unstored:
            await self.app(scope, receive, _mark_unstored(send))
        else:
            await self.app(scope, receive, send)


def _mark_unstored(send: Send) -> Send:
    async def marked(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), STORED]}
        await send(message)

    return marked
