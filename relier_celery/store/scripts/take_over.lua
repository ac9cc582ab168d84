-- take_over: move a delivery from a holder that is gone to the worker the broker redelivered
-- it to, so that it runs now instead of after the holder's lease runs out.
--
-- KEYS[1]  owners HASH (delivery id -> "worker|retries|resurrections" of the delivery held)
-- KEYS[2]  held HASH of the holder that is gone
-- KEYS[3]  claim STRING of that holder (a scanner is resurrecting its tasks)
-- KEYS[4]  held HASH of the receiving worker
-- KEYS[5]  taken STRING of the holder: its next renewal gives up what it still runs
-- ARGV[1]  delivery id
-- ARGV[2]  the owners entry the receiver saw ("holder|retries|resurrections")
-- ARGV[3]  receiving worker id
-- ARGV[4]  retries of the redelivered copy
-- ARGV[5]  resurrections of the redelivered copy
-- ARGV[6]  the message record (opaque to this script)
-- ARGV[7]  ttl of the taken marker in ms
-- Returns  1 taken over; 0 when the entry changed, a scanner holds a claim on the holder, or
--          the holder no longer holds the record: then the copy is a duplicate, as before.
--
-- Why: the caller checked that the holder's presence connection is gone (presence.py) and
-- the broker redelivered the message (its consumer went away). A scanner republishing the
-- same record at the same time must not also run it: its claim or its HDEL wins here. A holder
-- that only looked gone (cut off from Redis and the broker at once) is fenced by the marker
-- when it reaches Redis again: it stops the task it was running (lease.py, fence.py).
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
local gen = string.match(ARGV[2], '|(%d+|%d+)$')
if not gen or redis.call('HDEL', KEYS[2], ARGV[1] .. '|' .. gen) == 0 then
  return 0
end
local mine = ARGV[4] .. '|' .. ARGV[5]
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. '|' .. mine)
redis.call('HSET', KEYS[4], ARGV[1] .. '|' .. mine, ARGV[6])
redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[7])
return 1
