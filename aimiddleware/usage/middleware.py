"""``UsageMiddleware``: duration, usage, finish_reason, cost, headers and the ledger.

The innermost layer. Usage comes from what the endpoint reported (``report_usage``, an
``Envelope`` from :func:`~aimiddleware.usage.envelope.envelope`, an event stream that
reports at its end), or, for an app that proxies a provider unchanged, from the response
itself: a JSON body (OpenAI, Anthropic, Gemini shaped; up to ``max_json_body`` bytes) is
parsed, and an event stream is scanned line by line as it passes (never buffered).

A JSON response's ``http.response.start`` is held back until its body is complete (or past
the bound) so that the headers can carry what the body says; a body past the bound has its
usage read from its last bytes (a top-level ``usage``, as OpenAI's embeddings end with: see
:func:`~aimiddleware.usage.extract.from_tail`), its served model from its first or last
bytes (:func:`~aimiddleware.usage.extract.from_head`). A gzip or deflate body (from a
compression middleware inside the stack) is read from a copy decoded up to the same bound,
past it from its last decoded bytes (decoded as it passes, to at most 64x the larger of
the bound and its compressed size), and sent compressed as it came. Headers (prefix
configurable):

- ``x-usage-duration-ms``: time from the request reaching the stack to the response head
- ``x-usage-input-tokens``, ``x-usage-output-tokens``, ``x-usage-total-tokens``, and when
  non-zero ``x-usage-cached-input-tokens``, ``x-usage-reasoning-tokens``
- ``x-usage-estimated-cost``: decimal string; absent when the model is unpriced
- ``x-usage-finish-reason``: the normalized reason (raw value stays in the body/ledger)

Streams get only the duration header (their usage is known at the end) and are recorded
after the last chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

import anyio

from aimiddleware._encoding import DECODABLE, Inflater, TailInflater, content_coding, decode
from aimiddleware._stream_cut import SENT, SentWatch, says_event_stream
from aimiddleware.cancellation import DEADLINE
from aimiddleware.context import SCOPE_KEY, RequestContext
from aimiddleware.pricing import PriceTable
from aimiddleware.storage import Storage
from aimiddleware.tokens import TokenCounter
from aimiddleware.types import ASGIApp, Message, Receive, Scope, Send
from aimiddleware.usage.accounting import (
    DEFAULT_MAX_JSON_BODY,
    STATE_KEY,
    UsageAccounting,
    UsageSettings,
    ledger_for,
)
from aimiddleware.usage.extract import (
    HEAD_BYTES,
    TAIL_BYTES,
    from_head,
    from_response,
    from_stream_event,
    from_tail,
    parse_json,
)
from aimiddleware.usage.ledger import Ledger

# (_keep_tail reads the head from the tail: all of the body while it is shorter than both)
assert TAIL_BYTES >= HEAD_BYTES

__all__ = [
    "DEFAULT_MAX_JSON_BODY",
    "Responder",
    "UsageMiddleware",
    "UsageSettings",
    "finish_write",
    "ledger_for",
    "serve",
]

logger = logging.getLogger("aimiddleware.usage")

_NO_CHUNKS: list[bytes] = []  # shared, never appended to: a Responder has none yet


class UsageMiddleware:
    """Innermost layer. ``ledger=None`` derives one from ``storage``; ``record=False`` skips it.

    ``prices``: a :class:`PriceTable` (``None``: costs are unpriced). ``counter``: the
    :class:`TokenCounter` shared with the count route. ``max_json_body``: bytes of JSON
    response held to read its usage. ``header_prefix``: of the response headers.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        prices: PriceTable | None = None,
        ledger: Ledger | None = None,
        storage: Storage | str | None = None,
        counter: TokenCounter | None = None,
        record: bool = True,
        max_json_body: int = DEFAULT_MAX_JSON_BODY,
        header_prefix: str = "x-usage-",
    ) -> None:
        self.app = app
        self.accounting = UsageAccounting(
            prices=prices,
            ledger=ledger,
            storage=storage,
            counter=counter,
            record=record,
            max_json_body=max_json_body,
            header_prefix=header_prefix,
        )
        self.settings = self.accounting.settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = scope.get("state", {}).get(SCOPE_KEY)
        if not isinstance(ctx, RequestContext):
            logger.warning("UsageMiddleware without RequestContextMiddleware: nothing measured")
            await self.app(scope, receive, send)
            return
        await serve(self.app, scope, receive, Responder(self.accounting, ctx, send))


