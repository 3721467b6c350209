"""An httpx transport that retries what the error taxonomy marks retryable, and nothing else.

::

    client = httpx2.Client(transport=RetryTransport())
    openai.OpenAI(http_client=client, max_retries=0)          # or AsyncRetryTransport + AsyncOpenAI

The transports serve clients of ``httpx2`` (the HTTP client the official SDKs are built on)
and of legacy ``httpx`` alike: each is a transport of both modules, its default inner
transport is made from the module of the client's request (so the response is the type that
client expects), and both modules' errors and streams are read the same way.

Per logical request it adds an ``Idempotency-Key`` (POST and PATCH by default, unless the
caller set one) and sends the same key on every attempt, so a server with idempotency
middleware runs the operation at most once. What is retried, in order:

1. a response whose ``x-should-retry`` is ``true`` (``false`` is never retried: a
   ``quota_exceeded`` 429, a cost cap);
2. otherwise a response whose status is in ``retry_statuses`` (408, 409, 429, 5xx incl. 529);
3. connection errors and timeouts: always when the request never left (connect errors, a
   TLS handshake that failed or was cut, pool timeouts), else only for idempotent methods or
   requests carrying an Idempotency-Key; never a certificate refused (the server's, untrusted
   or another host's, or this client's by the server), nor a handshake whose two sides share
   no TLS version or no cipher (a server that takes only TLS 1.3, a client capped at 1.2:
   "protocol version", "no shared cipher", "handshake failure"), nor a handshake with a peer
   that does not speak TLS (an ``https://`` URL at a plain-HTTP port: OpenSSL's "wrong
   version number"): each fails the same way until someone changes it. A TLS failure httpx lets
   through unmapped (an ``ssl.SSLError`` or anyio stream error, on asyncio) is raised as the
   client's module's ``ConnectError`` (from the handshake) or ``ReadError`` (after it) and
   retried as those are (in a stream handed back, raised as the ``ReadError`` while the
   caller reads it);
4. under the same rule, key, backoff and budget: a response body lost mid-way (the connection
   drops after the headers). So a body that is not a stream is read inside the retry loop,
   before the transport returns: one with a known ``Content-Length`` up to
   ``max_buffered_body`` (16 MiB; 0 turns this off), or a JSON body of unknown length, of which
   only the first ``max_buffered_body`` bytes are covered (the rest streams on, not retried)
   and only when the request did not ask for a stream (``"stream": true``, or a path such as
   Gemini's ``streamGenerateContent``, which answers a JSON array chunk by chunk).
   Callers read such a body whole anyway, unless they stream it.

A stream is never buffered: ``text/event-stream``, or any non-JSON body of unknown length, is
handed back as it arrives. A stream cut mid-body is the caller's to resume (``Last-Event-ID``,
from a server that keeps a replay buffer): the transport has returned before the cut.

The wait is ``retry-after-ms``, then ``Retry-After`` (seconds or an HTTP-date), else
``min(initial_delay * 2**n, max_delay)`` minus up to ``jitter`` of it. A server delay longer
than ``max_retry_after`` is not waited for: the response goes back to the caller (as
openai-python 3 does), or with ``over_max_retry_after="cap"`` the wait is capped instead.
Request bodies are replayed from memory; a streaming body (a generator) is sent once and
never retried. The response of a failed attempt is closed before the next one.

The key makes a resend safe only if the server honours it. Every POST and PATCH gets one and is
then resent after a timeout or a lost response: against a server that ignores
``Idempotency-Key``, that POST can run twice (up to ``max_retries + 1`` times). For such a
server pass ``idempotency_methods=()``: a POST is then resent only if it never left, or on a
retryable status (as openai-python does; a proxy's 502/504 can still hide a run).

Requires ``httpx`` (the ``client`` extra); ``httpx2`` is used when it is installed (the
openai and anthropic SDKs install it).
"""

from __future__ import annotations

import inspect
import json
import math
import random as _random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import anyio
import httpx

from aimiddleware._body_buffer import abuffer_body, buffer_body
from aimiddleware._httpx_modules import (
    BYTE_STREAMS,
    MAYBE_SENT,
    MODULES,
    NOT_SENT,
    REQUEST_NOT_READ,
    UNMAPPED,
    AsyncBaseTransport2,
    AsyncByteStream2,
    BaseTransport2,
    Headers,
    Request,
    Response,
    certificate_failure,
    httpx2,
    mapped,
    not_tls,
    tls_mismatch,
)
from aimiddleware.headers import parse_http_date

