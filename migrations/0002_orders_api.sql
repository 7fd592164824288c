-- paystream schema v2: what the HTTP API and the order saga need.

-- Orders: the saga's timestamps, the request that created them, and refund bookkeeping.
-- A PAID order whose cancel was accepted keeps status PAID with refund_requested_at set
-- until AccountRefunded arrives (then REFUNDED). A CANCELLED order whose debit landed after
-- the cancel (compensation) stays CANCELLED and gets refunded_at once the money is back.
ALTER TABLE orders
    ADD COLUMN items               JSONB       NOT NULL DEFAULT '[]',
    ADD COLUMN idempotency_key     TEXT,
    ADD COLUMN paid_at             TIMESTAMPTZ,
    ADD COLUMN cancelled_at        TIMESTAMPTZ,
    ADD COLUMN refund_requested_at TIMESTAMPTZ,
    ADD COLUMN refunded_at         TIMESTAMPTZ,
    ADD CONSTRAINT orders_paid_has_paid_at CHECK (status <> 'PAID' OR paid_at IS NOT NULL),
    ADD CONSTRAINT orders_cancelled_has_reason
        CHECK (status <> 'CANCELLED' OR (cancel_reason IS NOT NULL AND cancelled_at IS NOT NULL)),
    ADD CONSTRAINT orders_refunded_has_refunded_at CHECK (status <> 'REFUNDED' OR refunded_at IS NOT NULL);

-- The timeout sweeper's queue: oldest PENDING first.
CREATE INDEX orders_pending_by_age ON orders (created_at, id) WHERE status = 'PENDING';
-- Listing a user's orders by status, newest first.
CREATE INDEX orders_by_user_status ON orders (user_id, status, id);

-- Idempotency keys (Stripe's model): scoped per user; the first successful response is kept
-- and replayed for the same key and the same request; a different request under the same key
-- is refused. Claimed in the same transaction as the work, so a key exists iff its work
-- committed.
CREATE TABLE idempotency_keys (
    user_id         BIGINT      NOT NULL,
    key             TEXT        NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    -- SHA-256 of method, route and canonical JSON body.
    request_hash    BYTEA       NOT NULL,
    response_status SMALLINT    NOT NULL,
    response_body   JSONB       NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at);
