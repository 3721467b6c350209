"""``IdempotencyConfig``: the options shared by the middleware and the decorator."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

from aimiddleware.headers import header_name

__all__ = ["DEFAULT_UNSTORED_STATUSES", "IdempotencyConfig"]

# Answers that depend on the moment rather than the request: a retry must run again.
DEFAULT_UNSTORED_STATUSES = frozenset({401, 403, 408, 409, 423, 425, 429})


@dataclass(frozen=True)
class IdempotencyConfig:
    """How ``Idempotency-Key`` is enforced.

    * ``methods``: the methods it applies to (others pass straight through).
    * ``required``: a request without the header is a 400 (else it simply is not deduped).
    * ``lease_seconds`` / ``heartbeat_seconds``: the in-flight lease and how often the
      running request extends it (default a third of the lease). A worker that dies frees
      the key after at most one lease.
    * ``retention_seconds``: how long completed responses are replayed (default 24 h).
    * ``on_conflict``: ``"reject"`` answers a duplicate in flight with 409 (retryable,
      ``Retry-After``); ``"wait"`` polls up to ``wait_seconds`` for the result (then 409).
    * ``follow_streams``: a duplicate arriving while the original's event stream is going
      out follows it live from its first event instead of a 409 (the store publishes every
      chunk: one more store write per event). If the original breaks off, the followers'
      streams are cut too.
    * ``store_server_errors``: also store 5xx answers (Stripe-style); default off, so 5xx,
      ``unstored_statuses`` (429, 409, 408, ...) and exceptions release the key.
    * ``max_record_bytes``: a larger response is passed through and not stored
      (``Idempotent-Stored: false`` when known at the start).
    * ``secret``: the fingerprint HMAC key. Random per process if unset: **several workers
      must share one configured secret**.
    * ``on_store_error``: ``"closed"`` (default) answers a typed 503 ``store_unavailable``
      when the store is down; ``"open"`` runs the request without idempotency and marks the
      response ``Idempotent-Stored: false``.
    * ``memory_max_bytes``: bound of the in-process store.
    """

    methods: Collection[str] = ("POST", "PATCH")
    header: str = "Idempotency-Key"
    required: bool = False
    lease_seconds: float = 60.0
    heartbeat_seconds: float | None = None
    retention_seconds: float = 24 * 3600.0
    on_conflict: Literal["reject", "wait"] = "reject"
    wait_seconds: float = 10.0
    poll_interval: float = 0.05
    follow_streams: bool = False
    store_server_errors: bool = False
    unstored_statuses: Collection[int] = field(default=DEFAULT_UNSTORED_STATUSES)
    max_record_bytes: int = 1024 * 1024
    secret: bytes | str | None = field(default=None, repr=False)
    on_store_error: Literal["closed", "open"] = "closed"
    memory_max_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if isinstance(self.methods, str) or not all(isinstance(m, str) for m in self.methods):
            raise TypeError("methods must be a collection of method names")
        object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))
        statuses = self.unstored_statuses
        if isinstance(statuses, (str, int)) or not all(
            type(c) is int and 100 <= c <= 599 for c in statuses
        ):
            raise TypeError("unstored_statuses must be a collection of HTTP status codes (ints)")
        object.__setattr__(self, "unstored_statuses", frozenset(statuses))
        header_name("header", self.header)  # (an RFC 9110 token; kept as given, for messages)
        for name in ("lease_seconds", "retention_seconds", "poll_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.heartbeat_seconds is not None and not (
            0 < self.heartbeat_seconds < self.lease_seconds
        ):
            raise ValueError("heartbeat_seconds must be > 0 and shorter than lease_seconds")
        if self.wait_seconds < 0:
            raise ValueError("wait_seconds must be >= 0")
        if self.on_conflict not in ("reject", "wait"):
            raise ValueError("on_conflict must be 'reject' or 'wait'")
        if self.on_store_error not in ("closed", "open"):
            raise ValueError("on_store_error must be 'closed' or 'open'")
        if self.max_record_bytes <= 0 or self.memory_max_bytes <= 0:
            raise ValueError("max_record_bytes and memory_max_bytes must be > 0")
        # Checked here, not first when the middleware is built: Starlette builds it on the
        # first ASGI call, uvicorn takes a failing lifespan for "lifespan unsupported", and
        # every request would then be a bare 500.
        secret = self.secret
        if secret is not None and len(secret.encode() if isinstance(secret, str) else secret) < 16:
            raise ValueError("secret must be at least 16 bytes (e.g. secrets.token_hex(16))")

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_seconds or self.lease_seconds / 3
