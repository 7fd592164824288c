-- paystream schema v3: tamper evidence for the ledger.
--
-- Every ledger entry carries a SHA-256 hash chained to the previous entry of its account:
--   entry_hash = sha256(previous entry_hash of the account (32 zero bytes for the first)
--                       || int8send(account_id) || int8send(transfer_id)
--                       || int8send(delta_fen) || int8send(balance_after_fen))
-- and each account keeps the hash of its latest entry (chain_head). `paystream audit`
-- recomputes the chains, so an entry edited, inserted or removed behind the application's
-- back (append-only triggers disabled, a restored backup, a manual fix) is found.

ALTER TABLE accounts ADD COLUMN chain_head BYTEA NOT NULL DEFAULT decode(repeat('00', 32), 'hex');
ALTER TABLE ledger_entries ADD COLUMN entry_hash BYTEA;

-- Chain the entries written before this migration, account by account, in id order.
ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only;
DO $$
DECLARE
    e RECORD;
    current_account BIGINT := NULL;
    head BYTEA;
BEGIN
    FOR e IN SELECT id, account_id, transfer_id, delta_fen, balance_after_fen
             FROM ledger_entries ORDER BY account_id, id LOOP
        IF current_account IS DISTINCT FROM e.account_id THEN
            IF current_account IS NOT NULL THEN
                UPDATE accounts SET chain_head = head WHERE id = current_account;
            END IF;
            current_account := e.account_id;
            head := decode(repeat('00', 32), 'hex');
        END IF;
        head := sha256(head || int8send(e.account_id) || int8send(e.transfer_id)
                       || int8send(e.delta_fen) || int8send(e.balance_after_fen));
        UPDATE ledger_entries SET entry_hash = head WHERE id = e.id;
    END LOOP;
    IF current_account IS NOT NULL THEN
        UPDATE accounts SET chain_head = head WHERE id = current_account;
    END IF;
END
$$;
ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_append_only;

ALTER TABLE ledger_entries ALTER COLUMN entry_hash SET NOT NULL;
ALTER TABLE ledger_entries ADD CONSTRAINT entry_hash_is_sha256 CHECK (length(entry_hash) = 32);
