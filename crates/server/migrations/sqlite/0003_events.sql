-- App events from devices (`widgetry/v1/{device}/events`), one row per
-- event; (device, session, seq, idx) makes a redelivered message stored once.
CREATE TABLE events (
    device  TEXT NOT NULL,
    session BLOB NOT NULL,
    seq     INTEGER NOT NULL,
    idx     INTEGER NOT NULL,
    ts      INTEGER NOT NULL,
    name    TEXT NOT NULL,
    body    TEXT NOT NULL,   -- the whole event object as JSON
    PRIMARY KEY (device, session, seq, idx)
) WITHOUT ROWID;

CREATE INDEX events_by_time ON events (device, ts);
