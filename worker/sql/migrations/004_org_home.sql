-- Every org is decided at its home partition (docs/delivery.md "One owner per org"). A parked
-- event read from another partition is moved to the home's owner: owner_partition is the
-- partition whose worker retries it (NULL: its source partition, where it was read).
ALTER TABLE parked_events ADD COLUMN owner_partition integer;
DROP INDEX parked_events_retry;
CREATE INDEX parked_events_retry
    ON parked_events (source_topic, (COALESCE(owner_partition, source_partition)), parked_at, event_id);
