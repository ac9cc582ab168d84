-- idem_release: give up a claim after a failed run, so that a retry can run.
--
-- KEYS[1]  the key's record HASH
-- ARGV[1]  our fencing token
-- Returns  1 released; 0 not ours any more
if redis.call('HGET', KEYS[1], 'token') == ARGV[1]
   and redis.call('HGET', KEYS[1], 'state') == 'in_flight' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
