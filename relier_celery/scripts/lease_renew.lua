-- lease_renew: renew a worker's lease and say whether it had run out.
--
-- KEYS[1]  leases ZSET (worker id -> deadline ms)
-- ARGV[1]  worker id
-- ARGV[2]  lease ttl in ms
-- Returns  the previous deadline (ms) or -1 when the worker had no lease, and the server time
--          (ms) the renewal was computed with.
--
-- Why: deadlines come from the Redis server's clock (TIME), so workers whose clocks disagree
-- still agree on who is dead. A previous deadline in the past tells the worker it was taken
-- for dead (its tasks may have been resurrected elsewhere).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prev = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if prev then
  return {tonumber(prev), now}
end
return {-1, now}