async def serve(app: ASGIApp, scope: Scope, receive: Receive, responder: Responder) -> None:
    """Call ``app`` with ``responder.send``; settle and record, whatever happens."""
    acc, ctx = responder.acc, responder.ctx
    assert acc is not None
    ctx.state[STATE_KEY] = acc.settings
    try:
        await app(scope, receive, responder.send)
        if responder.mode == "hold":  # (no coroutine for release() in the usual case)
            await responder.release()
    except BaseException:
        # Cut by its time limit before it reported anything: named here, as the cancellation
        # layer names it only once this has unwound (without a reason, no row of its own).
        deadline = ctx.state.get(DEADLINE)
        if ctx.raw_finish_reason is None and deadline is not None and (
            not ctx.response_complete and anyio.current_time() >= deadline
        ):
            ctx.raw_finish_reason = "timeout"
        raise
    finally:
        write = acc.finish_nowait(ctx)  # the in-process ledger is written at once
        if write is not None:
            await finish_write(acc, write)


async def finish_write(acc: UsageAccounting, write: Coroutine[Any, Any, None]) -> None:
    """Await the ledger ``write`` that :meth:`UsageAccounting.finish_nowait` handed back:
    shielded from cancellation when the ledger does I/O (record even a cancelled request)."""
    if acc.shield:
        with anyio.CancelScope(shield=True):
            await write
    else:
        await write


_parse_json = parse_json  # moved to extract.py (public, pure)


