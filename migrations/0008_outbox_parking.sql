-- paystream schema v8: an outbox row the broker refuses for good (too large for the topic, a
-- topic that does not exist or may not be written) is parked instead of holding back every
-- row behind it: only the later rows of its own topic and key wait (per-key order), the rest
-- flow. The relay retries a parked row after `relay.park_retry_s`; an operator can retry it
-- at once or discard it (`paystream outbox`), and each such action is recorded. Adding
-- nullable columns is instant: the table is not rewritten.
ALTER TABLE outbox
    ADD COLUMN parked_at      TIMESTAMPTZ,
    ADD COLUMN park_reason    TEXT,
    ADD COLUMN discarded_at   TIMESTAMPTZ;
-- Parked rows still waiting: the relay checks each row it takes against these.
CREATE INDEX outbox_parked ON outbox (topic, id)
    WHERE parked_at IS NOT NULL AND published_at IS NULL AND discarded_at IS NULL;

CREATE TABLE outbox_actions (
    id         BIGSERIAL   PRIMARY KEY,
    outbox_id  BIGINT      NOT NULL,
    action     TEXT        NOT NULL CHECK (action IN ('RETRY', 'DISCARD')),
    actor      TEXT        NOT NULL,
    reason     TEXT        NOT NULL,
    at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
