-- requeue: move a fetched message from a worker's held hash back into its queue list.
--
-- KEYS[1]  held HASH of the worker that holds it
-- KEYS[2]  the queue list it was fetched from
-- ARGV[1]  its field in the held hash
-- ARGV[2]  the envelope to push (the same message, its relier counters updated)
-- ARGV[3]  "head" to push where consumers pop next (resurrection, hand-off), "tail" to push
--          where publishers push (Celery's Reject(requeue=True), as kombu does it)
-- Returns  1 when moved; 0 when the worker no longer held it (it completed, or another
--          scanner moved it first): nothing is pushed.
--
-- Why: taking the record and pushing the message happen in one step, so a message is never in
-- two places (run twice) nor in none (lost), whoever dies midway. A resurrected task goes to
-- the head: it was delivered before everything queued behind it.
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return 0
end
if ARGV[3] == 'head' then
  redis.call('RPUSH', KEYS[2], ARGV[2])
else
  redis.call('LPUSH', KEYS[2], ARGV[2])
end
return 1
