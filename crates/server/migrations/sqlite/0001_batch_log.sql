-- Widgetry storage, first layout (DESIGN.md §4): devices, series, and the
-- batch log. Every accepted batch is one row keyed by its idempotence key
-- (device, session, seq); its payload is the protobuf Batch with series ids
-- rewritten from session-local ids to the ids of the `series` table.

CREATE TABLE devices (
    device        TEXT PRIMARY KEY NOT NULL,
    state         TEXT NOT NULL DEFAULT 'unknown',  -- online | offline | unknown
    session       TEXT,                             -- hex session id from the last status
    agent         TEXT,
    host          TEXT,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    status_ms     INTEGER,
    rejects       INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE series (
    id     INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    key    TEXT NOT NULL,        -- canonical text form: name or name{k=v,...}
    name   TEXT NOT NULL,
    labels TEXT NOT NULL,        -- JSON object
    UNIQUE (device, key)
);

-- Session-local series ids (from SeriesDef) → series.id.
CREATE TABLE session_series (
    device    TEXT NOT NULL,
    session   BLOB NOT NULL,
    local_id  INTEGER NOT NULL,
    series_id INTEGER NOT NULL REFERENCES series (id),
    PRIMARY KEY (device, session, local_id)
) WITHOUT ROWID;

-- Acknowledgement state: every seq <= through is committed.
CREATE TABLE sessions (
    device     TEXT NOT NULL,
    session    BLOB NOT NULL,
    through    INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    PRIMARY KEY (device, session)
) WITHOUT ROWID;

CREATE TABLE batches (
    device      TEXT NOT NULL,
    session     BLOB NOT NULL,
    seq         INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    min_ts      INTEGER NOT NULL,
    max_ts      INTEGER NOT NULL,
    samples     INTEGER NOT NULL,
    payload     BLOB NOT NULL,
    PRIMARY KEY (device, session, seq)
) WITHOUT ROWID;

CREATE INDEX batches_by_time ON batches (device, max_ts);
