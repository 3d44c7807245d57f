-- Read members' records back, several orgs per call: what the publisher reads after every
-- acknowledged publish so the compacted control topic ends on each member's current state
-- (worker/publisher.py ensure_current_signals). One script call instead of one pipelined
-- HMGET per org: under live traffic a batch publishes signals of a hundred orgs and more.
--
-- KEYS: per org, its member hash
-- ARGV: 1 JSON [[member_id, ...], ...] in KEYS order
-- Returns per org the records asked for, in order (nil: no such member).
--
-- Reads only (loaded with the no-writes flag): nothing to leave behind on a crash.

local CHUNK = 2000 -- stays well below Lua's unpack limit
local asked = cjson.decode(ARGV[1])
local out = {}
for i, ids in ipairs(asked) do
  local records = {}
  for from = 1, #ids, CHUNK do
    local got = redis.call('HMGET', KEYS[i], unpack(ids, from, math.min(from + CHUNK - 1, #ids)))
    for j = 1, #got do records[from + j - 1] = got[j] end
  end
  out[i] = records
end
return out
