-- Commit ids and rollups (DESIGN.md §4, §5).
--
-- commit_id numbers stored batches in commit order: the ingestor assigns
-- MAX(commit_id)+1, +2, ... inside its write transaction, so ids are unique
-- and contiguous even with several ingestors writing one database, and a
-- reader that has seen every id up to N has seen every batch committed up
-- to N. The live websocket bridge uses it as its resume cursor (`since`).
-- Batches stored before this migration keep a NULL id.
ALTER TABLE batches ADD COLUMN commit_id INTEGER;
CREATE UNIQUE INDEX batches_by_commit ON batches (commit_id);

-- Per-minute and per-hour summaries of every series, maintained by the
-- ingestor in the same transaction as the batches they summarise (so they
-- count each stored sample exactly once). `bucket` is the start of the
-- minute/hour in ms since the epoch; `last` is the value at `last_ts`, the
-- newest sample of the bucket. Long ranges are read from here.
CREATE TABLE rollup_1m (
    series_id INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    sum       REAL NOT NULL,
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    last_ts   INTEGER NOT NULL,
    last      REAL NOT NULL,
    PRIMARY KEY (series_id, bucket)
) WITHOUT ROWID;

CREATE TABLE rollup_1h (
    series_id INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    sum       REAL NOT NULL,
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    last_ts   INTEGER NOT NULL,
    last      REAL NOT NULL,
    PRIMARY KEY (series_id, bucket)
) WITHOUT ROWID;
