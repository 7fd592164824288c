-- no-transaction
-- paystream schema v6: processed event ids are kept for `processor.dedupe_retention_hours`,
-- then pruned by the workers of their consumer group. This index finds a group's oldest rows
-- without scanning the table. Built CONCURRENTLY (hence no transaction, and a single
-- statement), so that upgrading a live deployment with a large table does not block the
-- processors' inserts meanwhile. No IF NOT EXISTS on purpose: an interrupted build leaves an
-- INVALID index of this name, and the next `migrate` must fail on it (drop it, then migrate
-- again) rather than record the migration as applied over a useless index.
CREATE INDEX CONCURRENTLY processed_events_by_age
    ON processed_events (consumer_group, processed_at);
