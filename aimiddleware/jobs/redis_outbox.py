"""The Redis/Valkey webhook outbox, the part of :class:`~aimiddleware.jobs.redis.RedisJobStore`
that dispatchers claim deliveries from.

Keys: ``jobs:{outbox}:data`` (a hash of deliveries), per receiver host
``jobs:{outbox}:q:<host>`` (its pending deliveries by due time, or lease end while an
attempt is in flight) and ``jobs:{outbox}:busy:<host>`` (those in flight, by lease end),
``jobs:{outbox}:hosts`` (hosts by their earliest due delivery; a host with as many in
flight as a claim's cap is parked at its first lease end, so thousands of its due messages
cost a claim nothing), ``jobs:{outbox}:host`` (pending delivery -> host) and
``jobs:{outbox}:done`` (finished ones by expiry time, dropped from the hash past it when
deliveries are claimed or finished). Every outbox key is in the ``{outbox}`` slot; the
per-host ones are built inside the scripts, which touch only that slot. ``jobs:{outbox}:due``
is the earlier versions' due set (one for all hosts): still claimed, emptied as its
deliveries are put back or finished. Each operation is one Lua script.
"""

from __future__ import annotations

import time
from typing import Any

from aimiddleware.storage import Storage, redis_errors

__all__ = ["RedisOutbox"]

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


class RedisOutbox:
    """The outbox operations of the job store (``storage`` and ``ttl`` are the store's)."""

    storage: Storage
    ttl: int

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
        client: Any = self.storage.redis
        async with redis_errors("webhook outbox"):
            raw = await client.hget(self._outbox_keys[1], delivery_id)
        return raw.decode() if raw is not None else None
