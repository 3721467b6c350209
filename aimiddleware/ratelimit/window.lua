-- Prepended to every rate-limit script: the clock, and a limit's sliding-window state.
-- A limit's counter is stored as 'index prev curr': the index (now // window ms) of the
-- window it was last written in, that window's count and the one before's.

-- ARGV[1] in milliseconds, or the server's clock when it is '' (workers share one clock).
local function now_ms()
  local now = tonumber(ARGV[1])
  if now then return now end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A stored counter (nil: never written) as of window idx: (previous count, current count).
local function rolled(raw, idx)
  if not raw then return 0, 0 end
  local a, p, c = string.match(raw, '^(%-?%d+) (%d+) (%d+)$')
  a = tonumber(a)
  if a == idx then return tonumber(p), tonumber(c) end
  if a == idx - 1 then return tonumber(c), 0 end
  return 0, 0
end

-- (prev, curr) after giving back amount reserved in window ridx, if it is still counted.
local function given_back(prev, curr, idx, ridx, amount)
  if ridx == idx then return prev, math.max(0, curr - amount) end
  if ridx == idx - 1 then return math.max(0, prev - amount), curr end
  return prev, curr
end
