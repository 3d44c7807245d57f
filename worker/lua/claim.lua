-- Claim ids for the records that carry them: "each event_id is decided once, ever, across all
-- orgs" (SPEC section 5), checked before the engine decides anything. A claim is global (not
-- per org), so two records with one event_id under two orgs, or on two workers, cannot both
-- be charged.
--
-- KEYS: per claim shard, 2 keys: this window's claims (hash), the previous window's (one
--       claim shard's tag; on a Redis Cluster a call has one shard, on a single Redis any)
-- ARGV: 1 time to live of a window's hash (ms), 2 JSON [[[id, claim], ...], ...] per shard in
--       KEYS order: id is 'e|<event_id>' or 'c|<command_id>', claim names the record that
--       carries it ('<partition>:<offset>'); an entry [id, claim, 1] is a record passed on
--       to its org's home partition, which this worker does not decide: it makes no claim and
--       drops its own (left by an earlier attempt), so its copy at the home can claim the id
-- Returns per shard one string with one character per id, in order: '0' new (claimed by this
-- call; for a passed-on record: free), '1' already claimed by the same record (a replay of
-- it), '2' claimed by another record (a duplicate). The entries of one id in one call are
-- answered in order, as if one after the other: at most one of them is told '0' or '1'.
--
-- Writes: per shard one HSET of the new claims, one PEXPIRE, and one HDEL per dropped claim.
-- A crash of the worker after the call leaves claims for records that were not applied yet;
-- their replay presents the same claim and is told '1' (proceed), so nothing is lost; a
-- dropped claim was a passed-on record's, whose copy claims afresh at the home. The windows
-- rotate on the wall clock; PostgreSQL's unique keys are the permanent record.

local TTL = ARGV[1]
local CHUNK = 2000 -- stays well below Lua's unpack limit

local function claim_shard(CUR, PREV, pairs_in)
  local n = #pairs_in
  local out, new, dropped = {}, {}, {}
  local local_claims = {} -- ids claimed (or passed on) earlier in this call
  for from = 1, n, CHUNK do
    local to = math.min(from + CHUNK - 1, n)
    local ids = {}
    for j = from, to do ids[#ids + 1] = pairs_in[j][1] end
    local cur = redis.call('HMGET', CUR, unpack(ids))
    local prev = redis.call('HMGET', PREV, unpack(ids))
    for j = from, to do
      local k = j - from + 1
      local id, claim, passed = ids[k], pairs_in[j][2], pairs_in[j][3]
      local have = local_claims[id] or cur[k] or prev[k]
      if passed and (not have or have == claim) then
        local_claims[id] = claim
        if cur[k] == claim then dropped[#dropped + 1] = {CUR, id} end
        if prev[k] == claim then dropped[#dropped + 1] = {PREV, id} end
        out[j] = '0'
      elseif not have then
        local_claims[id] = claim
        new[#new + 1] = id
        new[#new + 1] = claim
        out[j] = '0'
      elseif have == claim then
        out[j] = '1'
      else
        out[j] = '2'
      end
    end
  end
  for i = 1, #new, 2 * CHUNK do
    redis.call('HSET', CUR, unpack(new, i, math.min(i + 2 * CHUNK - 1, #new)))
  end
  if #new > 0 then redis.call('PEXPIRE', CUR, TTL) end
  for _, d in ipairs(dropped) do redis.call('HDEL', d[1], d[2]) end -- rare: a crash's leftovers
  return table.concat(out)
end

local shards = cjson.decode(ARGV[2])
local replies = {}
for s, pairs_in in ipairs(shards) do
  replies[s] = claim_shard(KEYS[2 * s - 1], KEYS[2 * s], pairs_in)
end
return replies
