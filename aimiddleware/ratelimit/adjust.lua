-- Reconciliation and lease release in one round trip.
-- KEYS[1]: counters hash; KEYS[2]: leases sorted set; KEYS[3], KEYS[4]: held leases and
-- what they reserved (see held.lua).
-- ARGV: now_ms ('' = server clock), lease to release ('' = none), n,
--       then n x (field, window_ms, reserved index, delta, held). delta < 0 refunds the
--       window the reservation went to (if still counted), delta > 0 charges the current
--       window. held: what the lease held on that limit; if the lease's reservation was
--       already refunded (it expired: a late refresh), it is charged back on top of delta,
--       so the request ends charged its usage, once.
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
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
    local sidx, prev, curr = nil, 0, 0
    local raw = redis.call('HGET', KEYS[1], f)
    if raw then
      local a, p, c = string.match(raw, '^(%-?%d+) (%d+) (%d+)$')
      sidx, prev, curr = tonumber(a), tonumber(p), tonumber(c)
    end
    if sidx == idx - 1 then
      prev = curr
      curr = 0
    elseif sidx ~= idx then
      prev = 0
      curr = 0
    end
    if delta > 0 then
      curr = curr + delta
    elseif ridx == idx then
      curr = math.max(0, curr + delta)
    elseif ridx == idx - 1 then
      prev = math.max(0, prev + delta)
    end
    redis.call('HSET', KEYS[1], f, string.format('%d %d %d', idx, prev, curr))
    if 2 * w > longest then longest = 2 * w end
  end
end
if longest > 0 and redis.call('PTTL', KEYS[1]) < longest then
  redis.call('PEXPIRE', KEYS[1], longest)
end
return 1