class Responder:
    """One request's ``send`` wrapper: pass, hold (JSON) or scan (event stream).

    Every response head is built by :meth:`head` (a subclass adds its own headers there:
    ``install()``'s stack adds every layer's in this one wrapper) and sent by ``head_send``
    (``send`` unless a subclass says otherwise). ``acc=None``: no usage accounting, heads
    pass at once.
    """

    __slots__ = (
        "_send", "acc", "chunks", "coding", "ctx", "head_send", "inflater", "mode", "size",
        "start", "tail",
    )

    def __init__(self, acc: UsageAccounting | None, ctx: RequestContext, send: Send) -> None:
        self.acc, self.ctx, self._send, self.head_send = acc, ctx, send, send
        self.mode = "start"  # start -> hold | scan | pass; hold -> tail (a body past the bound)
        self.start: Message | None = None
        self.chunks: list[bytes] = _NO_CHUNKS  # a list of its own once a body is split
        self.size = 0
        self.tail = b""
        self.coding = b""  # the response's content coding (b"": identity)
        # decodes a compressed event stream, or a compressed JSON body past the bound
        self.inflater: Inflater | None = None

    async def send(self, message: Message) -> None:
        # One coroutine per message: the steps below are plain functions (none awaits).
        kind = message["type"]
        if kind == "http.response.start":
            added = self._on_start(message)
            if added is not None:
                await self.head_send(self.head(message, added))
        elif self.mode == "hold":
            if kind == "http.response.body":
                more = message.get("more_body", False)
                body = self._on_held_body(message.get("body", b""), more)
                if body is None:
                    return  # still holding
            else:  # trailers, pathsend...: release the head and the body held, then forward
                body, more = self._take_chunks(), True
            start, added = self._unhold()
            if start is not None:
                await self.head_send(self.head(start, added))
            if body or not more:
                await self._send({"type": "http.response.body", "body": body, "more_body": more})
            if kind != "http.response.body":
                await self._send(message)
        else:
            if self.mode == "scan" and kind == "http.response.body":
                chunk, final = message.get("body", b""), not message.get("more_body", False)
                if self.inflater is None:
                    self._scan(chunk, final=final)
                else:  # a compressed stream: its lines read from a decoded copy
                    for piece in self.inflater.pieces(chunk):
                        self._scan(piece, final=False)
                    if final:
                        self._scan(b"", final=True)
            elif self.mode == "tail" and kind == "http.response.body":
                self._keep_tail(message.get("body", b""), not message.get("more_body", False))
            await self._send(message)

    def head(self, message: Message, added: list[tuple[bytes, bytes]]) -> Message:
        """The response head to send: ``message`` with the usage headers ``added``.

        A plain function (the head is sent by the caller: no coroutine per head)."""
        return {**message, "headers": [*message.get("headers", ()), *added]}

    def watch_stream(self) -> None:
        """A foreign event stream starts: what goes out is watched from here (unless it
        already is, under a time limit), so that an error once it has started (its iterator
        raising, the server cancelling it) can end it with an error event where it is at an
        event boundary (see ``aimiddleware._stream_cut``). Event streams only: nothing
        more for any other response."""
        state = self.ctx.state
        if SENT not in state:
            self._send = self.head_send = state[SENT] = SentWatch(self._send)

    def _on_start(self, message: Message) -> list[tuple[bytes, bytes]] | None:
        """The headers to add to this head now; ``None``: the head is held."""
        mw = self.acc
        if mw is None:  # (install()'s stack without a usage layer, or past its idempotency)
            self.mode = "pass"
            ctx = self.ctx
            if (
                ctx.stream_error_writer is None  # (not an EventStreamResponse's)
                and SENT not in ctx.state  # (not watched already: a time limit, a usage layer)
                and says_event_stream(message.get("headers", ()))
            ):
                self.watch_stream()
            return []
        # the media type (lower-case, no parameters) and the content-length of the head
        ctype: bytes | None = None
        length: int | None = None
        for name, value in message.get("headers", ()):
            if name != b"content-type" and name != b"content-length":  # (usual: lower-case)
                name = name.lower()
            if name == b"content-type":
                if ctype is None:
                    ctype = value if value == b"application/json" else (  # (usual: as is)
                        bytes(value).split(b";", 1)[0].strip().lower())
            elif name == b"content-length" and length is None and value.isdigit():
                length = int(value)
            elif name == b"content-encoding":
                # compressed by a middleware inside the stack (GZip added before install())
                self.coding = content_coding(value)
        if ctype is None:
            ctype = b""
        if ctype == b"text/event-stream":
            self.ctx.streaming = True
            self.mode = "scan"
            if self.ctx.stream_error_writer is None:  # not an EventStreamResponse's
                self.watch_stream()
            if self.coding:  # (GZipMiddleware leaves streams alone; another may not)
                if self.coding in DECODABLE:
                    self.inflater = Inflater(self.coding)
                else:
                    self.mode = "pass"  # br, zstd...: not read
            return [(mw._h_duration, b"%.1f" % self.ctx.elapsed_ms)]
        if (ctype == b"application/json" or ctype.endswith(b"+json")) and mw.max_json_body > 0:
            if length is None or length <= mw.max_json_body:
                self.mode, self.start = "hold", message
                return None
            # declared past the bound: passed at once, its usage read from its last bytes
            self.mode = "tail" if not self.coding or self.coding in DECODABLE else "pass"
        else:
            self.mode = "pass"
        mw.settle(self.ctx)
        return mw.headers(self.ctx)

    async def release(self) -> None:
        """The app returned while a JSON head was held (no final body): send what we have."""
        if self.mode == "hold":
            body = self._on_held_body(b"", False)
            start, added = self._unhold()
            if start is not None:
                await self.head_send(self.head(start, added))
            await self._send({"type": "http.response.body", "body": body, "more_body": False})

    def _on_held_body(self, body: bytes, more: bool) -> bytes | None:
        """Absorb a held body message; what to send once the head is released (``None``:
        keep holding)."""
        assert self.acc is not None
        limit = self.acc.max_json_body
        if not more and not self.chunks:  # the usual case: the whole body in one message
            if type(body) is not bytes:
                body = bytes(body)
            if len(body) > limit:  # too large to parse: its usage read from its end
                self._keep_tail(body, True)
            elif not self.coding:
                self.acc.absorb(self.ctx, from_response(_parse_json(body)))
            else:
                self._read_coded(body)
            return body
        if self.chunks is _NO_CHUNKS:
            self.chunks = []
        self.chunks.append(body)
        self.size += len(body)
        if more and self.size <= limit:
            return None
        body = self._take_chunks()
        if more or self.size > limit:  # too large to parse: its usage read from its end
            self._keep_tail(body, not more)
        elif not self.coding:
            self.acc.absorb(self.ctx, from_response(_parse_json(body)))
        else:
            self._read_coded(body)
        return body

    def _keep_tail(self, chunk: bytes, final: bool) -> None:
        """Keep a JSON body's last bytes as it passes (mode ``tail`` until its end); at the
        end, read its usage from them. Its served model is read from its first 4 KiB, as
        many messages as they take (a first message may be ``{`` alone). A
        compressed body's are those of a copy decoded as it passes (:class:`TailInflater`:
        bounded memory and work)."""
        assert self.acc is not None
        self.mode = "pass" if final else "tail"
        if self.coding:
            reader = self.inflater
            if reader is None:
                if self.coding not in DECODABLE:
                    return  # br, zstd...: not read
                reader = self.inflater = TailInflater(
                    self.coding, TAIL_BYTES, self.acc.max_json_body)
            assert isinstance(reader, TailInflater)
            reader.feed(chunk)
            if final:
                tail = reader.result()
                if tail:
                    self.acc.absorb(self.ctx, from_head(reader.head))
                    self.acc.absorb(self.ctx, from_tail(tail))
                self.inflater = None
            return
        if len(self.tail) < HEAD_BYTES:  # the head not read yet: the tail is all so far
            head = self.tail + bytes(chunk[:HEAD_BYTES - len(self.tail)])
            if len(head) >= HEAD_BYTES or final:  # (a first message may be a byte or two)
                self.acc.absorb(self.ctx, from_head(head))
        if len(chunk) >= TAIL_BYTES:
            self.tail = bytes(chunk[-TAIL_BYTES:])
        else:
            self.tail = (self.tail + chunk)[-TAIL_BYTES:]
        if final:
            self.acc.absorb(self.ctx, from_tail(self.tail))
            self.tail = b""

    def _read_coded(self, body: bytes) -> None:
        """Read the usage of a whole compressed body held (within the bound): from a copy
        decoded up to the same bound, so a compression bomb costs no more memory; one that
        decodes past it, from its last decoded bytes."""
        assert self.acc is not None
        raw = decode(body, self.coding, self.acc.max_json_body)
        if raw is not None:
            self.acc.absorb(self.ctx, from_response(_parse_json(raw)))
        elif self.coding in DECODABLE:  # past the bound (or corrupt: then nothing read)
            self._keep_tail(body, True)

    def _take_chunks(self) -> bytes:
        chunks, self.chunks = self.chunks, _NO_CHUNKS
        return chunks[0] if len(chunks) == 1 and type(chunks[0]) is bytes else b"".join(chunks)

    def _unhold(self) -> tuple[Message | None, list[tuple[bytes, bytes]]]:
        """Settle; the held head (now released) and the usage headers to add to it."""
        mw = self.acc
        assert mw is not None
        mw.settle(self.ctx)
        start, self.start = self.start, None
        if self.mode == "hold":  # (a body past the bound goes on in mode tail: _keep_tail)
            self.mode = "pass"
        return start, mw.headers(self.ctx)

    def _scan(self, chunk: bytes, *, final: bool) -> None:
        """Read ``data:`` lines carrying usage as the stream passes; keep only a partial line."""
        assert self.acc is not None
        data = self.tail + chunk
        if b"\r" in data:  # CRLF or a lone CR ends a line too (the SSE spec's three endings)
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = data.split(b"\n")
        self.tail = b"" if final else lines.pop()
        if len(self.tail) > self.acc.max_json_body:
            self.tail = b""  # an absurd line: give up on it rather than grow
        for line in lines:
            if not line.startswith(b"data:") or (
                b"usage" not in line and b"stop_reason" not in line
                and b"finish" not in line and b"Reason" not in line
            ):
                continue
            # parse_json: None for what is not JSON, nested too deep included (no 500)
            self.acc.absorb(self.ctx, from_stream_event(_parse_json(line[5:].strip())))