__all__ = ["AsyncRetryTransport", "RetryPolicy", "RetryTransport"]

# RFC 9110 9.2.2: repeating these has the same effect as sending them once.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def _new_key() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry and how long to wait. Pure: no I/O besides the injected callables."""

    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 8.0
    jitter: float = 0.25
    idempotency_header: str = "Idempotency-Key"
    idempotency_methods: Collection[str] = frozenset({"POST", "PATCH"})
    retry_statuses: Collection[int] = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
    max_retry_after: float = 60.0
    over_max_retry_after: Literal["give_up", "cap"] = "give_up"
    sleep: Callable[[float], Any] | None = None
    random: Callable[[], float] = _random.random
    clock: Callable[[], float] = time.time
    key_factory: Callable[[], str] = field(default=_new_key)
    max_buffered_body: int = 16 * 2**20

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError("max_retries must be a non-negative int")
        if not isinstance(self.max_buffered_body, int) or self.max_buffered_body < 0:
            raise ValueError("max_buffered_body must be a non-negative int")
        if self.initial_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("delays must be non-negative")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")
        if self.over_max_retry_after not in ("give_up", "cap"):
            raise ValueError("over_max_retry_after must be 'give_up' or 'cap'")
        object.__setattr__(
            self, "idempotency_methods", frozenset(m.upper() for m in self.idempotency_methods)
        )
        object.__setattr__(self, "retry_statuses", frozenset(self.retry_statuses))

    # -- decisions ---------------------------------------------------------------------------

    def backoff(self, retries_done: int) -> float:
        """Exponential backoff with jitter for retry number ``retries_done + 1``."""
        # (the exponent capped: 2.0 ** 1024 overflows, and 2 ** 1000 is past any max_delay)
        base = min(self.initial_delay * 2.0 ** min(retries_done, 1000), self.max_delay)
        return base * (1.0 - self.jitter * self.random())

    def server_delay(self, headers: Headers) -> float | None:
        """The delay the server asked for, in seconds, or ``None`` if it gave none usable."""
        raw_ms = headers.get("retry-after-ms")
        if raw_ms is not None:
            try:
                ms = float(raw_ms)
            except ValueError:
                ms = math.nan
            if math.isfinite(ms) and ms >= 0:
                return ms / 1000.0
        raw = headers.get("retry-after")
        if raw is None:
            return None
        raw = raw.strip()
        try:
            seconds = float(raw)
        except ValueError:
            try:
                seconds = parse_http_date(raw).timestamp() - self.clock()
            except ValueError:
                return None
            return max(seconds, 0.0)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None

    def should_retry_response(self, response: Response) -> bool:
        """``x-should-retry`` wins; otherwise the status set. Only error statuses qualify."""
        if response.status_code < 400:
            return False
        signal = response.headers.get("x-should-retry", "").strip().lower()
        if signal == "true":
            return True
        if signal == "false":
            return False
        return response.status_code in self.retry_statuses

    def response_delay(self, response: Response, retries_done: int) -> float | None:
        """Seconds to wait before retrying after ``response``; ``None``: do not retry."""
        if retries_done >= self.max_retries or not self.should_retry_response(response):
            return None
        delay = self.server_delay(response.headers)
        if delay is None:
            return self.backoff(retries_done)
        if delay > self.max_retry_after:
            return self.max_retry_after if self.over_max_retry_after == "cap" else None
        return delay

    def error_delay(
        self, exc: Exception, request: Request, retries_done: int
    ) -> float | None:
        """Seconds to wait before retrying after a transport error; ``None``: re-raise."""
        if retries_done >= self.max_retries or certificate_failure(exc) or tls_mismatch(exc):
            return None
        if isinstance(exc, NOT_SENT):  # (a peer that does not speak TLS: a wrong URL)
            return None if not_tls(exc) else self.backoff(retries_done)
        if not isinstance(exc, MAYBE_SENT):
            return None
        return self.backoff(retries_done) if self.may_resend(request) else None

    def may_resend(self, request: Request) -> bool:
        """An idempotent method, or a key the server can replay by (if it honours keys)."""
        return (
            request.method.upper() in IDEMPOTENT_METHODS
            or self.idempotency_header in request.headers
        )

    def should_buffer(self, response: Response, request: Request) -> bool:
        """Whether to read this body (the answer to ``request``) inside the retry loop: a
        whole document, not a stream."""
        if self.max_buffered_body == 0 or response.status_code < 200:
            return False
        if response.is_stream_consumed or response.is_closed:
            return False
        media: str = response.headers.get("content-type", "")
        media = media.partition(";")[0].strip().lower()
        if media == "text/event-stream":
            return False
        try:
            length = int(response.headers["content-length"])
        except (KeyError, ValueError):  # JSON of unknown length: a document, unless streamed
            json_body = media == "application/json" or media.endswith("+json")
            return json_body and not _asks_for_stream(request)
        return length <= self.max_buffered_body

    # -- request preparation -----------------------------------------------------------------

    def add_idempotency_key(self, request: Request) -> None:
        """Give a POST/PATCH its key once per logical request, unless the caller set one."""
        if (
            request.method.upper() in self.idempotency_methods
            and self.idempotency_header not in request.headers
        ):
            request.headers[self.idempotency_header] = self.key_factory()


