"""Token counting against raw tiktoken, a cachetools cache, and UsageMiddleware's cost.

1. ``TokenCounter.count_text`` / ``count_messages`` vs raw ``len(enc.encode_ordinary(t))``
   with the very same ``tiktoken.Encoding`` object, on short, medium and long texts.
2. The same with the counter's cachetools LRU (keyed by a digest of long texts): a repeated
   text, and a 12-turn chat whose history is re-counted every turn (what a gateway sees).
3. UsageMiddleware on a JSON route (OpenAI-shaped response parsed, priced, headers, memory
   ledger) vs bare Starlette and vs the context layer alone.
4. The usage layer's own work per request, without any ASGI around it: the JSON chat
   response of ``benchmarks/stack_apps.py`` parsed, read, absorbed, settled (finish reason,
   price), turned into headers and recorded in a ``MemoryLedger`` (``finish``).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aimiddleware.context import RequestContext
from aimiddleware.context_middleware import RequestContextMiddleware
from aimiddleware.pricing import PriceTable
from aimiddleware.tokens import TokenCounter
from aimiddleware.usage.accounting import UsageAccounting
from aimiddleware.usage.extract import from_response, parse_json
from aimiddleware.usage.ledger import MemoryLedger
from aimiddleware.usage.middleware import UsageMiddleware
from benchmarks.harness import as_json, compare, make_request, table
from benchmarks.stack_apps import stack_config

SHORT = "What's the weather like in Paris today? 🌤️"
MEDIUM = (
    "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\n"
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. "
    "我能吞下玻璃而不伤身体。 The quick brown fox jumps over the lazy dog. "
) * 12
LONG = MEDIUM * 25
TEXTS = {
    "short (45 chars)": SHORT,
    f"medium ({len(MEDIUM)} chars)": MEDIUM,
    f"long ({len(LONG)} chars)": LONG,
}

OPENAI_BODY = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! " * 40},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 120,
            "completion_tokens": 80,
            "total_tokens": 200,
            "prompt_tokens_details": {"cached_tokens": 64},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
).encode()


def _time(fn: Callable[[], Any], *, rounds: int, reps: int) -> float:
    """Median µs per call over ``rounds`` rounds of ``reps`` calls."""
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(samples)


def _interleaved(
    fns: list[Callable[[], Any]], *, rounds: int, reps: int
) -> list[float]:
    """Median µs per call of each function, the functions alternating within every round
    (so a noisy neighbour slows them all alike)."""
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, samples, strict=True):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            out.append((time.perf_counter() - t0) / reps * 1e6)
    return [statistics.median(out) for out in samples]


def bench_counting(quick: bool) -> tuple[str, dict[str, Any]]:
    plain = TokenCounter(cache_size=0)
    cached = TokenCounter()  # default: LRU of digests, texts >= 256 chars
    enc = plain.encoding("o200k_base")
    assert enc is not None and cached.encoding("o200k_base") is not None

    rounds = 3 if quick else 7
    lines = [
        "## Token counting (o200k_base, median µs per call)",
        "",
        "| text | raw tiktoken | TokenCounter, no cache | ratio | TokenCounter, cached "
        "(repeat) | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    figures: dict[str, Any] = {}
    for label, text in TEXTS.items():
        reps = max(5, int((200 if quick else 1000) * 45 / max(len(text), 45)) + 5)
        want = len(enc.encode_ordinary(text))
        assert plain.count_text(text, "gpt-4o").tokens == want
        assert cached.count_text(text, "gpt-4o").tokens == want
        raw_us = _time(lambda t=text: len(enc.encode_ordinary(t)), rounds=rounds, reps=reps)
        ours_us = _time(lambda t=text: plain.count_text(t, "gpt-4o"), rounds=rounds, reps=reps)
        hit_us = _time(lambda t=text: cached.count_text(t, "gpt-4o"), rounds=rounds, reps=reps)
        lines.append(
            f"| {label} | {raw_us:.1f} | {ours_us:.1f} | {ours_us / raw_us:.2f}x | "
            f"{hit_us:.1f} | {hit_us / raw_us:.3f}x |"
        )
        figures[label] = {
            "raw_us": raw_us,
            "counter_us": ours_us,
            "ratio": ours_us / raw_us,
            "cached_us": hit_us,
            "cached_ratio": hit_us / raw_us,
        }

    # A chat client re-sends its whole history every turn: count 12 turns as a gateway would.
    turns = [(MEDIUM[: 300 + 37 * i], SHORT + str(i)) for i in range(12)]

    def conversation(counter: TokenCounter | None) -> int:
        history: list[dict[str, str]] = [{"role": "system", "content": MEDIUM}]
        total = 0
        for answer, question in turns:
            history.append({"role": "user", "content": question})
            if counter is None:
                total += 3 + sum(
                    3 + sum(len(enc.encode_ordinary(v)) for v in m.values()) for m in history
                )
            else:
                total += counter.count_messages(history, "gpt-4o").tokens
            history.append({"role": "assistant", "content": answer})
        return total

    assert conversation(None) == conversation(plain) == conversation(TokenCounter())
    reps = 3 if quick else 10
    raw_us = _time(lambda: conversation(None), rounds=rounds, reps=reps)
    ours_us = _time(lambda: conversation(plain), rounds=rounds, reps=reps)
    warm = TokenCounter()
    warm.preload("o200k_base")
    hit_us = _time(lambda: conversation(warm), rounds=rounds, reps=reps)
    lines.append(
        f"| 12-turn chat, history re-counted each turn | {raw_us:.0f} | {ours_us:.0f} "
        f"| {ours_us / raw_us:.2f}x | {hit_us:.0f} | {hit_us / raw_us:.3f}x |"
    )
    figures["conversation"] = {
        "raw_us": raw_us,
        "counter_us": ours_us,
        "ratio": ours_us / raw_us,
        "cached_us": hit_us,
        "cached_ratio": hit_us / raw_us,
    }

    # What rate limiting pays per request: count_request on a chat body (the texts encoded
    # plus the walk, the role and the chat overhead) vs encoding its texts alone (the role
    # included, which the counter does not re-encode), for the stack benchmark's "hello" body
    # and a 1 KB prompt.
    encode = enc.encode_ordinary
    prompt = ("Summarise the following support ticket in two sentences. " * 18)[:1024]
    for key, label, text, reps in (
        ("count_request_small", 'chat body, "hello"', "hello", 5000 if quick else 20000),
        ("count_request_1kb", "chat body with a 1 KB prompt", prompt, 100 if quick else 400),
    ):
        chat = {"model": "gpt-4o-mini", "max_tokens": 64,
                "messages": [{"role": "user", "content": text}]}
        assert plain.count_request(chat).tokens == 3 + len(encode("user")) + len(encode(text)) + 3
        raw_us, ours_us, hit_us = _interleaved(
            [
                lambda t=text: len(encode("user")) + len(encode(t)),
                lambda c=chat: plain.count_request(c),
                lambda c=chat: cached.count_request(c),
            ],
            rounds=rounds * 3,
            reps=reps,
        )
        lines.append(
            f"| count_request, {label} | {raw_us:.2f} | {ours_us:.2f} "
            f"| {ours_us / raw_us:.2f}x | {hit_us:.2f} | {hit_us / raw_us:.3f}x |"
        )
        figures[key] = {
            "raw_us": raw_us,
            "counter_us": ours_us,
            "ratio": ours_us / raw_us,
            "cached_us": hit_us,
            "cached_ratio": hit_us / raw_us,
        }
    return "\n".join(lines), figures


# What benchmarks/stack_apps.py:chat answers, as JSONResponse renders it.
CHAT_RESPONSE = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
    },
    separators=(",", ":"),
).encode()
CHAT_REQUEST = (
    b'{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"hello"}]}'
)


async def bench_accounting(quick: bool) -> tuple[str, dict[str, Any]]:
    """µs per request of each step, cumulated (contexts are built outside the timing)."""
    config = stack_config()
    assert config.usage is not None
    ids = iter(range(10**9))

    def context() -> RequestContext:
        ctx = RequestContext(
            request_id=f"req_{next(ids):024d}",
            principal="key_0123456789abcdef0123456789abcdef",
            method="POST",
            path="/v1/chat/completions",
            body=CHAT_REQUEST,
        )
        ctx.model, ctx.model_version = "gpt-4o-mini", "gpt-4o-mini-2024-07-18"  # versioning's
        ctx.response_status = 200
        return ctx

    # Real traffic: usage differs per request (no memo of a cost helps): 997 distinct bodies.
    varied = [
        CHAT_RESPONSE.replace(b'"prompt_tokens":12', b'"prompt_tokens":%d' % (1000 + i))
        .replace(b'"total_tokens":13', b'"total_tokens":%d' % (1001 + i))
        for i in range(997)
    ]
    assert all(from_response(parse_json(b)) is not None for b in varied[:3])

    async def upto(step: int, acc: UsageAccounting, ctx: RequestContext) -> None:
        if step == 0:
            return
        body = varied[int(ctx.request_id[4:]) % 997] if step == 7 else CHAT_RESPONSE
        found = from_response(parse_json(body))
        if step >= 2:
            acc.absorb(ctx, found)
        if step >= 3:
            acc.settle(ctx)
        if step >= 4:
            acc.headers(ctx)
        if step in (5, 7):
            if acc.finish_nowait(ctx) is not None:
                raise AssertionError("a MemoryLedger is written without an await")
        elif step == 6:
            await acc.finish(ctx)

    steps = {
        0: "(the loop and call alone: subtracted below)",
        1: "parse_json + from_response",
        2: "+ absorb",
        3: "+ settle (finish reason, price)",
        4: "+ headers",
        5: "+ finish_nowait (record in MemoryLedger)",
        6: "whole sequence with `await finish(ctx)` instead",
        7: "whole sequence (finish_nowait), usage different in every request",
    }
    n, rounds = (1000, 5) if quick else (5000, 15)
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):  # interleaved, fresh ledger each time; the min of the rounds
        for step in steps:
            acc = UsageAccounting(prices=config.usage.prices, ledger=MemoryLedger())
            ctxs = [context() for _ in range(n)]
            t0 = time.process_time()
            for ctx in ctxs:
                await upto(step, acc, ctx)
            best[step] = min(best[step], (time.process_time() - t0) / n * 1e6)
    base = best.pop(0)
    net = {steps[k]: v - base for k, v in best.items()}
    lines = [
        "## Usage accounting per request (JSON chat response, MemoryLedger)",
        "",
        "Steps cumulated; CPU µs per request, min of interleaved rounds, the empty loop "
        f"({base:.2f} µs) subtracted.",
        "",
        "| steps | µs/request |",
        "|---|---:|",
        *(f"| {k} | {v:.2f} |" for k, v in net.items()),
    ]
    return "\n".join(lines), net


async def _endpoint(request: Request) -> Response:
    return Response(OPENAI_BODY, media_type="application/json")


async def run(quick: bool) -> tuple[str, dict[str, Any]]:
    count_md, count_fig = bench_counting(quick)
    acc_md, acc_fig = await bench_accounting(quick)

    def app() -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", _endpoint, methods=["POST"])])

    prices = PriceTable({"gpt-4o": {"input": "2.5", "output": "10", "cached_input": "1.25"}})
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    factory = make_request(
        "POST",
        "/v1/chat/completions",
        body.encode(),
        [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-bench")],
    )
    ledger = MemoryLedger()
    contenders = {
        "bare Starlette": (app(), factory),
        "context layer": (RequestContextMiddleware(app()), factory),
        "context + usage": (
            RequestContextMiddleware(UsageMiddleware(app(), prices=prices, ledger=ledger)),
            factory,
        ),
    }
    results = await compare(
        contenders,
        requests=300 if quick else 2000,
        rounds=3 if quick else 7,
        warmup=50 if quick else 200,
    )
    md = table(results, "bare Starlette", "UsageMiddleware on a JSON route")
    usage_cost = results["context + usage"].median_us - results["context layer"].median_us
    md += f"\n\nUsage layer alone: {usage_cost:.1f} µs/request (context+usage minus context)."
    return (
        count_md + "\n\n" + acc_md + "\n\n" + md,
        {
            "counting": count_fig,
            "accounting_us": acc_fig,
            "middleware": as_json(results, "bare Starlette"),
            "usage_layer_us": usage_cost,
        },
    )
