-- The ledger's references (a transfer's two accounts; an entry's transfer and account) were
-- foreign keys: a trigger call, an index probe and a row lock per reference, six per debit,
-- about a quarter of PostgreSQL's CPU per debit (docs/performance.md). The ledger writes
-- hundreds of rows per statement, so the same rule is now checked once per statement, over
-- the inserted rows, with the same SQLSTATE (23503). What the foreign keys also forbade,
-- removing or renumbering a referenced row, cannot happen: transfers and entries are
-- append-only (0001), and accounts are never deleted or renumbered (below).

ALTER TABLE ledger_entries
    DROP CONSTRAINT ledger_entries_transfer_id_fkey,
    DROP CONSTRAINT ledger_entries_account_id_fkey;
ALTER TABLE transfers
    DROP CONSTRAINT transfers_from_account_id_fkey,
    DROP CONSTRAINT transfers_to_account_id_fkey;

-- Each check probes the primary keys with the distinct ids of the statement's rows (an
-- index scan whatever the table sizes), rather than joining the tables to the rows.
CREATE FUNCTION paystream_transfers_reference_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids BIGINT[] := ARRAY(SELECT DISTINCT x FROM inserted, LATERAL (VALUES (from_account_id), (to_account_id)) v(x));
BEGIN
    IF (SELECT count(*) FROM accounts WHERE id = ANY(ids)) <> cardinality(ids) THEN
        RAISE EXCEPTION 'a transfer refers to an account that does not exist (one of %)', ids
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER transfers_reference_accounts AFTER INSERT ON transfers
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION paystream_transfers_reference_accounts();

CREATE FUNCTION paystream_entries_reference_transfers_and_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    transfer_ids BIGINT[] := ARRAY(SELECT DISTINCT transfer_id FROM inserted);
    account_ids BIGINT[] := ARRAY(SELECT DISTINCT account_id FROM inserted);
BEGIN
    IF (SELECT count(*) FROM transfers WHERE id = ANY(transfer_ids)) <> cardinality(transfer_ids) THEN
        RAISE EXCEPTION 'a ledger entry refers to a transfer that does not exist (one of %)', transfer_ids
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF (SELECT count(*) FROM accounts WHERE id = ANY(account_ids)) <> cardinality(account_ids) THEN
        RAISE EXCEPTION 'a ledger entry refers to an account that does not exist (one of %)', account_ids
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER ledger_entries_reference_transfers_and_accounts AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION paystream_entries_reference_transfers_and_accounts();

-- Accounts stay: the ledger refers to them for good.
CREATE FUNCTION paystream_accounts_stay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'accounts are never deleted or renumbered: % on accounts is not allowed', TG_OP;
END;
$$;
CREATE TRIGGER accounts_never_deleted BEFORE DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION paystream_accounts_stay();
CREATE TRIGGER accounts_never_renumbered BEFORE UPDATE OF id ON accounts
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION paystream_accounts_stay();
CREATE TRIGGER accounts_no_truncate BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION paystream_accounts_stay();
