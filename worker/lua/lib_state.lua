-- The state of the org being applied, read once per call and written back once at its end.
--
-- The apply script handles several orgs per call (one after the other, each atomically in the
-- call); the variables below hold the current org's state and are reset by load_org() for
-- each. Every function of the other libraries reads them, never a table kept from an earlier
-- org. Writes: member sets as members are evaluated, everything else in write_back().

local GROUPS = cjson.decode(ARGV[1]) -- [[org_id, items, expect_seq, replay], ...] in KEYS order
local CFG = cjson.decode(ARGV[2])
local TIERS, BLOCK = CFG[1], CFG[2]
local MAX_USAGE_MC, MAX_AMOUNT_MC, MAX_BALANCE_MC = CFG[3], CFG[4], CFG[5]
local BUDGET = tonumber(ARGV[3]) -- member records the whole call may visit for org-wide work
local NULL = cjson.null
local INACTIVITY_MONTHS = 12
local YEAR_MS = 365 * 86400000
local MAX_SEATS = 16 -- closed seats kept per member (worker/constants.py MAX_SEATS)
local KEYS_PER_ORG = 8

local function fmt(x) return string.format('%d', x) end
local function tier_mc(t) return TIERS[t] or 0 end

-- Byte-wise string order (Lua's < follows the server's collation locale).
local function bytes_lt(a, b)
  local la, lb = #a, #b
  for i = 1, math.min(la, lb) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return la < lb
end

local function is_int(v, low)
  return type(v) == 'number' and v == math.floor(v) and v >= low and v <= MAX_AMOUNT_MC
end

-- The current org: its keys, id, and the org's part of the ids the engine makes
-- (schemas/ids.py derived_id: fixed length whatever the org id is).
local K_O, K_M, K_X, K_P, K_Q, K_B, K_E, K_U
local ORG_ID, ORG_DIGEST
-- Org hash: the integers (field 's', a MessagePack array in the order of worker/layout.py
-- ORG_FIELDS), the pending refill id
-- ('rp'), queued org-wide work ('jb'), watermarks ('w:<source>') and tier limits
-- ('t:<tier>'); the last two are read when first needed. O holds the integers and rp; W the
-- watermarks read so far (false: none), TL the tier limits read so far (false: none).
-- ODIRTY: an integer changed; RPDIRTY: the pending refill id changed.
local O, W, TL, JOBS, ODIRTY, RPDIRTY, WDIRTY, TLDIRTY, EXISTS, JOBS_DIRTY
-- Members read so far (false: known not to exist) and the ones to write back.
local MEM, MDIRTY
-- Effects of this org in this call (positional rows, see lib_layout.lua).
local E, NE
-- Unknown-offset marks (lib_items.lua): looked up or added, new ones, decided ones.
local SEEN, NEW_U, UNKNOWN_SEEN_DROP
-- The current org's items are a rebuild's replay of recorded decisions: decided wherever they
-- were recorded (no home check, lib_items.lua elsewhere).
local REPLAY = false

local function unused(t)
  if t ~= nil and next(t) == nil then return t end
  return {}
end

