"""Redis/Valkey :class:`~aimiddleware.jobs.store.JobStore`: shared by every worker.

Keys (hash-tagged per principal): ``jobs:{p}:<id>`` the record; ``…:<id>:events`` a
stream (its entry ids are the SSE ids, so ``Last-Event-ID`` maps to ``XREAD``);
``…:<id>:cancel`` the cancel flag; ``…:<id>:alive`` the running worker's lease;
``…:<id>:reaping`` the claim (for a lease) of the one reader reporting a lost worker;
``…:<id>:fenced`` set with it, for the retention: the lost worker's writes are refused;
``…:<id>:results`` batch result lines; ``…:idem:<sha256(key)>`` the idempotency map.
The webhook outbox is ``jobs:{outbox}:data`` (a hash of deliveries), per receiver host
``jobs:{outbox}:q:<host>`` (its pending deliveries by due time, or lease end while an
attempt is in flight) and ``jobs:{outbox}:busy:<host>`` (those in flight, by lease end),
``jobs:{outbox}:hosts`` (hosts by their earliest due delivery; a host with as many in
flight as a claim's cap is parked at its first lease end, so thousands of its due messages
cost a claim nothing), ``jobs:{outbox}:host`` (pending delivery -> host) and
``jobs:{outbox}:done`` (finished ones by expiry time, dropped from the hash past it when
deliveries are claimed or finished). Every outbox key is in the ``{outbox}`` slot; the
per-host ones are built inside the scripts, which touch only that slot. ``jobs:{outbox}:due``
is the earlier versions' due set (one for all hosts): still claimed, emptied as its
deliveries are put back or finished. Claiming is one Lua script.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

from aimiddleware.jobs.store import Event, JobFenced
from aimiddleware.storage import Storage, redis_errors

__all__ = ["RedisJobStore"]

_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}\Z")

# Outbox scripts. KEYS: hosts, data, done, host (delivery -> host), due (the earlier
# versions' due set); ARGV[4]: now (this host's clock), ARGV[6]: the per-host keys' prefix.
# Drop finished deliveries past their expiry, a bounded number per call. A delivery due
# again (put back in the outbox) is kept.
_PRUNE = """
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[4], 'LIMIT', 0, 100)
for _, id in ipairs(old) do
  if redis.call('HEXISTS', KEYS[4], id) == 0 and not redis.call('ZSCORE', KEYS[5], id) then
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[3], id)
end
local function queue(host) return ARGV[6] .. 'q:' .. host end
local function busy(host) return ARGV[6] .. 'busy:' .. host end
local function rescore(host)
  local first = redis.call('ZRANGE', queue(host), 0, 0, 'WITHSCORES')
  if first[1] then return redis.call('ZADD', KEYS[1], first[2], host) end
  return redis.call('ZREM', KEYS[1], host)
end
"""

# ARGV: now (the dispatcher's clock), lease end, limit, now (this host's clock), cap of
# attempts in flight per host, prefix. Hosts are taken oldest due first, each for what its
# free slots allow; one that has none left is parked (scored at its first lease end) until
# an attempt of it ends (_OUTBOX scores it again) or that lease does. So every host taken
# leaves the due range, and a claim looks at no more hosts than it claims plus those
# scored again since the last claim, however many messages the parked ones have due.
_CLAIM = _PRUNE + """
local out, limit, cap = {}, tonumber(ARGV[3]), tonumber(ARGV[5])
local legacy = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', ARGV[1], 'LIMIT', 0, limit)
for _, id in ipairs(legacy) do
  redis.call('ZADD', KEYS[5], ARGV[2], id)
  local data = redis.call('HGET', KEYS[2], id)
  if data then out[#out + 1] = data else redis.call('ZREM', KEYS[5], id) end
end
while #out < limit do
  local host = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)[1]
  if not host then break end
  local q, b = queue(host), busy(host)
  redis.call('ZREMRANGEBYSCORE', b, '-inf', ARGV[1])  -- (leases that ended: a dead dispatcher's)
  local free = cap - redis.call('ZCARD', b)
  if free > 0 then
    local ids = redis.call('ZRANGEBYSCORE', q, '-inf', ARGV[1], 'LIMIT', 0,
                           math.min(free, limit - #out))
    for _, id in ipairs(ids) do
      local data = redis.call('HGET', KEYS[2], id)
      if data then
        redis.call('ZADD', q, ARGV[2], id)
        redis.call('ZADD', b, ARGV[2], id)
        out[#out + 1] = data
      else
        redis.call('ZREM', q, id)
        redis.call('HDEL', KEYS[4], id)
      end
    end
  end
  if redis.call('ZCARD', b) >= cap then
    redis.call('ZADD', KEYS[1], redis.call('ZRANGE', b, 0, 0, 'WITHSCORES')[2], host)
  else
    rescore(host)
  end
end
return out
"""


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
# A delivery's data and its place in its host's queue, or (finished) in the done set until
# its expiry; an attempt of it in flight is over (ARGV: id, data, due time or '' when
# finished, now, expiry, prefix, host).
_OUTBOX = _PRUNE + """
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZREM', KEYS[5], ARGV[1])
local was = redis.call('HGET', KEYS[4], ARGV[1])
if was then
  redis.call('ZREM', queue(was), ARGV[1])
  redis.call('ZREM', busy(was), ARGV[1])
end
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[7])
  redis.call('ZADD', queue(ARGV[7]), ARGV[3], ARGV[1])
  if was and was ~= ARGV[7] then rescore(was) end
  return rescore(ARGV[7])
end
redis.call('HDEL', KEYS[4], ARGV[1])
if was then rescore(was) end
return redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
"""
# Result lines per round trip when appending many (a 100,000-item batch cancelled at once).
_CHUNK_LINES = 1000
_CHUNK_BYTES = 1 << 20


class RedisJobStore:
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
        last = after if after is not None and _STREAM_ID.match(after) else "0-0"
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

    # -- webhook outbox --------------------------------------------------------------

    @property
    def _outbox_keys(self) -> list[str]:
        return [self.storage.key("jobs", "outbox", name)
                for name in ("hosts", "data", "done", "host", "due")]

    async def outbox_put(self, delivery_id: str, data: str, next_at: float, host: str) -> None:
        await self._outbox(delivery_id, data, repr(next_at), host)

    async def outbox_done(self, delivery_id: str, data: str) -> None:
        await self._outbox(delivery_id, data, "", "")

    async def _outbox(self, delivery_id: str, data: str, due: str, host: str) -> None:
        now = time.time()
        prefix = self.storage.key("jobs", "outbox") + ":"
        async with redis_errors("webhook outbox"):
            args = [delivery_id, data, due, repr(now), repr(now + self.ttl), prefix, host]
            await self.storage.script(_OUTBOX)(keys=self._outbox_keys, args=args)

    async def outbox_claim(
        self, now: float, lease: float, limit: int, per_host: int
    ) -> list[str]:
        prefix = self.storage.key("jobs", "outbox") + ":"
        async with redis_errors("webhook outbox"):
            args = [repr(now), repr(now + lease), limit, repr(time.time()), per_host, prefix]
            raw = await self.storage.script(_CLAIM)(keys=self._outbox_keys, args=args)
        return [r.decode() for r in raw]

    async def outbox_get(self, delivery_id: str) -> str | None:
        async with redis_errors("webhook outbox"):
            raw = await self._r.hget(self._outbox_keys[1], delivery_id)
        return raw.decode() if raw is not None else None


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
