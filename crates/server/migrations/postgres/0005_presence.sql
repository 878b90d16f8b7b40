-- The cadence learned from a device's arrivals (ms between commits that
-- carried its data), for presence from activity (crates/server/src/presence.rs).
ALTER TABLE devices ADD COLUMN interval_ms BIGINT;
