"""``RedisLedger``: the usage ledger shared by every worker (Redis or Valkey).

Per principal (all keys hash-tagged ``{principal}``, so each script touches one slot):
``usage:{p}:agg:<day>:<model>`` a hash of integer counters, ``usage:{p}:index`` a sorted set
of ``<day>|<model>`` scored by the day's ordinal, ``usage:{p}:req:<request_id>`` the request's
record and feedback, ``usage:{p}:seen:<record_id>`` the marker that makes a retried write
count once. One Lua script per write: all of it or none.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from aimiddleware.storage import Storage, redis_errors
from aimiddleware.usage.ledger import Ledger
from aimiddleware.usage.records import (
    Feedback,
    RequestRecord,
    UsageAggregate,
    UsageRecord,
    aggregate_from_counters,
    counters_for,
)

__all__ = ["RedisLedger"]

_RECORD = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'data', ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
for i = 6, #ARGV, 2 do redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[3])
return 1
"""

_FEEDBACK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local old = redis.call('HGET', KEYS[1], 'rating')
if old then
  redis.call('HINCRBY', KEYS[2], 'rating_sum', tonumber(ARGV[2]) - tonumber(old))
else
  redis.call('HINCRBY', KEYS[2], 'feedback_count', 1)
  redis.call('HINCRBY', KEYS[2], 'rating_sum', ARGV[2])
end
redis.call('HSET', KEYS[1], 'feedback', ARGV[1], 'rating', ARGV[2])
return 1
"""


class RedisLedger(Ledger):
    """Aggregates kept ``retention_days``, request records (for feedback) ``request_days``."""

    def __init__(
        self,
        storage: Storage | str,
        *,
        retention_days: int = 400,
        request_days: int = 30,
        write_timeout: float = 2.0,
    ) -> None:
        super().__init__(write_timeout=write_timeout)
        self.storage = Storage.coerce(storage)
        if self.storage.is_memory:
            raise ValueError("RedisLedger needs a redis:// storage")
        if retention_days < 1 or request_days < 1:
            raise ValueError("retention_days and request_days must be >= 1")
        self.agg_ttl = retention_days * 86400
        self.req_ttl = request_days * 86400
        self._record_script: Any = None
        self._feedback_script: Any = None

    def _k(self, principal: str, *parts: str) -> str:
        return self.storage.key("usage", principal, *parts)

    def transient(self, exc: Exception) -> bool:
        import redis.exceptions as rexc

        return super().transient(exc) or isinstance(
            exc, (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError,
                  rexc.ReadOnlyError, rexc.TryAgainError, rexc.ClusterDownError)
        )

    async def _write(self, rec: UsageRecord) -> None:
        if self._record_script is None:
            self._record_script = self.storage.redis.register_script(_RECORD)
        p = rec.principal
        args: list[Any] = [
            rec.model_dump_json(),
            self.req_ttl,
            self.agg_ttl,
            f"{rec.day}|{rec.model_key}",
            date.fromisoformat(rec.day).toordinal(),
        ]
        for name, value in counters_for(rec).items():
            args += [name, value]
        keys = [
            self._k(p, "seen", rec.record_id),
            self._k(p, "req", rec.request_id),
            self._k(p, "agg", rec.day, rec.model_key),
            self._k(p, "index"),
        ]
        # (redis_errors: every outage, a full store or a failing cluster included, is a
        # StoreUnavailable, which the base class keeps for a retry rather than dropping)
        async with redis_errors("usage"):
            await self._record_script(keys=keys, args=args)

    async def query(
        self,
        principal: str,
        *,
        start: date | None = None,
        end: date | None = None,
        model: str | None = None,
    ) -> list[UsageAggregate]:
        lo = start.toordinal() if start else "-inf"
        hi = end.toordinal() if end else "+inf"
        r = self.storage.redis
        async with redis_errors("usage"):
            members = await r.zrangebyscore(self._k(principal, "index"), lo, hi)
            pairs = []
            for raw in members:
                member = raw.decode() if isinstance(raw, bytes) else str(raw)
                day, _, mod = member.partition("|")
                if model is None or mod == model:
                    pairs.append((day, mod))
            async with r.pipeline(transaction=False) as pipe:
                for day, mod in pairs:
                    pipe.hgetall(self._k(principal, "agg", day, mod))
                results = await pipe.execute() if pairs else []
        found = []
        for (day, mod), counters in zip(pairs, results, strict=True):
            if counters:
                decoded = {
                    (k.decode() if isinstance(k, bytes) else k): int(v)
                    for k, v in counters.items()
                }
                found.append(aggregate_from_counters(day, mod, decoded))
        return sorted(found, key=lambda a: (a.day, a.model))

    async def get_request(self, principal: str, request_id: str) -> RequestRecord | None:
        async with redis_errors("usage"):
            data, feedback = await self.storage.redis.hmget(
                self._k(principal, "req", request_id), ["data", "feedback"]
            )
        if data is None:
            return None
        return RequestRecord(
            record=UsageRecord.model_validate_json(data),
            feedback=Feedback.model_validate_json(feedback) if feedback else None,
        )

    async def add_feedback(self, principal: str, feedback: Feedback) -> bool:
        found = await self.get_request(principal, feedback.request_id)
        if found is None:
            return False
        if self._feedback_script is None:
            self._feedback_script = self.storage.redis.register_script(_FEEDBACK)
        rec = found.record
        keys = [
            self._k(principal, "req", feedback.request_id),
            self._k(principal, "agg", rec.day, rec.model_key),
        ]
        async with redis_errors("usage"):
            done = await self._feedback_script(
                keys=keys, args=[feedback.model_dump_json(), feedback.rating]
            )
        return bool(done)
