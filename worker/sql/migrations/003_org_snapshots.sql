-- The engine state of each org at one effect seq (the latest kept): a rebuild restores it and
-- replays only the decisions after "seq", so it costs O(state), not O(history). "state" is
-- opaque (the engine's own encoding, docs/engine.md "Snapshots"). A row is only written in a
-- transaction where org_seq already covers its seq: every effect up to it is in the ledger.
CREATE TABLE org_snapshots (
    org_id    text        PRIMARY KEY,
    seq       bigint      NOT NULL,
    state     bytea       NOT NULL,
    taken_at  timestamptz NOT NULL DEFAULT now()
);
