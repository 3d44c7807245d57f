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
