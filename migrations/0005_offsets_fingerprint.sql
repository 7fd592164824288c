-- paystream schema v5: a fingerprint of the message just before each stored offset.
-- The fingerprint of the last message applied: the one at `next_offset - 1`, written by the
-- same compare-and-set that advances `next_offset`. After claiming a partition, a worker
-- re-reads that message and compares. A topic deleted and recreated under this database
-- (or a database restored next to another cluster) holds a different message there, and
-- the worker then holds the partition instead of resuming in the middle of a foreign log.
-- NULL for rows written before this column existed, and for offsets never advanced.
ALTER TABLE consumer_offsets ADD COLUMN last_message_fp BIGINT;
