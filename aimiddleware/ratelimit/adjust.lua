-- Reconciliation and lease release in one round trip.
-- KEYS[1]: counters hash; KEYS[2]: leases sorted set; KEYS[3], KEYS[4]: held leases and
-- what they reserved (see held.lua).
-- ARGV: now_ms ('' = server clock), lease to release ('' = none), n,
--       then n x (field, window_ms, reserved index, delta, held). delta < 0 refunds the
--       window the reservation went to (if still counted), delta > 0 charges the current
--       window. held: what the lease held on that limit; if the lease's reservation was
--       already refunded (it expired: a late refresh), it is charged back on top of delta,
--       so the request ends charged its usage, once.
local now = now_ms()
local refunded = false
if ARGV[2] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  refunded = redis.call('HDEL', KEYS[4], ARGV[2]) == 0
end
local n = tonumber(ARGV[3])
local longest = 0
for i = 1, n do
  local b = 3 + (i - 1) * 5
  local f = ARGV[b + 1]
  local w = tonumber(ARGV[b + 2])
  local ridx = tonumber(ARGV[b + 3])
  local delta = tonumber(ARGV[b + 4])
  if refunded then delta = delta + tonumber(ARGV[b + 5]) end
  if delta ~= 0 then
    local idx = math.floor(now / w)
    local prev, curr = rolled(redis.call('HGET', KEYS[1], f), idx)
    if delta > 0 then
      -- (at most 2^53, exact in a double and past any limit: %d wraps past 2^63 to -2^63,
      -- which would read as an empty window)
      curr = math.min(curr + delta, 9007199254740992)
    else
      prev, curr = given_back(prev, curr, idx, ridx, -delta)
    end
    redis.call('HSET', KEYS[1], f, string.format('%d %d %d', idx, prev, curr))
    if 2 * w > longest then longest = 2 * w end
  end
end
if longest > 0 and redis.call('PTTL', KEYS[1]) < longest then
  redis.call('PEXPIRE', KEYS[1], longest)
end
return 1
