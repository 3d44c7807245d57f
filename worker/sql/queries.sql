-- Named queries of the ledger store. Each block starts with "-- name: <name>"; the loader in
-- worker/ledger.py reads them into a dict. Parameters are asyncpg positional ($1...), arrays
-- are passed whole and expanded with unnest so one round trip writes a whole batch.

-- name: decided_event_ids
-- Event ids already decided (or waiting in the parking lot): later copies are duplicates.
-- One primary-key probe per id, whatever the table size or its statistics: with
-- "event_id = ANY($1)" the planner chose a (parallel) sequential scan of the whole table for a
-- 20,000-id batch, a cost that grows with the ledger.
SELECT i.id FROM unnest($1::text[]) AS i(id)
CROSS JOIN LATERAL (SELECT 1 FROM usage_events u WHERE u.event_id = i.id LIMIT 1) AS hit
UNION ALL
SELECT i.id FROM unnest($1::text[]) AS i(id)
CROSS JOIN LATERAL (SELECT 1 FROM parked_events p WHERE p.event_id = i.id LIMIT 1) AS hit;

-- name: decided_command_ids
SELECT i.id FROM unnest($1::text[]) AS i(id)
CROSS JOIN LATERAL (SELECT 1 FROM admin_commands c WHERE c.command_id = i.id LIMIT 1) AS hit;

-- name: insert_ledger_entries
INSERT INTO ledger_entries (org_id, seq, member_id, source_kind, source_id, task_id, movement,
                            bucket, grant_id, amount_mc, cycle_start_ms, late, at_ms)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::text[], $10::bigint[], $11::bigint[],
                     $12::boolean[], $13::bigint[])
ON CONFLICT DO NOTHING
RETURNING org_id, seq;

-- name: ledger_at
-- The movements PostgreSQL holds at these (org, seq): compared with a batch's rows that were
-- skipped as already there (the same movement, or a seq collision).
SELECT l.org_id, l.seq, l.member_id, l.source_id, l.movement, l.amount_mc
FROM ledger_entries l
JOIN unnest($1::text[], $2::bigint[]) AS u(org_id, seq) ON l.org_id = u.org_id AND l.seq = u.seq;

-- name: insert_usage_events
INSERT INTO usage_events (event_id, org_id, seq, member_id, task_id, credits_mc, occurred_at_ms,
                          status, code, late, source, source_offset)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::bigint[],
                     $7::bigint[], $8::text[], $9::text[], $10::boolean[], $11::text[],
                     $12::bigint[])
ON CONFLICT DO NOTHING;

-- name: insert_admin_commands
INSERT INTO admin_commands (command_id, org_id, seq, type, status, code, command, source,
                            source_offset)
SELECT c, o, s, t, st, cd, cmd::jsonb, src, so
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::text[], $9::bigint[]) AS u(c, o, s, t, st, cd, cmd, src, so)
ON CONFLICT DO NOTHING;

-- name: insert_invoices
INSERT INTO invoices (org_id, seq, cycle_start_ms, cycle_end_ms, negative_balance_mc,
                      amount_usd_cents)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                     $6::bigint[])
ON CONFLICT DO NOTHING;

-- name: insert_notifications
INSERT INTO notifications (org_id, seq, type, member_id, detail, at_ms)
SELECT o, s, t, m, d::jsonb, a
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[])
     AS u(o, s, t, m, d, a)
ON CONFLICT DO NOTHING;

-- name: insert_refill_requests
INSERT INTO refill_requests (org_id, seq, request_id, credits_mc, amount_usd_cents, at_ms)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[],
                     $6::bigint[])
ON CONFLICT DO NOTHING;

-- name: upsert_signals
-- Keeps the signal with the highest member_seq: a re-drained older signal never wins.
INSERT INTO signals AS s (org_id, member_id, seq, signal, reason, member_seq, issued_at_ms)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                     $6::bigint[], $7::bigint[])
ON CONFLICT (org_id, member_id) DO UPDATE
SET seq = EXCLUDED.seq, signal = EXCLUDED.signal, reason = EXCLUDED.reason,
    member_seq = EXCLUDED.member_seq, issued_at_ms = EXCLUDED.issued_at_ms
WHERE EXCLUDED.member_seq > s.member_seq;

-- name: insert_parked
INSERT INTO parked_events (event_id, org_id, member_id, task_id, credits_mc, occurred_at_ms,
                           code, source_topic, source_partition, source_offset, msg_key,
                           msg_value)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                     $6::bigint[], $7::text[], $8::text[], $9::integer[], $10::bigint[],
                     $11::bytea[], $12::bytea[])
ON CONFLICT DO NOTHING;

-- name: delete_parked
DELETE FROM parked_events WHERE event_id = ANY($1::text[]);

