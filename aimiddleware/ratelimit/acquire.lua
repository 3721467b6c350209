-- Atomic all-or-nothing admission over every limit of a request (one round trip).
-- KEYS[1]: counters hash of the principal; KEYS[2]: leases sorted set (score = expiry ms).
-- ARGV: now_ms ('' = server clock), lease id ('' = none), concurrency (0 = none),
--       lease ttl ms, n, then n x (field, window_ms, limit, cost).
-- Returns {allowed, failed, now, in_flight, n x (index, prev, curr, elapsed)}.
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local conc = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local fields = {}
for i = 1, n do fields[i] = ARGV[5 + (i - 1) * 4 + 1] end
local raw = {}
if n > 0 then raw = redis.call('HMGET', KEYS[1], unpack(fields)) end
local states = {}
local failed = -1
local longest = ttl
for i = 1, n do
  local b = 5 + (i - 1) * 4
  local w = tonumber(ARGV[b + 2])
  local lim = tonumber(ARGV[b + 3])
  local cost = tonumber(ARGV[b + 4])
  local idx = math.floor(now / w)
  local sidx, prev, curr = nil, 0, 0
  if raw[i] then
    local a, p, c = string.match(raw[i], '^(%-?%d+) (%d+) (%d+)$')
    sidx, prev, curr = tonumber(a), tonumber(p), tonumber(c)
  end
  if sidx == idx - 1 then
    prev = curr
    curr = 0
  elseif sidx ~= idx then
    prev = 0
    curr = 0
  end
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
  for i = 1, n do
    local b = 5 + (i - 1) * 4
    local s = states[i]
    s[3] = s[3] + tonumber(ARGV[b + 4])
    args[#args + 1] = fields[i]
    args[#args + 1] = string.format('%d %d %d', s[1], s[2], s[3])
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
