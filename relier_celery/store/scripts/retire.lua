-- retire: a worker stops. Forget it if it holds nothing; else expire its lease now so the next
-- scan resurrects what it still holds.
--
-- KEYS[1]  leases ZSET
-- KEYS[2]  held HASH of the worker
-- ARGV[1]  worker id
-- Returns  the number of records it still held.
--
-- Why: a record left behind under a forgotten lease would never be resurrected, and would
-- make the broker's copy of that message look like a duplicate.
local left = redis.call('HLEN', KEYS[2])
if left == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], 0, ARGV[1])
end
return left
