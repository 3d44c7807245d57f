-- Named queries of the read API (worker/api.py). "{schema}" is replaced by the quoted schema
-- name from settings; every value is an asyncpg $n parameter.

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
