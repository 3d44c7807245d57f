-- Read the state of several orgs for a snapshot (docs/engine.md "Snapshots"): everything a
-- rebuild would otherwise replay the org's whole ledger to recreate.
--
-- KEYS: per org, the 8 keys of lib_state.lua load_org (on a Redis Cluster, one shard's tag)
-- Returns per org {the org hash's 's' field (its integers, false for an org Redis does not
-- know), the state}: the state is MessagePack of {org hash fields and values, member hash
-- fields and values, then per zset (paused, pool dependents, debtors, promo expiry) its
-- members and scores}, all flat, as restore.lua reads it.
--
-- Left out on purpose: the outbox (a snapshot is only stored once PostgreSQL holds every
-- effect up to its seq), the watermarks ('w:<source>': Kafka positions, which a replay from
-- the ledger does not recreate either) and the unknown-offset marks (same). Read-only: a
-- crash at any point leaves nothing behind.

local KEYS_PER_ORG = 8
local out = {}
for g = 1, #KEYS / KEYS_PER_ORG do
  local base = (g - 1) * KEYS_PER_ORG
  local org, ints = {}, false
  local raw = redis.call('HGETALL', KEYS[base + 1])
  for i = 1, #raw, 2 do
    if raw[i] == 's' then ints = raw[i + 1] end
    if string.sub(raw[i], 1, 2) ~= 'w:' then
      org[#org + 1] = raw[i]; org[#org + 1] = raw[i + 1]
    end
  end
  local state = {org, redis.call('HGETALL', KEYS[base + 2])}
  for z = 4, 7 do
    state[#state + 1] = redis.call('ZRANGE', KEYS[base + z], 0, -1, 'WITHSCORES')
  end
  out[g] = {ints, cmsgpack.pack(state)}
end
return out
