"""Redis/Valkey :class:`~aimiddleware.jobs.store.JobStore`: shared by every worker.

Keys (hash-tagged per principal): ``jobs:{p}:<id>`` the record; ``…:<id>:events`` a
stream (its entry ids are the SSE ids, so ``Last-Event-ID`` maps to ``XREAD``);
``…:<id>:cancel`` the cancel flag; ``…:<id>:alive`` the running worker's lease (on a task
queue taken with the claim to run the record);
``…:<id>:reaping`` the claim (for a lease) of the one reader reporting a lost worker;
``…:<id>:fenced`` set with it, for the retention: the lost worker's writes are refused;
``…:<id>:results`` batch result lines; ``…:idem:<sha256(key)>`` the idempotency map.
The webhook outbox is :class:`~aimiddleware.jobs.redis_outbox.RedisOutbox`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

from aimiddleware.jobs.redis_outbox import RedisOutbox
from aimiddleware.jobs.store import Event, JobFenced
from aimiddleware.storage import Storage, redis_errors

__all__ = ["RedisJobStore"]

_STREAM_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}\Z")  # (ASCII: \d takes any script's digits)
_ID_MAX = 2**64 - 1  # each part of a stream id is an unsigned 64-bit number

# A record under an idempotency key, or the key's owner if it still exists (KEYS: the new
# record, the key; ARGV: data, ttl, id, the records' key prefix). One script: creators that
# each found the owner expired each started a job when this was several commands. (The
# owner's key is built here; it is in the same {principal} slot as both declared keys.)
_CREATE = """
local owner = redis.call('GET', KEYS[2])
if owner then
  local existing = redis.call('GET', ARGV[4] .. owner)
  if existing then return {owner, existing} end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
