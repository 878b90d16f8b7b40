-- Compressed per-series chunks: the same tables and meaning as
-- migrations/sqlite/0010_chunks.sql (see the comments there).
CREATE TABLE chunks (
    series_id BIGINT NOT NULL,
    end_ts    BIGINT NOT NULL,
    id        BIGINT NOT NULL,
    start_ts  BIGINT NOT NULL,
    count     BIGINT NOT NULL,
    rolled    BIGINT NOT NULL,
    data      BYTEA NOT NULL,
    PRIMARY KEY (series_id, end_ts, id)
);

ALTER TABLE sessions ADD COLUMN compacted BIGINT NOT NULL DEFAULT 0;

CREATE TABLE batch_keys (
    device  TEXT NOT NULL,
    session BYTEA NOT NULL,
    seq     BIGINT NOT NULL,
    max_ts  BIGINT NOT NULL,
    PRIMARY KEY (device, session, seq)
);

CREATE TABLE store_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value BIGINT NOT NULL
);

CREATE INDEX batch_keys_by_time ON batch_keys (max_ts);
