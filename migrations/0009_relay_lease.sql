-- paystream schema v9: the relay's lease. One relay publishes at a time: the one named here,
-- until `expires_at`, which it pushes forward every round. A relay takes a free or lapsed
-- lease by raising the epoch; its marks are written only while it still holds the lease at
-- the epoch its round began with, so a relay that froze and came back cannot mark anything.
-- This replaces an advisory lock held in a transaction across the broker's acknowledgements.
CREATE TABLE relay_lease (
    id         INT         PRIMARY KEY CHECK (id = 1),
    owner      TEXT        NOT NULL,
    epoch      BIGINT      NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
INSERT INTO relay_lease (id, owner, epoch, expires_at) VALUES (1, '', 0, '-infinity');