return {ARGV[3], ARGV[1]}
"""

# Replace a record, append to a list or stream and renew its expiry, atomically (KEYS[1];
# ARGV: ttl, value(s)). A worker's write runs them behind _FENCE (KEYS[2]: the fence).
_SET = """
return redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1])
"""
_XADD = """
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[2], 'd', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return id
"""
_RPUSH = """
redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
return redis.call('EXPIRE', KEYS[1], ARGV[1])
"""
_FENCE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
"""
# The claim to reap a record (KEYS[1], for ARGV[1] ms) and, if won, its fence (KEYS[2], for
# ARGV[2] s): one script, so that no reaper holds the claim of a record left unfenced.
_CLAIM_REAP = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
return 1
"""
# The run of a record (KEYS[1]) taken, while it is still the one read (ARGV[1]: its SHA-1)
# and no worker holds its lease (KEYS[2], then held for ARGV[2] ms): one script, so that two
# deliveries of one message cannot both see it queued and unleased.
_CLAIM_RUN = """
local current = redis.call('GET', KEYS[1])
if not current or redis.sha1hex(current) ~= ARGV[1] then return 0 end
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then return 0 end
return 1
"""
# Result lines per round trip when appending many (a 100,000-item batch cancelled at once).
_CHUNK_LINES = 1000
_CHUNK_BYTES = 1 << 20


class RedisJobStore(RedisOutbox):
    def __init__(self, storage: Storage, *, ttl: float = 7 * 86400) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.storage = storage
        self.ttl = int(ttl)

    @property
    def _r(self) -> Any:
        return self.storage.redis

    def _key(self, principal: str, rec_id: str, *parts: str) -> str:
        return self.storage.key("jobs", principal, rec_id, *parts)

    async def create(
        self, principal: str, rec_id: str, data: str, idem_key: str | None
    ) -> tuple[str, str]:
        async with redis_errors("job"):
            if idem_key is None:
                await self._r.set(self._key(principal, rec_id), data, ex=self.ttl)
                return rec_id, data
            digest = hashlib.sha256(idem_key.encode()).hexdigest()[:40]
            idem = self.storage.key("jobs", principal, "idem", digest)
            prefix = self.storage.key("jobs", principal) + ":"  # (+ an id: a record's key)
            owner, stored = await self.storage.script(_CREATE)(
                keys=[self._key(principal, rec_id), idem], args=[data, self.ttl, rec_id, prefix]
            )
        return _text(owner), _text(stored)

    async def get(self, principal: str, rec_id: str) -> str | None:
        async with redis_errors("job"):
            raw = await self._r.get(self._key(principal, rec_id))
        return raw.decode() if raw is not None else None

    async def _write(
        self, script: str, principal: str, rec_id: str, key: str, args: list[Any], worker: bool
    ) -> Any:
        """Run a write ``script`` on ``key``; a ``worker``'s behind the record's fence."""
        keys = [key]
        if worker:
            script = _FENCE + script
            keys.append(self._key(principal, rec_id, "fenced"))
        async with redis_errors("job"):
            reply = await self.storage.script(script)(keys=keys, args=args)
        if reply is None:  # (only _FENCE answers nil)
            raise JobFenced(rec_id)
        return reply

    async def put(
        self, principal: str, rec_id: str, data: str, *, worker: bool = False
    ) -> None:
        if not worker:  # (one plain command)
            async with redis_errors("job"):
                await self._r.set(self._key(principal, rec_id), data, ex=self.ttl)
            return
        key = self._key(principal, rec_id)
        await self._write(_SET, principal, rec_id, key, [self.ttl, data], worker)

    async def append_event(
        self, principal: str, rec_id: str, event: str, data: str, *, worker: bool = False
    ) -> str:
        key = self._key(principal, rec_id, "events")
        event_id = await self._write(_XADD, principal, rec_id, key, [self.ttl, event, data],
                                     worker)
        return _text(event_id)

    async def read_events(
        self, principal: str, rec_id: str, after: str | None, wait: float
    ) -> list[Event]:
        key = self._key(principal, rec_id, "events")
        last = after if after is not None and _stream_id(after) else "0-0"
        # Stay well under the client's socket timeout: the caller loops.
        block = max(1, int(min(wait, self.storage.socket_timeout / 2) * 1000))
        async with redis_errors("job"):
            reply = await self._r.xread({key: last}, count=1000, block=block)
        events: list[Event] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                events.append((eid, fields[b"e"].decode(), fields[b"d"].decode()))
        return events

    async def resume_point(self, principal: str, rec_id: str, after: str) -> str | None:
        if not _stream_id(after):
            return None
        async with redis_errors("job"):
            newest = await self._r.xrevrange(self._key(principal, rec_id, "events"), count=1)
        if not newest or _id_key(after) > _id_key(_text(newest[0][0])):
            return None
        return after

    async def request_cancel(self, principal: str, rec_id: str) -> None:
        async with redis_errors("job"):
            await self._r.set(self._key(principal, rec_id, "cancel"), b"1", ex=self.ttl)

    async def cancel_requested(self, principal: str, rec_id: str) -> bool:
        async with redis_errors("job"):
            return bool(await self._r.exists(self._key(principal, rec_id, "cancel")))

    async def should_stop(self, principal: str, rec_id: str) -> bool:
        keys = (self._key(principal, rec_id, "cancel"), self._key(principal, rec_id, "fenced"))
        async with redis_errors("job"):
            return bool(await self._r.exists(*keys))

    async def beat(self, principal: str, rec_id: str, ttl: float) -> None:
        async with redis_errors("job"):
            await self._r.set(self._key(principal, rec_id, "alive"), b"1", px=int(ttl * 1000))

    async def alive(self, principal: str, rec_id: str) -> bool:
        async with redis_errors("job"):
            return bool(await self._r.exists(self._key(principal, rec_id, "alive")))

    async def claim_run(self, principal: str, rec_id: str, data: str, ttl: float) -> bool:
        keys = [self._key(principal, rec_id), self._key(principal, rec_id, "alive")]
        digest = hashlib.sha1(data.encode(), usedforsecurity=False).hexdigest()
        async with redis_errors("job"):
            won = await self.storage.script(_CLAIM_RUN)(
                keys=keys, args=[digest, max(1, int(ttl * 1000))]
            )
        return bool(won)

    async def claim_reap(self, principal: str, rec_id: str, ttl: float) -> bool:
        # (":reaping", not ":reaped": the previous version held ":reaped" for the retention)
        keys = [self._key(principal, rec_id, "reaping"), self._key(principal, rec_id, "fenced")]
        async with redis_errors("job"):
            won = await self.storage.script(_CLAIM_REAP)(
                keys=keys, args=[max(1, int(ttl * 1000)), self.ttl]
            )
        return bool(won)

    async def append_result(
        self, principal: str, rec_id: str, line: str, *, worker: bool = False
    ) -> None:
        await self.append_results(principal, rec_id, [line], worker=worker)

    async def append_results(
        self, principal: str, rec_id: str, lines: Sequence[str], *, worker: bool = False
    ) -> None:
        key = self._key(principal, rec_id, "results")
        for chunk in _chunks(lines):
            await self._write(_RPUSH, principal, rec_id, key, [self.ttl, *chunk], worker)

    async def results(self, principal: str, rec_id: str) -> list[str]:
        async with redis_errors("job"):
            raw = await self._r.lrange(self._key(principal, rec_id, "results"), 0, -1)
        return [r.decode() for r in raw]

def _chunks(lines: Sequence[str]) -> Iterator[list[str]]:
    """``lines`` in runs of at most ``_CHUNK_LINES`` lines and about ``_CHUNK_BYTES``."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        if chunk and (len(chunk) >= _CHUNK_LINES or size + len(line) > _CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield chunk


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_id(value: str) -> bool:
    """Whether ``value`` is an id XREAD takes (another would be its error, not a replay)."""
    return bool(_STREAM_ID.match(value)) and all(
        int(part) <= _ID_MAX for part in value.split("-")
    )


def _id_key(value: str) -> tuple[int, ...]:
    """A stream id (``_stream_id``) as the (ms, seq) pair Redis orders it by."""
    return tuple(int(part) for part in value.split("-"))
