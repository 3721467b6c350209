"""Idempotency keys: exactly-once handling of retried requests, event streams included.

Modelled on draft-ietf-httpapi-idempotency-key-header and Stripe's semantics. See
:class:`IdempotencyMiddleware`, :func:`idempotent` and :class:`IdempotencyConfig`.
"""

from aimiddleware.idempotency.config import DEFAULT_UNSTORED_STATUSES, IdempotencyConfig
from aimiddleware.idempotency.decorator import idempotent
from aimiddleware.idempotency.fingerprint import Fingerprinter
from aimiddleware.idempotency.key import MAX_KEY_LENGTH, parse_key
from aimiddleware.idempotency.memory import MemoryIdempotencyStore
from aimiddleware.idempotency.middleware import IdempotencyMiddleware
from aimiddleware.idempotency.models import Claimed, Completed, InFlight, LiveStream
from aimiddleware.idempotency.redis import RedisIdempotencyStore
from aimiddleware.idempotency.store import IdempotencyStore, StreamingStore

__all__ = [
    "DEFAULT_UNSTORED_STATUSES",
    "MAX_KEY_LENGTH",
    "Claimed",
    "Completed",
    "Fingerprinter",
    "IdempotencyConfig",
    "IdempotencyMiddleware",
    "IdempotencyStore",
    "InFlight",
    "LiveStream",
    "MemoryIdempotencyStore",
    "RedisIdempotencyStore",
    "StreamingStore",
    "idempotent",
    "parse_key",
]
