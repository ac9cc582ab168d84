-- expired: the workers whose lease deadline has passed, by this server's clock.
--
-- KEYS[1]  leases ZSET (worker -> deadline ms)
-- Returns  the flat list worker1, deadline1, worker2, deadline2, ...
--
-- Why: every worker's scanner asks this every scan; reading the clock and the set in one
-- round trip halves what an idle scan costs the fleet.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'WITHSCORES')
