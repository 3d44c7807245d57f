-- The rules of SPEC sections 2-4 on one member: predicates, pause/resume edges, the waterfall.
-- ---------------------------------------------------------------------------------------
-- Member predicates and signals
-- ---------------------------------------------------------------------------------------
local function eff_limit(m)
  if m.lim == 'inherit' then
    return tier_limit(m.tier)
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
  emit(row_signal(0, m.id, sig, reason, m.ms, O.ck))
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
    local rid = 'refill-' .. org_digest() .. '-' .. fmt(O.rc)
    O.rp = rid; RPDIRTY = true
    S('rpm', credits)
    emit(row_refill_request(0, rid, credits, math.floor((credits + 500) / 1000), O.ck))
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
