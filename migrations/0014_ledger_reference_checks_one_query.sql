-- The reference checks of 0011, with one query each where every reference holds. Each
-- query of a PL/pgSQL trigger is its own executor run, and the entries' check made four of
-- them per statement (two arrays, two counts): about 0.2 ms of each batch's ledger write
-- at 1,000 events/s, when a batch holds a few debits (docs/performance.md, section 4).
-- The checks still probe the primary keys with the distinct ids of the statement's rows
-- (an index scan whatever the table sizes); the ids are gathered again only to say which.

CREATE OR REPLACE FUNCTION paystream_transfers_reference_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (WITH r AS MATERIALIZED (
            SELECT ARRAY(SELECT DISTINCT x FROM inserted, LATERAL (VALUES (from_account_id), (to_account_id)) v(x)) AS ids)
        SELECT (SELECT count(*) FROM accounts WHERE id = ANY((SELECT ids FROM r)::bigint[]))
               <> (SELECT cardinality(ids) FROM r)) THEN
        RAISE EXCEPTION 'a transfer refers to an account that does not exist (one of %)',
            ARRAY(SELECT DISTINCT x FROM inserted, LATERAL (VALUES (from_account_id), (to_account_id)) v(x))
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION paystream_entries_reference_transfers_and_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT count(*) FROM transfers WHERE id = ANY(ARRAY(SELECT DISTINCT transfer_id FROM inserted)))
           <> (SELECT count(DISTINCT transfer_id) FROM inserted)
       OR (SELECT count(*) FROM accounts WHERE id = ANY(ARRAY(SELECT DISTINCT account_id FROM inserted)))
           <> (SELECT count(DISTINCT account_id) FROM inserted) THEN
        IF (SELECT count(*) FROM transfers WHERE id = ANY(ARRAY(SELECT DISTINCT transfer_id FROM inserted)))
               <> (SELECT count(DISTINCT transfer_id) FROM inserted) THEN
            RAISE EXCEPTION 'a ledger entry refers to a transfer that does not exist (one of %)',
                ARRAY(SELECT DISTINCT transfer_id FROM inserted)
                USING ERRCODE = 'foreign_key_violation';
        END IF;
        RAISE EXCEPTION 'a ledger entry refers to an account that does not exist (one of %)',
            ARRAY(SELECT DISTINCT account_id FROM inserted)
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END;
$$;
