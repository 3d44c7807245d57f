-- Put one org back from a snapshot (the state snapshot.lua returned for it): every key of the org is replaced, the outbox and the unknown-offset
-- marks start empty.
--
-- KEYS: the org's 8 keys (lib_state.lua load_org)
-- ARGV: 1 the snapshot
--
-- Atomic like every script: a crash of the worker leaves either the old keys or the restored
-- ones; the rebuild that called it then replays the ledger after the snapshot's seq, and a
-- rebuild that is interrupted is started again from the top (reset, restore, replay).

local snap = cmsgpack.unpack(ARGV[1])
redis.call('DEL', unpack(KEYS))
local CHUNK = 1000 -- pairs per command, well below Lua's unpack limit

local function put(cmd, key, flat, swap)
  for i = 1, #flat, 2 * CHUNK do
    local args = {}
    for j = i, math.min(i + 2 * CHUNK - 1, #flat), 2 do
      if swap then
        args[#args + 1] = flat[j + 1]; args[#args + 1] = flat[j]
      else
        args[#args + 1] = flat[j]; args[#args + 1] = flat[j + 1]
      end
    end
    if #args > 0 then redis.call(cmd, key, unpack(args)) end
  end
end

put('HSET', KEYS[1], snap[1], false)
put('HSET', KEYS[2], snap[2], false)
for z = 1, 4 do
  put('ZADD', KEYS[3 + z], snap[2 + z], true) -- ZADD takes score, member
end
return #snap[2] / 2
