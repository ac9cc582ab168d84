-- take_over: receive a broker's redelivery, taking the delivery over from a holder that is
-- gone, so that it runs now instead of after the holder's lease runs out. One round trip: the
-- receipt's duplicate checks, the holder's crash count and the move, in one step.
--
-- KEYS[1]  owners HASH (delivery id -> "worker|retries|resurrections" of the delivery held)
-- KEYS[2]  done STRING of this delivery id ("retries|resurrections" of the newest finished delivery)
-- KEYS[3]  held HASH of the holder that is gone
-- KEYS[4]  claim STRING of that holder (a scanner is resurrecting its tasks)
-- KEYS[5]  held HASH of the receiving worker
-- KEYS[6]  taken STRING of the holder: its next renewal gives up what it still runs
-- ARGV[1]  delivery id
-- ARGV[2]  the holder that is gone (worker id)
-- ARGV[3]  receiving worker id
-- ARGV[4]  retries of the redelivered copy
-- ARGV[5]  resurrections of the redelivered copy
-- ARGV[6]  the receiver's record, its crash count set to ARGV[7] + 1
-- ARGV[7]  the crash count the caller expects in the holder's record
-- ARGV[8]  the crash count's header name
-- ARGV[9]  ttl of the taken marker in ms
-- Returns  {1, "taken"} taken over; {0, "done", gen} a delivery not newer than one already
--          finished; {0, "held", owner} held by another worker than ARGV[2], or by it with a
--          scanner's claim on it, without the record, or with a record that is not relier's
--          JSON: a duplicate, as in receipt.lua; {0, "crashes", n} the holder's record counts
--          n crashes, not ARGV[7]: nothing changed, call again with n; {0, "free"} nobody
--          holds it: nothing changed, record it with receipt.lua.
--
-- Why: the caller saw the holder's presence connection gone (presence.py) and the broker
-- redelivered the message (its consumer went away). A scanner republishing the same record at
-- the same time must not also run it: its claim or its HDEL wins here. The holder's death is
-- a crash of the task, counted from the holder's record (the broker's copy carries the count
-- it was published with, not the takeovers since): the caller guesses it, this script checks
-- it, so that a dead worker's burst of redeliveries costs one round trip each. Decoding the
-- holder's record blocks Redis about 7 ms per MB of body (54 ms measured for 8 MB, the
-- largest relier_max_message_bytes lets through by default), on a takeover only. A holder
-- that only looked gone (cut off from Redis and the broker at once) is fenced by the marker
-- when it reaches Redis again: it stops the task it was running (lease.py, fence.py).
local retries = tonumber(ARGV[4])
local res = tonumber(ARGV[5])

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
if not owner or not not_newer(owner) then
  return {0, 'free'}
end
local gen = string.match(owner, '|(%d+|%d+)$')
if not gen or owner ~= ARGV[2] .. '|' .. gen or redis.call('EXISTS', KEYS[4]) == 1 then
  return {0, 'held', owner}
end
local field = ARGV[1] .. '|' .. gen
local raw = redis.call('HGET', KEYS[3], field)
if not raw then
  return {0, 'held', owner}
end
local ok, record = pcall(cjson.decode, raw)
if not ok or type(record) ~= 'table' or type(record['headers']) ~= 'table' then
  return {0, 'held', owner} -- the scanner quarantines it raw, after the lease
end
local crashes = tonumber(record['headers'][ARGV[8]]) or 0
crashes = crashes < 0 and 0 or math.floor(crashes)
if crashes ~= tonumber(ARGV[7]) then
  return {0, 'crashes', crashes}
end
redis.call('HDEL', KEYS[3], field)
local mine = retries .. '|' .. res
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. '|' .. mine)
redis.call('HSET', KEYS[5], ARGV[1] .. '|' .. mine, ARGV[6])
redis.call('SET', KEYS[6], ARGV[3], 'PX', ARGV[9])
return {1, 'taken'}