def _buffer_kind(request: Request) -> Literal["replayable", "buffer", "once"]:
    """How to make the body replayable: already bytes, read it once, or not at all."""
    stream = request.stream
    if isinstance(stream, BYTE_STREAMS):
        return "replayable"
    # Multipart bodies are built from bytes or seekable files: finite, so read them once.
    if type(stream).__name__ == "MultipartStream":
        return "buffer"
    return "once"  # a generator or iterator: it cannot be sent twice


def _asks_for_stream(request: Request) -> bool:
    """The request asks for its answer as it is generated: ``"stream": true`` in a JSON body
    (OpenAI, Anthropic) or a streaming method in the path (Gemini's ``streamGenerateContent``
    answers a JSON array chunk by chunk without ``alt=sse``)."""
    if "stream" in request.url.path.lower():
        return True
    try:
        body = request.content
    except REQUEST_NOT_READ:  # (a body sent as it is generated: never buffered here)
        return False
    if b'"stream"' not in body:
        return False
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("stream") is True


def _policy(policy: RetryPolicy | None, options: dict[str, Any]) -> RetryPolicy:
    if policy is not None and options:
        raise TypeError("pass either policy or RetryPolicy options, not both")
    return policy if policy is not None else RetryPolicy(**options)


class _Inner:
    """Where each attempt goes out: the transport given, used as is, or by default an
    ``HTTPTransport`` / ``AsyncHTTPTransport`` of the request's own module (httpx or httpx2),
    made on its first request, so that the response is of the type its client expects."""

    def __init__(self, given: Any, *, sync: bool) -> None:
        self._kind = "BaseTransport" if sync else "AsyncBaseTransport"
        self._default = "HTTPTransport" if sync else "AsyncHTTPTransport"
        bases = {module.__name__: getattr(module, self._kind) for module in MODULES}
        # the modules whose requests the given transport takes
        self._serves = {name for name, base in bases.items() if isinstance(given, base)}
        if given is not None and not self._serves:
            names = " or ".join(f"{name}.{self._kind}" for name in bases)
            raise TypeError(f"transport must be an {names}")
        self._given = given
        self._made: dict[str, Any] = {}
        self._lock = threading.Lock()  # (a sync client's first requests may come at once)

    def for_request(self, request: Request) -> Any:
        module = httpx2 if httpx2 is not None and isinstance(request, httpx2.Request) else httpx
        name = module.__name__
        if self._given is not None:
            if name not in self._serves:
                raise TypeError(
                    f"this retrying transport wraps {type(self._given).__name__}, a transport "
                    f"of {' and '.join(sorted(self._serves))}, which cannot send an {name} "
                    f"client's request: wrap an {name}.{self._kind} (or none: the default "
                    "follows the client)"
                )
            return self._given
        made = self._made.get(name)
        if made is None:
            with self._lock:
                made = self._made.get(name)
                if made is None:
                    made = self._made[name] = getattr(module, self._default)()
        return made

    def opened(self) -> list[Any]:
        """The transports to close."""
        return [self._given] if self._given is not None else list(self._made.values())


