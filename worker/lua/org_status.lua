-- Where several orgs stand, for the start-up checks (worker/recovery.py): the Redis-behind
-- check reads each org's effect seq, the outbox drain each outbox's length. One script call per
-- thousand orgs instead of a pipelined command per org: the client's cost per reply is what a
-- restart of a worker with many orgs waited on.
--
-- KEYS: per org, its org hash and its outbox stream (on a Redis Cluster, one shard's tag)
-- Returns, flat, per org: the org hash's 's' field (its integers; false: an org Redis does not
-- know), then the number of entries in its outbox.
--
-- Reads only (loaded with the no-writes flag): nothing to leave behind on a crash.

local out = {}
for g = 1, #KEYS / 2 do
  out[#out + 1] = redis.call('HGET', KEYS[2 * g - 1], 's')
  out[#out + 1] = redis.call('XLEN', KEYS[2 * g])
end
return out
