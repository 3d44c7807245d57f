-- Acknowledge the outboxes of several orgs (of one shard on a Redis Cluster): drop each org's outbox entries whose
-- effects are all at or below its acknowledged seq, and forget unknown-offset marks of events
-- PostgreSQL now holds as parked. One call per commit (per shard on a cluster), not per org.
--
-- KEYS: per org, 2 keys: its outbox stream, its unknown-offset marks set
-- ARGV: 1 JSON [[seq, [mark, ...]], ...] in KEYS order (seq 0: nothing to trim)
-- Returns the number of outbox entries dropped.
--
-- Writes: XTRIM and SREM per org, nothing else. Entry ids are '<last seq of the entry>-0', so
-- MINID <seq + 1> drops exactly the entries PostgreSQL holds. A crash of the worker before the
-- call leaves acknowledged effects in the outboxes: the next start-up drains them again, and
-- PostgreSQL's unique keys turn that into no-ops.

local acks = cjson.decode(ARGV[1])
local dropped = 0
for i, a in ipairs(acks) do
  local seq, marks = a[1], a[2]
  if seq > 0 then
    dropped = dropped + redis.call('XTRIM', KEYS[2 * i - 1], 'MINID', string.format('%d', seq + 1) .. '-0')
  end
  if #marks > 0 then redis.call('SREM', KEYS[2 * i], unpack(marks)) end
end
return dropped
