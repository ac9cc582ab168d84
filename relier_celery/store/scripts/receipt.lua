-- receipt: record a received task message under the receiving worker, unless it is a
-- duplicate; for a broker's redelivery, take it over from a holder that is gone.
--
-- KEYS[1]  owners HASH (delivery id -> "worker|retries|resurrections" of the delivery held)
-- KEYS[2]  done STRING of this delivery id ("retries|resurrections" of the newest finished delivery)
-- KEYS[3]  held HASH of the receiving worker ("delivery_id|retries|resurrections" -> record)
-- ARGV[1]  delivery id: the task id and its publication id (rl_pub); see record.delivery_id
-- ARGV[2]  receiving worker id
-- ARGV[3]  retries of this delivery
-- ARGV[4]  resurrections of this delivery
-- ARGV[5]  the message record (opaque to this script); for a takeover, its crash count set
--          to ARGV[9] + 1
-- A broker's redelivery (takeover mode) adds:
-- ARGV[6]  the prefix of relier's keys ("<prefix>:{<prefix>}"): the holder's held HASH,
--          claim STRING and taken STRING are ARGV[6] .. ":held:" / ":claim:" / ":taken:" ..
--          the holder (the same hash tag, so the same slot as KEYS)
-- ARGV[7]  the prefix of the workers' presence channels (presence.py)
-- ARGV[8]  which holder may be taken over: "*" any whose presence channel has no subscriber
--          here (one Redis server), else the one the caller saw gone ("" none)
-- ARGV[9]  the crash count the caller expects in the holder's record
-- ARGV[10] the crash count's header name
-- ARGV[11] ttl of the taken marker in ms
-- Returns  {1} recorded; {1, "taken", holder} taken over; {0, "done", gen} a delivery not
--          newer than one already finished; {0, "held", owner, n} a delivery not newer than
--          one a worker already holds (n, in takeover mode: subscribers on the holder's
--          presence channel, 0 when its process is gone; held all the same when the holder
--          is the receiver, a scanner claimed its tasks, or its record is missing or not
--          relier's JSON); {0, "held", owner, 1, own} held by the receiver itself, own = 1
--          when its held HASH has this very delivery's record (a receipt of it by the
--          receiver landed, its reply lost); {0, "crashes", n} the holder's record counts n crashes, not
--          ARGV[9]: nothing changed, call again with n; {0, "free"} in takeover mode,
--          nobody holds it: nothing changed, record it without takeover arguments.
--
-- Why: a delivery is identified by its delivery id (one publication: Celery publishing again
-- under the same task id, as Task.replace does, is another one and runs) and, within it, by
-- (retries, resurrections). A relier resurrection is newer and runs; a broker redelivery of
-- the same delivery (visibility timeout, a restore on reconnect) is not, and is dropped
-- instead of running twice (G4). A holder whose lease ran out still counts: the scanner
-- republishes its copy. But RabbitMQ redelivers a dead consumer's messages at once: when the
-- holder's presence connection is gone too, its copy runs now, not after its lease
-- (docs/rabbitmq.md). A scanner republishing the same record meanwhile must not also run it:
-- its claim or its HDEL wins here. The holder's death is a crash of the task, counted from
-- the holder's record (the broker's copy carries the count it was published with): the
-- caller guesses it, this script checks it, so that each redelivery of a dead worker costs
-- one round trip. Decoding the holder's record blocks Redis about 7 ms per MB of body, on a
-- takeover only. A holder that only looked gone (cut off from Redis and the broker at once)
-- is fenced by the marker when it reaches Redis again (lease.py, fence.py).
local retries = tonumber(ARGV[3])
local res = tonumber(ARGV[4])
local takeover = ARGV[6] ~= nil

local function not_newer(gen)
  local r, s = string.match(gen, '(%d+)|(%d+)$')
  r = tonumber(r); s = tonumber(s)
  return retries < r or (retries == r and res <= s)
end

local done = redis.call('GET', KEYS[2])
if done and not_newer(done) then
  return {0, 'done', done}
end
local mine = retries .. '|' .. res
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if not owner or not not_newer(owner) then
  if takeover then
    return {0, 'free'}
  end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. mine)
  redis.call('HSET', KEYS[3], ARGV[1] .. '|' .. mine, ARGV[5])
  return {1}
end
local holder, gen = string.match(owner, '^(.*)|(%d+|%d+)$')
if holder == ARGV[2] then
  -- The receiver holds it already: a duplicate, unless it is its own record of this very
  -- delivery (own = 1), which a receipt whose reply was lost left behind (receipt.py).
  local own = gen == mine and redis.call('HEXISTS', KEYS[3], ARGV[1] .. '|' .. gen) or 0
  return {0, 'held', owner, 1, own}
end
if not takeover then
  return {0, 'held', owner}
end
if not holder then
  return {0, 'held', owner, 1}
end
local present = redis.call('PUBSUB', 'NUMSUB', ARGV[7] .. holder)[2]
if present > 0 or (ARGV[8] ~= '*' and ARGV[8] ~= holder) then
  return {0, 'held', owner, present}
end
if redis.call('EXISTS', ARGV[6] .. ':claim:' .. holder) == 1 then
  return {0, 'held', owner, 0}
end
local field = ARGV[1] .. '|' .. gen
local held = ARGV[6] .. ':held:' .. holder
local raw = redis.call('HGET', held, field)
if not raw then
  return {0, 'held', owner, 0}
end
local ok, record = pcall(cjson.decode, raw)
if not ok or type(record) ~= 'table' or type(record['headers']) ~= 'table' then
  return {0, 'held', owner, 0} -- the scanner quarantines it raw, after the lease
end
local crashes = tonumber(record['headers'][ARGV[10]]) or 0
crashes = crashes < 0 and 0 or math.floor(crashes)
if crashes ~= tonumber(ARGV[9]) then
  return {0, 'crashes', crashes}
end
redis.call('HDEL', held, field)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. mine)
redis.call('HSET', KEYS[3], ARGV[1] .. '|' .. mine, ARGV[5])
redis.call('SET', ARGV[6] .. ':taken:' .. holder, ARGV[2], 'PX', ARGV[11])
return {1, 'taken', holder}
