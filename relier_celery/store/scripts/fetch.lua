-- fetch: take the next message from a worker's queues into its held hash, in one step.
--
-- KEYS[1]     leases ZSET
-- KEYS[2]     claim STRING of this worker (a scanner is taking its records)
-- KEYS[3]     held HASH of this worker
-- KEYS[4..n]  the queue lists to try, in kombu's order (queues in rotation, priority steps)
-- ARGV[1]     worker id
-- ARGV[2]     field to store the message under (unique in this worker's held hash)
-- ARGV[3]     record prefix: "rlf1\n<worker>\n"
-- Returns     {1, list, envelope} a message was taken; {2} every list is empty;
--             {0} this worker's lease is missing, expired or being claimed: nothing taken.
--
-- Why: kombu's BRPOP takes a message out of Redis into a socket buffer, and writes its
-- "unacked" copy in a second round trip; a worker killed in between loses the message without
-- a trace. Here the message is at every instant in its list or in exactly one worker's held
-- hash, under that worker's lease. A worker whose lease ran out takes nothing: a scanner may
-- be moving its records back to their queues.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not deadline or tonumber(deadline) < now or redis.call('EXISTS', KEYS[2]) == 1 then
  return {0}
end
for i = 4, #KEYS do
  local m = redis.call('RPOP', KEYS[i])
  if m then
    redis.call('HSET', KEYS[3], ARGV[2], ARGV[3] .. KEYS[i] .. '\n' .. now .. '\n' .. m)
    return {1, KEYS[i], m}
  end
end
return {2}
