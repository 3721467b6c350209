"""Redis/Valkey idempotency store: one Lua script per operation, one key per record.

A record is one string value under a key hash-tagged by principal (one cluster slot):

* a lease: ``L:<owner>:<expires_at>:<fingerprint>``, expiring after the lease TTL (a worker
  that dies lets the key go by itself; the heartbeat extends it while the handler runs);
* a completed response: ``C:`` + the record's JSON, expiring after the retention;
* with ``follow_streams``, a live event stream beside the lease: ``<key>:meta`` (owner,
  status, headers) and ``<key>:chunks`` (a list), living as long as the lease and deleted
  with it, so a duplicate on any worker can follow the stream.

``claim`` is GET-or-SET in one script; ``complete``, ``release`` and ``heartbeat`` compare
the owner token and write in the same script (compare-and-set / compare-and-delete). A
store that is down raises :class:`~aimiddleware.errors.StoreUnavailable` (typed 503).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from aimiddleware.idempotency.models import Claimed, Completed, InFlight, LiveStream, Outcome
from aimiddleware.storage import redis_errors

if TYPE_CHECKING:
    from aimiddleware.storage import Storage

__all__ = ["RedisIdempotencyStore"]

_CLAIM = """
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# ARGV[1] = 'L:<owner>:' prefix; compare it with the held value before writing.
# KEYS = record, meta, chunks for every script below.
_COMPLETE = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"""

_RELEASE = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
"""

_HEARTBEAT = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return 1
"""

_STREAM_START = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', redis.call('PTTL', KEYS[1]))
redis.call('DEL', KEYS[3])
return 1
"""

_STREAM_APPEND = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('PEXPIRE', KEYS[3], redis.call('PTTL', KEYS[1]))
return 1
"""

# {0} gone | {1, record} | {2, lease, meta, chunk...}
_STREAM_READ = """
local v = redis.call('GET', KEYS[1])
if not v then return {0} end
if string.sub(v, 1, 2) == 'C:' then return {1, v} end
local meta = redis.call('GET', KEYS[2])
if not meta then return {1, v} end
local out = {2, v, meta}
for _, c in ipairs(redis.call('LRANGE', KEYS[3], ARGV[1], -1)) do out[#out + 1] = c end
return out
"""



def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _lease_value(owner: str, fingerprint: str, expires_at: float) -> str:
    return f"L:{owner}:{expires_at:.3f}:{fingerprint}"


def decode(raw: bytes | str) -> InFlight | Completed:
    """A stored value back into a record."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    if text.startswith("C:"):
        return Completed.model_validate_json(text[2:])
    _, owner, expires_at, fingerprint = text.split(":", 3)
    return InFlight(owner=owner, fingerprint=fingerprint, expires_at=float(expires_at))


class RedisIdempotencyStore:
    def __init__(self, storage: Storage) -> None:
        if storage.is_memory:
            raise ValueError("RedisIdempotencyStore needs a redis:// storage URL")
        self.storage = storage
        self._scripts: dict[str, Any] = {}

    def _script(self, name: str, text: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.storage.redis.register_script(text)
        return script

    @staticmethod
    def _keys(key: str) -> list[str]:
        return [key, key + ":meta", key + ":chunks"]

    async def claim(self, key: str, fingerprint: str, owner: str, lease: float) -> Outcome:
        value = _lease_value(owner, fingerprint, time.time() + lease)
        async with redis_errors("idempotency"):
            held = await self._script("claim", _CLAIM)(keys=[key], args=[value, _ms(lease)])
        if held is None:
            return Claimed(owner=owner)
        return decode(held)

    async def heartbeat(self, key: str, owner: str, lease: float) -> bool:
        # The expiry written in the value stays the first one (informational); the key's
        # TTL is what counts.
        async with redis_errors("idempotency"):
            done = await self._script("heartbeat", _HEARTBEAT)(
                keys=self._keys(key), args=[f"L:{owner}:", _ms(lease)]
            )
        return bool(done)

    async def complete(self, key: str, owner: str, record: Completed, retention: float) -> bool:
        value = "C:" + record.model_dump_json()
        async with redis_errors("idempotency"):
            done = await self._script("complete", _COMPLETE)(
                keys=self._keys(key), args=[f"L:{owner}:", value, _ms(retention)]
            )
        return bool(done)

    async def release(self, key: str, owner: str) -> bool:
        async with redis_errors("idempotency"):
            done = await self._script("release", _RELEASE)(
                keys=self._keys(key), args=[f"L:{owner}:"]
            )
        return bool(done)

    async def stream_start(
        self, key: str, owner: str, status: int, headers: tuple[tuple[str, str], ...]
    ) -> bool:
        meta = owner + "\n" + json.dumps({"status": status, "headers": headers})
        async with redis_errors("idempotency"):
            done = await self._script("stream_start", _STREAM_START)(
                keys=self._keys(key), args=[f"L:{owner}:", meta]
            )
        return bool(done)

    async def stream_append(self, key: str, owner: str, chunk: bytes) -> bool:
        async with redis_errors("idempotency"):
            done = await self._script("stream_append", _STREAM_APPEND)(
                keys=self._keys(key), args=[f"L:{owner}:", chunk]
            )
        return bool(done)

    async def stream_read(
        self, key: str, offset: int
    ) -> LiveStream | InFlight | Completed | None:
        async with redis_errors("idempotency"):
            reply = await self._script("stream_read", _STREAM_READ)(
                keys=self._keys(key), args=[offset]
            )
        if int(reply[0]) == 0:
            return None
        record = decode(reply[1])
        if int(reply[0]) == 1 or not isinstance(record, InFlight):
            return record
        owner, _, meta_json = bytes(reply[2]).decode().partition("\n")
        if owner != record.owner:
            return record
        meta = json.loads(meta_json)
        return LiveStream(
            status=meta["status"],
            headers=tuple((k, v) for k, v in meta["headers"]),
            chunks=tuple(bytes(c) for c in reply[3:]),
            offset=offset,
        )
