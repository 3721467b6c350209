"""ReplayBuffer on memory and on a real Redis: order, bounds, TTL, scoping."""

from __future__ import annotations

import time

import anyio
import pytest

from aimiddleware.sse import ReplayBuffer, parse_event_id
from aimiddleware.storage import Storage
from tests.stalls import in_time, steady


def test_parse_event_id() -> None:
    assert parse_event_id("abc:12") == ("abc", 12)
    assert parse_event_id("a:b:3") == ("a:b", 3)
    for bad in ("", "abc", ":1", "abc:", "abc:x", "abc:-1", "a:" + "9" * 30):
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
