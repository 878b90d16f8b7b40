//! The ingest role's settings, resolved and validated (by `config::cli`
//! from flags, environment and files, or built by tests).

use std::time::Duration;

use widgetry_proto::Limits;

/// Settings of the ingest role.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Broker host and port.
    pub broker_host: String,
    pub broker_port: u16,
    /// MQTT client id of the subscriber connection (`-pub` is appended for
    /// the publisher). Persistent session: a broker that keeps sessions
    /// queues messages for it while it is down.
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    /// MQTT shared-subscription group: several ingestors with the same
    /// group (and distinct client ids) split the messages between them.
    pub shared_group: Option<String>,
    /// Most items per transaction.
    pub max_batch_items: usize,
    /// How long the writer waits for more items once its queue is empty.
    /// 0 (the default) is plain group commit: a transaction takes every
    /// item already queued, and items arriving while it commits form the
    /// next one. A 20 ms window measured worse at 2,000 devices (p50 62–67
    /// vs 44 ms, p99 231–259 vs 139–160 ms; docs/BENCHMARKS.md).
    pub max_wait: Duration,
    /// Items queued between the subscriber and the writer.
    pub queue: usize,
    pub limits: Limits,
    pub retention: Retention,
}

/// How long data is kept, by resolution (`None`: forever). Raw batches
/// and events are deleted by sample time once older than `raw`; rollups
/// once older than their own period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub raw: Option<Duration>,
    pub minute: Option<Duration>,
    pub hour: Option<Duration>,
    /// Time between retention passes.
    pub every: Duration,
    /// Time between compaction passes (`store::compact`); `None`: never.
    pub compact_every: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            raw: Some(Duration::from_secs(30 * 86_400)),
            minute: Some(Duration::from_secs(90 * 86_400)),
            hour: None,
            every: Duration::from_secs(600),
            compact_every: Some(Duration::from_secs(60)),
        }
    }
}

impl IngestConfig {
    /// Defaults for a broker at `host:port`.
    pub fn new(broker_host: impl Into<String>, broker_port: u16) -> Self {
        IngestConfig {
            broker_host: broker_host.into(),
            broker_port,
            client_id: "widgetry-ingest".into(),
            credentials: None,
            shared_group: None,
            max_batch_items: 1000,
            max_wait: Duration::from_millis(0),
            queue: 4096,
            limits: Limits::default(),
            retention: Retention::default(),
        }
    }
}
