-- ---------------------------------------------------------------------------------------
-- Idempotency: the per-source offset watermark. Ids are deduplicated before the engine is
-- called (the global claims, worker/lua/claim.lua, and PostgreSQL's unique keys): a copy of
-- a decided id never reaches this script.
-- ---------------------------------------------------------------------------------------

-- Offsets of usage for a member that did not exist yet ('u|<source>|<offset>'): the watermark
-- moves past them, so a replay of such an offset (after a crash, before the pipeline parked
-- the event durably) must be decided again, not skipped. Kept in their own set, which never
-- rotates, until decided or until the pipeline's ack of the batch that parked them removes
-- them (worker/pipeline/commit.py): the decision cannot depend on the dedupe window.
local function mark_unknown(u)
  if not SEEN[u] then SEEN[u] = true; NEW_U[#NEW_U + 1] = u end
end

local function mark(src, off)
  if off < 0 then return end
  local w = watermark(src)
  if w == nil or w < off then W[src] = off; WDIRTY[src] = true end
end

local OUT_APPLIED, OUT_REPLAYED = {'applied', NULL}, {'replayed', NULL}
-- Returns the outcome when the item is not to be decided (a replay of an applied offset), else
-- nil and, for a replayed offset that was unknown when first seen, its mark (dropped once the
-- item is decided).
local function gate(src, off)
  local w = off >= 0 and watermark(src)
  if w and w >= off then
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
-- Routing: one decider per org (docs/delivery.md "One owner per org"). An org is decided
-- only from its home partition, the partition of the org_upsert that created it (the same
-- partition number of every input topic). An item read from another partition is not decided
-- here: its outcome names the home ('elsewhere', '<partition>') and the pipeline forwards the
-- record there. Nothing is written for it (no watermark, no mark): a replay of its offset is
-- sent on again, and no item of that partition is ever applied to the org to move a
-- watermark past it. Orgs created before homes existed have none (hm 0) and are decided
-- where their records arrive; so are items with no Kafka source (tests, tools), and a
-- rebuild's replay (REPLAY), which re-applies decisions already recorded.
-- ---------------------------------------------------------------------------------------
local PART = {} -- source -> its partition + 1 (0: not a '<topic>:<partition>' source)

local function part_of(src)
  local p = PART[src]
  if p == nil then
    local digits = type(src) == 'string' and string.match(src, ':(%d+)$')
    p = digits and (tonumber(digits) + 1) or 0
    PART[src] = p
  end
  return p
end

local function elsewhere(src)
  local hm = O.hm
  if hm == 0 or REPLAY then return nil end
  local p = part_of(src)
  if p == 0 or p == hm then return nil end
  return {'elsewhere', fmt(hm - 1)}
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
  local away = elsewhere(src)
  if away then return away end
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
  local ctx = nil -- ctx_of('usage', ...), made where a rule needs it (not on the fast path)
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
    ctx = ctx_of('usage', eid, task, late)
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
      E[NE] = row_charge(sq, bucket, NULL, eid, mid, task, c, occ, late, src, off, O.cs, O.ck)
      compact = true
    else
      waterfall = true
    end
  end
  if waterfall then
    local before = NE
    ctx = ctx_of('usage', eid, task, late)
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
      -- (the ledger row: [1, seq, member, kind, id, task, movement, bucket, grant, amount,
      --  cycle start, late, at], lib_layout.lua row_ledger)
      local l = E[NE]
      E[NE] = row_charge(l[2], l[8], l[9], eid, mid, task, c, occ, late, src, off, l[11], l[13])
      O.sq = O.sq + 1
      compact = true
    end
  end
  if not compact then
    emit(row_usage(0, eid, mid, task, c, occ, code and 'rejected' or 'charged', code or NULL,
      late, src, off))
  end
  -- Fast path: a running member with credits left, no debt and the pool as available as
  -- before cannot change state, so there is nothing to evaluate.
  if not (m.pz == 0 and m.debt == 0 and m.inq == 0 and m.ag - m.au + m.bk > 0
      and tier_mc(m.tier) ~= 0 and tier_mc(m.nt) ~= 0 and (not avail or pool_available())) then
    finish_point(ctx or ctx_of('usage', eid, task, late), nil, {m}, {}, avail)
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
    O.rp = ''; RPDIRTY = true
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
    local old = tier_limit(tier)
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
    for _, f in ipairs(ORG_FIELDS) do O[f] = 0 end
    ODIRTY = true
    O.rp = ''; RPDIRTY = true
    O.an, O.ck, O.cs, O.ce, O.la = day, at, s, e, at
    O.hm = part_of(src) -- its home: where the org is decided from now on
    EXISTS = true
    mark(src, off)
    emit(row_command(0, cid, typ, 'applied', NULL, raw, src, off))
    return {'applied', NULL}
  end
  local away = elsewhere(src)
  if away then return away end
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
  emit(row_command(0, cid, typ, status, code or NULL, raw, src, off))
  finish_point(ctx, reason, touched, flags, avail)
  return {status, code or NULL}
end
