"""The benchmark's hand-written floor does the full stack's work: the same heads and bodies.

``benchmarks/floor_app.py`` is the anchor that says what the stack's work costs with nothing
else around it. It is only a floor if it does all of that work, so its responses must equal
the full stack's, header for header and request after request (the counters, the remaining
quota and the lease count move the same way), for the small and the 1 KB prompt.
"""

from __future__ import annotations

import json
import time

import pytest
from starlette.applications import Starlette

from aimiddleware import TokenCounter
from aimiddleware.ratelimit.headers import go_ms
from benchmarks.floor_app import floor, go_duration
from benchmarks.harness import call, make_request
from benchmarks.stack_apps import PROMPT_1KB, chat_body, full, routes

HEADERS = [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-bench")]
PER_REQUEST = {b"x-request-id", b"x-usage-duration-ms"}  # a fresh id, a measured time


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    found = TokenCounter(cache_size=0)
    found.preload("o200k_base")
    return found


def comparable(message: dict[str, object]) -> list[tuple[bytes, bytes]]:
    headers = message["headers"]
    assert isinstance(headers, list)
    return [(k, b"" if k in PER_REQUEST else v) for k, v in headers]


@pytest.mark.parametrize("prompt", ["hello", PROMPT_1KB], ids=["hello", "1kb"])
async def test_the_floor_answers_as_the_full_stack_does(
    counter: TokenCounter, prompt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One frozen wall clock (both read it at construction): the resets are the same too.
    monkeypatch.setattr(time, "time", lambda: 1_700_000_012.345)
    stack = full(counter)
    hand_written = floor(Starlette(routes=routes()), counter)
    request = make_request(
        "POST", "/v1/chat/completions", json.dumps(chat_body(prompt)).encode(), HEADERS
    )
    for _ in range(5):  # the counters move the same way
        status, ours = await call(stack, request)
        floor_status, theirs = await call(hand_written, request)
        assert status == floor_status == 200
        assert comparable(ours[0]) == comparable(theirs[0])
        assert [m.get("body") for m in ours[1:]] == [m.get("body") for m in theirs[1:]]
    names = [k for k, _ in ours[0]["headers"]]
    assert b"x-ratelimit-remaining-tokens" in names and b"x-model-version" in names


@pytest.mark.parametrize("ms", [60_000, 60_001, 60_010, 60_100, 113_927, 119_999, 120_000])
def test_the_floor_writes_durations_as_the_stack_does(ms: int) -> None:
    assert go_duration(ms) == go_ms(ms).encode()
