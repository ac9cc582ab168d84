-- claim: take the in-flight tasks of a worker whose lease ran out, for one scanner only.
--
-- KEYS[1]  leases ZSET
-- KEYS[2]  held HASH of the dead worker
-- KEYS[3]  claim STRING of the dead worker
-- ARGV[1]  dead worker id
-- ARGV[2]  scanner id
-- ARGV[3]  claim ttl in ms
-- Returns  {} when the worker is alive, already claimed, or held nothing (its lease is then
--          removed); else the flat list field1, record1, field2, record2, ...
--
-- Why: two scanners racing over the same dead worker must resurrect each task once. The claim
-- expires, so a scanner that dies after claiming leaves the tasks to be taken again: at least
-- once, never zero times.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if deadline and tonumber(deadline) >= now then
  return {}
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {}
end
if redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {}
end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
return redis.call('HGETALL', KEYS[2])
