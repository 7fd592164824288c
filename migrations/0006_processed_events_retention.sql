-- no-transaction
-- paystream schema v6: processed event ids are kept for `processor.dedupe_retention_hours`,
-- then pruned by the workers of their consumer group. This index finds a group's oldest rows
-- without scanning the table. Built CONCURRENTLY (hence no transaction), so that upgrading a
-- live deployment with a large table does not block the processors' inserts meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS processed_events_by_age
    ON processed_events (consumer_group, processed_at);
