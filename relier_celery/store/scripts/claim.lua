-- claim: take the in-flight tasks of workers whose lease ran out, for one scanner only.
--
-- KEYS[1]      leases ZSET
-- KEYS[2k]     held HASH of the k-th dead worker
-- KEYS[2k+1]   claim STRING of the k-th dead worker
-- ARGV[1]      scanner id
-- ARGV[2]      claim ttl in ms
-- ARGV[2+k]    the k-th dead worker id
-- Returns      one list per worker, in order: empty when the worker is alive, already
--              claimed, or held nothing (its lease is then removed); else the flat list
--              field1, record1, field2, record2, ...
--
-- Why: two scanners racing over the same dead worker must resurrect each task once. The claim
-- expires, so a scanner that dies after claiming leaves the tasks to be taken again: at least
-- once, never zero times. Several workers in one call: a scan that finds ten dead pays one
-- round trip, not ten.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for k = 1, #ARGV - 2 do
  local worker, held, claim = ARGV[k + 2], KEYS[2 * k], KEYS[2 * k + 1]
  local got = {}
  local deadline = redis.call('ZSCORE', KEYS[1], worker)
  local alive = deadline and tonumber(deadline) >= now
  if not alive and redis.call('EXISTS', claim) == 0 then
    if redis.call('HLEN', held) == 0 then
      redis.call('ZREM', KEYS[1], worker)
    else
      redis.call('SET', claim, ARGV[1], 'PX', ARGV[2])
      got = redis.call('HGETALL', held)
    end
  end
  out[k] = got
end
return out
