"""What the ``memory://`` stores cost the garbage collector: ``python -m benchmarks.gc_pauses``.

A full collection walks every object the collector tracks (a pause for every request in
flight), and CPython runs one whenever the long-lived tracked objects have grown by 25%.
For each in-process store this fills a fresh instance to a realistic size, then reports the
objects it leaves tracked (after ``gc.collect()``), per entry, and the median time of a full
collection over the whole process. Idempotency records are real ones: captured from the
reference app (a chat answer and a chat stream), then stored again under new keys.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import time
from typing import Any

import httpx

from aimiddleware.idempotency.memory import MemoryIdempotencyStore
from aimiddleware.idempotency.models import Completed
from aimiddleware.jobs.memory import MemoryJobStore
from aimiddleware.sse import ReplayBuffer
from aimiddleware.usage import MemoryLedger, Usage


def tracked() -> int:
    gc.collect()
    gc.collect()  # (a tuple in a tuple is untracked one collection after its content)
    return sum(1 for o in gc.get_objects() if gc.is_tracked(o))


def pause_ms(rounds: int = 9) -> str:
    """A full collection's time: the median of ``rounds`` (and the fastest, less disturbed
    by other work on the machine)."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - t)
    return f"{statistics.median(times) * 1000:.1f} ms ({min(times) * 1000:.1f})"


async def captured_records() -> tuple[Completed, Completed]:
    """A chat answer and a chat stream as the reference app's idempotency store keeps them."""
    from examples.app import create_app

    app = create_app(storage="memory://")
    transport = httpx.ASGITransport(app=app)
    body = {"model": "fake-chat", "messages": [{"role": "user", "content": "Say hello."}]}
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for i, streamed in enumerate((False, True)):
            r = await client.post("/v1/chat/completions", json={**body, "stream": streamed},
                                  headers={"idempotency-key": f"k{i}"})
            assert r.status_code == 200, r.text
    stores = [o for o in gc.get_objects() if type(o) is MemoryIdempotencyStore]
    records = [await s.claim(key, "", "", 1.0) for s in stores for key in list(s._done)]
    plain = next(r for r in records if isinstance(r, Completed) and not r.stream)
    stream = next(r for r in records if isinstance(r, Completed) and r.stream)
    return plain, stream


def fresh(rec: Completed, i: int) -> Completed:
    """``rec`` with its own objects (no text shared with another record), as a new request
    would make it."""
    tag = f"{i:08d}"
    headers = tuple((k.encode().decode(), v.encode().decode()) for k, v in rec.headers)
    body = None if rec.body is None else rec.body[:-8] + tag.encode()
    chunks = None if rec.chunks is None else tuple(c[:-1] + c[-1:] for c in rec.chunks)
    return Completed(status=rec.status, headers=headers, body=body, chunks=chunks,
                     fingerprint=rec.fingerprint[:-8] + tag)


async def idempotency(template: Completed, label: str) -> dict[str, Any]:
    before = tracked()
    store = MemoryIdempotencyStore()
    n = 0
    while True:  # fill to the default bound (64 MiB), then 10% more (evictions under way)
        key = f"idem:p{n % 1000}:{n:040d}"
        await store.claim(key, "fp", "owner", 60.0)
        await store.complete(key, "owner", fresh(template, n), 86400.0)
        n += 1
        if len(store._done) < n:
            break
    for m in range(n, n + n // 10):
        key = f"idem:p{m % 1000}:{m:040d}"
        await store.claim(key, "fp", "owner", 60.0)
        await store.complete(key, "owner", fresh(template, m), 86400.0)
    entries = len(store._done)
    grown = tracked() - before
    return {"store": f"idempotency, {label} ({template.size} B counted each)",
            "entries": entries, "tracked": grown, "per_entry": grown / entries,
            "pause_ms": pause_ms(), "keep": store}


async def ledger(n: int = 100_000) -> dict[str, Any]:
    before = tracked()
    led = MemoryLedger()
    ts = time.time()
    for i in range(n):
        usage = Usage(input_tokens=20 + i % 50, output_tokens=100 + i % 200)
        led.record_values((f"key_{i:06d}", f"req_{i:012d}", "fake-chat-2026-06-01", None,
                           usage, None, "stop", "stop", 200, 12.5, ts))
    grown = tracked() - before
    return {"store": "usage ledger (one aggregate + one request per principal)",
            "entries": n, "tracked": grown, "per_entry": grown / n, "pause_ms": pause_ms(),
            "keep": led}


async def jobs(n: int = 5_000) -> dict[str, Any]:
    """What the runner writes for a job of 3 documents: the record (4 versions), a beat,
    its events (started, 3 partials, 3 progress, completed)."""
    before = tracked()
    store = MemoryJobStore()
    for i in range(n):
        rid = f"job_{i:024d}"
        data = json.dumps({"object": "job", "id": rid, "status": "queued", "input": {"text": "x"}})
        await store.create(f"key_{i % 100}", rid, data, f"idem{i}")
        await store.beat(f"key_{i % 100}", rid, 30.0)
        for step in range(3):
            await store.put(f"key_{i % 100}", rid, data + " " * step, worker=True)
            await store.append_event(f"key_{i % 100}", rid, "job.partial",
                                     json.dumps({"text": f"summary {step}"}), worker=True)
            await store.append_event(f"key_{i % 100}", rid, "job.progress",
                                     json.dumps({"progress": step}), worker=True)
        await store.append_event(f"key_{i % 100}", rid, "job.completed", data, worker=True)
    grown = tracked() - before
    return {"store": "jobs (3-step job: record, beat, 7 events)", "entries": n,
            "tracked": grown, "per_entry": grown / n, "pause_ms": pause_ms(), "keep": store}


async def replay(streams: int = 2_000, frames: int = 200) -> dict[str, Any]:
    before = tracked()
    buf = ReplayBuffer("memory://", ttl=600)
    frame = b'id: 0123456789abcdef:%d\nevent: delta\ndata: {"text":"tok"}\n\n'
    for s in range(streams):
        sid = f"{s:016x}"
        for seq in range(1, frames + 1):
            await buf.append(f"key_{s % 100}", sid, seq, frame % seq)
        await buf.finish(f"key_{s % 100}", sid)
    grown = tracked() - before
    return {"store": f"SSE replay buffer ({frames} frames per stream)", "entries": streams,
            "tracked": grown, "per_entry": grown / streams, "pause_ms": pause_ms(),
            "keep": buf}


async def main() -> None:
    plain, stream = await captured_records()
    print(f"process after imports and the reference app: {tracked():,} tracked objects, "
          f"full collection {pause_ms()}: median of 9 (fastest)\n")
    print("| store | entries | tracked objects added | per entry | full collection (fastest) |")
    print("|---|---:|---:|---:|---:|")
    makers = (lambda: idempotency(plain, "chat answers"),
              lambda: idempotency(stream, f"chat streams of {len(stream.chunks or ())} chunks"),
              ledger, jobs, replay)
    for make in makers:
        row = await make()
        print(f"| {row['store']} | {row['entries']:,} | {row['tracked']:,} | "
              f"{row['per_entry']:.2f} | {row['pause_ms']} |", flush=True)
        del row
        gc.collect()
    before = tracked()
    rows = [await make() for make in makers[:1] + makers[2:]]
    print(f"| all at once (chat answers, ledger, jobs, replay) | | {tracked() - before:,} | | "
          f"{pause_ms()} |")
    del rows


if __name__ == "__main__":
    asyncio.run(main())
