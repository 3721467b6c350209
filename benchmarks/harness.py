"""In-process ASGI driving and robust timing for the benchmarks.

Every benchmark runs its contenders interleaved, round by round, in one process, and reports
the median per-request time of each and its ratio to the anchor: on a noisy 2-core box
only ratios measured side by side mean anything.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ASGIApp = Callable[..., Awaitable[None]]


def make_request(
    method: str = "GET",
    path: str = "/",
    body: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> Callable[[], tuple[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]]]]:
    """A factory of (scope, receive) pairs for one request shape."""
    base_headers = [(b"host", b"bench"), *headers]
    if body:
        base_headers.append((b"content-length", str(len(body)).encode()))

    def factory() -> tuple[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]]]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": list(base_headers),
            "client": ("127.0.0.1", 50000),
            "server": ("bench", 80),
            "state": {},
        }
        sent = False
        done = asyncio.Event()
        scope["bench.done"] = done  # set by call() when the response is complete

        async def receive() -> dict[str, Any]:
            # Like a real server: the body, then http.disconnect once the response is done.
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        return scope, receive

    return factory


async def call(app: ASGIApp, factory: Callable[..., Any]) -> tuple[int, list[dict[str, Any]]]:
    scope, receive = factory()
    messages: list[dict[str, Any]] = []

    done = scope["bench.done"]

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await app(scope, receive, send)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    return status, messages


@dataclass
class Result:
    name: str
    samples_us: list[float] = field(default_factory=list)

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)


async def compare(
    contenders: Mapping[str, tuple[ASGIApp, Callable[..., Any]]],
    *,
    requests: int = 2000,
    rounds: int = 7,
    warmup: int = 200,
    expect_status: int | None = 200,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Result]:
    """Time each contender ``rounds`` times (interleaved); a sample = mean µs per request.

    ``clock``: wall time by default; ``time.process_time`` (this process's CPU time) for
    contenders that do no I/O, which a shared VM's stolen time then does not inflate."""
    results = {name: Result(name) for name in contenders}
    for app, factory in contenders.values():
        for _ in range(warmup):
            status, _msgs = await call(app, factory)
            if expect_status is not None and status != expect_status:
                raise RuntimeError(f"unexpected status {status}")
    for _ in range(rounds):
        for name, (app, factory) in contenders.items():
            gc.collect()
            gc.disable()
            t0 = clock()
            for _ in range(requests):
                await call(app, factory)
            elapsed = clock() - t0
            gc.enable()
            results[name].samples_us.append(elapsed / requests * 1e6)
    return results


def table(results: Mapping[str, Result], anchor: str, title: str) -> str:
    base = results[anchor].median_us
    lines = [
        f"## {title}",
        "",
        "| contender | median µs/request | ratio to " + anchor + " |",
        "|---|---:|---:|",
    ]
    for name, res in results.items():
        lines.append(f"| {name} | {res.median_us:.1f} | {res.median_us / base:.2f}x |")
    return "\n".join(lines)


def as_json(results: Mapping[str, Result], anchor: str) -> dict[str, Any]:
    base = results[anchor].median_us
    return {
        name: {"median_us": r.median_us, "ratio": r.median_us / base, "samples_us": r.samples_us}
        for name, r in results.items()
    }
