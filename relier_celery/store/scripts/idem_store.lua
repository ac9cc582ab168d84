-- idem_store: record the result of a claimed key, if the claim is still ours.
--
-- KEYS[1]  the key's record HASH
-- ARGV[1]  our fencing token
-- ARGV[2]  the serialized result
-- ARGV[3]  how long the result is kept, in ms
-- Returns  1 stored; 0 fenced out (our claim was taken over, or expired)
--
-- Why: only the current owner may write; a late write from a stale owner is refused.
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'done', 'result', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
