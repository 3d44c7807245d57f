-- Read what an entitlement check needs, for the members of several orgs (read-only).
--
-- Runs after lib_layout.lua (MP: the member record's positions).
-- KEYS: per org, its org hash and its member hash (worker/constants.py OrgKeys .org, .members;
--       on a Redis Cluster, orgs of one shard's tag)
-- ARGV: per org, the number of member ids asked for, then the ids
-- Returns per org {the org hash's 's' field (its integers; false: Redis does not know the org),
-- the member records asked for in order (false: no such member), the limits of the tiers those
-- members hold or move to, flat ['t:<tier>', value, ...] (tiers without a limit left out)}.
-- One call reads every org at one moment: no apply runs in between.

local out = {}
local at = 1
for g = 1, #KEYS / 2 do
  local k_org, k_members = KEYS[2 * g - 1], KEYS[2 * g]
  local n = tonumber(ARGV[at])
  local ids = {}
  for i = 1, n do ids[i] = ARGV[at + i] end
  at = at + n + 1
  local ints = redis.call('HGET', k_org, 's')
  if not ints then
    out[g] = {false, {}, {}}
  else
    local records = {}
    if n > 0 then records = redis.call('HMGET', k_members, unpack(ids)) end
    local fields, seen = {}, {}
    for i = 1, n do
      if records[i] then
        local m = cmsgpack.unpack(records[i])
        for _, tier in ipairs({m[MP.tier], m[MP.nt]}) do
          local f = 't:' .. tier
          if not seen[f] then
            seen[f] = true
            fields[#fields + 1] = f
          end
        end
      end
    end
    local limits = {}
    if #fields > 0 then
      local values = redis.call('HMGET', k_org, unpack(fields))
      for i = 1, #fields do
        if values[i] then
          limits[#limits + 1] = fields[i]
          limits[#limits + 1] = values[i]
        end
      end
    end
    out[g] = {ints, records, limits}
  end
end
return out
