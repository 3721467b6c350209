"""Idempotency records (frozen, pure): an in-flight lease and a completed response.

Records serialize to compact JSON (bytes as base64) so the Redis store keeps them as one
string value; the memory store keeps the objects themselves.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Claimed", "Completed", "InFlight", "LiveStream", "Outcome"]

_CONFIG = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")


class InFlight(BaseModel):
    """A lease: ``owner`` runs the request; only it may complete or release the record."""

    model_config = _CONFIG

    owner: str
    fingerprint: str
    expires_at: float


# What the memory store holds for a record beyond its text (CPython 3.11, measured with
# tracemalloc): the tuple of its values, the key, the LRU's and the expiry heap's entries for
# it (held as a model, it was ~1,700); a (name, value) header pair as a tuple of two str; a
# chunk as a bytes object in a tuple.
_RECORD_OVERHEAD = 640
_HEADER_OVERHEAD = 165
_CHUNK_OVERHEAD = 45


class Completed(BaseModel):
    """A finished response, replayed byte for byte.

    ``headers`` are (name, value) pairs as latin-1 text, in order. A plain response keeps
    its ``body``; an event stream keeps its ``chunks``, one per body message as sent.
    """

    model_config = _CONFIG

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes | None = None
    chunks: tuple[bytes, ...] | None = None
    fingerprint: str
    stored_at: float = Field(default_factory=time.time)

    @property
    def stream(self) -> bool:
        return self.chunks is not None

    @property
    def size(self) -> int:
        """Approximate bytes the memory store holds for it: headers plus body or chunks,
        and the Python objects around them (counting the text alone, a small JSON answer
        took ~4.7 times its count: ``memory_max_bytes`` held ~3 times what it says)."""
        n = _RECORD_OVERHEAD + _HEADER_OVERHEAD * len(self.headers)
        for k, v in self.headers:
            n += len(k) + len(v)
        if self.body is not None:
            n += len(self.body)
        if self.chunks is not None:
            n += _CHUNK_OVERHEAD * len(self.chunks) + sum(map(len, self.chunks))
        return n


class LiveStream(BaseModel):
    """An event stream still going out: its start and the chunks sent from ``offset`` on."""

    model_config = _CONFIG

    status: int
    headers: tuple[tuple[str, str], ...]
    chunks: tuple[bytes, ...] = ()
    offset: int = 0


class Claimed(BaseModel):
    """The caller now holds the lease."""

    model_config = _CONFIG

    owner: str


Outcome = Claimed | InFlight | Completed
