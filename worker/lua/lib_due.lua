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
  emit(row_invoice(0, O.cs, e, invoice, math.floor((invoice + 500) / 1000)))
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
