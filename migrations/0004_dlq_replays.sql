-- paystream schema v4: who replayed which dead letter, and when (`paystream dlq replay`).
CREATE TABLE dlq_replays (
    id             BIGSERIAL PRIMARY KEY,
    replayed_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    operator       TEXT        NOT NULL,
    dlq_topic      TEXT        NOT NULL,
    dlq_partition  INT         NOT NULL,
    dlq_offset     BIGINT      NOT NULL,
    original_topic TEXT        NOT NULL,
    event_id       UUID,
    error_class    TEXT,
    attempts       INT
);
CREATE INDEX dlq_replays_by_dead_letter ON dlq_replays (dlq_topic, dlq_partition, dlq_offset);
