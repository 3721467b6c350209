"""ReplayBuffer on memory and on a real Redis: order, bounds, TTL, scoping."""

from __future__ import annotations

import gc
import time
import tracemalloc

import anyio
import pytest

from aimiddleware.errors import NotFound
from aimiddleware.sse import ReplayBuffer, parse_event_id
from aimiddleware.storage import Storage
from tests.gc_counts import tracked_per_entry
from tests.resp_split import split_after
from tests.stalls import in_time, steady


def test_parse_event_id() -> None:
    assert parse_event_id("abc:12") == ("abc", 12)
    assert parse_event_id("a:b:3") == ("a:b", 3)
    for bad in ("", "abc", ":1", "abc:", "abc:x", "abc:-1", "a:" + "9" * 30):
        assert parse_event_id(bad) is None
    # Digits to str.isdigit() but not ASCII: int() refused some ("²": a ValueError, a 500
    # for the request that sent it) and read others ("٣" as 3); no id written here has them.
    for bad in ("abc:\u00b2", "abc:\u2460", "abc:\u0663", "abc:\uff11"):
        assert parse_event_id(bad) is None


async def test_append_read_follow_and_scoping(storage: Storage) -> None:
    buf = ReplayBuffer(storage, max_events=50, ttl=30)
    for seq in range(1, 6):
        await buf.append("alice", "s1", seq, f"frame{seq}".encode())
    assert await buf.state("alice", "s1", 0) == "available"
    assert await buf.state("bob", "s1", 0) == "gone"  # another principal sees nothing
    got: list[bytes] = []

    async def finish_later() -> None:
        await anyio.sleep(0.05)
        await buf.append("alice", "s1", 6, b"frame6")
        await buf.finish("alice", "s1")

    async with anyio.create_task_group() as tg:
        tg.start_soon(finish_later)
        with anyio.fail_after(5):
            async for frame in buf.follow("alice", "s1", 2, idle_timeout=5):
                got.append(frame)
    assert got == [b"frame3", b"frame4", b"frame5", b"frame6"]
    assert await buf.state("alice", "s1", 6) == "complete"


async def test_bounded_buffer_reports_lost_events_as_gone(storage: Storage) -> None:
    buf = ReplayBuffer(storage, max_events=3, ttl=30)
    for seq in range(1, 11):
        await buf.append("p", "s", seq, b"f%d" % seq)
    assert await buf.state("p", "s", 2) == "gone"  # events 3..7 were dropped
    assert await buf.state("p", "s", 7) == "available"


async def test_ttl_expires_streams(storage: Storage) -> None:
    buf = ReplayBuffer(storage, ttl=0.2)
    attempts = iter(range(3))

    async def scenario() -> None:
        sid = f"s{next(attempts)}"
        appended = time.monotonic()
        await buf.append("p", sid, 1, b"f1")
        # (a machine that stalls past the TTL right here voids the attempt: see tests.stalls)
        assert in_time(await buf.state("p", sid, 0) == "available", appended, buf.ttl)
        await anyio.sleep(0.35)
        assert await buf.state("p", sid, 0) == "gone"

    await steady(scenario)


def test_validation() -> None:
    with pytest.raises(ValueError):
        ReplayBuffer(max_events=0)
    with pytest.raises(ValueError):
        ReplayBuffer(ttl=0)
    with pytest.raises(ValueError):
        ReplayBuffer(max_bytes=0)


def frame(sid: str, seq: int, text: bytes = b"x" * 60) -> bytes:
    return b"id: %s:%d\ndata: %s\n\n" % (sid.encode(), seq, text)


async def test_memory_buffer_holds_at_most_max_bytes() -> None:
    """In memory the buffer is bounded in bytes (what its frames and the objects around them
    take, as tracemalloc measures it), evicting the least recently used streams whole:
    the newest is whole, the oldest are gone (their resume is a 404), none is cut short.
    (Only counts bounded it: 10,000 streams of 10,000 frames, 100 GB of ~1 KB frames.)"""
    bound = 4 * 1024 * 1024
    buf = ReplayBuffer("memory://", max_bytes=bound, ttl=60)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for s in range(300):
            sid = f"{s:016x}"
            for seq in range(1, 201):
                await buf.append(f"key_{s % 7}", sid, seq, frame(sid, seq))
                assert buf._mem.bytes <= bound
            await buf.finish(f"key_{s % 7}", sid)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held <= 1.05 * bound, held
    assert buf._mem.bytes > 0.9 * bound  # (full: it counts what it holds, not far more)
    kept = len(buf._mem)
    assert 100 < kept < 300
    for s in range(300):
        sid, principal = f"{s:016x}", f"key_{s % 7}"
        expected = "complete" if s >= 300 - kept else "gone"
        assert await buf.state(principal, sid, 200) == expected, s
        if expected == "complete":
            frames, done, first, _ = await buf._read(principal, sid, 0)
            assert [seq for seq, _ in frames] == list(range(1, 201)) and done and first == 1


async def test_a_stream_larger_than_max_bytes_keeps_its_newest_frames() -> None:
    buf = ReplayBuffer("memory://", max_bytes=100_000, ttl=60)
    await buf.append("p", "old", 1, frame("old", 1))
    for seq in range(1, 2001):
        await buf.append("p", "big", seq, frame("big", seq))
        assert buf._mem.bytes <= 100_000
    assert await buf.state("p", "old", 0) == "gone"  # evicted whole first
    assert await buf.state("p", "big", 10) == "gone"  # its oldest frames were dropped
    assert await buf.state("p", "big", 1990) == "available"
    frames, _, first, _ = await buf._read("p", "big", 0)
    assert [seq for seq, _ in frames] == list(range(first or 0, 2001))
    assert 500 < len(frames) < 2000


