"""httpx and httpx2 side by side, for the retrying client, which serves clients of either.

httpx2 (pydantic/httpx2) is httpx's successor under the same API names; the official SDKs
(openai 3, anthropic 2) are built on it and type their ``http_client=`` as an httpx2 client.
Its classes are not httpx's: a check against one module's ``ConnectError`` or ``ByteStream``
misses the other's. Here each check holds both modules' classes, and ``*2`` names the
second base a class takes to be one of httpx2's too (``object`` where httpx2 is not
installed, or is httpx itself, after ``httpx2.alias_httpx()``). httpx2 stays optional.
"""

from __future__ import annotations

import ssl
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, TypeAlias

import anyio
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
    "UNMAPPED",
    "AsyncBaseTransport2",
    "AsyncByteStream2",
    "BaseTransport2",
    "Headers",
    "Request",
    "Response",
    "SyncByteStream2",
    "certificate_failure",
    "httpx2",
    "mapped",
    "not_tls",
    "tls_mismatch",
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


# What a TLS connection's failure can surface as below httpx's mapping, on an asyncio event
# loop: an ``ssl.SSLError`` from a read after the handshake (a record the client cannot
# decrypt, an alert), ``anyio.EndOfStream`` from a write after the peer left without
# close_notify (httpcore 1.0.9, httpcore2 before 2.14), and from the handshake itself on
# httpcore before 1.0.6 (ssl.SSLError, EndOfStream, BrokenResourceError).
UNMAPPED: tuple[type[Exception], ...] = (
    ssl.SSLError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
)

# The function a TLS handshake runs in: httpcore's and httpcore2's backends, and ssl's.
_HANDSHAKE = frozenset({"start_tls", "do_handshake"})


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, innermost last."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _frames(traceback: TracebackType | None) -> set[str]:
    names: set[str] = set()
    while traceback is not None:
        names.add(traceback.tb_frame.f_code.co_name)
        traceback = traceback.tb_next
    return names


def mapped(exc: Exception, request: Request) -> Exception:
    """For an error httpx left unmapped (one of ``UNMAPPED``), the request's module's own:
    ``ConnectError`` if it came from the TLS handshake, is a certificate failure or a
    version or cipher the peers do not share (nothing was sent), else ``ReadError`` (the
    request may have reached the server)."""
    module = httpx2 if httpx2 is not None and isinstance(request, httpx2.Request) else httpx
    chain = _chain(exc)
    handshake = certificate_failure(exc) or tls_mismatch(exc) or any(
        _HANDSHAKE & _frames(error.__traceback__) for error in chain
    )
    kind = module.ConnectError if handshake else module.ReadError
    message = next((str(error) for error in chain if str(error)), type(exc).__name__)
    error: Exception = kind(message, request=request)
    error.__cause__ = exc  # (before it is raised: the retry decision reads the chain)
    return error


def certificate_failure(exc: BaseException) -> bool:
    """A TLS certificate refused: the server's by this client (``SSLCertVerificationError``:
    untrusted, expired, another host's) or this client's by the server (its alert: a
    certificate required, bad, unknown, expired, from an unknown CA). Permanent until
    someone changes a certificate or its trust: never worth a retry."""
    for error in _chain(exc):
        if isinstance(error, ssl.SSLCertVerificationError):
            return True
        if isinstance(error, ssl.SSLError):
            reason = error.reason or ""
            if "CERTIFICATE" in reason or reason.endswith("UNKNOWN_CA"):
                return True
    return False


# What OpenSSL says when the two sides' TLS settings have nothing in common: no protocol
# version both take (a server that speaks only TLS 1.3 to a client capped at 1.2, or the
# reverse: the peer's alert, TLSV1_ALERT_PROTOCOL_VERSION, or this side's own
# UNSUPPORTED_PROTOCOL; NO_PROTOCOLS_AVAILABLE, a context whose range is empty), or no cipher
# both take (NO_SHARED_CIPHER where the server says it, SSLV3_ALERT_HANDSHAKE_FAILURE, the
# alert it then sends; NO_CIPHERS_AVAILABLE, a context left with none;
# TLSV1_ALERT_INSUFFICIENT_SECURITY, a server that wants stronger ciphers than offered).
_MISMATCH = frozenset(
    {
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "UNSUPPORTED_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "NO_SHARED_CIPHER",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        "NO_CIPHERS_AVAILABLE",
        "TLSV1_ALERT_INSUFFICIENT_SECURITY",
    }
)


def tls_mismatch(exc: BaseException) -> bool:
    """A TLS handshake refused because the two sides share no protocol version or no cipher
    (each side's ``SSLContext``: its minimum/maximum version, its ciphers). A configuration
    error, failing the same way until someone changes a context: never worth a retry, as a
    certificate refused is not. A handshake cut or reset is not one of these."""
    for error in _chain(exc):
        if isinstance(error, ssl.SSLError) and getattr(error, "reason", None) in _MISMATCH:
            return True
    return False


# What OpenSSL says when the peer's first bytes are not a TLS record (a plain-HTTP port, or
# another protocol's): WRONG_VERSION_NUMBER from OpenSSL 1.1 to 3.1, UNKNOWN_PROTOCOL before,
# RECORD_LAYER_FAILURE from 3.2 (pushed last, over the record layer's own reason, and where
# Python's table of reasons lacks it, in the message alone: "[SSL] record layer failure");
# HTTP_REQUEST and HTTPS_PROXY_REQUEST where the peer sent an HTTP request instead.
_NOT_TLS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "UNKNOWN_PROTOCOL",
        "RECORD_LAYER_FAILURE",
        "HTTP_REQUEST",
        "HTTPS_PROXY_REQUEST",
    }
)
_NOT_TLS_WORDS = ("wrong version number", "unknown protocol", "record layer failure")


def not_tls(exc: BaseException) -> bool:
    """The TLS handshake of ``exc`` (a connect error) failed because the peer does not speak
    TLS: an ``https://`` URL at a plain-HTTP port, or another protocol's. A configuration
    error, failing the same way until someone changes the URL: never worth a retry. A
    handshake the peer cut (an EOF) is not one of these."""
    for error in _chain(exc):
        if isinstance(error, ssl.SSLError) and not isinstance(error, ssl.SSLEOFError):
            reason = getattr(error, "reason", None)  # (None: a reason Python has no name for)
            if reason is not None:
                if reason in _NOT_TLS:
                    return True
            elif any(words in str(error).lower() for words in _NOT_TLS_WORDS):
                return True
    return False
