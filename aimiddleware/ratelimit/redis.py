"""Redis/Valkey backend: one Lua script per admission, whatever the number of limits.

The counters of a principal live in one hash, its concurrency leases in one sorted set, and
the reservations held under leases (what a request reserved, refunded if its worker dies:
``held.lua``) in a sorted set of expiries and a hash of amounts; all four are keyed with
``{principal}`` hash tags (:meth:`Storage.key`), so a script touches one cluster slot.
Scripts go through redis-py's ``register_script`` (EVALSHA, reloaded after ``NOSCRIPT``, as
after a server restart). Time comes from the server (``TIME``) unless a ``clock`` is given,
so workers on hosts with skewed clocks still share windows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib.resources import files
from typing import Any

from aimiddleware.ratelimit.backend import Adjustment, Decision, Hit, WindowState, roll
from aimiddleware.storage import Storage, redis_errors

__all__ = ["RedisBackend"]

def _script(name: str, *, held: bool = True) -> str:
    """A script's text after window.lua's functions (the clock, a counter's window state);
    ``held``: after held.lua's refund function too (the scripts that read the counters
    refund expired reservations first)."""
    source = files("aimiddleware.ratelimit")
    parts = ["window.lua", "held.lua", name] if held else ["window.lua", name]
    return "\n".join(source.joinpath(part).read_text() for part in parts)


class RedisBackend:
    """Counters and leases in Redis/Valkey. ``clock`` (seconds) is for tests only."""

    #: State is shared between processes: leases need TTL refreshes.
    shared = True

    def __init__(
        self,
        storage: Storage,
        *,
        namespace: str = "rl",
        clock: Callable[[], float] | None = None,
    ) -> None:
        if storage.is_memory:
            raise ValueError("RedisBackend needs a redis:// storage")
        if not namespace or any(c in namespace for c in "{}"):
            raise ValueError("namespace must be non-empty and contain no braces")
        self.storage = storage
        self.namespace = namespace
        self.clock = clock
        self._acquire: Any = None
        self._adjust: Any = None
        self._refresh: Any = None
        self._peek: Any = None

    def _keys(self, principal: str) -> list[str]:
        """Counters, concurrency leases, held leases (expiries), what they hold."""
        key, ns = self.storage.key, self.namespace
        return [
            key(ns, principal),
            key(ns, principal, "leases"),
            key(ns, principal, "held"),
            key(ns, principal, "held", "amounts"),
        ]

    def _now_arg(self) -> str:
        return "" if self.clock is None else str(int(self.clock() * 1000))

    async def _server_now(self) -> int:
        """Now in ms: the server's clock (the scripts' time), or the test clock."""
        if self.clock is not None:
            return int(self.clock() * 1000)
        sec, micro = await self.storage.redis.time()
        return int(sec) * 1000 + int(micro) // 1000

    def _scripts(self) -> tuple[Any, Any]:
        if self._acquire is None:
            client = self.storage.redis
            self._acquire = client.register_script(_script("acquire.lua"))
            self._adjust = client.register_script(_script("adjust.lua", held=False))
        return self._acquire, self._adjust

    async def acquire(
        self,
        principal: str,
        hits: Sequence[Hit],
        *,
        lease: str | None = None,
        concurrency: int = 0,
        lease_ttl_ms: int = 0,
        held: str = "",
    ) -> Decision:
        args: list[Any] = [
            self._now_arg(), lease or "", concurrency, lease_ttl_ms, len(hits), held
        ]
        for hit in hits:
            args.extend((hit.field, hit.window_ms, hit.limit, hit.cost))
        script, _ = self._scripts()
        async with redis_errors("rate limit"):
            out = await script(keys=self._keys(principal), args=args)
        vals = [int(v) for v in out]
        states = tuple(
            WindowState(vals[i], vals[i + 1], vals[i + 2], vals[i + 3])
            for i in range(4, len(vals), 4)
        )
        return Decision(bool(vals[0]), vals[1], states, vals[3], vals[2])

    async def adjust(
        self, principal: str, adjustments: Sequence[Adjustment], *, release: str | None = None
    ) -> None:
        if not adjustments and release is None:
            return
        args: list[Any] = [self._now_arg(), release or "", len(adjustments)]
        for adj in adjustments:
            args.extend(adj)  # (field, window_ms, window, delta, held)
        _, script = self._scripts()
        async with redis_errors("rate limit"):
            await script(keys=self._keys(principal), args=args)

    async def refresh(
        self,
        principal: str,
        lease: str,
        ttl_ms: int,
        *,
        concurrent: bool = True,
        held: bool = False,
    ) -> None:
        if self._refresh is None:
            self._refresh = self.storage.redis.register_script(_script("refresh.lua", held=False))
        async with redis_errors("rate limit"):
            args = [self._now_arg(), lease, ttl_ms, "1" if concurrent else "", "1" if held else ""]
            await self._refresh(keys=self._keys(principal)[1:3], args=args)

    async def mark_once(self, principal: str, tag: str, ttl_ms: int) -> bool:
        key = self.storage.key(self.namespace, principal, "alert", tag)
        async with redis_errors("rate limit"):
            return bool(await self.storage.redis.set(key, b"1", nx=True, px=ttl_ms))

    async def peek(self, principal: str, hits: Sequence[Hit]) -> tuple[WindowState, ...]:
        """The counters now, after refunding expired held reservations (one round trip)."""
        if self._peek is None:
            self._peek = self.storage.redis.register_script(_script("peek.lua"))
        async with redis_errors("rate limit"):
            args = [self._now_arg(), *(h.field for h in hits)]
            now, *raw = await self._peek(keys=self._keys(principal), args=args)
        now = int(now)
        out = []
        for hit, value in zip(hits, raw, strict=False):
            index = now // hit.window_ms
            prev = curr = 0
            if value is not None:
                a, p, c = (int(x) for x in value.split())
                prev, curr = roll(a, p, c, index)
            out.append(WindowState(index, prev, curr, now - index * hit.window_ms))
        return tuple(out)

    async def in_flight(self, principal: str) -> int:
        client = self.storage.redis
        async with redis_errors("rate limit"):
            now = await self._server_now()
            return int(await client.zcount(self._keys(principal)[1], f"({now}", "+inf"))
