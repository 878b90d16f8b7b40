-- Compressed per-series chunks (DESIGN.md §4 step 2; issue 14).
--
-- The compactor (store/compact.rs) moves the samples of logged batches
-- into chunks and deletes those batches in one transaction. A chunk holds
-- one series' points from start_ts to end_ts (inclusive), encoded by
-- widgetry-codec (tag byte, then pcodec columns). `id` tells apart chunks
-- of one series that end at the same time (late data).
--
-- `rolled` says which rollup tables count the chunk's points: bit 1 =
-- rollup_1m, bit 2 = rollup_1h. A fresh chunk's points are counted (the
-- ingestor rolled them up as they arrived); for a sparse series the
-- compactor deletes the rollup rows that only this chunk's points make up
-- (a per-minute row per sample costs ~50 bytes, 20 times the sample) and
-- clears the bit, and queries then aggregate the chunk's points on the fly.
-- Every sample is thus counted once: by a rollup row, or by its chunk.
--
-- A rowid table, not WITHOUT ROWID: an index b-tree keeps only ~1 KB of a
-- row in its leaf page (4 KB pages) and the rest in overflow pages, which
-- wasted ~1.9 KB per chunk (measured: 119 KB of pages for 86 KB of chunks).
CREATE TABLE chunks (
    series_id INTEGER NOT NULL,
    end_ts    INTEGER NOT NULL,
    id        INTEGER NOT NULL,
    start_ts  INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    rolled    INTEGER NOT NULL,
    data      BLOB NOT NULL
);
CREATE UNIQUE INDEX chunks_by_series ON chunks (series_id, end_ts, id);

-- Idempotence after compaction: every seq of a session at or below
-- `compacted` is stored (in the log or in chunks) or was settled by the
-- device, so a redelivery of it is a duplicate.
ALTER TABLE sessions ADD COLUMN compacted INTEGER NOT NULL DEFAULT 0;

-- Keys of compacted batches that `compacted` does not cover (seqs above
-- the session's watermark, and the content-named batches of plain JSON
-- clients), kept until raw retention passes max_ts.
CREATE TABLE batch_keys (
    device  TEXT NOT NULL,
    session BLOB NOT NULL,
    seq     INTEGER NOT NULL,
    max_ts  INTEGER NOT NULL,
    PRIMARY KEY (device, session, seq)
) WITHOUT ROWID;

-- Counters that must survive the deletion of every row that held them:
-- `commit_floor` is the highest commit id ever removed from the log
-- (compaction, retention), so commit ids never restart below it.
CREATE TABLE store_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX batch_keys_by_time ON batch_keys (max_ts);
