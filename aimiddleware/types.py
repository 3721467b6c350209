"""ASGI type aliases and the Protocols for pluggable callables.

Kept deliberately tiny, like ``starlette.types``: every middleware in the package speaks
these names and nothing else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

__all__ = [
    "ASGIApp",
    "Message",
    "PrincipalResolver",
    "Receive",
    "Scope",
    "Send",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class PrincipalResolver(Protocol):
    """Who is calling: returns a stable, non-secret identifier for the caller.

    May be sync or async; ``None`` falls back to the default resolution.
    """

    def __call__(self, scope: Scope) -> str | Awaitable[str | None] | None: ...
