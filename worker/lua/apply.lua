-- Apply usage events and admin commands of SEVERAL orgs, each org's items atomically and in
-- order, and continue any pending org-wide work (an org with no items is a "drain" call).
-- Loaded after the libraries (worker/engine.py concatenates them in dependency order:
-- lib_layout, lib_calendar, lib_state, lib_effects, lib_rules, lib_jobs, lib_due, lib_items).
--
-- KEYS: per org, 8 keys (lib_state.lua load_org): org hash, member hash, outbox stream,
--       paused zset, pool-dependents zset, debtors zset, promo expiry zset, unknown-offset
--       marks set. On a Redis Cluster every key of one call shares one hash tag (the orgs of
--       one virtual shard, worker/constants.py).
-- ARGV: 1 JSON [[org_id, items, expect_seq, replay], ...] in KEYS order; items are positional
--       (lib_layout.lua ITEM_USAGE / ITEM_COMMAND); expect_seq (0: none) is the org's effect
--       seq the caller knows PostgreSQL holds or will hold: an org below it lost writes and is
--       refused unchanged; replay (1) marks a rebuild's replay of recorded decisions, which
--       skips the home check (lib_items.lua elsewhere);
--       2 config JSON [{tier: mc}, block_mc, max usage, max amount, max balance];
--       3 walk budget (member records the call may visit for org-wide work).
-- Returns {meta JSON [[consumed, pending, outcomes] per org], effects JSON per org ...}; a
-- refused org's meta is [-1, its seq in Redis (0: unknown org), []].
--
-- Write order and crashes: the script is atomic, so no client ever sees part of a call; but
-- Redis has no rollback, so every input is validated before its item's first write and no error
-- path exists after it (the loader adds a '#!lua' shebang, so Redis refuses the whole call at
-- its start when out of memory under maxmemory-policy noeviction). Member sets are updated as
-- members are evaluated; each org's hashes, marks and its one outbox entry are written when the
-- org is done (write_back). A worker crash after the call loses nothing: the effects wait in the
-- outboxes until acked. Unfinished org-wide work is recorded in the org hash ('jb') and finished
-- by the next call, whoever makes it, before any further item of that org is applied.

local results, blobs = {}, {}
for g, group in ipairs(GROUPS) do
  local org_id, items, expect = group[1], group[2], tonumber(group[3]) or 0
  REPLAY = group[4] == 1
  load_org(g, org_id, items)
  if expect > 0 and (not EXISTS or O.sq < expect) then
    -- Redis behind PostgreSQL (restarted behind its AOF, emptied): decide nothing on stale
    -- state. Nothing was written; the caller rebuilds the org from the ledger and calls again.
    results[g] = {-1, EXISTS and O.sq or 0, {}}
    blobs[g] = ''
  else
    for _, it in ipairs(items) do
      if it[1] == ITEM_COMMAND then it.cmd = cjson.decode(it[2]) end
    end
    local outcomes, consumed, stopped = {}, 0, false
    if EXISTS and #JOBS > 0 then run_jobs() end
    for i, it in ipairs(items) do
      local r
      if it[1] == ITEM_USAGE then r = do_usage(it) else r = do_command(it) end
      -- The budget ran out in the middle of an item's due moments: the rest waits.
      if r == INTERRUPTED then stopped = true; break end
      outcomes[i] = r
      consumed = i
    end
    if EXISTS and consumed == #items and #JOBS > 0 then run_jobs() end
    blobs[g] = write_back()
    results[g] = {consumed, (#JOBS > 0 or stopped) and 1 or 0, outcomes}
  end
end
return {cjson.encode(results), unpack(blobs)}
