-- receipt: record a received task message under the receiving worker, unless it is a duplicate.
--
-- KEYS[1]  owners HASH (delivery id -> "worker|retries|resurrections" of the delivery held)
-- KEYS[2]  done STRING of this delivery id ("retries|resurrections" of the newest finished delivery)
-- KEYS[3]  held HASH of the receiving worker ("delivery_id|retries|resurrections" -> record)
-- ARGV[1]  delivery id: the task id and its publication id (rl_pub); see record.delivery_id
-- ARGV[2]  receiving worker id
-- ARGV[3]  retries of this delivery
-- ARGV[4]  resurrections of this delivery
-- ARGV[5]  the message record (opaque to this script)
-- Returns  {1} recorded; {0, "done", gen} a delivery not newer than one already finished;
--          {0, "held", owner} a delivery not newer than one a worker already holds.
--
-- Why: a delivery is identified by its delivery id (one publication: Celery publishing again
-- under the same task id, as Task.replace does, is another one and runs) and, within it, by
-- (retries, resurrections). A relier resurrection is newer and runs; a broker redelivery of the same delivery (visibility
-- timeout, a restore on reconnect) is not, and is dropped instead of running twice (G4). A
-- holder whose lease ran out still counts: the scanner republishes its copy.
local retries = tonumber(ARGV[3])
local res = tonumber(ARGV[4])

local function not_newer(gen)
  local r, s = string.match(gen, '(%d+)|(%d+)$')
  r = tonumber(r); s = tonumber(s)
  return retries < r or (retries == r and res <= s)
end

local done = redis.call('GET', KEYS[2])
if done and not_newer(done) then
  return {0, 'done', done}
end
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner and not_newer(owner) then
  return {0, 'held', owner}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. retries .. '|' .. res)
redis.call('HSET', KEYS[3], ARGV[1] .. '|' .. retries .. '|' .. res, ARGV[5])
return {1}