-- load_org reads the org hash's integers, pending refill and queued work, and the watermarks of
-- the sources the org's items come from, in one HMGET.
local function load_org(g, org_id, items)
  local base = (g - 1) * KEYS_PER_ORG
  K_O, K_M, K_X, K_P = KEYS[base + 1], KEYS[base + 2], KEYS[base + 3], KEYS[base + 4]
  K_Q, K_B, K_E, K_U = KEYS[base + 5], KEYS[base + 6], KEYS[base + 7], KEYS[base + 8]
  ORG_ID = org_id
  ORG_DIGEST = nil
  -- Tables the last org left empty are taken over (most stay empty: a call of many orgs
  -- with an event each would otherwise allocate, and collect, a dozen tables per org).
  O, W, WDIRTY = {}, {}, {}
  TL, JOBS, TLDIRTY = unused(TL), unused(JOBS), unused(TLDIRTY)
  EXISTS, JOBS_DIRTY, ODIRTY, RPDIRTY = false, false, false, false
  MEM, MDIRTY = {}, unused(MDIRTY)
  E, NE = unused(E), 0
  SEEN, NEW_U, UNKNOWN_SEEN_DROP = unused(SEEN), unused(NEW_U), unused(UNKNOWN_SEEN_DROP)
  local fields, srcs = {'s', 'rp', 'jb'}, {}
  for _, it in ipairs(items) do
    local src = (it[1] == ITEM_USAGE) and it[7] or it[3]
    if type(src) == 'string' and W[src] == nil then
      W[src] = false -- none, unless the read below finds one
      srcs[#srcs + 1] = src
      fields[#fields + 1] = 'w:' .. src
    end
  end
  local h = redis.call('HMGET', K_O, unpack(fields))
  if h[1] then
    EXISTS = true
    O = org_from(cmsgpack.unpack(h[1]), h[2] or '')
    if h[3] and h[3] ~= '' then JOBS = cjson.decode(h[3]) end
  end
  for i, src in ipairs(srcs) do
    local raw = h[3 + i]
    if raw then W[src] = tonumber(raw) end
  end
end

-- The org's part of the ids the engine makes (schemas/ids.py derived_id: fixed length
-- whatever the org id is), computed when first needed.
local function org_digest()
  if ORG_DIGEST == nil then ORG_DIGEST = string.sub(redis.sha1hex(ORG_ID), 1, 20) end
  return ORG_DIGEST
end

-- The watermark of a source (nil: none yet).
local function watermark(src)
  local w = W[src]
  if w == nil then
    local raw = redis.call('HGET', K_O, 'w:' .. src)
    w = raw and tonumber(raw) or false
    W[src] = w
  end
  return w or nil
end

-- A tier's pool limit: mc, or false (no limit).
local function tier_limit(t)
  local l = TL[t]
  if l == nil then
    local raw = redis.call('HGET', K_O, 't:' .. t)
    if raw and raw ~= 'none' then l = tonumber(raw) else l = false end
    TL[t] = l
  end
  return l
end

local function S(k, v)
  if O[k] ~= v then O[k] = v; ODIRTY = true end
end

-- ---------------------------------------------------------------------------------------
-- Members: one HGET per member per call, written back once at the end
-- ---------------------------------------------------------------------------------------
local function decode_member(id, s)
  local a = cmsgpack.unpack(s)
  local m = member_from(id, a)
  m.pr = {}
  local lim = a[MP.lim] -- MessagePack nil comes back as Lua nil
  if lim == nil or lim == NULL then m.lim = false else m.lim = lim end
  m.rs = (a[MP.rs] ~= NULL) and a[MP.rs] or false
  m.ra = (a[MP.ra] ~= NULL) and a[MP.ra] or false
  local p = a[MP.pr]
  for i = 1, #p, 3 do m.pr[#m.pr + 1] = {g = p[i], r = p[i + 1], e = p[i + 2]} end
  m.sh = a[MP.sh] or {}
  -- Reason and org clock of the member's last signal: its current state on the control topic,
  -- re-sent as such after a publish that may have landed out of order.
  m.lr = a[MP.lr] or NULL
  m.li = a[MP.li] or 0
  return m
end

local NO_PROMOS = {} -- packed as an empty array; never written to

local function encode_member(m)
  local p = NO_PROMOS
  if #m.pr > 0 then
    p = {}
    for _, g in ipairs(m.pr) do
      p[#p + 1] = g.g; p[#p + 1] = g.r; p[#p + 1] = g.e
    end
  end
  local lim = (m.lim == false) and NULL or m.lim
  return cmsgpack.pack(member_array(m, lim, m.rs or NULL, m.ra or NULL, p))
end

-- Lazy cycle rollover: the org-level counters were reset at cycle end; the member catches up
-- the first time it is touched afterwards.
local function roll(m)
  if m.cn < O.cn then
    m.cn = O.cn
    m.tier = m.nt
    m.ag = (m.act == 1) and tier_mc(m.tier) or 0
    m.au, m.bk, m.dr, m.bu, m.pu, m.debt, m.ds = 0, 0, 0, 0, 0, 0, 0
    m.inb = 0 -- the debtors set was dropped at cycle end
    MDIRTY[m.id] = true
  end
end

local function get(id)
  local m = MEM[id]
  if m == nil then
    local s = redis.call('HGET', K_M, id)
    if not s then MEM[id] = false; return nil end
    m = decode_member(id, s)
    MEM[id] = m
  elseif m == false then
    return nil
  end
  roll(m)
  return m
end

local function dirty(m) MDIRTY[m.id] = true end

-- Write-back of the current org. Everything before it only read, or wrote the member sets; the
-- org and member hashes, the marks and the one outbox entry land here, together.
local function write_back()
  if EXISTS then
    local args = {}
    if NE > 0 or ODIRTY or RPDIRTY then
      args[1] = 's'; args[2] = cmsgpack.pack(org_array(O))
      if RPDIRTY then args[3] = 'rp'; args[4] = O.rp end
    end
    for src in pairs(WDIRTY) do
      args[#args + 1] = 'w:' .. src; args[#args + 1] = fmt(W[src])
    end
    for t in pairs(TLDIRTY) do
      args[#args + 1] = 't:' .. t
      args[#args + 1] = (TL[t] == false) and 'none' or fmt(TL[t])
    end
    if JOBS_DIRTY then
      args[#args + 1] = 'jb'
      args[#args + 1] = (#JOBS > 0) and cjson.encode(JOBS) or ''
    end
    if #args > 0 then redis.call('HSET', K_O, unpack(args)) end
    local margs = {}
    for id in pairs(MDIRTY) do
      local m = MEM[id]
      if m then
        margs[#margs + 1] = id
        margs[#margs + 1] = encode_member(m)
        if #margs >= 400 then redis.call('HSET', K_M, unpack(margs)); margs = {} end
      end
    end
    if #margs > 0 then redis.call('HSET', K_M, unpack(margs)) end
    if #NEW_U > 0 then redis.call('SADD', K_U, unpack(NEW_U)) end
    if #UNKNOWN_SEEN_DROP > 0 then redis.call('SREM', K_U, unpack(UNKNOWN_SEEN_DROP)) end
  end
  local blob = ''
  if #E > 0 then
    blob = cmsgpack.pack(E)
    redis.call('XADD', K_X, fmt(O.sq) .. '-0', 'e', blob)
  end
  return blob
end
