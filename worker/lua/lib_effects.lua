-- Effects: appended to the current org's list as positional rows (lib_layout.lua), each
-- with the next org-wide seq.
-- ---------------------------------------------------------------------------------------
-- Effects
-- ---------------------------------------------------------------------------------------
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
  emit(row_ledger(0, mid or NULL, ctx.k, ctx.id, ctx.task, movement, bucket, grant or NULL,
    amount, cstart or O.cs, ctx.late, O.ck))
end

local function notify(typ, mid, detail)
  emit(row_notification(0, typ, mid or NULL, detail, O.ck))
end
