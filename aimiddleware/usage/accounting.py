"""The usage layer's accounting: what a response says, settled, priced, headed and recorded.

Shared by :class:`~aimiddleware.usage.middleware.UsageMiddleware` and by ``install()``'s
fused stack: one :class:`UsageAccounting` per configuration, no per-request state on it.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from aimiddleware.context import NO_MODEL_CALL, RequestContext
from aimiddleware.finish_reason import _PLAIN_VALUES, FinishReason, finish_reason_value
from aimiddleware.headers import is_header_name
from aimiddleware.pricing import PriceTable
from aimiddleware.storage import Storage
from aimiddleware.tokens import TokenCounter
from aimiddleware.usage.extract import Extracted
from aimiddleware.usage.ledger import Ledger
from aimiddleware.usage.ledger_memory import MemoryLedger, _pack, _token_values
from aimiddleware.usage.models import _FIVE_SET, Usage, closed, merge
from aimiddleware.usage.records import UsageRecord

__all__ = ["DEFAULT_MAX_JSON_BODY", "STATE_KEY", "UsageAccounting", "UsageSettings", "ledger_for"]

logger = logging.getLogger("aimiddleware.usage")

DEFAULT_MAX_JSON_BODY = 1024 * 1024
STATE_KEY = "usage"
_NO_USAGE = Usage()  # frozen: one shared instance for records without usage
_NO_USAGE_PACKED = _pack(_NO_USAGE)
# ctx.state key of the Quote settle() priced: its string and nanos serve headers and ledger
# while it still is ctx.estimated_cost (an endpoint may set the cost itself)
_QUOTE = "usage_quote"
# ctx.state key: an Anthropic stream's message_start usage, until its message_delta
_OPENING = "usage_opening"
_PAIRS_MAX = 1024  # distinct cost texts whose header a UsageAccounting keeps


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


def check_options(
    prices: object, ledger: object, max_json_body: object, header_prefix: object
) -> None:
    """The usage layer's options checked (TypeError / ValueError), by the layer and by
    ``UsageConfig`` when it is made (Starlette builds the layer on the app's first call)."""
    if prices is not None and not isinstance(prices, PriceTable):
        raise TypeError(f"prices must be a PriceTable (a dict: PriceTable.from_dict(...)), "
                        f"got {type(prices).__name__}")
    if ledger is not None and not isinstance(ledger, Ledger):
        raise TypeError("ledger must be a Ledger")
    if isinstance(max_json_body, bool) or not isinstance(max_json_body, int) or max_json_body < 0:
        raise ValueError(f"max_json_body must be a number of bytes >= 0, got {max_json_body!r}")
    if (
        not isinstance(header_prefix, str) or header_prefix.lower() != header_prefix
        or not is_header_name(header_prefix)
    ):
        raise ValueError(f"header_prefix must be a lower-case header name prefix, such as "
                         f"'x-usage-', got {header_prefix!r}")


class UsageAccounting:
    """``ledger=None`` derives one from ``storage``; ``record=False`` skips it.

    ``prices``: a :class:`PriceTable` (``None``: costs are unpriced). ``counter``: the
    :class:`TokenCounter` shared with the count route. ``max_json_body``: bytes of JSON
    response held to read its usage. ``header_prefix``: of the response headers.
    """

    def __init__(
        self,
        *,
        prices: PriceTable | None = None,
        ledger: Ledger | None = None,
        storage: Storage | str | None = None,
        counter: TokenCounter | None = None,
        record: bool = True,
        max_json_body: int = DEFAULT_MAX_JSON_BODY,
        header_prefix: str = "x-usage-",
    ) -> None:
        check_options(prices, ledger, max_json_body, header_prefix)
        if record and ledger is None:
            ledger = ledger_for(storage)
        self.settings = UsageSettings(prices, counter or TokenCounter(), ledger if record else None)
        # a ledger doing I/O is shielded from cancellation (record even a cancelled request)
        self.shield = bool(record and ledger is not None and ledger.does_io)
        # the in-process ledger as such (not a subclass) is written without an await
        self._memory = ledger if record and type(ledger) is MemoryLedger else None
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
        self._finish_pairs = {r.value: (self._h_finish, r.value.encode()) for r in FinishReason}
        self._cost_pairs: dict[str, tuple[bytes, bytes]] = {}

    # -- accounting -----------------------------------------------------------------------

    def absorb(self, ctx: RequestContext, found: Extracted | None) -> None:
        """Take what a response said, unless the endpoint already reported it."""
        if found is None:
            return
        usage, raw, provider, version, provisional = found
        state = ctx.state
        reported = state.get("usage_reported")
        if reported is None:
            reported = state["usage_reported"] = ctx.usage is not None
        if usage is not None and not reported:
            if provisional:  # a stream's opening usage: held until its closing usage
                state[_OPENING] = merge(state.get(_OPENING), usage)
            else:
                opening = state.pop(_OPENING, None)
                if opening is not None:
                    usage = closed(opening, usage)
                old = ctx.usage
                ctx.usage = usage if old is None else merge(old, usage)
        if raw is not None and (not reported or ctx.raw_finish_reason is None):
            ctx.raw_finish_reason = raw
        if provider and "usage_provider" not in state:
            state["usage_provider"] = provider
        if version and ctx.model_version is None:
            ctx.model_version = version

    def settle(self, ctx: RequestContext) -> None:
        """Normalize the finish reason, fill in the model, price the usage."""
        if ctx.model is None:
            body = ctx.json()
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                ctx.model = body["model"]
        raw = ctx.raw_finish_reason
        if raw is not None:
            # finish_reason_value's usual case (an exact known value) without the call
            found = _PLAIN_VALUES.get(raw) if type(raw) is str else None
            ctx.finish_reason = found if found is not None else finish_reason_value(
                raw, ctx.state.get("usage_provider")
            )
        usage = ctx.usage
        if usage is not None and ctx.estimated_cost is None:
            prices = self.settings.prices
            if prices is None:
                return
            price = prices.price(ctx.model_version) or prices.price(ctx.model)
            if price is not None:
                quote = price.quote(usage)
                ctx.estimated_cost = quote.cost
                ctx.state[_QUOTE] = quote

    def headers(self, ctx: RequestContext) -> list[tuple[bytes, bytes]]:
        # ctx.elapsed_ms without the property call (per request)
        duration = (self._h_duration, b"%.1f" % ((perf_counter() - ctx.started) * 1000.0))
        u = ctx.usage
        if u is None:
            out = [duration]
        else:
            out = [
                duration,
                (self._h_input, b"%d" % u.input_tokens),
                (self._h_output, b"%d" % u.output_tokens),
                (self._h_total, b"%d" % u.total_tokens),
            ]
            if u.cached_input_tokens:
                out.append((self._h_cached, b"%d" % u.cached_input_tokens))
            if u.reasoning_tokens:
                out.append((self._h_reasoning, b"%d" % u.reasoning_tokens))
        cost = ctx.estimated_cost
        if cost is not None:
            quote = ctx.state.get(_QUOTE)
            text = quote.text if quote is not None and quote.cost is cost else format(cost, "f")
            # the header of a cost text seen before, as built then (bounded)
            pairs = self._cost_pairs
            pair = pairs.get(text)
            if pair is None:
                if len(pairs) >= _PAIRS_MAX:
                    pairs.clear()
                pair = pairs[text] = (self._h_cost, text.encode())
            out.append(pair)
        reason = ctx.finish_reason
        if reason is not None:
            # the normalized values' headers are built once
            pair = self._finish_pairs.get(reason)
            out.append(pair if pair is not None else (self._h_finish, reason.encode()))
        return out

    async def finish(self, ctx: RequestContext) -> None:
        """Settle and record; accounting never fails the response it accounts for."""
        pending = self.finish_nowait(ctx)
        if pending is not None:
            await pending

    def finish_nowait(self, ctx: RequestContext) -> Coroutine[Any, Any, None] | None:
        """:meth:`finish` without an await when none is needed; never raises.

        Settles, and records at once in a :class:`MemoryLedger`; returns the write still to
        await for any other ledger (await it shielded when :attr:`shield` is true), else
        ``None``.
        """
        # (the record built here, not in a helper: one call less per request)
        try:
            self.settle(ctx)
            ledger = self.settings.ledger
            usage = ctx.usage
            if ledger is None or (
                usage is None
                and (ctx.raw_finish_reason is None or NO_MODEL_CALL in ctx.state)
            ):  # (a request that called no model, a replayed stream, has no row of its own)
                return None
            cost = ctx.estimated_cost
            memory = self._memory
            if memory is not None and (usage is None or type(usage) is Usage):
                nanos = None
                if cost is not None:
                    quote = ctx.state.get(_QUOTE)
                    if quote is not None and quote.cost is cost:
                        nanos = quote.nanos
                # the row as the ledger keeps it, built once (usage packed: _pack's usual
                # case inline); the in-process ledger is written here, without a record
                row = (
                    ctx.principal, ctx.request_id, ctx.model, ctx.model_version,
                    _NO_USAGE_PACKED if usage is None else _token_values(usage.__dict__) if (
                        usage.__pydantic_fields_set__ is _FIVE_SET) else _pack(usage),
                    cost, ctx.finish_reason, ctx.raw_finish_reason, ctx.response_status,
                    (perf_counter() - ctx.started) * 1000.0, ctx.started_at,
                )
                if memory._record_row(row, nanos):
                    return None
            rec = UsageRecord.of(
                principal=ctx.principal,
                request_id=ctx.request_id,
                model=ctx.model,
                model_version=ctx.model_version,
                usage=ctx.usage or _NO_USAGE,
                estimated_cost=cost,
                finish_reason=ctx.finish_reason,
                raw_finish_reason=ctx.raw_finish_reason,
                status=ctx.response_status,
                duration_ms=round(ctx.elapsed_ms, 3),
                timestamp=ctx.started_at,
            )
        except Exception:
            logger.exception("usage accounting failed for %s", ctx.request_id)
            return None
        return self._write(ctx, ledger, rec)

    async def _write(self, ctx: RequestContext, ledger: Ledger, rec: UsageRecord) -> None:
        try:
            await ledger.record(rec)
        except Exception:
            logger.exception("usage accounting failed for %s", ctx.request_id)
