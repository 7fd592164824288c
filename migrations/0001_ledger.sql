-- paystream schema v1: accounts, a double-entry append-only ledger, orders, exactly-once
-- consumer bookkeeping (processed events + fenced offsets) and the transactional outbox.

-- Accounts ------------------------------------------------------------------------------
-- USER accounts belong to one user, one per currency, and never go below zero.
-- SETTLEMENT accounts (merchant side, sharded to avoid one hot row) receive debits.
-- FUNDING accounts are the outside world: deposits move money out of them, so their
-- balance is the negative of all money ever brought in.
CREATE TABLE accounts (
    id           BIGSERIAL PRIMARY KEY,
    kind         TEXT        NOT NULL CHECK (kind IN ('USER', 'SETTLEMENT', 'FUNDING')),
    user_id      BIGINT,
    currency     CHAR(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    shard        INT         NOT NULL DEFAULT 0 CHECK (shard >= 0),
    status       TEXT        NOT NULL DEFAULT 'ACTIVE' CHECK (status IN ('ACTIVE', 'FROZEN')),
    balance_fen  BIGINT      NOT NULL DEFAULT 0,
    version      BIGINT      NOT NULL DEFAULT 0,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT user_accounts_have_a_user CHECK ((kind = 'USER') = (user_id IS NOT NULL)),
    CONSTRAINT user_balance_never_negative CHECK (kind <> 'USER' OR balance_fen >= 0)
);
CREATE UNIQUE INDEX accounts_one_per_user_and_currency ON accounts (user_id, currency)
    WHERE kind = 'USER';
CREATE UNIQUE INDEX accounts_system_per_currency_and_shard ON accounts (kind, currency, shard)
    WHERE kind <> 'USER';

-- Ledger ----------------------------------------------------------------------------------
-- A transfer moves amount_fen from one account to another; each transfer has exactly two
-- entries (-amount on from, +amount on to), each with the balance after it.
CREATE TABLE transfers (
    id              BIGSERIAL PRIMARY KEY,
    kind            TEXT        NOT NULL CHECK (kind IN ('DEBIT', 'REFUND', 'DEPOSIT')),
    order_id        BIGINT,
    from_account_id BIGINT      NOT NULL REFERENCES accounts (id),
    to_account_id   BIGINT      NOT NULL REFERENCES accounts (id),
    amount_fen      BIGINT      NOT NULL CHECK (amount_fen > 0),
    currency        CHAR(3)     NOT NULL,
    cause_event_id  UUID,
    reference       TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (from_account_id <> to_account_id),
    CHECK ((kind = 'DEPOSIT') = (order_id IS NULL))
);
-- SPEC §6.3, enforced by the database: at most one debit and one refund per order.
CREATE UNIQUE INDEX transfers_one_debit_and_one_refund_per_order ON transfers (order_id, kind)
    WHERE kind IN ('DEBIT', 'REFUND');

CREATE TABLE ledger_entries (
    id                BIGSERIAL PRIMARY KEY,
    transfer_id       BIGINT      NOT NULL REFERENCES transfers (id),
    account_id        BIGINT      NOT NULL REFERENCES accounts (id),
    delta_fen         BIGINT      NOT NULL CHECK (delta_fen <> 0),
    balance_after_fen BIGINT      NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_by_account ON ledger_entries (account_id, id);
CREATE INDEX ledger_entries_by_transfer ON ledger_entries (transfer_id);

-- The ledger is append-only: no UPDATE, DELETE or TRUNCATE, whoever asks.
CREATE FUNCTION paystream_ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % on % is not allowed', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION paystream_ledger_is_append_only();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION paystream_ledger_is_append_only();
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION paystream_ledger_is_append_only();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION paystream_ledger_is_append_only();

-- Orders (the order service extends this table) -------------------------------------------
CREATE TABLE orders (
    id               BIGSERIAL PRIMARY KEY,
    order_no         VARCHAR(64) NOT NULL UNIQUE,
    user_id          BIGINT      NOT NULL,
    amount_fen       BIGINT      NOT NULL CHECK (amount_fen > 0),
    currency         CHAR(3)     NOT NULL,
    status           TEXT        NOT NULL DEFAULT 'PENDING'
                     CHECK (status IN ('PENDING', 'PAID', 'CANCELLED', 'REFUNDED')),
    cancel_reason    TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX orders_by_user ON orders (user_id, id);

-- Exactly-once consumption -------------------------------------------------------------------
-- Event ids a consumer group has applied: a redelivery at any offset is a no-op.
CREATE TABLE processed_events (
    consumer_group TEXT        NOT NULL,
    event_id       UUID        NOT NULL,
    topic          TEXT        NOT NULL,
    partition      INT         NOT NULL,
    "offset"       BIGINT      NOT NULL,
    processed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, event_id)
);

-- The source of truth for where each consumer group is in each partition. A worker claims a
-- partition by bumping `epoch`; it may only advance `next_offset` while the epoch is still
-- its own and the offset is still the one it read (compare-and-set), so a worker that lost
-- the partition (a zombie) cannot commit.
CREATE TABLE consumer_offsets (
    consumer_group TEXT        NOT NULL,
    topic          TEXT        NOT NULL,
    partition      INT         NOT NULL,
    next_offset    BIGINT      NOT NULL CHECK (next_offset >= 0),
    epoch          BIGINT      NOT NULL,
    owner          TEXT        NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

CREATE FUNCTION paystream_offsets_never_move_backwards() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.next_offset < OLD.next_offset THEN
        RAISE EXCEPTION 'stored offset of %/%/% would move backwards from % to %',
            OLD.consumer_group, OLD.topic, OLD.partition, OLD.next_offset, NEW.next_offset
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER consumer_offsets_monotonic BEFORE UPDATE ON consumer_offsets
    FOR EACH ROW EXECUTE FUNCTION paystream_offsets_never_move_backwards();

-- Transactional outbox -------------------------------------------------------------------------
-- Written in the same transaction as the business change; `paystream relay` publishes it.
CREATE TABLE outbox (
    id           BIGSERIAL PRIMARY KEY,
    topic        TEXT        NOT NULL,
    message_key  TEXT,
    payload      BYTEA       NOT NULL,
    -- [[name, value], ...] in order; values are text.
    headers      JSONB       NOT NULL DEFAULT '[]',
    event_id     UUID,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at TIMESTAMPTZ
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;

-- Wake the relay (LISTEN paystream_outbox) once per writing statement.
CREATE FUNCTION paystream_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('paystream_outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION paystream_outbox_notify();
