-- A published outbox row now leaves the outbox. The relay used to mark it (`published_at`),
-- and as that column was in index predicates the mark was never a HOT update: a whole new
-- row version (payload included) and two index entries per event, plus their vacuuming. On
-- its own table, inserting, reading and marking 500-row rounds cost PostgreSQL 21-22 us of
-- CPU per row; inserting, reading, deleting and logging 10-11 us (docs/performance.md).
--
-- Now the relay deletes what the broker acknowledged and appends a narrow record of it to
-- `outbox_published` in the same statement: which row, which event, when it was written and
-- when published. The payload lives on in the topic. The outbox holds only what is still
-- to publish, parked or discarded, so it needs no index on publication any more.

CREATE TABLE outbox_published (
    -- The outbox row's id: per topic and key, the order of publication.
    id           BIGINT      NOT NULL,
    topic        TEXT        NOT NULL,
    event_id     UUID,
    created_at   TIMESTAMPTZ NOT NULL,
    published_at TIMESTAMPTZ NOT NULL
);
-- Append-only in publication order: a block range index finds what retention removes, at
-- almost no cost per insert.
CREATE INDEX outbox_published_at_range ON outbox_published USING brin (published_at);

INSERT INTO outbox_published (id, topic, event_id, created_at, published_at)
    SELECT id, topic, event_id, created_at, published_at
    FROM outbox WHERE published_at IS NOT NULL
    ORDER BY published_at;
DELETE FROM outbox WHERE published_at IS NOT NULL;

DROP INDEX outbox_unpublished;
DROP INDEX outbox_published_at;
DROP INDEX outbox_parked;
ALTER TABLE outbox DROP COLUMN published_at;
-- Parked rows still waiting: the relay checks each row it takes against these.
CREATE INDEX outbox_parked ON outbox (topic, id)
    WHERE parked_at IS NOT NULL AND discarded_at IS NULL;
