"""httpx and httpx2 side by side, for the retrying client, which serves clients of either.

httpx2 (pydantic/httpx2) is httpx's successor under the same API names; the official SDKs
(openai 3, anthropic 2) are built on it and type their ``http_client=`` as an httpx2 client.
Its classes are not httpx's: a check against one module's ``ConnectError`` or ``ByteStream``
misses the other's. Here each check holds both modules' classes, and ``*2`` names the
second base a class takes to be one of httpx2's too (``object`` where httpx2 is not
installed, or is httpx itself, after ``httpx2.alias_httpx()``). httpx2 stays optional.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, TypeAlias

import httpx

if TYPE_CHECKING:
    import httpx2 as httpx2
    from httpx2 import AsyncBaseTransport as AsyncBaseTransport2
    from httpx2 import AsyncByteStream as AsyncByteStream2
    from httpx2 import BaseTransport as BaseTransport2
    from httpx2 import SyncByteStream as SyncByteStream2
else:
    try:
        import httpx2
    except ImportError:  # httpx alone: the transports serve httpx clients
        httpx2 = None
    if httpx2 is httpx:  # alias_httpx(): one module under two names
        httpx2 = None
    if httpx2 is None:
        AsyncBaseTransport2 = AsyncByteStream2 = BaseTransport2 = SyncByteStream2 = object
    else:
        AsyncBaseTransport2 = httpx2.AsyncBaseTransport
        AsyncByteStream2 = httpx2.AsyncByteStream
        BaseTransport2 = httpx2.BaseTransport
        SyncByteStream2 = httpx2.SyncByteStream

__all__ = [
    "ASYNC_STREAMS",
    "BYTE_STREAMS",
    "MAYBE_SENT",
    "MODULES",
    "NOT_SENT",
    "REQUEST_NOT_READ",
    "SYNC_STREAMS",
    "AsyncBaseTransport2",
    "AsyncByteStream2",
    "BaseTransport2",
    "Headers",
    "Request",
    "Response",
    "SyncByteStream2",
    "httpx2",
]

Request: TypeAlias = "httpx.Request | httpx2.Request"
Response: TypeAlias = "httpx.Response | httpx2.Response"
Headers: TypeAlias = "httpx.Headers | httpx2.Headers"

MODULES: tuple[ModuleType, ...] = (httpx,) if httpx2 is None else (httpx, httpx2)

# The request never reached the server: safe to resend whatever the method.
NOT_SENT: tuple[type[Exception], ...] = tuple(
    cls for m in MODULES for cls in (m.ConnectError, m.ConnectTimeout, m.PoolTimeout)
)
# The request may have reached the server.
MAYBE_SENT: tuple[type[Exception], ...] = tuple(
    cls for m in MODULES for cls in (m.TimeoutException, m.NetworkError, m.RemoteProtocolError)
)
REQUEST_NOT_READ: tuple[type[Exception], ...] = tuple(m.RequestNotRead for m in MODULES)
# A body held whole in memory: sent again as it is.
BYTE_STREAMS: tuple[type[httpx.ByteStream | httpx2.ByteStream], ...] = tuple(
    m.ByteStream for m in MODULES
)
SYNC_STREAMS: tuple[type[httpx.SyncByteStream | httpx2.SyncByteStream], ...] = tuple(
    m.SyncByteStream for m in MODULES
)
ASYNC_STREAMS: tuple[type[httpx.AsyncByteStream | httpx2.AsyncByteStream], ...] = tuple(
    m.AsyncByteStream for m in MODULES
)
