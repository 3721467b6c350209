"""The store protocol every idempotency backend implements (memory, Redis/Valkey).

Every operation is atomic in its backend. ``complete``, ``release`` and ``heartbeat`` are
compare-and-set on the owner token: a worker whose lease expired and was taken over can
never overwrite or delete the new owner's record.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from aimiddleware.idempotency.models import Completed, InFlight, LiveStream, Outcome

__all__ = ["IdempotencyStore", "StreamingStore"]


@runtime_checkable
class IdempotencyStore(Protocol):
    async def claim(self, key: str, fingerprint: str, owner: str, lease: float) -> Outcome:
        """Take the lease if the key is free (-> ``Claimed``), else return the record held."""
        ...

    async def heartbeat(self, key: str, owner: str, lease: float) -> bool:
        """Extend ``owner``'s lease; ``False`` if it no longer holds it."""
        ...

    async def complete(self, key: str, owner: str, record: Completed, retention: float) -> bool:
        """Replace ``owner``'s lease by ``record`` for ``retention`` seconds."""
        ...

    async def release(self, key: str, owner: str) -> bool:
        """Delete ``owner``'s lease so that a retry runs again."""
        ...


@runtime_checkable
class StreamingStore(IdempotencyStore, Protocol):
    """A store that also publishes a live event stream, so duplicates can follow it."""

    async def stream_start(
        self, key: str, owner: str, status: int, headers: tuple[tuple[str, str], ...]
    ) -> bool:
        """Publish the start of ``owner``'s event stream."""
        ...

    async def stream_append(self, key: str, owner: str, chunk: bytes) -> bool:
        """Publish one more chunk of ``owner``'s event stream, in order."""
        ...

    async def stream_read(
        self, key: str, offset: int
    ) -> LiveStream | InFlight | Completed | None:
        """The live stream from chunk ``offset`` on; else the record held (``None``: gone)."""
        ...
