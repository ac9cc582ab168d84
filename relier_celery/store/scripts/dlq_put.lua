-- dlq_put: quarantine a task in the dead letter queue and drop its in-flight record, atomically.
--
-- KEYS[1]  dlq HASH (entry id -> entry JSON)
-- KEYS[2]  dlq index ZSET (entry id -> quarantine time ms)
-- KEYS[3]  held HASH the record comes from
-- KEYS[4]  done STRING of the delivery id
-- ARGV[1]  entry id
-- ARGV[2]  entry JSON
-- ARGV[3]  quarantine time in ms
-- ARGV[4]  held field to remove ("" for none)
-- ARGV[5]  "retries|resurrections" of the quarantined delivery
-- ARGV[6]  ttl of the done record in ms
-- KEYS[5]  owners HASH
-- ARGV[7]  delivery id (task id and publication id)
-- ARGV[8]  owner entry of the quarantined delivery ("worker|retries|resurrections"), or ""
-- Returns  1
--
-- Why: the entry is written before the record goes, in one step, so a task is never in
-- neither place. The done record makes a late broker copy of it a duplicate.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if ARGV[4] ~= '' then
  redis.call('HDEL', KEYS[3], ARGV[4])
end
redis.call('SET', KEYS[4], ARGV[5], 'PX', ARGV[6])
if ARGV[8] ~= '' and redis.call('HGET', KEYS[5], ARGV[7]) == ARGV[8] then
  redis.call('HDEL', KEYS[5], ARGV[7])
end
return 1
