-- Keep a lease alive: a concurrency lease (re-added if it had expired meanwhile) and/or a
-- held reservation's (see held.lua; only if still held: one already refunded stays so).
-- KEYS[1]: leases sorted set; KEYS[2]: held leases sorted set.
-- ARGV: now_ms ('' = server clock), lease id, ttl ms, concurrency ('1' = a concurrency
-- lease), held ('1' = a held reservation).
local now = now_ms()
local ttl = tonumber(ARGV[3])
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
end
if ARGV[5] == '1' then redis.call('ZADD', KEYS[2], 'XX', now + ttl, ARGV[2]) end
return 1
