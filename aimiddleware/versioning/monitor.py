"""Deprecated calls made visible to monitoring: a per-principal counter and a hook.

Counts live in the shared :class:`~aimiddleware.storage.Storage` (a Redis hash per
principal, or an in-process dict for ``memory://``), so with many workers the counts are
global. Each deprecated call also goes to an optional hook (sync or async) as a
:class:`DeprecatedCall`, for logs, metrics or alerts.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import anyio
from cachetools import LRUCache
from starlette.concurrency import run_in_threadpool

from aimiddleware._asgi import is_async_callable
from aimiddleware.context import RequestContext, after_response
from aimiddleware.storage import Storage, redis_errors
from aimiddleware.versioning.lifecycle import Lifecycle

__all__ = ["DeprecatedCall", "DeprecationHook", "DeprecationMonitor", "Kind"]

logger = logging.getLogger("aimiddleware.versioning")

_MAX_MEMORY_PRINCIPALS = 100_000  # callers whose counts memory:// keeps

# One more call in a caller's hash (KEYS[1]; ARGV: field, ttl seconds or '' for none).
_COUNT = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if ARGV[2] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return n
"""

Kind = Literal["model", "api_version", "route"]


@dataclass(frozen=True)
class DeprecatedCall:
    """One call that used something deprecated."""

    principal: str
    kind: Kind
    name: str
    deprecated_at: datetime | None
    sunset_at: datetime | None
    replacement: str | None
    request_id: str | None
    at: datetime

    @classmethod
    def of(
        cls, ctx: RequestContext, kind: Kind, name: str, lifecycle: Lifecycle, now: datetime
    ) -> DeprecatedCall:
        """The call ``ctx`` makes to ``name`` (a ``kind``) whose lifecycle is ``lifecycle``."""
        return cls(
            principal=ctx.principal,
            kind=kind,
            name=name,
            deprecated_at=lifecycle.deprecated_at,
            sunset_at=lifecycle.sunset_at,
            replacement=lifecycle.replacement,
            request_id=ctx.request_id,
            at=now,
        )


DeprecationHook = Callable[[DeprecatedCall], Awaitable[None] | None]


class DeprecationMonitor:
    """Counts deprecated calls per principal and forwards each to ``hook``.

    Recording never fails the request: if the store is down the count is skipped and a
    warning logged (the response still carries its Deprecation headers).
    """

    def __init__(
        self,
        storage: Storage | str | None = None,
        *,
        hook: DeprecationHook | None = None,
        ttl_seconds: int | None = 90 * 86400,
    ) -> None:
        if hook is not None and not callable(hook):
            raise TypeError("hook must be a callable taking a DeprecatedCall")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive or None")
        self.storage = Storage.coerce(storage)
        self.hook = hook
        self.ttl_seconds = ttl_seconds
        self._hook_async = hook is not None and is_async_callable(hook)
        # memory://: bounded like the other in-process stores (least recent caller first)
        self._memory: LRUCache[str, dict[str, int]] = LRUCache(_MAX_MEMORY_PRINCIPALS)

    def _key(self, principal: str) -> str:
        return self.storage.key("deprecations", principal)

    async def record(self, call: DeprecatedCall) -> None:
        field_name = f"{call.kind}:{call.name}"
        try:
            if self.storage.is_memory:
                counts = self._memory.setdefault(call.principal, {})
                counts[field_name] = counts.get(field_name, 0) + 1
            else:
                async with redis_errors("deprecation monitor"):
                    ttl = "" if self.ttl_seconds is None else self.ttl_seconds
                    await self.storage.script(_COUNT)(
                        keys=[self._key(call.principal)], args=[field_name, ttl]
                    )
        except Exception:
            logger.warning("could not count a deprecated call", exc_info=True)
        if self.hook is not None:
            try:
                if self._hook_async:
                    await self.hook(call)  # type: ignore[misc]
                else:
                    await run_in_threadpool(self.hook, call)
            except Exception:
                logger.exception("deprecation hook failed")

    async def record_later(self, ctx: RequestContext, calls: tuple[DeprecatedCall, ...]) -> None:
        """:meth:`record` ``calls`` once ``ctx``'s request has ended (now, if no context layer
        will run it): counting is telemetry, and a slow or dead store must not hold the
        endpoint back. A cancelled request is counted too."""

        async def count() -> None:
            with anyio.CancelScope(shield=True):  # (bounded by the store's socket timeout)
                for call in calls:
                    await self.record(call)

        if not after_response(ctx, count):
            await count()

    async def counts(self, principal: str) -> dict[str, int]:
        """``{"model:my-model-2025-01-01": 3, "api_version:v1": 1, ...}`` for one caller."""
        if self.storage.is_memory:
            return dict(self._memory.get(principal, {}))
        async with redis_errors("deprecation monitor"):
            raw = await self.storage.redis.hgetall(self._key(principal))
        return {
            (k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()
        }
