-- Retained MQTT messages of the embedded broker (rumqttd keeps them in
-- memory only), written by `serve` so that a subscriber that joins after a
-- restart still sees every device's last status.
CREATE TABLE retained (
    topic TEXT PRIMARY KEY,
    payload BYTEA NOT NULL,
    qos INTEGER NOT NULL,
    updated_ms BIGINT NOT NULL
);
