-- lease_renew: renew a worker's lease and say whether it had run out.
--
-- KEYS[1]  leases ZSET (worker id -> deadline ms)
-- KEYS[2]  taken STRING of the worker (set by a takeover in receipt.lua)
-- ARGV[1]  worker id
-- ARGV[2]  lease ttl in ms
-- Returns  the previous deadline (ms), -1 when the worker had no lease, or -2 when another
--          worker took over one of its deliveries (it looked gone), and the server time (ms)
--          the renewal was computed with.
--
-- Why: deadlines come from the Redis server's clock (TIME), so workers whose clocks disagree
-- still agree on who is dead. A previous deadline in the past tells the worker it was taken
-- for dead (its tasks may have been resurrected elsewhere); so does a takeover (a worker cut
-- off from Redis and the broker for less than its lease, whose redelivered tasks run elsewhere).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prev = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if redis.call('DEL', KEYS[2]) == 1 then
  return {-2, now}
end
if prev then
  return {tonumber(prev), now}
end
return {-1, now}
