-- Batches a device lost because its spool was full, as reported by the
-- device in a later batch (Batch.gaps), less any batch of the range that
-- reached the server before the device dropped it. Keyed so a redelivered
-- report is stored once.
CREATE TABLE gaps (
    device      TEXT NOT NULL,
    session     BLOB NOT NULL,
    from_seq    INTEGER NOT NULL,
    to_seq      INTEGER NOT NULL,
    batches     INTEGER NOT NULL,   -- batches of the range the server never stored
    samples     INTEGER NOT NULL,   -- samples in those batches
    from_ts     INTEGER NOT NULL,
    to_ts       INTEGER NOT NULL,
    reported_ms INTEGER NOT NULL,
    PRIMARY KEY (device, session, from_seq)
) WITHOUT ROWID;