def test_memory_frames_are_not_walked_by_the_gc() -> None:
    """A stream's frames are a dict of ints and bytes, which the garbage collector neither
    tracks nor walks (an OrderedDict of them was walked by every full collection: ~15 ms
    for 400,000 frames); a stream is one tracked object, whatever its frames."""
    buf = ReplayBuffer("memory://", ttl=60)
    for seq in range(1, 501):
        anyio.run(buf.append, "p", "s", seq, frame("s", seq))
    stream = buf._mem.get("p", "s")
    assert stream is not None
    gc.collect()
    assert not gc.is_tracked(stream.frames)

    def fill(n: int) -> ReplayBuffer:
        many = ReplayBuffer("memory://", ttl=60)
        for s in range(n):
            for seq in range(1, 21):
                anyio.run(many.append, "p", f"s{s}", seq, frame("s", seq))
        return many

    assert tracked_per_entry(fill, 100, 400) <= 1.0


async def test_a_follower_of_an_evicted_stream_ends_with_not_found() -> None:
    """A resumed stream evicted while it is followed ends with ``NotFound`` at once (the
    rest would come with a gap), instead of a loop that never awaited: in memory, the
    follower spun without yielding to the event loop until its idle timeout."""
    buf = ReplayBuffer("memory://", max_streams=1, ttl=60)
    for seq in range(1, 4):
        await buf.append("p", "s", seq, frame("s", seq))
    got: list[bytes] = []
    with anyio.fail_after(5), pytest.raises(NotFound):
        async for f in buf.follow("p", "s", 1, idle_timeout=10):
            got.append(f)
            if len(got) == 2:
                await buf.append("p", "other", 1, b"x")  # evicts "s"
    assert got == [frame("s", 2), frame("s", 3)]


async def test_a_read_split_by_a_trim_never_hides_a_gap(redis_url: str) -> None:
    """The producer's appends can trim the frames a resume asked for while the resume reads
    them. The read was three pipelined commands: a trim between the first (the oldest frame
    kept: 1, so no gap) and the second (the frames after 0: already 7 and 8) served 7 and 8
    as if they followed 0. The read is one script now; the trim lands before or after it,
    and the follower gets frames 1.. in order, then ``NotFound`` for the rest."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    writer = ReplayBuffer(redis_url, max_events=3, ttl=30)
    for seq in (1, 2, 3):
        await writer.append("p", "s", seq, b"f%d" % seq)

    async def trim() -> None:
        for seq in range(4, 9):
            await writer.append("p", "s", seq, b"f%d" % seq)
        await writer.finish("p", "s")

    got: list[bytes] = []
    async with split_after(port, frozenset({b"XRANGE", b"EVALSHA", b"EVAL"}), trim) as proxy:
        reader = ReplayBuffer(f"redis://127.0.0.1:{proxy}/0", max_events=3, ttl=30)
        try:
            with anyio.fail_after(10), pytest.raises(NotFound):
                async for f in reader.follow("p", "s", 0, idle_timeout=5):
                    got.append(f)
        finally:
            await reader.storage.aclose()
    await writer.storage.aclose()
    assert got == [b"f%d" % seq for seq in range(1, len(got) + 1)]


async def test_a_resume_past_a_trim_is_gone_and_a_follower_stops(storage: Storage) -> None:
    """The contract the atomic read keeps: a resume point whose next frames were trimmed is
    ``gone`` and a follower of it ends with ``NotFound`` having served nothing; one whose
    next frame is the oldest kept replays from there to the end."""
    buf = ReplayBuffer(storage, max_events=4, ttl=30)
    for seq in range(1, 9):
        await buf.append("p", "s", seq, b"f%d" % seq)
    # (kept: 5 to 8 in memory; 6 to 8 on Redis, whose end marker takes one of the places)
    await buf.finish("p", "s")
    assert await buf.state("p", "s", 3) == "gone"
    got: list[bytes] = []
    with anyio.fail_after(5), pytest.raises(NotFound):
        async for f in buf.follow("p", "s", 3, idle_timeout=5):
            got.append(f)
    assert got == []
    assert await buf.state("p", "s", 5) == "available"
    with anyio.fail_after(5):
        got = [f async for f in buf.follow("p", "s", 5, idle_timeout=5)]
    assert got == [b"f6", b"f7", b"f8"]
    assert await buf.state("p", "s", 8) == "complete"


async def test_an_id_past_the_newest_frame_is_gone(storage: Storage) -> None:
    """An id whose number is past the newest frame is none the stream sent (hand-edited or
    corrupted): ``gone``, as an unknown one, while the stream runs and once it ended (its
    newest frame's own id stays ``complete``), including a number past Redis's end marker."""
    buf = ReplayBuffer(storage, max_events=4, ttl=30)
    for seq in range(1, 7):
        await buf.append("p", "s", seq, b"f%d" % seq)
    assert await buf.state("p", "s", 6) == "available"  # running: waits for the 7th
    assert await buf.state("p", "s", 7) == "gone"
    assert await buf.state("p", "s", 10**17) == "gone"
    await buf.finish("p", "s")
    assert await buf.state("p", "s", 5) == "available"
    assert await buf.state("p", "s", 6) == "complete"
    assert await buf.state("p", "s", 7) == "gone"
    assert await buf.state("p", "s", 10**17) == "gone"
