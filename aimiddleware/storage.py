"""One storage URL for all state: ``memory://`` (embedded default) or Redis/Valkey.

``Storage("memory://")`` keeps everything in-process. ``redis://``, ``rediss://``,
``valkey://``, ``valkeys://``, ``unix://`` and ``redis+cluster://host:port`` (Redis Cluster;
``rediss+cluster://`` over TLS) share one redis-py asyncio client, created on first use,
between every layer. Every feature hashes its keys per principal (``{principal}`` tags) so one
operation touches one slot.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from aimiddleware.errors import StoreUnavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["Storage", "redis_errors"]

logger = logging.getLogger("aimiddleware.storage")

_REDIS_SCHEMES = {"redis", "rediss", "valkey", "valkeys", "unix"}
_CLUSTER_SCHEMES = {"redis+cluster", "rediss+cluster", "valkey+cluster", "valkeys+cluster"}


class Storage:
    """A parsed storage URL and, for Redis/Valkey, the shared client."""

    def __init__(
        self,
        url: str = "memory://",
        *,
        key_prefix: str = "aimw",
        client: Any | None = None,
        socket_timeout: float = 2.0,
        max_connections: int = 100,
        pool_timeout: float = 5.0,
    ) -> None:
        scheme = urlsplit(url).scheme.lower()
        if scheme == "memory":
            self.kind: Literal["memory", "redis"] = "memory"
        elif scheme in _REDIS_SCHEMES or scheme in _CLUSTER_SCHEMES:
            self.kind = "redis"
        else:
            raise ValueError(
                f"unsupported storage URL scheme {scheme!r}: use memory://, redis://, rediss://, "
                "valkey://, unix://, redis+cluster:// or rediss+cluster://"
            )
        if not key_prefix or "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must be non-empty and contain no braces")
        self.url = url
        self.key_prefix = key_prefix
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.socket_timeout = socket_timeout
        self.max_connections = max_connections
        self.pool_timeout = pool_timeout
        self.cluster = scheme.endswith("+cluster")
        self._client = client
        self._scripts: dict[str, Any] = {}
        if self.kind == "redis" and client is None:
            self._check_url()

    @classmethod
    def coerce(cls, value: Storage | str | None) -> Storage:
        if value is None:
            return cls()
        if isinstance(value, Storage):
            return value
        return cls(value)

    @property
    def is_memory(self) -> bool:
        return self.kind == "memory"

    @property
    def redis(self) -> Redis:
        """The shared asyncio client (created lazily; needs the ``redis`` extra)."""
        if self.kind != "redis":
            raise RuntimeError("this Storage is in-memory; it has no Redis client")
        if self._client is None:
            self._client = self._connect()
        return self._client  # type: ignore[no-any-return]

    def script(self, text: str) -> Any:
        """``text`` registered once on the shared client: one atomic round trip per call.

        Used for multi-key writes rather than a ``MULTI`` pipeline: redis-py's asyncio
        Cluster client runs each command queued on a transaction pipeline in a thread with an
        event loop of its own (blocking this one), and maps the cluster on that loop when it
        has not yet done so, which leaves the client unusable afterwards (redis-py 8.1).
        """
        script = self._scripts.get(text)
        if script is None:
            script = self._scripts[text] = self.redis.register_script(text)
        return script

    def key(self, namespace: str, principal: str, *parts: str) -> str:
        """``prefix:namespace:{principal}:parts``: hash-tagged so a principal is one slot."""
        tail = ":".join(parts)
        base = f"{self.key_prefix}:{namespace}:{{{principal}}}"
        return f"{base}:{tail}" if tail else base

    def _check_url(self) -> None:
        """Build what :meth:`_connect` builds, a connection of the pool too, and drop them:
        nothing connects. A URL redis-py refuses (an option its client does not take, such as
        ``ssl_ca_path`` on a cluster URL or a misspelt ``ssl_ca_cert``, a value it cannot
        read, a database on a cluster) is a ``ValueError`` at startup, where it failed every
        request with a 500 once the client was built on first use."""
        try:
            import redis  # noqa: F401
        except ImportError:  # pragma: no cover - (the first use says what to install)
            return
        try:
            client = self._connect()
            if not self.cluster:
                client.connection_pool.make_connection()
        except Exception as exc:  # (no I/O here: whatever fails is the URL's)
            raise ValueError(f"redis-py does not take this storage URL: {exc}") from exc

    def _connect(self) -> Any:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.cluster import RedisCluster
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(
                "a redis:// storage URL needs the redis extra: pip install 'aimiddleware[redis]'"
            ) from exc
        scheme, _, rest = self.url.partition("://")
        scheme = scheme.lower()
        timeout = self.socket_timeout
        if self.cluster:
            real = "rediss" if scheme.startswith(("rediss", "valkeys")) else "redis"
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # No retries of its own: redis-py's (3, each re-mapping the cluster, which
            # connects to the node that stopped answering) held a call 22 s, not
            # ``socket_timeout``; a 503 is retryable, and the caller's client retries it.
            return _initializing(RedisCluster).from_url(
                f"{real}://{rest}", socket_timeout=timeout, socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
            )
        if scheme in ("valkey", "valkeys"):
            scheme = "redis" if scheme == "valkey" else "rediss"
        # A blocking pool: a burst of concurrent requests waits for a free connection
        # (up to ``pool_timeout``) instead of failing with MaxConnectionsError.
        pool = aioredis.BlockingConnectionPool.from_url(
            f"{scheme}://{rest}",
            max_connections=self.max_connections,
            timeout=self.pool_timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            self._scripts.clear()
            await client.aclose()
            if self.cluster:  # (redis-py skips the nodes of a client flagged to map again)
                await client.nodes_manager.aclose()
                await client.nodes_manager.aclose("startup_nodes")

    def __repr__(self) -> str:
        safe = urlsplit(self.url)
        host = safe.hostname or ""
        return f"Storage({safe.scheme}://{host}{':' + str(safe.port) if safe.port else ''})"


def _initializing(cluster: type[Any]) -> type[Any]:
    """redis-py's asyncio ``RedisCluster``, mapping the cluster before every command that needs it.

    The asyncio client must be ``await initialize()``-d before use, and again after it closes
    its nodes (a burst of MOVED replies during a resharding does that). Until then it routes a
    keyed command such as ``EVALSHA`` to a random node: with many requests in flight, enough
    ``MOVED`` replies come back for it to close every node, connections in use included, and
    those requests fail inside the client (redis-py 8.1, found by the cluster tests).
    ``initialize()`` is idempotent and takes a lock, so checking its flag first is enough.
    """

    class InitializingCluster(cluster):  # type: ignore[misc]
        async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
            if self._initialize:
                await self.initialize()
            return await super().execute_command(*args, **kwargs)

    return InitializingCluster


@contextlib.asynccontextmanager
async def redis_errors(what: str) -> AsyncIterator[None]:
    """Turn a store that is down or timing out into a typed, retryable 503."""
    try:
        import redis.exceptions as rexc
    except ImportError:  # pragma: no cover
        yield
        return
    try:
        yield
    except (
        rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, rexc.ReadOnlyError,
        rexc.OutOfMemoryError, rexc.ClusterError, rexc.TryAgainError, rexc.SlotNotCoveredError,
        OSError,
    ) as exc:  # down, slow, failing over (a read-only replica, a cluster resharding) or full
        raise _unavailable(what, exc) from exc
    except rexc.RedisClusterException as exc:
        # No node reachable, the slots not covered, nodes that disagree on the slot map in a
        # failover: an outage. A command whose keys are in different slots is a bug of ours
        # to see, not a 503 to retry for ever.
        if "same key slot" in str(exc):
            raise
        raise _unavailable(what, exc) from exc
    except AttributeError as exc:
        # redis-py's asyncio cluster client closes connections that other requests are using
        # when a node fails or comes back (8.1: a node's ``aclose`` on re-mapping), and those
        # requests fail inside the client: ``'NoneType' object has no attribute 'writelines'``.
        if not _raised_in_redis(exc):
            raise
        raise _unavailable(what, exc) from exc


# Failures logged lately, by (store, reason): when each was last logged, and how many were
# not since. An outage fails every request the same way: one line per reason per
# ``_LOG_EVERY`` seconds, not one per request. (Bounded: the reasons name a store's address.)
_LOG_EVERY = 5.0
_logged: dict[tuple[str, str], tuple[float, int]] = {}


def _unavailable(what: str, exc: BaseException) -> StoreUnavailable:
    """The 503 for ``exc``, logged with its cause. The client is told which store failed,
    never why (its address, its certificate); the server's log says: a CA that does not sign
    the store's certificate, a refused password, a timeout. One line, no traceback, and the
    same failure again within ``_LOG_EVERY`` seconds is counted, not logged."""
    why = f"{type(exc).__name__}: {exc}"
    root, seen = exc, {id(exc)}
    while (inner := root.__cause__ or root.__context__) is not None and id(inner) not in seen:
        root = inner
        seen.add(id(root))
    if root is not exc and str(root) not in why:  # (redis-py 5.0 drops an SSL error's text)
        why += f" ({type(root).__name__}: {root})"
    now = time.monotonic()
    last, quiet = _logged.get((what, why), (-math.inf, 0))
    if now - last < _LOG_EVERY:
        _logged[what, why] = (last, quiet + 1)
    else:
        if len(_logged) >= 256:
            _logged.clear()
        _logged[what, why] = (now, 0)
        more = f" ({quiet} more since the last such line)" if quiet else ""
        logger.warning("the %s store is unavailable: %s%s", what, why, more)
    return StoreUnavailable(f"The {what} store is unavailable.", retry_after=1)


def _raised_in_redis(exc: BaseException) -> bool:
    """The innermost frame of ``exc``'s traceback is redis-py's."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("redis.")
