-- admit: one admission decision (GCRA) over one or more rate limits, all or nothing.
--
-- KEYS[i]      STRING with a TTL: theoretical arrival time (TAT) of limit i, in microseconds
--              since the epoch on the Redis clock
-- ARGV[1]      cost: admissions this call asks for (1 per published task)
-- ARGV[2i]     emission interval of limit i in whole microseconds (period / rate, rounded up)
-- ARGV[2i+1]   burst of limit i: admissions it allows at once from idle (>= 1)
-- Returns      {allowed (1 or 0), retry_after_ms, remaining, reset_ms, refusing limit (1-based,
--              0 when allowed)}. retry_after_ms is rounded up, so waiting it always suffices
--              (unless other callers take the freed capacity first); remaining is how many
--              more this call's limits would admit right now (the smallest); reset_ms is when
--              every limit is back to its full burst.
--
-- Why: the Generic Cell Rate Algorithm keeps one number per limit and decides in O(1): a call
-- is admitted when TAT + cost * interval - burst * interval <= now, and then TAT moves forward
-- by cost * interval. The clock is the Redis server's (TIME), so publishers with skewed clocks
-- share one timeline. Several limits (a task's, a tenant's, a queue's) are decided together: a
-- call refused by one of them consumes none of the others. Over any window of length W this
-- admits at most burst + W / interval calls.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local n = #KEYS
local new_tat = {}
local wait, refusing = 0, 0
local remaining = nil
-- Time until every limit is full again: if refused (nothing moves) and if admitted.
local reset_refused, reset_admitted = 0, 0
for i = 1, n do
  local interval = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local tat = now
  local stored = redis.call('GET', KEYS[i])
  if stored then
    tat = math.max(tonumber(stored), now)
  end
  local next_tat = tat + cost * interval
  local allow_at = next_tat - burst * interval
  if allow_at > now then
    if allow_at - now > wait then
      wait, refusing = allow_at - now, i
    end
  else
    local left = math.floor((now - allow_at) / interval)
    if remaining == nil or left < remaining then
      remaining = left
    end
  end
  reset_refused = math.max(reset_refused, tat - now)
  reset_admitted = math.max(reset_admitted, next_tat - now)
  new_tat[i] = next_tat
end
if refusing > 0 then
  return {0, math.ceil(wait / 1000), 0, math.ceil(reset_refused / 1000), refusing}
end
-- Whole microseconds (< 2^53) keep every sum exact in Lua's doubles.
for i = 1, n do
  local ttl = math.ceil((new_tat[i] - now) / 1000) + 1
  redis.call('SET', KEYS[i], string.format('%.0f', new_tat[i]), 'PX', ttl)
end
return {1, 0, remaining or 0, math.ceil(reset_admitted / 1000), 0}
