"""``UsageMiddleware``: duration, usage, finish_reason, cost, headers and the ledger.

The innermost layer. Usage comes from what the endpoint reported (``report_usage``, an
``Envelope`` from :func:`~aimiddleware.usage.envelope.envelope`, an event stream that
reports at its end), or, for an app that proxies a provider unchanged, from the response
itself: a JSON body (OpenAI, Anthropic, Gemini shaped; up to ``max_json_body`` bytes) is
parsed, and an event stream is scanned line by line as it passes (never buffered).

A JSON response's ``http.response.start`` is held back until its body is complete (or past
the bound) so that the headers can carry what the body says. Headers (prefix configurable):

- ``x-usage-duration-ms``: time from the request reaching the stack to the response head
- ``x-usage-input-tokens``, ``x-usage-output-tokens``, ``x-usage-total-tokens``, and when
  non-zero ``x-usage-cached-input-tokens``, ``x-usage-reasoning-tokens``
- ``x-usage-estimated-cost``: decimal string; absent when the model is unpriced
- ``x-usage-finish-reason``: the normalized reason (raw value stays in the body/ledger)

Streams get only the duration header (their usage is known at the end) and are recorded
after the last chunk.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import anyio

from aimiddleware.context import SCOPE_KEY, RequestContext
from aimiddleware.finish_reason import normalize_finish_reason
from aimiddleware.pricing import PriceTable
from aimiddleware.storage import Storage
from aimiddleware.tokens import TokenCounter
from aimiddleware.types import ASGIApp, Message, Receive, Scope, Send
from aimiddleware.usage.extract import Extracted, from_response, from_stream_event
from aimiddleware.usage.ledger import Ledger, MemoryLedger, UsageRecord
from aimiddleware.usage.models import Usage

__all__ = ["DEFAULT_MAX_JSON_BODY", "UsageMiddleware", "UsageSettings", "ledger_for"]

logger = logging.getLogger("aimiddleware.usage")

DEFAULT_MAX_JSON_BODY = 1024 * 1024
STATE_KEY = "usage"
_NO_USAGE = Usage()  # frozen: one shared instance for records without usage


@dataclass(frozen=True)
class UsageSettings:
    """What the usage layer shares with routes and decorators via ``ctx.state["usage"]``."""

    prices: PriceTable | None
    counter: TokenCounter
    ledger: Ledger | None


def ledger_for(storage: Storage | str | None) -> Ledger:
    """The default ledger for a storage: memory in-process, else Redis."""
    storage = Storage.coerce(storage)
    if storage.is_memory:
        return MemoryLedger()
    from aimiddleware.usage.ledger_redis import RedisLedger

    return RedisLedger(storage)


def merge(old: Usage | None, new: Usage | None) -> Usage | None:
    """Field-wise max: streamed usage is cumulative (Anthropic start + delta, Gemini chunks)."""
    if old is None or new is None:
        return new or old
    fields = {k: max(getattr(old, k), getattr(new, k)) for k in Usage.model_fields}
    both = fields["input_tokens"] + fields["output_tokens"]
    fields["total_tokens"] = max(fields["total_tokens"], both)
    return Usage(**fields)


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
        if prices is not None and not isinstance(prices, PriceTable):
            raise TypeError("prices must be a PriceTable")
        if ledger is not None and not isinstance(ledger, Ledger):
            raise TypeError("ledger must be a Ledger")
        if max_json_body < 0:
            raise ValueError("max_json_body must be >= 0")
        if not header_prefix or header_prefix.lower() != header_prefix or " " in header_prefix:
            raise ValueError("header_prefix must be a lower-case header name prefix")
        if record and ledger is None:
            ledger = ledger_for(storage)
        self.app = app
        self.settings = UsageSettings(prices, counter or TokenCounter(), ledger if record else None)
        # a ledger doing I/O is shielded from cancellation (record even a cancelled request)
        self._shield = bool(record and ledger is not None and ledger.does_io)
        self.max_json_body = max_json_body
        self.prefix = p = header_prefix.encode("latin-1")
        self._h_duration = p + b"duration-ms"
        self._h_input = p + b"input-tokens"
        self._h_output = p + b"output-tokens"
        self._h_total = p + b"total-tokens"
        self._h_cached = p + b"cached-input-tokens"
        self._h_reasoning = p + b"reasoning-tokens"
        self._h_cost = p + b"estimated-cost"
        self._h_finish = p + b"finish-reason"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = scope.get("state", {}).get(SCOPE_KEY)
        if not isinstance(ctx, RequestContext):
            logger.warning("UsageMiddleware without RequestContextMiddleware: nothing measured")
            await self.app(scope, receive, send)
            return
        ctx.state[STATE_KEY] = self.settings
        responder = _Responder(self, ctx, send)
        try:
            await self.app(scope, receive, responder.send)
            await responder.release()
        finally:
            if self._shield:
                with anyio.CancelScope(shield=True):  # record even a cancelled request
                    await self.finish(ctx)
            else:
                await self.finish(ctx)

    # -- accounting -----------------------------------------------------------------------

    def absorb(self, ctx: RequestContext, found: Extracted | None) -> None:
        """Take what a response said, unless the endpoint already reported it."""
        if found is None:
            return
        reported = ctx.state.setdefault("usage_reported", ctx.usage is not None)
        if found.usage is not None and not reported:
            ctx.usage = merge(ctx.usage, found.usage)
        if found.raw_finish_reason is not None and (not reported or ctx.raw_finish_reason is None):
            ctx.raw_finish_reason = found.raw_finish_reason
        if found.provider:
            ctx.state.setdefault("usage_provider", found.provider)
        if found.model_version and ctx.model_version is None:
            ctx.model_version = found.model_version

    def settle(self, ctx: RequestContext) -> None:
        """Normalize the finish reason, fill in the model, price the usage."""
        if ctx.model is None:
            body = ctx.json()
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                ctx.model = body["model"]
        if ctx.raw_finish_reason is not None:
            ctx.finish_reason = normalize_finish_reason(
                ctx.raw_finish_reason, ctx.state.get("usage_provider")
            ).value
        prices = self.settings.prices
        usage = ctx.usage
        if usage is not None and ctx.estimated_cost is None and prices is not None:
            for name in (ctx.model_version, ctx.model):
                price = prices.price(name) if name else None
                if price is not None:
                    ctx.estimated_cost = price.cost(usage)
                    break

    def headers(self, ctx: RequestContext) -> list[tuple[bytes, bytes]]:
        out = [(self._h_duration, b"%.1f" % ctx.elapsed_ms)]
        u = ctx.usage
        if u is not None:
            out.append((self._h_input, b"%d" % u.input_tokens))
            out.append((self._h_output, b"%d" % u.output_tokens))
            out.append((self._h_total, b"%d" % u.total_tokens))
            if u.cached_input_tokens:
                out.append((self._h_cached, b"%d" % u.cached_input_tokens))
            if u.reasoning_tokens:
                out.append((self._h_reasoning, b"%d" % u.reasoning_tokens))
        if ctx.estimated_cost is not None:
            out.append((self._h_cost, format(ctx.estimated_cost, "f").encode()))
        if ctx.finish_reason is not None:
            out.append((self._h_finish, ctx.finish_reason.encode()))
        return out

    async def finish(self, ctx: RequestContext) -> None:
        """Settle and record; accounting never fails the response it accounts for."""
        try:
            rec = self._record_of(ctx)
            if rec is not None:
                await rec[0].record(rec[1])
        except Exception:
            logger.exception("usage accounting failed for %s", ctx.request_id)

    def _record_of(self, ctx: RequestContext) -> tuple[Ledger, UsageRecord] | None:
        """Settle; the ledger and the record to write (``None``: nothing to record)."""
        self.settle(ctx)
        ledger = self.settings.ledger
        if ledger is None or (ctx.usage is None and ctx.raw_finish_reason is None):
            return None
        return ledger, UsageRecord.of(
            principal=ctx.principal,
            request_id=ctx.request_id,
            model=ctx.model,
            model_version=ctx.model_version,
            usage=ctx.usage or _NO_USAGE,
            estimated_cost=ctx.estimated_cost,
            finish_reason=ctx.finish_reason,
            raw_finish_reason=ctx.raw_finish_reason,
            status=ctx.response_status,
            duration_ms=round(ctx.elapsed_ms, 3),
            timestamp=ctx.started_at,
        )


def _parse_json(raw: bytes) -> Any:
    """The body as JSON (UTF-8 decoded first, the usual case; any JSON encoding else)."""
    try:
        return json.loads(raw.decode())
    except ValueError:  # includes UnicodeDecodeError: a BOM, UTF-16/32, or not JSON
        pass
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _head_info(headers: Any) -> tuple[bytes, int | None]:
    """The response's media type (lower-case, no parameters) and its content-length."""
    ctype: bytes | None = None
    length: int | None = None
    for name, value in headers:
        name = name.lower()
        if name == b"content-type":
            if ctype is None:
                ctype = bytes(value).split(b";", 1)[0].strip().lower()
        elif name == b"content-length" and length is None and value.isdigit():
            length = int(value)
    return ctype or b"", length


