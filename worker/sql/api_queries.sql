-- Named queries of the read API (worker/api.py, worker/api_export.py). "{schema}" is replaced
-- by the quoted schema name from settings; every value is an asyncpg $n parameter.

-- name: ledger_page
-- $1 org_id, $2 seq upper bound exclusive (NULL: newest), $3 limit. Newest first; keyset
-- pagination on the (org_id, seq) primary key.
SELECT seq, org_id, member_id, source_kind, source_id, task_id, movement, bucket, grant_id,
       amount_mc, cycle_start_ms, late, at_ms, recorded_at
FROM {schema}.ledger_entries
WHERE org_id = $1
  AND ($2::bigint IS NULL OR seq < $2)
ORDER BY seq DESC
LIMIT $3

-- name: ledger_page_member
-- $1 org_id, $2 member_id, $3 seq upper bound exclusive (NULL: newest), $4 limit. A separate
-- query (not "member_id = $2 OR $2 IS NULL") so the planner always uses the
-- (org_id, member_id, seq) index, also for a member with few entries in a large org.
SELECT seq, org_id, member_id, source_kind, source_id, task_id, movement, bucket, grant_id,
       amount_mc, cycle_start_ms, late, at_ms, recorded_at
FROM {schema}.ledger_entries
WHERE org_id = $1
  AND member_id = $2
  AND ($3::bigint IS NULL OR seq < $3)
ORDER BY seq DESC
LIMIT $4

-- name: consumer_offsets
-- $1 group_id. The worker's processed offsets of record (next offset to consume per partition),
-- written in the same transaction as the ledger rows; Kafka's committed offsets may trail them.
SELECT topic, partition, next_offset
FROM {schema}.consumer_offsets
WHERE group_id = $1

-- name: export_start
-- $1 org_id. The highest seq PostgreSQL holds for the org (no row: the org is unknown) and the
-- cycle of its newest ledger entry (NULL: none yet), read in one snapshot. An export stops at
-- this seq, so rows flushed while it streams do not change it.
SELECT o.last_seq,
       (SELECT l.cycle_start_ms
        FROM {schema}.ledger_entries l
        WHERE l.org_id = $1
        ORDER BY l.seq DESC
        LIMIT 1) AS newest_cycle_start_ms
FROM {schema}.org_seq o
WHERE o.org_id = $1

-- name: ledger_cycle_page
-- $1 org_id, $2 cycle_start_ms, $3 seq lower bound exclusive, $4 seq upper bound inclusive,
-- $5 limit. Oldest first; keyset pagination on the (org_id, seq) primary key, one short query
-- per page so a slow download never holds a connection of the pool. No index on
-- cycle_start_ms (every index costs on the hot write path): the first page walks the org's
-- older entries through the primary key.
SELECT seq, org_id, member_id, source_kind, source_id, task_id, movement, bucket, grant_id,
       amount_mc, cycle_start_ms, late, at_ms, recorded_at
FROM {schema}.ledger_entries
WHERE org_id = $1
  AND cycle_start_ms = $2
  AND seq > $3
  AND seq <= $4
ORDER BY seq
LIMIT $5

-- name: admin_decided
-- $1 org_id, $2 command_ids. The admin page's pending changes: which of its commands the worker
-- has decided (applied or rejected), through the admin_commands primary key.
SELECT command_id, status, code, type
FROM {schema}.admin_commands
WHERE command_id = ANY($2::text[])
  AND org_id = $1

-- name: admin_notifications
-- $1 org_id, $2 type, $3 limit. The org's notifications of one type, newest first (credit
-- requests, the refill failure behind a locked pool). Walks the org's notifications backwards
-- through the (org_id, seq) primary key; notifications are rare next to ledger entries.
SELECT seq, member_id, detail, at_ms
FROM {schema}.notifications
WHERE org_id = $1
  AND type = $2
ORDER BY seq DESC
LIMIT $3

-- name: admin_daily_usage
-- $1 org_id, $2 cycle_start_ms. Credits used per UTC day of one cycle and bucket paid from:
-- the "charge" movements (promo, allocation, block; debt and invoice for what was unpaid).
-- Settlements are not counted again: the usage they pay was charged as debt on its day.
SELECT (at_ms / 86400000)::bigint AS day, bucket, (-sum(amount_mc))::bigint AS used_mc
FROM {schema}.ledger_entries
WHERE org_id = $1
  AND cycle_start_ms = $2
  AND movement = 'charge'
GROUP BY 1, 2
ORDER BY 1, 2
