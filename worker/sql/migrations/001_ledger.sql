-- Ledger of record. Applied inside the worker's schema (search_path), in one transaction.
-- Every table is append-only except signals (last per member), parked_events (a waiting
-- room), org_seq and consumer_offsets (high-water marks).

CREATE TABLE ledger_entries (
    org_id          text    NOT NULL,
    seq             bigint  NOT NULL,   -- the engine's org-wide effect sequence number
    member_id       text,
    source_kind     text    NOT NULL,   -- usage | admin | system
    source_id       text,               -- event_id or command_id
    task_id         text,
    movement        text    NOT NULL,
    bucket          text,
    grant_id        text,
    amount_mc       bigint  NOT NULL,   -- signed millicredits
    cycle_start_ms  bigint,
    late            boolean NOT NULL DEFAULT false,
    at_ms           bigint,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, seq)
);
-- Member history (the ledger API pages by seq). No index on source_id: every index costs on
-- the hot write path, and an event's movements are found through its org and member.
CREATE INDEX ledger_entries_member ON ledger_entries (org_id, member_id, seq);

-- One row per usage event_id ever decided (charged or rejected): the permanent at-most-once
-- guarantee. seq is NULL when the pipeline rejected the event before the engine saw it.
CREATE TABLE usage_events (
    event_id        text    PRIMARY KEY,
    org_id          text    NOT NULL,
    seq             bigint,
    member_id       text,
    task_id         text,
    credits_mc      bigint,
    occurred_at_ms  bigint,
    status          text    NOT NULL,   -- charged | rejected
    code            text,
    late            boolean NOT NULL DEFAULT false,
    source          text,               -- "<topic>:<partition>"
    source_offset   bigint,
    decided_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_events_org_seq ON usage_events (org_id, seq) WHERE seq IS NOT NULL;

-- One row per command_id ever decided; "command" is the validated input (mc, ms), which is
-- what a rebuild replays.
CREATE TABLE admin_commands (
    command_id      text    PRIMARY KEY,
    org_id          text    NOT NULL,
    seq             bigint,
    type            text    NOT NULL,
    status          text    NOT NULL,   -- applied | rejected
    code            text,
    command         jsonb   NOT NULL,
    source          text,
    source_offset   bigint,
    decided_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX admin_commands_org_seq ON admin_commands (org_id, seq) WHERE seq IS NOT NULL;

CREATE TABLE invoices (
    org_id              text    NOT NULL,
    seq                 bigint  NOT NULL,
    cycle_start_ms      bigint  NOT NULL,
    cycle_end_ms        bigint  NOT NULL,
    negative_balance_mc bigint  NOT NULL,
    amount_usd_cents    bigint  NOT NULL,
    recorded_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, seq)
);

CREATE TABLE notifications (
    org_id      text    NOT NULL,
    seq         bigint  NOT NULL,
    type        text    NOT NULL,
    member_id   text,
    detail      jsonb   NOT NULL,
    at_ms       bigint  NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, seq)
);

CREATE TABLE refill_requests (
    org_id           text    NOT NULL,
    seq              bigint  NOT NULL,
    request_id       text    NOT NULL,
    credits_mc       bigint  NOT NULL,
    amount_usd_cents bigint  NOT NULL,
    at_ms            bigint  NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, seq)
);

-- Last pause/resume signal per member (what the control topic's compacted view should show).
CREATE TABLE signals (
    org_id        text    NOT NULL,
    member_id     text    NOT NULL,
    seq           bigint  NOT NULL,
    signal        text    NOT NULL,
    reason        text    NOT NULL,
    member_seq    bigint  NOT NULL,
    issued_at_ms  bigint  NOT NULL,
    PRIMARY KEY (org_id, member_id)
);

-- Usage events whose org or member did not exist yet, waiting out the grace period.
CREATE TABLE parked_events (
    event_id          text    PRIMARY KEY,
    org_id            text    NOT NULL,
    member_id         text    NOT NULL,
    task_id           text    NOT NULL,
    credits_mc        bigint  NOT NULL,
    occurred_at_ms    bigint  NOT NULL,
    code              text    NOT NULL,   -- unknown_org | unknown_member
    source_topic      text    NOT NULL,
    source_partition  integer NOT NULL,
    source_offset     bigint  NOT NULL,
    msg_key           bytea,
    msg_value         bytea   NOT NULL,
    parked_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX parked_events_partition ON parked_events (source_topic, source_partition);

-- Highest effect seq PostgreSQL holds per org: compared with Redis to detect data loss there.
CREATE TABLE org_seq (
    org_id    text    PRIMARY KEY,
    last_seq  bigint  NOT NULL
);

-- Next offset to consume per input partition, written in the same transaction as the rows
-- the consumed messages produced. This, not Kafka's committed offset, is where a worker resumes.
CREATE TABLE consumer_offsets (
    group_id     text    NOT NULL,
    topic        text    NOT NULL,
    partition    integer NOT NULL,
    next_offset  bigint  NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);
