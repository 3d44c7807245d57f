-- A rebuild reads the org's charged events through their ledger movements (every charged event
-- has at least one, whose source is the event: the ledger's primary key, then usage_events'
-- own), so the (org_id, seq) index is needed only for events the engine rejected, which have
-- no movement. One index less on every charged event: about a sixth of a batch's flush
-- (BENCHMARKS.md). On a large existing table the new index is built in one pass, under a lock
-- that holds writers back: run the upgrade with the workers stopped (docs/operations.md).
-- Like every migration it runs in one transaction with its schema_migrations row: a crash
-- leaves the old index and the migration to run again. Both versions' rebuild reads give the
-- same rows with either index (an older worker's, after this migration, scans the table), so
-- the order of a rollout changes speed, not results.
CREATE INDEX usage_events_org_seq_unsettled ON usage_events (org_id, seq)
    WHERE seq IS NOT NULL AND status <> 'charged';
DROP INDEX usage_events_org_seq;
