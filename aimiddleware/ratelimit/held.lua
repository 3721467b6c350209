-- Reservations held under leases: prepended to the scripts that read a principal's counters.
-- KEYS[1]: counters hash; KEYS[3]: held leases, a sorted set (score = expiry ms); KEYS[4]:
-- what each held lease reserved, a hash (lease -> entries '<window ms> <window index>
-- <amount> <field length> <field>', one after another).
-- A request's lease is refreshed while it runs and deleted when it finishes (adjust.lua);
-- one whose worker died (SIGKILL, out of memory) expires, and the next script that reads the
-- counters refunds what it reserved from the window it went to, if that one is still counted
-- (given_back, as adjust.lua refunds), then deletes it. Scripts are atomic: refunded once.
local function refund_expired(now)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 64)
  if #gone == 0 then return end
  local recs = redis.call('HMGET', KEYS[4], unpack(gone))
  for j = 1, #gone do
    local rec = recs[j]
    local pos = 1
    while rec and pos <= #rec do
      local w, ridx, amount, len, at = string.match(rec, '^(%d+) (%-?%d+) (%d+) (%d+) ()', pos)
      if not w then break end
      local f = string.sub(rec, at, at + tonumber(len) - 1)
      pos = at + tonumber(len)
      w, ridx, amount = tonumber(w), tonumber(ridx), tonumber(amount)
      local idx = math.floor(now / w)
      local raw = redis.call('HGET', KEYS[1], f)
      if raw and (ridx == idx or ridx == idx - 1) then
        local prev, curr = rolled(raw, idx)
        prev, curr = given_back(prev, curr, idx, ridx, amount)
        redis.call('HSET', KEYS[1], f, string.format('%d %d %d', idx, prev, curr))
      end
    end
  end
  redis.call('ZREM', KEYS[3], unpack(gone))
  redis.call('HDEL', KEYS[4], unpack(gone))
end
