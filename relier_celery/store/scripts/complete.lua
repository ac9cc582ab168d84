-- complete: forget a delivery that reached a final state and remember that it finished.
--
-- KEYS[1]  owners HASH
-- KEYS[2]  done STRING of this delivery id
-- KEYS[3]  held HASH of the worker that ran it
-- ARGV[1]  delivery id: the task id and its publication id (rl_pub); see record.delivery_id
-- ARGV[2]  worker id
-- ARGV[3]  retries of this delivery
-- ARGV[4]  resurrections of this delivery
-- ARGV[5]  ttl of the done record in ms
-- ARGV[6]  "1" to remember the delivery as finished; "0" when Celery requeues the message
--          itself (a Reject(requeue=True)), so its next delivery must not look like a duplicate
-- Returns  1 when the worker still held the record, 0 when it had been taken (resurrected).
--
-- Why: one round trip on completion (G7). The owner entry is removed only when it is still
-- this delivery's: a newer delivery (a retry already received elsewhere) keeps its own. The
-- done record only moves forward, and outlives the broker's visibility timeout so that a
-- late redelivery is recognised.
local gen = ARGV[3] .. '|' .. ARGV[4]
local removed = redis.call('HDEL', KEYS[3], ARGV[1] .. '|' .. gen)
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] .. '|' .. gen then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
if ARGV[6] == '0' then
  if redis.call('GET', KEYS[2]) == gen then
    redis.call('DEL', KEYS[2])
  end
  return removed
end
local retries = tonumber(ARGV[3])
local res = tonumber(ARGV[4])
local done = redis.call('GET', KEYS[2])
local newer = true
if done then
  local r, s = string.match(done, '(%d+)|(%d+)$')
  r = tonumber(r); s = tonumber(s)
  newer = retries > r or (retries == r and res > s)
end
if newer then
  redis.call('SET', KEYS[2], gen, 'PX', ARGV[5])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return removed
