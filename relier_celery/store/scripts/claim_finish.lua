-- claim_finish: end a scanner's claim on a dead worker; forget the worker if nothing is left.
--
-- KEYS[1]  leases ZSET
-- KEYS[2]  held HASH of the dead worker
-- KEYS[3]  claim STRING of the dead worker
-- ARGV[1]  dead worker id
-- ARGV[2]  scanner id
-- Returns  the number of records left (0 when the worker was forgotten).
--
-- Why: only the claim's owner may end it; records left over (a publish failed) stay for the
-- next scan.
if redis.call('GET', KEYS[3]) == ARGV[2] then
  redis.call('DEL', KEYS[3])
end
local left = redis.call('HLEN', KEYS[2])
if left == 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if deadline and tonumber(deadline) < now then
    redis.call('ZREM', KEYS[1], ARGV[1])
  end
end
return left
