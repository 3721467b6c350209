-- Atomic all-or-nothing admission over every limit of a request (one round trip).
-- KEYS[1]: counters hash of the principal; KEYS[2]: leases sorted set (score = expiry ms);
-- KEYS[3], KEYS[4]: held leases and what they reserved (held.lua, prepended).
-- ARGV: now_ms ('' = server clock), lease id ('' = none), concurrency (0 = none),
--       lease ttl ms, n, held ('' = none, else one '0'/'1' per limit: '1' = its cost is
--       held under the lease, refunded if the lease expires), then n x (field, window_ms,
--       limit, cost).
-- Returns {allowed, failed, now, in_flight, n x (index, prev, curr, elapsed)}.
local now = now_ms()
refund_expired(now)
local conc = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local held = ARGV[6]
local fields = {}
for i = 1, n do fields[i] = ARGV[6 + (i - 1) * 4 + 1] end
local raw = {}
if n > 0 then raw = redis.call('HMGET', KEYS[1], unpack(fields)) end
local states = {}
local failed = -1
local longest = ttl
for i = 1, n do
  local b = 6 + (i - 1) * 4
  local w = tonumber(ARGV[b + 2])
  local lim = tonumber(ARGV[b + 3])
  local cost = tonumber(ARGV[b + 4])
  local idx = math.floor(now / w)
  local prev, curr = rolled(raw[i], idx)
  local elapsed = now - idx * w
  states[i] = {idx, prev, curr, elapsed}
  if failed < 0 and prev * (w - elapsed) / w + curr + cost > lim then failed = i - 1 end
  if 2 * w > longest then longest = 2 * w end
end
local inflight = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  inflight = redis.call('ZCARD', KEYS[2])
  if failed < 0 and inflight >= conc then failed = n end
end
local allowed = 0
if failed < 0 then
  allowed = 1
  local args = {}
  local record = {}
  for i = 1, n do
    local b = 6 + (i - 1) * 4
    local s = states[i]
    local cost = tonumber(ARGV[b + 4])
    s[3] = s[3] + cost
    args[#args + 1] = fields[i]
    args[#args + 1] = string.format('%d %d %d', s[1], s[2], s[3])
    if cost > 0 and string.byte(held, i) == 49 then  -- '1'
      record[#record + 1] = string.format(
        '%d %d %d %d %s', ARGV[b + 2], s[1], cost, #fields[i], fields[i])
    end
  end
  if n > 0 then
    redis.call('HSET', KEYS[1], unpack(args))
    if redis.call('PTTL', KEYS[1]) < longest then redis.call('PEXPIRE', KEYS[1], longest) end
  end
  if conc > 0 and ARGV[2] ~= '' then
    redis.call('ZADD', KEYS[2], now + ttl, ARGV[2])
    inflight = inflight + 1
    if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
  end
  if #record > 0 and ARGV[2] ~= '' then
    redis.call('ZADD', KEYS[3], now + ttl, ARGV[2])
    redis.call('HSET', KEYS[4], ARGV[2], table.concat(record))
    -- (both written and emptied together: one lifetime, as long as the counters')
    if redis.call('PTTL', KEYS[3]) < longest then
      redis.call('PEXPIRE', KEYS[3], longest)
      redis.call('PEXPIRE', KEYS[4], longest)
    end
  end
end
local out = {allowed, failed, now, inflight}
for i = 1, n do
  local s = states[i]
  out[#out + 1] = s[1]
  out[#out + 1] = s[2]
  out[#out + 1] = s[3]
  out[#out + 1] = s[4]
end
return out
