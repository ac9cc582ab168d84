-- claim_finish: end a scanner's claims on dead workers; forget each one that has nothing left.
--
-- KEYS[1]      leases ZSET
-- KEYS[2k]     held HASH of the k-th dead worker
-- KEYS[2k+1]   claim STRING of the k-th dead worker
-- ARGV[1]      scanner id
-- ARGV[1+k]    the k-th dead worker id
-- Returns      the number of records left for each worker, in order (0: it was forgotten).
--
-- Why: only the claim's owner may end it; records left over (a publish failed) stay for the
-- next scan.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for k = 1, #ARGV - 1 do
  local worker, held, claim = ARGV[k + 1], KEYS[2 * k], KEYS[2 * k + 1]
  if redis.call('GET', claim) == ARGV[1] then
    redis.call('DEL', claim)
  end
  local left = redis.call('HLEN', held)
  if left == 0 then
    local deadline = redis.call('ZSCORE', KEYS[1], worker)
    if deadline and tonumber(deadline) < now then
      redis.call('ZREM', KEYS[1], worker)
    end
  end
  out[k] = left
end
return out
