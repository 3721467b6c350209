"""The floor: the full stack's work on the benchmark chat route, written by hand in one function.

What would the stack cost if it did nothing but its job? ``floor(app)`` does, for the one
policy, price and model alias of ``stack_apps.stack_config`` and a plain chat body, what the
full stack does for a request on its happy path, with the fewest Python steps I could write:

- one scan of the request headers (request id, trace, content type and length, API key,
  ``Idempotency-Key``); a request id; the principal (a cached SHA-256 of the key); a context
  in a ContextVar; the body read once and parsed once;
- the model alias resolved to its snapshot; the prompt counted with tiktoken as the stack
  counts chat messages; the request priced in whole nano-units;
- requests/min and tokens/min as sliding windows, cost/day, a concurrency lease, all
  admitted at once; the OpenAI-style and IETF rate-limit headers;
- the task recorded for cancellation on disconnect;
- the response held, its ``usage`` and ``finish_reason`` read, priced in ``Decimal``; the
  usage, rate-limit, version and request-id headers added;
- the reservation reconciled with the real usage, the lease released, the request added
  to per-(principal, day, model) counters and kept in a bounded history.

Its response heads equal the full stack's, header for header
(``tests/test_benchmark_floor.py``). It has no configuration, no error path, no refusal,
no streaming, no shared store, no idempotency replay and no versioning rules: every one of
those is a branch or a lookup the real stack pays for and this does not. So the ratio of the
full stack to this function is what the library's generality costs, and this function's own
ratio to bare Starlette is a floor for any pure-Python middleware doing the same work.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import os
import time
from collections import OrderedDict
from decimal import Decimal
from math import floor as _floor
from typing import Any

from pydantic_core import from_json

from aimiddleware import TokenCounter
from aimiddleware.types import ASGIApp, Message, Receive, Scope, Send

MINUTE_MS = 60_000
DAY_MS = 86_400_000
REQUESTS, TOKENS, COST, CONCURRENCY = 100_000_000, 100_000_000_000, 100_000_000 * 10**9, 10_000
SNAPSHOTS = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18"}
PRICE_IN, PRICE_OUT = Decimal("0.15"), Decimal("0.60")  # per million tokens
NANOS_IN, NANOS_OUT = 150, 600  # nano-units per token: the same prices
MILLION = Decimal(1_000_000)
FINISH = {"stop": "stop", "length": "length", "content_filter": "content_filter"}
POLICY = (
    b'"requests-1m";q=100000000;qu="requests";w=60, "tokens-1m";q=100000000000;w=60, '
    b'"concurrency";q=10000;qu="concurrent-requests"'
)
RATELIMIT = b'"requests-1m";r=%d;t=%d, "tokens-1m";r=%d;t=%d, "concurrency";r=%d;t=0'
WANTED = {
    b"x-request-id", b"content-type", b"content-length", b"authorization", b"x-api-key",
    b"traceparent", b"tracestate", b"idempotency-key",
}


def go_duration(ms: int) -> bytes:
    """A Go duration of one to sixty minutes, as OpenAI's ``x-ratelimit-reset-*`` headers
    write it (``1m53.927s``, ``1m53.9s``, ``2m0s``)."""
    seconds, frac = divmod(ms, 1000)
    minutes, seconds = divmod(seconds, 60)
    secs = (b"%d.%03d" % (seconds, frac)).rstrip(b"0") if frac else b"%d" % seconds
    return b"%dm%bs" % (minutes, secs)


class _Context:
    __slots__ = ("principal", "request_id", "started", "task", "trace", "usage")


def floor(app: ASGIApp, counter: TokenCounter) -> ASGIApp:
    """``app`` behind the hand-written stack. ``counter`` must have o200k_base loaded."""
    core = counter.encoding("o200k_base")._core_bpe.encode_ordinary  # type: ignore[union-attr]
    roles = {role: len(core(role)) for role in ("system", "user", "assistant", "tool")}
    current: contextvars.ContextVar[_Context] = contextvars.ContextVar("floor")
    principals: dict[bytes, str] = {}
    windows: dict[tuple[str, str], tuple[int, int, int]] = {}  # (window, prev, curr)
    leases: dict[str, dict[int, int]] = {}
    counters: dict[tuple[str, int, str], list[Any]] = {}
    history: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
    lease_ids = iter(range(1 << 62))

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        ctx = _Context()
        ctx.started = time.perf_counter()
        key = trace = None
        for name, value in scope["headers"]:
            if name in WANTED:
                if name == b"authorization":
                    key = value.partition(b" ")[2].strip()
                elif name == b"traceparent":
                    trace = value
        ctx.request_id = "req_" + os.urandom(12).hex()
        ctx.trace = trace
        principal = principals.get(key)  # type: ignore[arg-type]
        if principal is None:
            principal = principals[key] = "key_" + hashlib.sha256(key).hexdigest()[:32]  # type: ignore[arg-type,index]
        ctx.principal = principal
        ctx.task = asyncio.current_task()
        token = current.set(ctx)
        try:
            request = await receive()
            body = from_json(request["body"])
            model = body["model"]
            snapshot = SNAPSHOTS.get(model, model)
            prompt = 3
            for message in body["messages"]:
                prompt += 3 + roles[message["role"]] + len(core(message["content"]))
            reserved = prompt + body["max_tokens"]
            cost = -(-(prompt * NANOS_IN + body["max_tokens"] * NANOS_OUT) // 1000)

            # Admission: every dimension checked before any is charged.
            now = int(time.time() * 1000)
            index = now // MINUTE_MS
            elapsed = now - index * MINUTE_MS
            rows = []
            for dimension, amount, limit in (
                ("requests", 1, REQUESTS),
                ("tokens", reserved, TOKENS),
            ):
                at, prev, curr = windows.get((principal, dimension), (0, 0, 0))
                if at != index:
                    prev, curr = (curr, 0) if at == index - 1 else (0, 0)
                weighted = prev * float(MINUTE_MS - elapsed) / MINUTE_MS
                assert weighted + curr + amount <= limit  # (never refused in the benchmark)
                rows.append((dimension, prev, curr + amount, weighted, limit))
            day = now // DAY_MS
            spent_day, spent = windows.get((principal, "cost"), (0, 0, 0))[:2]
            assert (spent if spent_day == day else 0) + cost <= COST
            held = leases.setdefault(principal, {})
            assert len(held) < CONCURRENCY
            for dimension, prev, curr, _, _ in rows:
                windows[principal, dimension] = (index, prev, curr)
            windows[principal, "cost"] = (day, (spent if spent_day == day else 0) + cost, 0)
            lease = next(lease_ids)
            held[lease] = now + 300_000
            reset = 2 * MINUTE_MS - elapsed
            duration = go_duration(reset)
            limit_headers = []
            args = []
            for dimension, _, curr, weighted, limit in rows:
                left = max(0, _floor(limit - (weighted + curr)))
                name = dimension.encode()
                limit_headers += (
                    (b"x-ratelimit-limit-" + name, b"%d" % limit),
                    (b"x-ratelimit-remaining-" + name, b"%d" % left),
                    (b"x-ratelimit-reset-" + name, duration),
                )
                args += (left, -(-reset // 1000))
            args.append(CONCURRENCY - len(held))
            limit_headers += (
                (b"ratelimit-policy", POLICY),
                (b"ratelimit", RATELIMIT % tuple(args)),
            )

            start: Message | None = None
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return request
                return await receive()

            async def respond(message: Message) -> None:
                nonlocal start
                if message["type"] == "http.response.start":
                    start = message
                    return
                assert start is not None
                payload = from_json(message["body"])
                usage, choice = payload["usage"], payload["choices"][0]
                used_in, used_out = usage["prompt_tokens"], usage["completion_tokens"]
                price = (used_in * PRICE_IN + used_out * PRICE_OUT) / MILLION
                reason = FINISH.get(choice["finish_reason"], "stop")
                ctx.usage = (used_in, used_out, price, reason)
                ms = (time.perf_counter() - ctx.started) * 1000
                headers = [
                    *start["headers"],
                    (b"x-usage-duration-ms", b"%.1f" % ms),
                    (b"x-usage-input-tokens", b"%d" % used_in),
                    (b"x-usage-output-tokens", b"%d" % used_out),
                    (b"x-usage-total-tokens", b"%d" % (used_in + used_out)),
                    (b"x-usage-estimated-cost", format(price, "f").encode()),
                    (b"x-usage-finish-reason", reason.encode()),
                    *limit_headers,
                    (b"x-model", model.encode()),
                    (b"x-model-version", snapshot.encode()),
                    (b"x-request-id", ctx.request_id.encode()),
                ]
                await send({**start, "headers": headers})
                await send(message)

            await app(scope, replay, respond)

            # Reconcile: the real usage replaces the reservation; the lease is released.
            used_in, used_out, price, reason = ctx.usage
            at, prev, curr = windows[principal, "tokens"]
            windows[principal, "tokens"] = (at, prev, curr + used_in + used_out - reserved)
            nanos = int(price * 10**9)
            spent_day, spent, _ = windows[principal, "cost"]
            windows[principal, "cost"] = (spent_day, spent - cost + nanos, 0)
            del held[lease]
            aggregate = counters.get((principal, day, snapshot))
            if aggregate is None:
                aggregate = counters[principal, day, snapshot] = [0, 0, 0, 0, {}]
            aggregate[0] += 1
            aggregate[1] += used_in
            aggregate[2] += used_out
            aggregate[3] += nanos
            aggregate[4][reason] = aggregate[4].get(reason, 0) + 1
            history[ctx.request_id] = (principal, model, snapshot, used_in, used_out, price, reason)
            if len(history) > 10_000:
                history.popitem(last=False)
        finally:
            current.reset(token)

    return middleware
