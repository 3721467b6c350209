-- A principal's counters as of now, after refunding expired held leases (held.lua).
-- KEYS: as acquire.lua. ARGV: now_ms ('' = server clock), then the fields to read.
-- Returns {now, the value of each field (nil: never used)}.
local now = now_ms()
refund_expired(now)
local out = {now}
if #ARGV > 1 then
  local raw = redis.call('HMGET', KEYS[1], unpack(ARGV, 2))
  for i = 1, #raw do out[i + 1] = raw[i] end
end
return out