-- name: parked_for_partitions
-- Oldest first, bounded: the retry loop takes the rest on its next turn. Each partition's
-- oldest rows come straight from the parked_events_retry index (no sort of the backlog).
-- "decided": PostgreSQL already holds the event as decided (an outbox drained after a crash
-- charged it); such a row is only removed, never offered again.
SELECT p.event_id, p.org_id, p.member_id, p.task_id, p.credits_mc, p.occurred_at_ms, p.code,
       p.source_topic, p.source_partition, p.source_offset, p.msg_key, p.msg_value,
       (extract(epoch FROM p.parked_at) * 1000)::bigint AS parked_at_ms,
       COALESCE(p.owner_partition, p.source_partition) AS owner,
       EXISTS (SELECT 1 FROM usage_events u WHERE u.event_id = p.event_id) AS decided
FROM unnest($2::integer[]) AS part(n)
CROSS JOIN LATERAL (
    SELECT * FROM parked_events
    WHERE source_topic = $1 AND COALESCE(owner_partition, source_partition) = part.n
    ORDER BY parked_at, event_id
    LIMIT $3
) AS p
ORDER BY p.parked_at, p.event_id
LIMIT $3;

-- name: move_parked
-- Parked events of orgs whose home is another partition: retried by that partition's owner.
UPDATE parked_events AS p SET owner_partition = m.home
FROM unnest($1::text[], $2::integer[]) AS m(event_id, home)
WHERE p.event_id = m.event_id;

-- name: parked_counts
SELECT org_id, count(*) AS n FROM parked_events GROUP BY org_id;

-- name: count_parked
SELECT count(*) FROM parked_events;

-- name: upsert_org_seq
INSERT INTO org_seq AS o (org_id, last_seq)
SELECT * FROM unnest($1::text[], $2::bigint[])
ON CONFLICT (org_id) DO UPDATE SET last_seq = GREATEST(o.last_seq, EXCLUDED.last_seq);

-- name: upsert_snapshots
-- Only where org_seq (raised earlier in the same transaction) covers the snapshot's seq, and
-- only forward: a snapshot never runs ahead of the ledger it is replayed with.
INSERT INTO org_snapshots AS s (org_id, seq, state)
SELECT u.org_id, u.seq, u.state
FROM unnest($1::text[], $2::bigint[], $3::bytea[]) AS u(org_id, seq, state)
JOIN org_seq o ON o.org_id = u.org_id AND o.last_seq >= u.seq
ON CONFLICT (org_id) DO UPDATE
SET seq = EXCLUDED.seq, state = EXCLUDED.state, taken_at = now()
WHERE s.seq < EXCLUDED.seq;

-- name: select_snapshot
SELECT seq, state FROM org_snapshots WHERE org_id = $1;

-- name: org_seqs
SELECT org_id, last_seq FROM org_seq ORDER BY org_id;

-- name: upsert_offsets
-- GREATEST: a late flush from a worker that already lost the partition never moves it back.
INSERT INTO consumer_offsets AS c (group_id, topic, partition, next_offset)
SELECT $1, t, p, n FROM unnest($2::text[], $3::integer[], $4::bigint[]) AS u(t, p, n)
ON CONFLICT (group_id, topic, partition) DO UPDATE
SET next_offset = GREATEST(c.next_offset, EXCLUDED.next_offset), updated_at = now();

-- name: select_offsets
SELECT topic, partition, next_offset FROM consumer_offsets WHERE group_id = $1;

-- name: rebuild_inputs
-- The recorded decisions of one org after seq $2 (0: all), in decision order: what a rebuild
-- replays after the org's snapshot. A charged event is found through its ledger movements
-- (every charged event has at least one, whose source is the event; one per bucket, hence
-- DISTINCT) and one primary-key probe (LATERAL: never a scan of the whole table, whatever
-- its statistics); an event the engine rejected through usage_events_org_seq_unsettled. So
-- the charged events need no (org_id, seq) index of their own on the hot write path. $2 is
-- a snapshot's seq, taken between two calls, so the effects of one item (its movements, then
-- its usage row) all lie on the same side of it.
SELECT u.seq, 'usage' AS kind, u.event_id AS id, u.member_id, u.task_id, u.credits_mc,
       u.occurred_at_ms, NULL::text AS command, u.source
FROM (SELECT DISTINCT l.source_id FROM ledger_entries l
      WHERE l.org_id = $1 AND l.seq > $2 AND l.source_kind = 'usage') AS e
CROSS JOIN LATERAL (SELECT * FROM usage_events x WHERE x.event_id = e.source_id LIMIT 1) AS u
WHERE u.org_id = $1 AND u.seq > $2 AND u.status = 'charged'
UNION ALL
SELECT seq, 'usage', event_id, member_id, task_id, credits_mc, occurred_at_ms, NULL::text, source
FROM usage_events WHERE org_id = $1 AND seq > $2 AND status <> 'charged'
UNION ALL
SELECT seq, 'command', command_id, NULL, NULL, NULL, NULL, command::text, source
FROM admin_commands WHERE org_id = $1 AND seq > $2
ORDER BY seq;

-- name: insert_quarantined
INSERT INTO quarantined_rows (table_name, reason, row_json, source, source_offset)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[]);

-- name: known_orgs
SELECT org_id FROM org_seq ORDER BY org_id;
