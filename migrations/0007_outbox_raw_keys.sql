-- paystream schema v7: outbox keys that are not UTF-8 are kept as bytes. A dead letter keeps
-- its original message's key exactly (a replay then lands on the partition the original
-- did), and its header values too: headers stay JSONB, a value that is not UTF-8 is stored
-- as {"hex": "..."}. A UTF-8 key stays in `message_key`, readable; at most one of the two
-- is set. Adding a nullable column is instant: the table is not rewritten.
ALTER TABLE outbox ADD COLUMN message_key_raw BYTEA;
