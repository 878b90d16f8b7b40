-- MQTT accounts of devices and read-only observers, managed with
-- `widgetry device add|remove|list|rotate`. Only argon2id hashes (PHC
-- strings) are kept, never a password. `accounts_version` changes in the
-- same transaction as every change, so a running `serve` notices it with
-- one cheap read.
CREATE TABLE accounts (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('device', 'observer')),
    phc TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE accounts_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO accounts_version (id, version) VALUES (1, 0);
