-- Generated from worker/layout.py by `python -m worker.layout`: do not edit.
-- Item kinds, effect kind codes, member record positions, the org's integer fields and
-- effect row constructors.

local ITEM_USAGE, ITEM_COMMAND = 1, 2
local EK = {ledger = 1, usage = 2, command = 3, signal = 4, notification = 5, refill_request = 6, invoice = 7, charge = 8}
local MP = {tier = 1, nt = 2, act = 3, cn = 4, ag = 5, au = 6, bk = 7, dr = 8, bu = 9, pu = 10, debt = 11, ds = 12, lim = 13, pz = 14, rs = 15, ms = 16, aa = 17, ra = 18, inp = 19, inq = 20, inb = 21, pr = 22, sh = 23, lr = 24, li = 25}
local ORG_FIELDS = {'an', 'pa', 'ck', 'cn', 'cs', 'ce', 'la', 'pl', 'lk', 'pd', 'bw', 're', 'rt', 'ra', 'rm', 'rd', 'rpm', 'rc', 'rn', 'ie', 'sq', 'at', 'bt', 'dt', 'nt', 'np', 'hm'}

-- The org's integers from their stored array (and the pending refill id), and back.
local function org_from(a, rp)
  return {an = a[1] or 0, pa = a[2] or 0, ck = a[3] or 0, cn = a[4] or 0, cs = a[5] or 0, ce = a[6] or 0, la = a[7] or 0, pl = a[8] or 0, lk = a[9] or 0, pd = a[10] or 0, bw = a[11] or 0, re = a[12] or 0, rt = a[13] or 0, ra = a[14] or 0, rm = a[15] or 0, rd = a[16] or 0, rpm = a[17] or 0, rc = a[18] or 0, rn = a[19] or 0, ie = a[20] or 0, sq = a[21] or 0, at = a[22] or 0, bt = a[23] or 0, dt = a[24] or 0, nt = a[25] or 0, np = a[26] or 0, hm = a[27] or 0, rp = rp}
end
local function org_array(o)
  return {o.an, o.pa, o.ck, o.cn, o.cs, o.ce, o.la, o.pl, o.lk, o.pd, o.bw, o.re, o.rt, o.ra, o.rm, o.rd, o.rpm, o.rc, o.rn, o.ie, o.sq, o.at, o.bt, o.dt, o.nt, o.np, o.hm}
end
-- A member from its stored array: the fields stored as they are (lim, rs, ra, pr, sh, lr, li are the caller's).
local function member_from(id, a)
  return {id = id, tier = a[1], nt = a[2], act = a[3], cn = a[4], ag = a[5], au = a[6], bk = a[7], dr = a[8], bu = a[9], pu = a[10], debt = a[11], ds = a[12], pz = a[14], ms = a[16], aa = a[17], inp = a[19], inq = a[20], inb = a[21]}
end
-- A member's stored array; lim, rs, ra, pr as the caller encoded them.
local function member_array(m, lim, rs, ra, pr)
  return {m.tier, m.nt, m.act, m.cn, m.ag, m.au, m.bk, m.dr, m.bu, m.pu, m.debt, m.ds, lim, m.pz, rs, m.ms, m.aa, ra, m.inp, m.inq, m.inb, pr, m.sh, m.lr, m.li}
end

-- [1, seq, member_id, source_kind, source_id, task_id, movement, bucket, grant_id, amount_mc, cycle_start_ms, late, at_ms]
local function row_ledger(seq, member_id, source_kind, source_id, task_id, movement, bucket, grant_id, amount_mc, cycle_start_ms, late, at_ms)
  return {1, seq, member_id, source_kind, source_id, task_id, movement, bucket, grant_id, amount_mc, cycle_start_ms, late, at_ms}
end
-- [2, seq, event_id, member_id, task_id, credits_mc, occurred_at_ms, status, code, late, source, offset]
local function row_usage(seq, event_id, member_id, task_id, credits_mc, occurred_at_ms, status, code, late, source, offset)
  return {2, seq, event_id, member_id, task_id, credits_mc, occurred_at_ms, status, code, late, source, offset}
end
-- [3, seq, command_id, type, status, code, command, source, offset]
local function row_command(seq, command_id, type, status, code, command, source, offset)
  return {3, seq, command_id, type, status, code, command, source, offset}
end
-- [4, seq, member_id, signal, reason, member_seq, issued_at_ms]
local function row_signal(seq, member_id, signal, reason, member_seq, issued_at_ms)
  return {4, seq, member_id, signal, reason, member_seq, issued_at_ms}
end
-- [5, seq, type, member_id, detail, at_ms]
local function row_notification(seq, type, member_id, detail, at_ms)
  return {5, seq, type, member_id, detail, at_ms}
end
-- [6, seq, request_id, credits_mc, amount_usd_cents, at_ms]
local function row_refill_request(seq, request_id, credits_mc, amount_usd_cents, at_ms)
  return {6, seq, request_id, credits_mc, amount_usd_cents, at_ms}
end
-- [7, seq, cycle_start_ms, cycle_end_ms, negative_balance_mc, amount_usd_cents]
local function row_invoice(seq, cycle_start_ms, cycle_end_ms, negative_balance_mc, amount_usd_cents)
  return {7, seq, cycle_start_ms, cycle_end_ms, negative_balance_mc, amount_usd_cents}
end
-- [8, seq, bucket, grant_id, event_id, member_id, task_id, credits_mc, occurred_at_ms, late, source, offset, cycle_start_ms, at_ms]
local function row_charge(seq, bucket, grant_id, event_id, member_id, task_id, credits_mc, occurred_at_ms, late, source, offset, cycle_start_ms, at_ms)
  return {8, seq, bucket, grant_id, event_id, member_id, task_id, credits_mc, occurred_at_ms, late, source, offset, cycle_start_ms, at_ms}
end
