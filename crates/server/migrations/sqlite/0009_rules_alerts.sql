-- Health rules (crates/server/src/rules): each kept as its JSON spec; config
-- rules are re-applied at every start, API rules stay until deleted.
CREATE TABLE rules (
    name       TEXT PRIMARY KEY NOT NULL,
    spec       TEXT NOT NULL,
    source     TEXT NOT NULL,  -- config | api
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;

-- Alerts and their lifecycle: pending -> firing -> resolved.
CREATE TABLE alerts (
    id          INTEGER PRIMARY KEY,
    rule        TEXT NOT NULL,
    device      TEXT NOT NULL,
    series      TEXT NOT NULL,  -- '' for presence rules
    severity    TEXT NOT NULL,
    state       TEXT NOT NULL,  -- pending | firing | resolved
    value       REAL,
    pending_ms  INTEGER NOT NULL,
    firing_ms   INTEGER,
    resolved_ms INTEGER,
    updated_ms  INTEGER NOT NULL
);
-- At most one open alert per rule, device and series: a restart cannot
-- fire the same alert twice.
CREATE UNIQUE INDEX alerts_open ON alerts (rule, device, series) WHERE state <> 'resolved';
CREATE INDEX alerts_by_device ON alerts (device, pending_ms);
CREATE INDEX alerts_by_time ON alerts (pending_ms);
