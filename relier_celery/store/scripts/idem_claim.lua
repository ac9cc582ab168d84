-- idem_claim: claim an idempotency key, or read what it already holds, in one step.
--
-- KEYS[1]  the key's record HASH (state, token, lease, task_id, args, result)
-- KEYS[2]  leases ZSET (worker id -> deadline ms)
-- KEYS[3]  fencing counter STRING
-- ARGV[1]  claimant's lease id (a worker id), or "" when the claim lives by its TTL alone
-- ARGV[2]  claimant's task id (or a unique lock owner)
-- ARGV[3]  hash of the call's arguments
-- ARGV[4]  ttl of an in-flight claim in ms (a safety net: a live owner's lease decides)
-- ARGV[5]  what a claim left by a dead owner means: "rerun" (take it over), "quarantine"
--          (mark it interrupted: nobody runs it until an operator approves) or "approved"
--          (an operator released it: take it over even when marked interrupted)
-- Returns  {"claimed", token, taken_over(0|1)} | {"done", result} | {"conflict", stored_args}
--          | {"busy", owner_task_id} | {"interrupted", owner_task_id}
--
-- Why: claim-or-read must be atomic, or two duplicates both see "no record" and both run.
-- Every claim gets a new fencing token: a stale owner (paused past its lease, then back) can
-- never store over the result of the claim that took over from it. A claim whose owner died
-- mid-run is taken over (the run is repeated), or, for tasks that must never repeat a side
-- effect, kept as "interrupted" for an operator, who releases it from the DLQ.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HGET', KEYS[1], 'state')
local taken_over = 0
if state then
  local args = redis.call('HGET', KEYS[1], 'args')
  if args ~= ARGV[3] then
    return {'conflict', args}
  end
  if state == 'done' then
    return {'done', redis.call('HGET', KEYS[1], 'result')}
  end
  local lease = redis.call('HGET', KEYS[1], 'lease')
  local alive = true
  if lease ~= '' then
    local deadline = redis.call('ZSCORE', KEYS[2], lease)
    alive = deadline ~= false and tonumber(deadline) >= now
  end
  if state == 'interrupted' then
    alive = false
  end
  if redis.call('HGET', KEYS[1], 'task_id') == ARGV[2] then
    -- The same task id claims again: its earlier attempt is over (relier runs one delivery of
    -- a task id at a time), killed without releasing the claim (a hard time limit).
    alive = false
  end
  if alive then
    return {'busy', redis.call('HGET', KEYS[1], 'task_id')}
  end
  if ARGV[5] == 'quarantine' or (state == 'interrupted' and ARGV[5] ~= 'approved') then
    -- Its owner died mid-run: whether the side effect happened is unknown.
    redis.call('HSET', KEYS[1], 'state', 'interrupted')
    return {'interrupted', redis.call('HGET', KEYS[1], 'task_id')}
  end
  taken_over = 1
end
local token = redis.call('INCR', KEYS[3])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'in_flight', 'token', token, 'lease', ARGV[1],
           'task_id', ARGV[2], 'args', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'claimed', token, taken_over}