class _Responder:
    """One request's ``send`` wrapper: pass, hold (JSON) or scan (event stream)."""

    __slots__ = ("_send", "chunks", "ctx", "mode", "mw", "size", "start", "tail")

    def __init__(self, mw: UsageMiddleware, ctx: RequestContext, send: Send) -> None:
        self.mw, self.ctx, self._send = mw, ctx, send
        self.mode = "start"  # start -> hold | scan | pass
        self.start: Message | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.tail = b""

    async def send(self, message: Message) -> None:
        kind = message["type"]
        mode = self.mode
        if kind == "http.response.start":
            await self._on_start(message)
        elif mode == "hold":
            if kind == "http.response.body":
                await self._on_held_body(message)
            else:  # trailers, pathsend...: release the head, then forward
                await self._release_held(more=True)
                await self._send(message)
        else:
            if mode == "scan" and kind == "http.response.body":
                self._scan(message.get("body", b""), final=not message.get("more_body", False))
            await self._send(message)

    async def _on_start(self, message: Message) -> None:
        headers = message.get("headers", ())
        ctype, length = _head_info(headers)
        mw = self.mw
        if ctype == b"text/event-stream":
            self.ctx.streaming = True
            self.mode = "scan"
            duration = (mw._h_duration, b"%.1f" % self.ctx.elapsed_ms)
            await self._send({**message, "headers": [*headers, duration]})
        elif (ctype == b"application/json" or ctype.endswith(b"+json")) and (
            length is None or length <= mw.max_json_body
        ) and mw.max_json_body > 0:
            self.mode, self.start = "hold", message
        else:
            self.mode = "pass"
            mw.settle(self.ctx)
            await self._send({**message, "headers": [*headers, *mw.headers(self.ctx)]})

    async def release(self) -> None:
        """The app returned while a JSON head was held (no final body): send what we have."""
        if self.mode == "hold":
            await self._on_held_body({"type": "http.response.body", "body": b""})

    async def _on_held_body(self, message: Message) -> None:
        body = message.get("body", b"")
        more = message.get("more_body", False)
        limit = self.mw.max_json_body
        if not more and not self.chunks:  # the usual case: the whole body in one message
            if len(body) <= limit:
                self.mw.absorb(self.ctx, from_response(_parse_json(bytes(body))))
            self.chunks.append(body)
            await self._release_held(more=False)
            return
        self.chunks.append(body)
        self.size += len(body)
        if more and self.size <= limit:
            return
        if not more and self.size <= limit:
            self.mw.absorb(self.ctx, from_response(_parse_json(b"".join(self.chunks))))
        await self._release_held(more=more)

    async def _release_held(self, *, more: bool) -> None:
        mw = self.mw
        mw.settle(self.ctx)
        start, self.start, self.mode = self.start, None, "pass"
        if start is not None:
            headers = [*start.get("headers", ()), *mw.headers(self.ctx)]
            await self._send({**start, "headers": headers})
        chunks, self.chunks = self.chunks, []
        body = chunks[0] if len(chunks) == 1 and type(chunks[0]) is bytes else b"".join(chunks)
        if body or not more:
            await self._send({"type": "http.response.body", "body": body, "more_body": more})

    def _scan(self, chunk: bytes, *, final: bool) -> None:
        """Read ``data:`` lines carrying usage as the stream passes; keep only a partial line."""
        data = self.tail + chunk
        lines = data.split(b"\n")
        self.tail = b"" if final else lines.pop()
        if len(self.tail) > self.mw.max_json_body:
            self.tail = b""  # an absurd line: give up on it rather than grow
        for line in lines:
            if not line.startswith(b"data:") or (
                b"usage" not in line and b"stop_reason" not in line
                and b"finish" not in line and b"Reason" not in line
            ):
                continue
            try:
                event = json.loads(line[5:].strip())
            except (ValueError, UnicodeDecodeError):
                continue
            self.mw.absorb(self.ctx, from_stream_event(event))