class RetryTransport(httpx.BaseTransport, BaseTransport2):
    """Sync retrying transport around ``transport`` (default: an ``HTTPTransport()`` of the
    client's module, httpx2's or httpx's).

    Pass a :class:`RetryPolicy`, or its fields as keyword arguments. A non-streamed body is
    read before this returns (see the module docstring); a stream is returned as it arrives.
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | httpx2.BaseTransport | None = None,
        *,
        policy: RetryPolicy | None = None,
        **options: Any,
    ) -> None:
        self._inner = _Inner(transport, sync=True)
        self.policy = _policy(policy, options)

    @overload
    def handle_request(self, request: httpx.Request) -> httpx.Response: ...
    @overload
    def handle_request(self, request: httpx2.Request) -> httpx2.Response: ...
    def handle_request(self, request: Request) -> Response:
        policy = self.policy
        transport = self._inner.for_request(request)
        policy.add_idempotency_key(request)
        kind = _buffer_kind(request)
        if kind == "buffer":
            request.read()
        elif kind == "once":
            return self._send(transport, request, False)
        sleep = policy.sleep or time.sleep
        resendable = policy.may_resend(request)
        retries = 0
        while True:
            try:
                response = self._send(
                    transport, request, resendable and retries < policy.max_retries
                )
            except Exception as exc:
                delay = policy.error_delay(exc, request, retries)
                if delay is None:
                    raise
            else:
                delay = policy.response_delay(response, retries)
                if delay is None:
                    return response
                response.close()
            sleep(delay)
            retries += 1

    def _send(self, transport: Any, request: Request, read_body: bool) -> Response:
        """One attempt; with ``read_body``, a lost body fails it like a lost response."""
        try:
            response: Response = transport.handle_request(request)
            if read_body and self.policy.should_buffer(response, request):
                try:
                    buffer_body(response, self.policy.max_buffered_body)
                except BaseException:
                    response.close()
                    raise
        except UNMAPPED as exc:  # (a TLS failure httpx let through: its module's error)
            raise mapped(exc, request) from exc
        return response

    def close(self) -> None:
        for transport in self._inner.opened():
            transport.close()


class _AsyncMapped(httpx.AsyncByteStream, AsyncByteStream2):
    """A body handed back as it arrives, whose TLS failures httpx lets through unmapped on
    asyncio (a bare ``ssl.SSLError`` while the caller reads) come as the client's module's
    ``ReadError``, the error a caller (and the SDKs) handle for a connection lost mid-body."""

    def __init__(self, stream: Any, request: Request) -> None:
        self._stream, self._request = stream, request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except UNMAPPED as exc:
            raise mapped(exc, self._request) from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


class AsyncRetryTransport(httpx.AsyncBaseTransport, AsyncBaseTransport2):
    """Async retrying transport around ``transport`` (default: an ``AsyncHTTPTransport()`` of
    the client's module, httpx2's or httpx's).

    The waits are cancellable. An injected ``sleep`` may be sync or async.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | httpx2.AsyncBaseTransport | None = None,
        *,
        policy: RetryPolicy | None = None,
        **options: Any,
    ) -> None:
        self._inner = _Inner(transport, sync=False)
        self.policy = _policy(policy, options)

    @overload
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response: ...
    @overload
    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response: ...
    async def handle_async_request(self, request: Request) -> Response:
        policy = self.policy
        transport = self._inner.for_request(request)
        policy.add_idempotency_key(request)
        kind = _buffer_kind(request)
        if kind == "buffer":
            await request.aread()
        elif kind == "once":
            return await self._send(transport, request, False)
        resendable = policy.may_resend(request)
        retries = 0
        while True:
            try:
                response = await self._send(
                    transport, request, resendable and retries < policy.max_retries
                )
            except Exception as exc:
                delay = policy.error_delay(exc, request, retries)
                if delay is None:
                    raise
            else:
                delay = policy.response_delay(response, retries)
                if delay is None:
                    return response
                await response.aclose()
            await self._sleep(delay)
            retries += 1

    async def _send(self, transport: Any, request: Request, read_body: bool) -> Response:
        """One attempt; with ``read_body``, a lost body fails it like a lost response."""
        try:
            response: Response = await transport.handle_async_request(request)
            if read_body and self.policy.should_buffer(response, request):
                try:
                    await abuffer_body(response, self.policy.max_buffered_body)
                except BaseException:
                    await response.aclose()
                    raise
        except UNMAPPED as exc:  # (a TLS failure httpx let through: its module's error)
            raise mapped(exc, request) from exc
        if not isinstance(response.stream, BYTE_STREAMS):  # (read by the caller, later)
            response.stream = _AsyncMapped(response.stream, request)
        return response

    async def _sleep(self, delay: float) -> None:
        if self.policy.sleep is None:
            await anyio.sleep(delay)
            return
        result = self.policy.sleep(delay)
        if inspect.isawaitable(result):
            await result

    async def aclose(self) -> None:
        for transport in self._inner.opened():
            await transport.aclose()
