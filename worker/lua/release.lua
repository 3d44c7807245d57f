-- Release claims (worker/lua/claim.lua) of records that did not decide their id: records
-- forwarded to their org's home partition, whose copy there must be free to claim it.
--
-- KEYS: per claim shard, 2 keys: this window's claims (hash), the previous window's
-- ARGV: 1 JSON [[[id, claim], ...], ...] per shard in KEYS order
-- Returns the number of claims removed. Only a claim still held by the same record is removed
-- (another record's claim on the id stays). A crash after the call loses nothing: the record
-- is read again, claims again and is forwarded again; its copy at the home is a duplicate.

local shards = cjson.decode(ARGV[1])
local removed = 0
for s, entries in ipairs(shards) do
  for _, e in ipairs(entries) do
    for k = 2 * s - 1, 2 * s do
      if redis.call('HGET', KEYS[k], e[1]) == e[2] then
        removed = removed + redis.call('HDEL', KEYS[k], e[1])
      end
    end
  end
end
return removed
