-- A balance update rewrites the account's row. With the pages packed full (the default
-- fillfactor 100) the new version lands on another page, so every update also adds an
-- entry to each of the table's indexes and leaves them to vacuum: in the bench, 80 % of
-- the account updates were such non-HOT updates. Leaving a fifth of each page free keeps
-- an update on its page (a HOT update: no index entries), and the page's dead versions
-- are pruned in place. Applies to pages written from now on; `VACUUM FULL accounts`
-- repacks an existing table.
ALTER TABLE accounts SET (fillfactor = 80);
