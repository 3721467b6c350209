-- Reconciliation and lease release in one round trip.
-- KEYS[1]: counters hash; KEYS[2]: leases sorted set.
-- ARGV: now_ms ('' = server clock), lease to release ('' = none), n,
--       then n x (field, window_ms, reserved index, delta). delta < 0 refunds the window the
--       reservation went to (if still counted), delta > 0 charges the current window.
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[2], ARGV[2]) end
local n = tonumber(ARGV[3])
local longest = 0
for i = 1, n do
  local b = 3 + (i - 1) * 4
  local f = ARGV[b + 1]
  local w = tonumber(ARGV[b + 2])
  local ridx = tonumber(ARGV[b + 3])
  local delta = tonumber(ARGV[b + 4])
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
  if delta >= 0 then
    curr = curr + delta
  elseif ridx == idx then
    curr = math.max(0, curr + delta)
  elseif ridx == idx - 1 then
    prev = math.max(0, prev + delta)
  end
  redis.call('HSET', KEYS[1], f, string.format('%d %d %d', idx, prev, curr))
  if 2 * w > longest then longest = 2 * w end
end
if n > 0 and redis.call('PTTL', KEYS[1]) < longest then
  redis.call('PEXPIRE', KEYS[1], longest)
end
return 1
