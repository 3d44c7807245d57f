-- Generated from worker/layout.py by `python -m worker.layout`: do not edit.
-- Item kinds, effect kind codes, member record positions, the org's integer fields and
-- effect row constructors.

local ITEM_USAGE, ITEM_COMMAND = 1, 2
local EK = {ledger = 1, usage = 2, command = 3, signal = 4, notification = 5, refill_request = 6, invoice = 7, charge = 8}
local MP = {tier = 1, nt = 2, act = 3, cn = 4, ag = 5, au = 6, bk = 7, dr = 8, bu = 9, pu = 10, debt = 11, ds = 12, lim = 13, pz = 14, rs = 15, ms = 16, aa = 17, ra = 18, inp = 19, inq = 20, inb = 21, pr = 22, sh = 23, lr = 24, li = 25}
local ORG_FIELDS = {'an', 'pa', 'ck', 'cn', 'cs', 'ce', 'la', 'pl', 'lk', 'pd', 'bw', 're', 'rt', 'ra', 'rm', 'rd', 'rpm', 'rc', 'rn', 'ie', 'sq', 'at', 'bt', 'dt', 'nt', 'np', 'hm'}

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
