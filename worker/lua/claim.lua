-- Claim ids for the records that carry them: "each event_id is decided once, ever, across all
-- orgs" (SPEC section 5), checked before the engine decides anything. A claim is global (not
-- per org), so two records with one event_id under two orgs, or on two workers, cannot both
-- be charged; the apply script's own window is per org.
--
-- KEYS: 1 this window's claims (hash), 2 the previous window's      (one claim shard's tag)
-- ARGV: 1 time to live of a window's hash (ms), then pairs: id ('e|<event_id>' or
--       'c|<command_id>'), claim (the record that carries it: '<partition>:<offset>')
-- Returns one integer per id, in order: 0 new (claimed by this call), 1 already claimed by
-- the same record (a replay of it), 2 claimed by another record (a duplicate).
--
-- Writes: one HSET of the new claims and one PEXPIRE, at the end. A crash of the worker after
-- the call leaves claims for records that were not applied yet; their replay presents the same
-- claim and is told 1 (proceed), so nothing is lost. The windows rotate on the wall clock like
-- the engine's dedupe window; PostgreSQL's unique keys are the permanent record.

local CUR, PREV = KEYS[1], KEYS[2]
local TTL = ARGV[1]
local ids, claims = {}, {}
for i = 2, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
  claims[#claims + 1] = ARGV[i + 1]
end

local function fetch(key, from, to)
  local part = {}
  for j = from, to do part[#part + 1] = ids[j] end
  return redis.call('HMGET', key, unpack(part))
end

local out, new = {}, {}
local local_claims = {} -- ids claimed earlier in this call
local CHUNK = 2000 -- stays well below Lua's unpack limit
for from = 1, #ids, CHUNK do
  local to = math.min(from + CHUNK - 1, #ids)
  local cur = fetch(CUR, from, to)
  local prev = fetch(PREV, from, to)
  for j = from, to do
    local k = j - from + 1
    local id, claim = ids[j], claims[j]
    local have = local_claims[id] or cur[k] or prev[k]
    if not have then
      local_claims[id] = claim
      new[#new + 1] = id
      new[#new + 1] = claim
      out[j] = 0
    elseif have == claim then
      out[j] = 1
    else
      out[j] = 2
    end
  end
end
for i = 1, #new, 2 * CHUNK do
  redis.call('HSET', CUR, unpack(new, i, math.min(i + 2 * CHUNK - 1, #new)))
end
if #new > 0 then redis.call('PEXPIRE', CUR, TTL) end
return out
