-- Apply a batch of usage events and admin commands of ONE org, atomically and in order, and
-- continue any pending org-wide work (the same script with no items is the "drain" call).
-- Loaded after lib_*.lua (concatenated by worker/engine.py).
--
-- KEYS: 1 org hash, 2 member hash, 3 outbox stream, 4 paused zset, 5 pool-dependents zset,
--       6 debtors zset, 7 promo expiry zset, 8 unknown-offset marks set
--                                                       (one hash tag: the encoded org id)
-- ARGV: 1 org_id, 2 items (JSON),
--       3 config JSON [{tier: mc}, block_mc, max usage, max amount, max balance],
--       4 walk budget (members per call),
--       5 expected seq (optional): the org's effect seq the caller knows PostgreSQL holds
--         or will hold; a Redis below it lost writes and the call is refused unchanged
-- Returns {meta JSON [consumed, pending, outcomes], effects JSON}, or for a refused call
-- {meta JSON [-1, the org's seq in Redis (0: unknown org), []], '[]'}.
--
-- Write order and crashes: the script is atomic, so no client ever sees part of a call; but
-- Redis has no rollback, so every input is validated before its item's first write and no
-- error path exists after it (the loader adds a '#!lua' shebang, so Redis refuses the whole
-- call at its start when out of memory under maxmemory-policy noeviction). Member sets are updated as
-- members are evaluated; the org and member hashes, the unknown-offset marks and the one outbox entry
-- are written at the end. A worker crash after the call loses nothing: the effects wait in the
-- outbox until acked. Unfinished org-wide work is recorded in the org hash ('jb') and finished
-- by the next call, whoever makes it, before any further item is applied.

local K_O, K_M, K_X, K_P, K_Q, K_B, K_E, K_U =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local ORG_ID = ARGV[1]
local ITEMS = cjson.decode(ARGV[2])
local CFG = cjson.decode(ARGV[3])
local TIERS, BLOCK = CFG[1], CFG[2]
local MAX_USAGE_MC, MAX_AMOUNT_MC, MAX_BALANCE_MC = CFG[3], CFG[4], CFG[5]
local BUDGET = tonumber(ARGV[4])
local NULL = cjson.null
local INACTIVITY_MONTHS = 12
local YEAR_MS = 365 * 86400000

local function fmt(x) return string.format('%d', x) end
-- The org's part of the ids the engine makes (schemas/ids.py derived_id): fixed length,
-- whatever the org id is.
local ORG_DIGEST = string.sub(redis.sha1hex(ORG_ID), 1, 20)
local MAX_SEATS = 16 -- closed seats kept per member (worker/constants.py MAX_SEATS)
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

-- ---------------------------------------------------------------------------------------
-- Org state: read once, written once (changed fields only)
-- ---------------------------------------------------------------------------------------
local NUM_FIELDS = {'an', 'pa', 'ck', 'cn', 'cs', 'ce', 'la', 'pl', 'lk', 'pd', 'bw', 're',
  'rt', 'ra', 'rm', 'rd', 'rpm', 'rc', 'rn', 'ie', 'sq', 'at', 'bt', 'dt', 'nt', 'np'}
local O, W, TL, JOBS = {}, {}, {}, {}
local ODIRTY, WDIRTY, TLDIRTY = {}, {}, {}
local EXISTS = false
do
  local raw = redis.call('HGETALL', K_O)
  local h = {}
  for i = 1, #raw, 2 do h[raw[i]] = raw[i + 1] end
  if h.ex then
    EXISTS = true
    for _, f in ipairs(NUM_FIELDS) do O[f] = tonumber(h[f] or '0') end
    O.rp = h.rp or ''
    for k, v in pairs(h) do
      local c = string.sub(k, 1, 2)
      if c == 'w:' then W[string.sub(k, 3)] = tonumber(v)
      elseif c == 't:' then
        if v == 'none' then TL[string.sub(k, 3)] = false else TL[string.sub(k, 3)] = tonumber(v) end
      end
    end
    if h.jb and h.jb ~= '' then JOBS = cjson.decode(h.jb) end
  end
end
local JOBS_DIRTY = false

-- Redis behind PostgreSQL (restarted behind its AOF, emptied): decide nothing on stale state.
-- Nothing has been written yet; the caller rebuilds the org from the ledger and calls again.
local EXPECT = tonumber(ARGV[5]) or 0
if EXPECT > 0 and (not EXISTS or O.sq < EXPECT) then
  return {cjson.encode({-1, EXISTS and O.sq or 0, {}}), '[]'}
end

local function S(k, v)
  if O[k] ~= v then O[k] = v; ODIRTY[k] = true end
end

-- ---------------------------------------------------------------------------------------
-- Members: one HGET per member per call, written back once at the end
-- ---------------------------------------------------------------------------------------
local MEM, MDIRTY = {}, {}
local function decode_member(id, s)
  local a = cjson.decode(s)
  local m = {id = id, tier = a[1], nt = a[2], act = a[3], cn = a[4], ag = a[5], au = a[6],
    bk = a[7], dr = a[8], bu = a[9], pu = a[10], debt = a[11], ds = a[12], pz = a[14],
    ms = a[16], aa = a[17], inp = a[19], inq = a[20], inb = a[21], pr = {}}
  local lim = a[13]
  if lim == NULL then m.lim = false else m.lim = lim end
  m.rs = (a[15] ~= NULL) and a[15] or false
  m.ra = (a[18] ~= NULL) and a[18] or false
  local p = a[22]
  for i = 1, #p, 3 do m.pr[#m.pr + 1] = {g = p[i], r = p[i + 1], e = p[i + 2]} end
  m.sh = a[23] or {}
  m.lr = a[24] or NULL -- reason and org clock of the member's last signal (its current state
  m.li = a[25] or 0 -- on the control topic, re-sent as such after a failed publish)
  return m
end

local function encode_member(m)
  local p = {}
  for _, g in ipairs(m.pr) do
    p[#p + 1] = g.g; p[#p + 1] = g.r; p[#p + 1] = g.e
  end
  return cjson.encode({m.tier, m.nt, m.act, m.cn, m.ag, m.au, m.bk, m.dr, m.bu, m.pu, m.debt,
    m.ds, m.lim == false and NULL or m.lim, m.pz, m.rs or NULL, m.ms, m.aa, m.ra or NULL,
    m.inp, m.inq, m.inb, p, m.sh, m.lr, m.li})
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

-- ---------------------------------------------------------------------------------------
-- Effects
-- ---------------------------------------------------------------------------------------
local E = {}
local NE = 0
local function emit(e)
  local sq = O.sq + 1
  O.sq = sq
  e[2] = sq
  NE = NE + 1
  E[NE] = e
end

local function ctx_of(kind, id, task, late)
  return {k = kind, id = id, task = task or NULL, late = late or false}
end

local function ledger(ctx, mid, movement, bucket, amount, grant, cstart)
  emit({1, 0, mid or NULL, ctx.k, ctx.id, ctx.task, movement, bucket, grant or NULL, amount,
    cstart or O.cs, ctx.late, O.ck})
end

local function notify(typ, mid, detail)
  emit({5, 0, typ, mid or NULL, detail, O.ck})
end

-- ---------------------------------------------------------------------------------------
-- Member predicates and signals
-- ---------------------------------------------------------------------------------------
local function eff_limit(m)
  if m.lim == 'inherit' then
    local t = TL[m.tier]
    if t == nil then return false end
    return t
  end
  return m.lim
end

local function limit_left(m)
  local l = eff_limit(m)
  if l == false then return false end
  local left = l - m.dr
  if left < 0 then left = 0 end
  return left
end

local function promo_left(m)
  local s = 0
  for _, g in ipairs(m.pr) do s = s + g.r end
  return s
end

local function can_draw(m)
  if O.lk == 1 or O.pl <= 0 then return false end
  -- Exact-amount bound: the cycle's drawn counter stays within MAX_BALANCE_MC.
  if O.pd + BLOCK > MAX_BALANCE_MC then return false end
  local left = limit_left(m)
  return left == false or left > 0
end

local function exhausted(m)
  return m.ag - m.au + m.bk + promo_left(m) == 0
end

local function blocked(m)
  return m.debt > 0 or (exhausted(m) and not can_draw(m))
end

local function pool_available()
  return O.lk == 0 and O.pl > 0
end

local function signal(m, sig, reason)
  m.ms = m.ms + 1
  m.lr, m.li = reason, O.ck
  dirty(m)
  emit({4, 0, m.id, sig, reason, m.ms, O.ck})
end

local function pause(m)
  local reason
  if limit_left(m) == 0 then reason = 'member_limit_reached'
  elseif O.lk == 1 then reason = 'refill_failed'
  else reason = 'pool_exhausted' end
  m.pz, m.rs = 1, reason
  signal(m, 'pause', reason)
  if reason == 'member_limit_reached' then
    notify('pool_limit_reached', m.id, {limit_mc = eff_limit(m), drawn_mc = m.dr})
  end
end

-- Keep the paused / pool-dependent / debtor sets in step with the member record.
local function sync(m)
  local want_p = (m.act == 1 and m.pz == 1) and 1 or 0
  if want_p ~= m.inp then
    if want_p == 1 then redis.call('ZADD', K_P, 0, m.id) else redis.call('ZREM', K_P, m.id) end
    m.inp = want_p; dirty(m)
  end
  local want_q = 0
  if m.act == 1 and m.pz == 0 and (exhausted(m) or tier_mc(m.tier) == 0 or tier_mc(m.nt) == 0) then
    want_q = 1
  end
  if want_q ~= m.inq then
    if want_q == 1 then redis.call('ZADD', K_Q, 0, m.id) else redis.call('ZREM', K_Q, m.id) end
    m.inq = want_q; dirty(m)
  end
  local want_b = (m.act == 1 and m.debt > 0) and 1 or 0
  if want_b ~= m.inb then
    if want_b == 1 then redis.call('ZADD', K_B, m.ds, m.id) else redis.call('ZREM', K_B, m.id) end
    m.inb = want_b; dirty(m)
  end
end

local function evaluate(m, reason)
  if reason == NULL then reason = nil end
  if m.act == 1 then
    local b = blocked(m)
    if b and m.pz == 0 then pause(m)
    elseif (not b) and m.pz == 1 then
      m.pz, m.rs = 0, false
      signal(m, 'resume', reason or 'funded')
    end
  end
  sync(m)
end

-- ---------------------------------------------------------------------------------------
-- The waterfall
-- ---------------------------------------------------------------------------------------
local function after_draw()
  if O.re ~= 1 or O.pl >= O.rt then return end
  if O.bw == 0 then
    S('bw', 1)
    notify('pool_below_threshold', nil, {balance_mc = O.pl, threshold_mc = O.rt})
  end
  if O.rp ~= '' then return end
  if O.rd < O.rm then
    local credits = math.min(O.ra, O.rm - O.rd)
    S('rc', O.rc + 1)
    local rid = 'refill-' .. ORG_DIGEST .. '-' .. fmt(O.rc)
    O.rp = rid; ODIRTY.rp = true
    S('rpm', credits)
    emit({6, 0, rid, credits, math.floor((credits + 500) / 1000), O.ck})
    notify('refill_requested', nil, {request_id = rid, credits_mc = credits})
  elseif O.rn == 0 then
    S('rn', 1)
    notify('refill_limit_reached', nil, {monthly_limit_mc = O.rm, refilled_mc = O.rd})
  end
end

local function consume(m, amount, ctx, movement)
  local need = amount
  local mid = m.id
  dirty(m)
  if #m.pr > 0 then
    local keep = {}
    for _, g in ipairs(m.pr) do
      if need > 0 then
        local take = math.min(g.r, need)
        if take > 0 then
          g.r = g.r - take
          m.pu = m.pu + take
          need = need - take
          ledger(ctx, mid, movement, 'promo', -take, g.g)
        end
      end
      if g.r > 0 then keep[#keep + 1] = g end
    end
    m.pr = keep
  end
  if need > 0 then
    local take = math.min(m.ag - m.au, need)
    if take > 0 then
      m.au = m.au + take
      S('at', O.at - take)
      need = need - take
      ledger(ctx, mid, movement, 'allocation', -take)
    end
  end
  if need > 0 and m.bk > 0 then
    local take = math.min(m.bk, need)
    m.bk = m.bk - take
    m.bu = m.bu + take
    S('bt', O.bt - take)
    need = need - take
    ledger(ctx, mid, movement, 'block', -take)
  end
  while need > 0 and can_draw(m) do
    local d = math.min(BLOCK, O.pl)
    local left = limit_left(m)
    if left ~= false and left < d then d = left end
    S('pl', O.pl - d)
    S('pd', O.pd + d)
    m.dr = m.dr + d
    m.bk = m.bk + d
    ledger(ctx, mid, 'draw', 'pool', -d)
    ledger(ctx, mid, 'draw', 'block', d)
    after_draw()
    local take = math.min(m.bk, need)
    m.bk = m.bk - take
    m.bu = m.bu + take
    S('bt', O.bt + d - take)
    need = need - take
    ledger(ctx, mid, movement, 'block', -take)
  end
  return need
end

local function settle(m, ctx)
  local unpaid = consume(m, m.debt, ctx, 'settle')
  local paid = m.debt - unpaid
  if paid > 0 then
    m.debt = unpaid
    S('dt', O.dt - paid)
    ledger(ctx, m.id, 'settle', 'debt', paid)
    if m.debt == 0 then m.ds = 0 end
  end
end

-- ---------------------------------------------------------------------------------------
-- Org-wide work in bounded chunks. A job walks one set; jobs run in order, and no item is
-- applied while any job is pending, so chunking never changes the outcome.
--   s: settle debtors oldest first (cursor: debtors skipped so far)
--   p: re-evaluate paused members (cursor: lexicographic position)
--   q: re-evaluate running members that depend on the pool (cursor: lexicographic position)
-- ---------------------------------------------------------------------------------------
local function step_job(j)
  if j.t == 's' then
    if not pool_available() then return true end
    local ids = redis.call('ZRANGE', K_B, j.c, j.c + BUDGET - 1)
    local ctx = ctx_of(j.k, j.i)
    for _, id in ipairs(ids) do
      BUDGET = BUDGET - 1
      local m = get(id)
      settle(m, ctx)
      sync(m)
      if m.debt > 0 then j.c = j.c + 1 end
      if not pool_available() then return true end
    end
    return #ids == 0 or BUDGET > 0
  end
  local key = (j.t == 'p') and K_P or K_Q
  local n = BUDGET
  local ids = redis.call('ZRANGEBYLEX', key, j.c, '+', 'LIMIT', 0, n)
  for _, id in ipairs(ids) do
    BUDGET = BUDGET - 1
    local m = get(id)
    evaluate(m, j.r)
    j.c = '(' .. id
  end
  return #ids < n
end

local function run_jobs()
  while #JOBS > 0 do
    if BUDGET <= 0 then return false end
    JOBS_DIRTY = true
    if step_job(JOBS[1]) then table.remove(JOBS, 1) end
  end
  return true
end

local function add_job(t, reason, ctx)
  JOBS_DIRTY = true
  local c = (t == 's') and 0 or '-'
  JOBS[#JOBS + 1] = {t = t, r = reason or NULL, c = c, k = ctx.k, i = ctx.id}
end

-- End of one evaluation point (an item or a due moment): settle, then pause/resume edges.
-- flags: settle_all (credits became available to every debtor), walk_p (someone paused may
-- resume), walk_q (a running pool dependent may now be blocked).
local function finish_point(ctx, reason, touched, flags, avail_before)
  for _, m in ipairs(touched) do
    if m.act == 1 and m.debt > 0 and not flags.settle_all then settle(m, ctx) end
  end
  for _, m in ipairs(touched) do evaluate(m, reason) end
  if avail_before and not pool_available() then flags.walk_q = true end
  if flags.settle_all then add_job('s', reason, ctx) end
  if flags.settle_all or flags.walk_p then add_job('p', reason, ctx) end
  if flags.walk_q then add_job('q', reason, ctx) end
  if #JOBS > 0 then run_jobs() end
end

-- ---------------------------------------------------------------------------------------
-- Due moments: promotional expiry, pool inactivity, cycle end (same instant: that order)
-- ---------------------------------------------------------------------------------------
local function expire_promos(t)
  local ctx = ctx_of('system', 'promo_expiry:' .. fmt(t))
  local avail = pool_available()
  local n = math.max(BUDGET, 1)
  local entries = redis.call('ZRANGEBYSCORE', K_E, t, t, 'LIMIT', 0, n)
  local touched, seen = {}, {}
  for _, entry in ipairs(entries) do
    BUDGET = BUDGET - 1
    local sep = string.find(entry, '\0', 1, true)
    local mid, gid = string.sub(entry, 1, sep - 1), string.sub(entry, sep + 1)
    local m = get(mid)
    if m and m.act == 1 then
      local keep = {}
      for _, g in ipairs(m.pr) do
        if g.g == gid and g.e == t and g.r > 0 then
          ledger(ctx, mid, 'expire', 'promo', -g.r, gid)
          g.r = 0
          dirty(m)
        end
        if g.r > 0 then keep[#keep + 1] = g end
      end
      m.pr = keep
      if not seen[mid] then seen[mid] = true; touched[#touched + 1] = m end
    end
  end
  if #entries > 0 then redis.call('ZREM', K_E, unpack(entries)) end
  local nxt = redis.call('ZRANGE', K_E, 0, 0, 'WITHSCORES')
  S('np', nxt[2] and tonumber(nxt[2]) or 0)
  finish_point(ctx, nil, touched, {}, avail)
end

local function expire_pool()
  local ctx = ctx_of('system', 'pool_inactivity:' .. fmt(O.ck))
  local amount = O.pl
  S('pl', 0)
  ledger(ctx, nil, 'expire', 'pool', -amount)
  notify('pool_expired', nil, {expired_mc = amount})
  finish_point(ctx, nil, {}, {}, O.lk == 0)
end

local function end_cycle()
  local e = O.ce
  local ctx = ctx_of('system', 'cycle_end:' .. fmt(e))
  local alloc_left, blocks, debts = O.at, O.bt, O.dt
  local invoice = debts + O.ie
  if alloc_left ~= 0 then ledger(ctx, nil, 'expire', 'allocation', -alloc_left) end
  if blocks ~= 0 then
    ledger(ctx, nil, 'return', 'block', -blocks)
    ledger(ctx, nil, 'return', 'pool', blocks)
  end
  if debts ~= 0 then
    ledger(ctx, nil, 'invoice', 'debt', debts)
    ledger(ctx, nil, 'invoice', 'invoice', -debts)
  end
  if invoice ~= 0 then ledger(ctx, nil, 'invoiced', 'invoice', invoice) end
  emit({7, 0, O.cs, e, invoice, math.floor((invoice + 500) / 1000)})
  if O.pa ~= 0 then S('an', O.pa); S('pa', 0) end
  S('pl', O.pl + blocks)
  S('cn', O.cn + 1)
  S('cs', e)
  S('ce', next_cycle_end(e, O.an))
  S('pd', 0); S('rd', 0); S('ie', 0); S('rn', 0)
  S('at', O.nt); S('bt', 0); S('dt', 0)
  redis.call('UNLINK', K_B)
  for _, m in pairs(MEM) do if m then roll(m) end end
  if O.nt ~= 0 then ledger(ctx, nil, 'grant', 'allocation', O.nt) end
  if O.pl >= O.rt then S('bw', 0) end
  finish_point(ctx, 'cycle_reset', {}, {walk_p = true, walk_q = true}, false)
end

-- Move the org clock to t, applying due moments first. False: stopped with work pending.
local function advance(t)
  while true do
    if #JOBS > 0 and not run_jobs() then return false end
    local best, rank = nil, nil
    if O.np ~= 0 and O.np <= t then best, rank = O.np, 0 end
    if O.pl > 0 and O.la + YEAR_MS <= t then
      local ia = add_months(O.la, INACTIVITY_MONTHS)
      if ia <= t and (best == nil or ia < best) then best, rank = ia, 1 end
    end
    if O.ce <= t and (best == nil or O.ce < best) then best, rank = O.ce, 2 end
    if best == nil then break end
    if BUDGET <= 0 then return false end
    if best > O.ck then S('ck', best) end
    if rank == 0 then expire_promos(best)
    elseif rank == 1 then expire_pool()
    else end_cycle() end
  end
  if t > O.ck then S('ck', t) end
  return true
end

-- ---------------------------------------------------------------------------------------
-- Idempotency: the per-source offset watermark. Ids are deduplicated before the engine is
-- called (the global claims, worker/lua/claim.lua, and PostgreSQL's unique keys): a copy of
-- a decided id never reaches this script.
-- ---------------------------------------------------------------------------------------
local SEEN = {}      -- unknown-offset marks known to exist (looked up or added by this call)
for _, it in ipairs(ITEMS) do
  if it[1] ~= 1 then it.cmd = cjson.decode(it[2]) end
end

-- Offsets of usage for a member that did not exist yet ('u|<source>|<offset>'): the watermark
-- moves past them, so a replay of such an offset (after a crash, before the pipeline parked
-- the event durably) must be decided again, not skipped. Kept in their own set, which never
-- rotates, until decided or until the pipeline's ack of the batch that parked them removes
-- them (worker/pipeline/commit.py): the decision cannot depend on the dedupe window.
local NEW_U = {}
local function mark_unknown(u)
  if not SEEN[u] then SEEN[u] = true; NEW_U[#NEW_U + 1] = u end
end

local function mark(src, off)
  if off >= 0 and (W[src] == nil or W[src] < off) then W[src] = off; WDIRTY[src] = true end
end

local UNKNOWN_SEEN_DROP = {}
local OUT_APPLIED, OUT_REPLAYED = {'applied', NULL}, {'replayed', NULL}
-- Returns the outcome when the item is not to be decided (a replay of an applied offset), else
-- nil and, for a replayed offset that was unknown when first seen, its mark (dropped once the
-- item is decided).
local function gate(src, off)
  if off >= 0 and W[src] ~= nil and W[src] >= off then
    local u = 'u|' .. src .. '|' .. fmt(off)
    if SEEN[u] == nil then
      SEEN[u] = redis.call('SISMEMBER', K_U, u) == 1
    end
    if not SEEN[u] then return OUT_REPLAYED, nil end
    return nil, u
  end
  return nil, nil
end

local function decided(drop)
  if drop then SEEN[drop] = false; UNKNOWN_SEEN_DROP[#UNKNOWN_SEEN_DROP + 1] = drop end
end

-- ---------------------------------------------------------------------------------------
-- Items
-- ---------------------------------------------------------------------------------------
local INTERRUPTED = {}

-- Which seat of m a usage event that occurred at occ belongs to (SPEC section 3; the model's
-- seat_of): 'cur' the active seat, 'past' an earlier seat (charged to the invoice), 'gap' no
-- seat (after a removal, before the next add). m.sh holds the closed seats, oldest first.
local function seat_of(m, occ)
  if m.act == 1 and occ >= m.aa then return 'cur' end
  local sh = m.sh
  for i = #sh - 1, 1, -2 do
    if occ >= sh[i + 1] then return 'gap' end
    if occ >= sh[i] then return 'past' end
  end
  if m.act == 1 and #sh == 0 then return 'cur' end
  return 'past'
end

local function do_usage(it)
  local eid, mid, task, c, occ, src, off = it[2], it[3], it[4], it[5], it[6], it[7], it[8]
  if not EXISTS then return {'unknown', 'unknown_org'} end
  local m = get(mid)
  if not m then
    mark(src, off)
    if off >= 0 then
      local u = 'u|' .. src .. '|' .. fmt(off)
      mark_unknown(u)
    end
    return {'unknown', 'unknown_member'}
  end
  local g, drop = gate(src, off)
  if g then return g end
  if not advance(occ) then return INTERRUPTED end
  decided(drop)
  m = get(mid)
  mark(src, off)
  local late = occ < O.cs
  local ctx = ctx_of('usage', eid, task, late)
  local avail = pool_available()
  local code = nil
  local compact, waterfall = false, false
  local seat = nil
  if not (type(c) == 'number' and c == math.floor(c) and c > 0 and c <= MAX_USAGE_MC) then
    code = 'invalid_amount'
  else
    seat = seat_of(m, occ)
    if seat == 'gap' then code = 'member_removed' -- no seat when it occurred
    elseif O.dt + O.ie + c > MAX_BALANCE_MC then
      -- Exact-amount bound: member debt plus the open invoice never passes MAX_BALANCE_MC.
      code = 'balance_overflow'
    end
  end
  if code then
    -- rejected: recorded below, nothing charged
  elseif seat == 'past' then
    -- An earlier seat still owes it: straight on the org's invoice.
    S('ie', O.ie + c)
    S('la', O.ck)
    ledger(ctx, mid, 'charge', 'invoice', -c)
  else
    S('la', O.ck)
    -- Fastest path, same result as consume(): no promos, and the allocation alone or (with
    -- the allocation used up) the block alone pays the whole event.
    local al = m.ag - m.au
    local bucket = nil
    if #m.pr == 0 then
      if al >= c then
        m.au = m.au + c
        S('at', O.at - c)
        bucket = 'allocation'
      elseif al == 0 and m.bk >= c then
        m.bk = m.bk - c
        m.bu = m.bu + c
        S('bt', O.bt - c)
        bucket = 'block'
      end
    end
    if bucket then
      dirty(m)
      local sq = O.sq + 1
      O.sq = sq + 1
      NE = NE + 1
      E[NE] = {8, sq, bucket, NULL, eid, mid, task, c, occ, late, src, off, O.cs, O.ck}
      compact = true
    else
      waterfall = true
    end
  end
  if waterfall then
    local before = NE
    local unpaid = consume(m, c, ctx, 'charge')
    if unpaid > 0 then
      if m.debt == 0 then m.ds = O.ck end
      m.debt = m.debt + unpaid
      S('dt', O.dt + unpaid)
      ledger(ctx, mid, 'charge', 'debt', -unpaid)
    end
    if NE == before + 1 then
      -- The common case, one bucket paid it all: the ledger row and the usage row travel as
      -- one compact row (kind 8, seq of the ledger row; the usage row is seq + 1).
      local l = E[NE]
      E[NE] = {8, l[2], l[8], l[9], eid, mid, task, c, occ, late, src, off, l[11], l[13]}
      O.sq = O.sq + 1
      compact = true
    end
  end
  if not compact then
    emit({2, 0, eid, mid, task, c, occ, code and 'rejected' or 'charged', code or NULL, late,
      src, off})
  end
  -- Fast path: a running member with credits left, no debt and the pool as available as
  -- before cannot change state, so there is nothing to evaluate.
  if not (m.pz == 0 and m.debt == 0 and m.inq == 0 and m.ag - m.au + m.bk > 0
      and tier_mc(m.tier) ~= 0 and tier_mc(m.nt) ~= 0 and (not avail or pool_available())) then
    finish_point(ctx, nil, {m}, {}, avail)
  end
  if code then return {'rejected', code} end
  return OUT_APPLIED
end

local function credit_pool(amount)
  S('pl', O.pl + amount)
  S('lk', 0)
  S('la', O.ck)
  if O.pl >= O.rt then S('bw', 0) end
end

local function member_of(cmd)
  local mid = cmd.member_id
  if type(mid) ~= 'string' then return nil, 'unknown_member' end
  local m = get(mid)
  if not m then return nil, 'unknown_member' end
  if m.act ~= 1 then return nil, 'member_removed' end
  return m, nil
end

local function member_add(cmd, ctx, touched)
  local mid, tier = cmd.member_id, cmd.tier
  if type(mid) ~= 'string' then return 'invalid_command' end
  if type(tier) ~= 'string' or TIERS[tier] == nil then return 'unknown_tier' end
  local old = get(mid)
  if old and old.act == 1 then return 'member_exists' end
  if O.nt + tier_mc(tier) > MAX_BALANCE_MC then return 'balance_overflow' end
  local alloc = 0
  local credits = math.floor(tier_mc(tier) / 1000)
  local total = math.floor(O.ce / 1000) - math.floor(O.cs / 1000)
  local left = math.floor(O.ce / 1000) - math.floor(O.ck / 1000)
  if total > 0 and left > 0 then
    if left > total then left = total end
    local q = math.floor(credits * left / total)
    while q * total > credits * left do q = q - 1 end
    while (q + 1) * total <= credits * left do q = q + 1 end
    alloc = q * 1000
  end
  local m = {id = mid, tier = tier, nt = tier, act = 1, cn = O.cn, ag = alloc, au = 0, bk = 0,
    dr = 0, bu = 0, pu = 0, debt = 0, ds = 0, lim = 'inherit', pz = 0, rs = false, ms = 0,
    aa = O.ck, ra = false, inp = 0, inq = 0, inb = 0, pr = {}, sh = {}, lr = NULL, li = 0}
  if old then
    m.ms, m.ra, m.inp, m.inq, m.inb, m.sh = old.ms, old.ra, old.inp, old.inq, old.inb, old.sh
    m.lr, m.li = old.lr, old.li
  end
  MEM[mid] = m
  dirty(m)
  S('at', O.at + alloc)
  S('nt', O.nt + tier_mc(tier))
  if alloc > 0 then ledger(ctx, mid, 'grant', 'allocation', alloc) end
  if blocked(m) then pause(m)
  elseif old then signal(m, 'resume', 'member_added') end
  touched[#touched + 1] = m
  return nil
end

local function member_remove(m, ctx)
  local mid = m.id
  local left = m.ag - m.au
  if left ~= 0 then ledger(ctx, mid, 'forfeit', 'allocation', -left) end
  for _, g in ipairs(m.pr) do
    ledger(ctx, mid, 'forfeit', 'promo', -g.r, g.g)
    redis.call('ZREM', K_E, mid .. '\0' .. g.g)
  end
  S('at', O.at - left)
  S('nt', O.nt - tier_mc(m.nt))
  if m.bk > 0 then
    ledger(ctx, mid, 'return', 'block', -m.bk)
    ledger(ctx, mid, 'return', 'pool', m.bk)
    S('pl', O.pl + m.bk)
    S('bt', O.bt - m.bk)
    if O.pl >= O.rt then S('bw', 0) end
  end
  if m.debt > 0 then
    ledger(ctx, mid, 'invoice', 'debt', m.debt)
    ledger(ctx, mid, 'invoice', 'invoice', -m.debt)
    S('ie', O.ie + m.debt)
    S('dt', O.dt - m.debt)
  end
  m.ag, m.bk, m.debt, m.ds, m.pr = m.au, 0, 0, 0, {}
  local sh = m.sh
  sh[#sh + 1] = m.aa
  sh[#sh + 1] = O.ck
  while #sh > 2 * MAX_SEATS do
    table.remove(sh, 1)
    table.remove(sh, 1)
  end
  m.act, m.ra = 0, O.ck
  m.pz, m.rs = 1, 'member_removed'
  signal(m, 'pause', 'member_removed')
  sync(m)
end

-- Returns error code (or nil), resume reason, flags.
local function dispatch(cmd, ctx, touched)
  local typ = cmd.type
  local flags = {}
  if type(cmd.at_ms) ~= 'number' then return 'invalid_command', nil, flags end
  if typ == 'org_upsert' then
    local day = cmd.billing_anchor_day
    if type(day) ~= 'number' or day ~= math.floor(day) or day < 1 or day > 31 then
      return 'invalid_command', nil, flags
    end
    S('pa', (day == O.an) and 0 or day)
    return nil, nil, flags
  elseif typ == 'tick' then
    return nil, nil, flags
  elseif typ == 'pool_purchase' then
    local amount = cmd.credits_mc
    if not is_int(amount, 1) then return 'invalid_amount', nil, flags end
    if O.pl + O.bt + amount > MAX_BALANCE_MC then return 'balance_overflow', nil, flags end
    credit_pool(amount)
    ledger(ctx, nil, 'purchase', 'pool', amount)
    flags.settle_all = true
    return nil, 'funded', flags
  elseif typ == 'auto_refill_set' then
    local en, thr, amt, mon = cmd.enabled, cmd.threshold_mc, cmd.amount_mc, cmd.monthly_limit_mc
    if type(en) ~= 'boolean' then return 'invalid_command', nil, flags end
    if not (is_int(thr, 0) and is_int(amt, 1) and is_int(mon, 0)) then
      return 'invalid_amount', nil, flags
    end
    S('re', en and 1 or 0); S('rt', thr); S('ra', amt); S('rm', mon); S('bw', 0)
    return nil, nil, flags
  elseif typ == 'refill_result' then
    local st = cmd.status
    if st ~= 'succeeded' and st ~= 'failed' then return 'invalid_command', nil, flags end
    if O.rp == '' or cmd.request_id ~= O.rp then return 'unknown_request', nil, flags end
    local credits = O.rpm
    if st == 'succeeded' and O.pl + O.bt + credits > MAX_BALANCE_MC then
      return 'balance_overflow', nil, flags
    end
    O.rp = ''; ODIRTY.rp = true
    S('rpm', 0)
    if st == 'succeeded' then
      credit_pool(credits)
      S('rd', O.rd + credits)
      ledger(ctx, nil, 'refill', 'pool', credits)
      flags.settle_all = true
      return nil, 'funded', flags
    end
    S('lk', 1)
    notify('refill_failed', nil, {request_id = cmd.request_id, credits_mc = credits})
    return nil, nil, flags
  elseif typ == 'tier_limit_set' then
    local tier = cmd.tier
    if type(tier) ~= 'string' or TIERS[tier] == nil then return 'unknown_tier', nil, flags end
    local lim = cmd.limit_mc
    if lim == nil then lim = NULL end
    if lim ~= NULL and not is_int(lim, 0) then return 'invalid_amount', nil, flags end
    local old = TL[tier]
    if old == nil then old = false end
    local new = lim
    if lim == NULL then new = false end
    TL[tier] = new; TLDIRTY[tier] = true
    local raised = (new == false and old ~= false) or (new ~= false and old ~= false and new > old)
    local lowered = (old == false and new ~= false) or (new ~= false and old ~= false and new < old)
    if raised then flags.settle_all = true end
    if lowered then flags.walk_q = true end
    return nil, 'limit_raised', flags
  elseif typ == 'member_add' then
    return member_add(cmd, ctx, touched), 'member_added', flags
  end
  if typ ~= 'member_remove' and typ ~= 'member_set_tier' and typ ~= 'member_limit_set'
      and typ ~= 'promo_grant' and typ ~= 'credit_request' then
    return 'invalid_command', nil, flags
  end
  local m, err = member_of(cmd)
  if err then return err, nil, flags end
  if typ == 'member_remove' then
    local returned = m.bk
    member_remove(m, ctx)
    if returned > 0 then flags.settle_all = true end
    return nil, 'funded', flags
  elseif typ == 'member_set_tier' then
    local tier = cmd.tier
    if type(tier) ~= 'string' or TIERS[tier] == nil then return 'unknown_tier', nil, flags end
    local new_mc, cur_mc = tier_mc(tier), tier_mc(m.tier)
    if O.nt - tier_mc(m.nt) + new_mc > MAX_BALANCE_MC then return 'balance_overflow', nil, flags end
    S('nt', O.nt - tier_mc(m.nt) + new_mc)
    if new_mc >= cur_mc then
      local credits = math.floor((new_mc - cur_mc) / 1000)
      local total = math.floor(O.ce / 1000) - math.floor(O.cs / 1000)
      local left = math.floor(O.ce / 1000) - math.floor(O.ck / 1000)
      local diff = 0
      if total > 0 and left > 0 then
        if left > total then left = total end
        local q = math.floor(credits * left / total)
        while q * total > credits * left do q = q - 1 end
        while (q + 1) * total <= credits * left do q = q + 1 end
        diff = q * 1000
      end
      m.tier, m.nt = tier, tier
      if diff > 0 then
        m.ag = m.ag + diff
        S('at', O.at + diff)
        ledger(ctx, m.id, 'grant', 'allocation', diff)
      end
    else
      m.nt = tier
    end
    dirty(m)
    touched[#touched + 1] = m
    return nil, 'funded', flags
  elseif typ == 'member_limit_set' then
    local lim = cmd.limit_mc
    if lim == nil then lim = NULL end
    if lim ~= 'inherit' and lim ~= NULL and not is_int(lim, 0) then
      return 'invalid_amount', nil, flags
    end
    if lim == NULL then m.lim = false else m.lim = lim end
    dirty(m)
    touched[#touched + 1] = m
    return nil, 'limit_raised', flags
  elseif typ == 'promo_grant' then
    local amount, exp, gid = cmd.credits_mc, cmd.expires_at_ms, cmd.grant_id
    if type(gid) ~= 'string' or type(exp) ~= 'number' then return 'invalid_command', nil, flags end
    if not is_int(amount, 1) then return 'invalid_amount', nil, flags end
    if exp <= O.ck then return 'promo_expired', nil, flags end
    for _, g in ipairs(m.pr) do
      if g.g == gid then return 'duplicate_grant', nil, flags end
    end
    if m.pu + promo_left(m) + amount > MAX_BALANCE_MC then
      return 'balance_overflow', nil, flags
    end
    local pos = #m.pr + 1
    for i, g in ipairs(m.pr) do
      if exp < g.e or (exp == g.e and bytes_lt(gid, g.g)) then pos = i; break end
    end
    table.insert(m.pr, pos, {g = gid, r = amount, e = exp})
    redis.call('ZADD', K_E, exp, m.id .. '\0' .. gid)
    if O.np == 0 or exp < O.np then S('np', exp) end
    ledger(ctx, m.id, 'grant', 'promo', amount, gid)
    dirty(m)
    touched[#touched + 1] = m
    return nil, 'funded', flags
  end
  -- credit_request
  local amount = cmd.credits_mc
  if not is_int(amount, 1) then return 'invalid_amount', nil, flags end
  local detail = {credits_mc = amount, command_id = ctx.id}
  if type(cmd.note) == 'string' then detail.note = cmd.note end
  notify('credit_request', m.id, detail)
  return nil, nil, flags
end

local function do_command(it)
  local cmd, src, off = it.cmd, it[3], it[4]
  local raw = it[2]
  local typ = cmd.type
  local cid = tostring(cmd.command_id)
  if not EXISTS then
    if typ ~= 'org_upsert' then return {'rejected', 'unknown_org'} end
    local day, at = cmd.billing_anchor_day, cmd.at_ms
    if type(at) ~= 'number' or type(day) ~= 'number' or day ~= math.floor(day) or day < 1
        or day > 31 then
      return {'rejected', 'invalid_command'}
    end
    local s, e = cycle_containing(at, day)
    for _, f in ipairs(NUM_FIELDS) do O[f] = 0; ODIRTY[f] = true end
    O.rp = ''; ODIRTY.rp = true
    O.an, O.ck, O.cs, O.ce, O.la = day, at, s, e, at
    EXISTS = true
    ODIRTY.ex = true
    O.ex = 1
    mark(src, off)
    emit({3, 0, cid, typ, 'applied', NULL, raw, src, off})
    return {'applied', NULL}
  end
  local g, drop = gate(src, off)
  if g then return g end
  if type(cmd.at_ms) == 'number' then
    if not advance(cmd.at_ms) then return INTERRUPTED end
  end
  decided(drop)
  mark(src, off)
  local ctx = ctx_of('admin', cid)
  local avail = pool_available()
  local touched = {}
  local code, reason, flags = dispatch(cmd, ctx, touched)
  local status = 'applied'
  if code ~= nil and code ~= 'unknown_request' then status = 'rejected' end
  emit({3, 0, cid, typ, status, code or NULL, raw, src, off})
  finish_point(ctx, reason, touched, flags, avail)
  return {status, code or NULL}
end

-- ---------------------------------------------------------------------------------------
-- Main
-- ---------------------------------------------------------------------------------------
local outcomes = {}
local consumed = 0
local STOPPED = false -- the budget ran out in the middle of an item's due moments
if EXISTS and #JOBS > 0 then run_jobs() end
for i, it in ipairs(ITEMS) do
  local r
  if it[1] == 1 then r = do_usage(it) else r = do_command(it) end
  if r == INTERRUPTED then STOPPED = true; break end
  outcomes[i] = r
  consumed = i
end
if EXISTS and consumed == #ITEMS and #JOBS > 0 then run_jobs() end

-- Write-back. Everything above only read, or wrote the member sets; the state lands here.
if EXISTS then
  if NE > 0 then ODIRTY.sq = true end
  local args = {}
  for k in pairs(ODIRTY) do
    args[#args + 1] = k
    if k == 'rp' then args[#args + 1] = O.rp
    elseif k == 'ex' then args[#args + 1] = '1'
    else args[#args + 1] = fmt(O[k]) end
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
local blob = '[]'
if #E > 0 then
  blob = cjson.encode(E)
  redis.call('XADD', K_X, fmt(O.sq) .. '-0', 'e', blob)
end
return {cjson.encode({consumed, (#JOBS > 0 or STOPPED) and 1 or 0, outcomes}), blob}
