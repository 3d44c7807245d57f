-- Rejections whose org id could not be read are still recorded (their event id decides the id);
-- the org is then unknown.
ALTER TABLE usage_events ALTER COLUMN org_id DROP NOT NULL;
ALTER TABLE admin_commands ALTER COLUMN org_id DROP NOT NULL;

-- The retry turn reads each partition's oldest parked events through this index (bounded work
-- whatever the backlog); the per-org cap counts through the second one.
DROP INDEX parked_events_partition;
CREATE INDEX parked_events_retry ON parked_events (source_topic, source_partition, parked_at, event_id);
CREATE INDEX parked_events_org ON parked_events (org_id);

-- Rows PostgreSQL refused for their content (a data error, not an outage), set aside so that
-- the rest of their batch and its offsets commit. "row" is the row as JSON with every non-ASCII
-- character escaped, which any text column can hold; nothing is lost, and an operator decides.
CREATE TABLE quarantined_rows (
    id          bigserial PRIMARY KEY,
    table_name  text        NOT NULL,
    reason      text        NOT NULL,
    row_json    text        NOT NULL,
    source      text,
    source_offset bigint,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
