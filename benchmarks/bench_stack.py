"""The whole stack on a JSON chat route, in-process, against bare Starlette.

Goals (issue 9): at most 2x a bare Starlette request; on a chat route with a 1 KB prompt, at
most 2x (bare Starlette + tiktoken counting that prompt once). The issue's anchor, "slowapi's
decorator alone costs 3.2x here today", is measured here too, on a plain JSON route (a GET,
no model, no usage): there it costs ~3.1x, on the chat route ~2.7x. Timed in CPU time of this
process (nothing here waits on I/O), so time the VM's host steals is not counted.

Beside them runs the hand-written floor (``floor_app``): the same work, with the same
response heads, written as one function for this one route and policy. Its ratio to bare
Starlette is what that work costs in pure Python with nothing around it; the full stack's
ratio to it is what the library's generality costs.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aimiddleware import TokenCounter
from benchmarks.floor_app import floor
from benchmarks.harness import as_json, compare, make_request, table
from benchmarks.stack_apps import (
    PLAIN_PATH,
    PROMPT_1KB,
    bare,
    chat,
    chat_body,
    full,
    item,
    routes,
    slowapi_app,
)

JSON = [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-bench")]


def counting_bare(counter: TokenCounter) -> Starlette:
    """Bare Starlette that counts the prompt once with tiktoken: the floor for exact limits."""

    async def endpoint(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        counter.count_request(body)
        return await chat(request)

    return Starlette(routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])])


def _to_floor(results: dict[str, Any], floor_name: str) -> str:
    stack = next(r for name, r in results.items() if name.startswith("full stack"))
    ratio = stack.median_us / results[floor_name].median_us
    return f"The full stack costs {ratio:.2f}x the hand-written floor."


def floor_app(counter: TokenCounter) -> Any:
    return floor(Starlette(routes=routes()), counter)


async def run(quick: bool) -> tuple[str, dict[str, Any]]:
    n, rounds = (300, 3) if quick else (2000, 9)
    small = make_request("POST", "/v1/chat/completions", json.dumps(chat_body()).encode(), JSON)
    big = make_request(
        "POST", "/v1/chat/completions", json.dumps(chat_body(PROMPT_1KB)).encode(), JSON
    )
    raw_counter = TokenCounter(cache_size=0)
    raw_counter.preload("o200k_base")
    counter = TokenCounter(cache_size=0)
    counter.preload("o200k_base")
    small_res = await compare(
        {
            "bare starlette": (bare(), small),
            "hand-written floor (same work, one function)": (floor_app(counter), small),
            "full stack (memory)": (full(counter), small),
        },
        requests=n,
        rounds=rounds,
        clock=time.process_time,  # (CPU time: no I/O here; a noisy VM's steal left out)
    )
    plain = make_request("GET", PLAIN_PATH, b"", JSON[1:])  # (the key alone: no body)
    plain_res = await compare(
        {
            "bare starlette": (bare(), plain),
            "slowapi decorator (1 limit)": (slowapi_app(PLAIN_PATH, item, "GET"), plain),
            "full stack (memory)": (full(counter), plain),
        },
        requests=n,
        rounds=rounds,
        clock=time.process_time,
    )
    big_res = await compare(
        {
            "bare starlette + tiktoken once": (counting_bare(raw_counter), big),
            "hand-written floor, 1 KB prompt": (floor_app(counter), big),
            "full stack (memory), 1 KB prompt": (full(counter), big),
        },
        requests=n // 2,
        rounds=rounds,
        clock=time.process_time,
    )
    text = "\n\n".join(
        [
            table(small_res, "bare starlette", "full stack on a JSON route"),
            _to_floor(small_res, "hand-written floor (same work, one function)"),
            table(plain_res, "bare starlette", "full stack on a plain JSON route (GET, no model)"),
            table(big_res, "bare starlette + tiktoken once", "full stack, 1 KB chat prompt"),
            _to_floor(big_res, "hand-written floor, 1 KB prompt"),
        ]
    )
    return text, {
        "json_route": as_json(small_res, "bare starlette"),
        "plain_route": as_json(plain_res, "bare starlette"),
        "chat_1kb": as_json(big_res, "bare starlette + tiktoken once"),
    }
