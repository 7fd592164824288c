-- paystream schema v10: which partitions each live worker holds, as it last said. The
-- development broker's group coordinator (tansu 0.6) can leave a partition assigned to no
-- member after a worker dies and comes back; a worker that finds a partition held by no live
-- worker for a session timeout rejoins the group, which makes the coordinator assign again.
CREATE TABLE consumer_members (
    consumer_group TEXT        NOT NULL,
    topic          TEXT        NOT NULL,
    owner          TEXT        NOT NULL,
    partitions     INT[]       NOT NULL,
    seen_at        TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (consumer_group, topic, owner)
);
