//! Process-wide counters, rendered as Prometheus text on `GET /metrics`.
//!
//! Counters are plain atomics: incrementing one must never block or
//! allocate on the ingest path.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use widgetry_proto::Reject;

/// Writes one counter with its help text and labelled samples.
fn write_counter(out: &mut String, name: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// Counts one more `name` in counters kept per fixed name: `counts[i]`
/// counts `names[i]` (a name not in the list is not counted).
fn bump(names: &[&str], counts: &[AtomicU64], name: &str) {
    if let Some(i) = names.iter().position(|n| *n == name) {
        counts[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// What such counters hold for `name` (0 for a name not in the list).
fn count_of(names: &[&str], counts: &[AtomicU64], name: &str) -> u64 {
    names
        .iter()
        .position(|n| *n == name)
        .map_or(0, |i| counts[i].load(Ordering::Relaxed))
}

/// Prometheus samples `{label="name"} value` of such counters, each one
/// `show` keeps.
fn labelled(
    label: &str,
    names: &[&str],
    counts: &[AtomicU64],
    show: impl Fn(&str, u64) -> bool,
) -> Vec<(String, u64)> {
    names
        .iter()
        .zip(counts)
        .map(|(n, c)| (*n, c.load(Ordering::Relaxed)))
        .filter(|(n, v)| show(n, *v))
        .map(|(n, v)| (format!("{{{label}=\"{n}\"}}"), v))
        .collect()
}

/// `labelled`'s samples as `write_counter` takes them.
fn as_samples(samples: &[(String, u64)]) -> Vec<(&str, u64)> {
    samples.iter().map(|(l, v)| (l.as_str(), *v)).collect()
}

/// Which roles a process runs: `/metrics` shows only their counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles {
    pub broker: bool,
    pub ingest: bool,
    pub web: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        broker: true,
        ingest: true,
        web: true,
    };
    pub const INGEST: Roles = Roles {
        broker: false,
        ingest: true,
        web: false,
    };
    pub const WEB: Roles = Roles {
        broker: false,
        ingest: false,
        web: true,
    };
}

/// Counters of the roles that run in this process.
#[derive(Debug, Default)]
pub struct Metrics {
    roles: Roles,
    pub messages_samples: AtomicU64,
    pub messages_samples_json: AtomicU64,
    pub messages_status: AtomicU64,
    pub messages_events: AtomicU64,
    pub events_stored: AtomicU64,
    pub events_dropped_by_devices: AtomicU64,
    pub messages_other: AtomicU64,
    pub batches_stored: AtomicU64,
    pub batches_duplicate: AtomicU64,
    pub samples_stored: AtomicU64,
    pub commits: AtomicU64,
    pub db_errors: AtomicU64,
    pub mqtt_reconnects: AtomicU64,
    pub acks_published: AtomicU64,
    pub gaps_reported: AtomicU64,
    /// The compactor's work (`store::compact`).
    pub compacted_batches: AtomicU64,
    pub compacted_samples: AtomicU64,
    pub compacted_chunks: AtomicU64,
    pub compaction_failures: AtomicU64,
    /// Milliseconds between receiving the oldest message of the last
    /// committed transaction and its commit.
    pub ingest_lag_ms: AtomicI64,
    rejects: [AtomicU64; Reject::CODES.len()],
    pub http_requests: AtomicU64,
    /// Live-feed messages published after commits, and skipped (queue full
    /// or too large; readers fetch those from the database).
    pub live_published: AtomicU64,
    pub live_skipped: AtomicU64,
    /// Websocket clients connected to `GET /api/v1/live`, and data they
    /// lost by reading too slowly.
    pub ws_clients: AtomicI64,
    pub ws_lost_commits: AtomicU64,
    /// 1 while the ingestor's subscriptions are acknowledged by the broker.
    pub ingest_subscribed: AtomicU64,
    /// Per transaction: from receiving its oldest message to starting it
    /// (queue and gathering), writing and committing it, and publishing
    /// its acks and live messages. Where publish→ack latency is spent.
    pub ingest_wait: Histogram,
    pub ingest_commit: Histogram,
    pub ingest_publish: Histogram,
    /// Actions the embedded broker's policy denied, by [`BROKER_ACTIONS`].
    broker_denied: [AtomicU64; BROKER_ACTIONS.len()],
    /// CONNECTs the embedded broker refused, by [`BROKER_REFUSALS`].
    broker_refused: [AtomicU64; BROKER_REFUSALS.len()],
    /// Messages subscribers missed because the broker's log dropped them
    /// before they read them (QoS 0 floods beyond a slow subscriber).
    pub broker_dropped: AtomicU64,
    /// The statsd listener's counters (on `/metrics` while it runs).
    pub statsd: StatsdMetrics,
    /// The Graphite export's counters (on `/metrics` while it runs).
    pub graphite: GraphiteMetrics,
    /// Health rules and alerts (on `/metrics` while the evaluator runs).
    pub alerts: AlertMetrics,
    /// HTTPS handshakes that failed (on `/metrics` when HTTPS is on).
    pub http_tls: HttpTlsMetrics,
    /// The websocket source bridges' counters (on `/metrics` while one runs).
    pub bridge: BridgeMetrics,
}

/// Why an HTTPS connection ended before its TLS handshake completed: the
/// handshake failed (plain HTTP, an untrusted certificate, garbage), or
/// the client did not finish it within the handshake timeout.
pub const TLS_HANDSHAKE_FAILURES: [&str; 2] = ["failed", "timeout"];

/// Counters of the web service's HTTPS listener.
#[derive(Debug, Default)]
pub struct HttpTlsMetrics {
    /// Set when the web service serves HTTPS; its counters are shown then.
    pub enabled: AtomicBool,
    failures: [AtomicU64; TLS_HANDSHAKE_FAILURES.len()],
}

impl HttpTlsMetrics {
    /// Counts a failed handshake under its reason ([`TLS_HANDSHAKE_FAILURES`]).
    pub fn handshake_failed(&self, reason: &str) {
        bump(&TLS_HANDSHAKE_FAILURES, &self.failures, reason);
    }

    /// Handshakes failed for `reason` so far.
    pub fn handshake_failures(&self, reason: &str) -> u64 {
        count_of(&TLS_HANDSHAKE_FAILURES, &self.failures, reason)
    }

    fn render(&self, out: &mut String) {
        let failed = labelled("reason", &TLS_HANDSHAKE_FAILURES, &self.failures, |_, _| {
            true
        });
        write_counter(
            out,
            "widgetry_web_tls_handshake_failures_total",
            "HTTPS connections closed before their TLS handshake completed, by reason.",
            &as_samples(&failed),
        );
    }
}

/// Why a websocket source bridge did not store a message (see
/// `sources::ws::Reason`, whose discriminants index this list).
pub const BRIDGE_REJECTS: [&str; 15] = [
    "binary_frame",
    "too_large",
    "truncated",
    "not_json",
    "not_an_object",
    "missing_timestamp",
    "missing_value",
    "timestamp_not_integer",
    "timestamp_in_seconds",
    "timestamp_in_milliseconds",
    "timestamp_out_of_range",
    "value_is_string",
    "value_not_a_number",
    "value_out_of_range",
    "store_rejected",
];

/// Counters of the websocket source bridges (`[[bridge.ws]]`,
/// `widgetry bridge ws`), summed over every bridge of the process.
#[derive(Debug, Default)]
pub struct BridgeMetrics {
    /// Set when a bridge starts; its counters are shown from then on.
    pub enabled: AtomicBool,
    /// Data frames (text and binary) received.
    pub messages: AtomicU64,
    /// Valid messages committed to the database as new samples: only
    /// then are they accepted.
    pub accepted: AtomicU64,
    /// Valid messages committed that were already stored (same device,
    /// series, timestamp and value): stored once.
    pub duplicates: AtomicU64,
    rejects: [AtomicU64; BRIDGE_REJECTS.len()],
    /// Connections made again after a refusal, a close, an error or a
    /// half-open socket.
    pub reconnects: AtomicU64,
    /// Connections that went quiet past the idle timeout (no frame, no pong).
    pub idle_timeouts: AtomicU64,
    /// Bridges connected to their upstream right now.
    pub connected: AtomicI64,
}

impl BridgeMetrics {
    /// Counts a message not stored, under its reason ([`BRIDGE_REJECTS`]).
    pub fn reject(&self, reason: &str) {
        bump(&BRIDGE_REJECTS, &self.rejects, reason);
    }

    /// Messages not stored for `reason` so far.
    pub fn rejects(&self, reason: &str) -> u64 {
        count_of(&BRIDGE_REJECTS, &self.rejects, reason)
    }

    fn render(&self, out: &mut String) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        write_counter(
            out,
            "widgetry_bridge_messages_total",
            "Data frames (text and binary) the websocket bridges received.",
            &[("", get(&self.messages))],
        );
        write_counter(
            out,
            "widgetry_bridge_accepted_total",
            "Valid messages committed to the database as new samples.",
            &[("", get(&self.accepted))],
        );
        write_counter(
            out,
            "widgetry_bridge_duplicates_total",
            "Valid messages committed that were already stored (stored once).",
            &[("", get(&self.duplicates))],
        );
        let rejects = labelled("reason", &BRIDGE_REJECTS, &self.rejects, |_, _| true);
        write_counter(
            out,
            "widgetry_bridge_rejects_total",
            "Messages the websocket bridges did not store, by reason.",
            &as_samples(&rejects),
        );
        write_counter(
            out,
            "widgetry_bridge_reconnects_total",
            "Connections to an upstream made again (after a refusal, close, error or idle timeout).",
            &[("", get(&self.reconnects))],
        );
        write_counter(
            out,
            "widgetry_bridge_idle_timeouts_total",
            "Upstream connections dropped because no frame or pong came within the idle timeout.",
            &[("", get(&self.idle_timeouts))],
        );
        let _ = writeln!(
            out,
            "# HELP widgetry_bridge_connected Websocket bridges connected to their upstream.\n# TYPE widgetry_bridge_connected gauge\nwidgetry_bridge_connected {}",
            self.connected.load(Ordering::Relaxed)
        );
    }
}

/// Counters of the `[graphite]` export.
#[derive(Debug, Default)]
pub struct GraphiteMetrics {
    /// Set when the export starts; its counters are shown from then on.
    pub enabled: AtomicBool,
    pub lines_sent: AtomicU64,
    /// Lines dropped, oldest first, while Carbon was away too long.
    pub dropped: AtomicU64,
    /// Failed flushes (connects, writes, confirmations).
    pub errors: AtomicU64,
    /// Lines of flushes Carbon did not confirm (held and sent again).
    pub unconfirmed: AtomicU64,
    /// Unix time (s) of the last flush Carbon confirmed; 0 before one.
    pub last_flush_s: AtomicI64,
}

impl GraphiteMetrics {
    fn render(&self, out: &mut String) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        write_counter(
            out,
            "widgetry_graphite_lines_sent_total",
            "Lines Carbon confirmed it read (each flush ends with a half-close that Carbon answers once it has read everything).",
            &[("", get(&self.lines_sent))],
        );
        write_counter(
            out,
            "widgetry_graphite_dropped_total",
            "Lines dropped, oldest first, because the buffer was full while Carbon was away.",
            &[("", get(&self.dropped))],
        );
        write_counter(
            out,
            "widgetry_graphite_errors_total",
            "Failed flushes to Carbon: connects, writes and flushes it did not confirm.",
            &[("", get(&self.errors))],
        );
        write_counter(
            out,
            "widgetry_graphite_lines_unconfirmed_total",
            "Lines of flushes Carbon did not confirm; they stay held and are sent again (a whisper file keeps one value per timestamp).",
            &[("", get(&self.unconfirmed))],
        );
        let _ = writeln!(
            out,
            "# HELP widgetry_graphite_last_flush_timestamp_seconds Unix time of the last flush Carbon confirmed.\n# TYPE widgetry_graphite_last_flush_timestamp_seconds gauge\nwidgetry_graphite_last_flush_timestamp_seconds {}",
            self.last_flush_s.load(Ordering::Relaxed)
        );
    }
}

/// Counters of the health rules (`crate::rules`).
#[derive(Debug, Default)]
pub struct AlertMetrics {
    /// Set when the evaluator starts; its counters are shown from then on.
    pub enabled: AtomicBool,
    pub fired: AtomicU64,
    pub resolved: AtomicU64,
    /// Alerts firing now.
    pub firing: AtomicI64,
    /// Committed batches the evaluator missed because it fell behind the
    /// live hub.
    pub lagged: AtomicU64,
    pub webhook_sent: AtomicU64,
    pub webhook_errors: AtomicU64,
    pub webhook_dropped: AtomicU64,
}

impl AlertMetrics {
    fn render(&self, out: &mut String) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, help, v) in [
            (
                "widgetry_alerts_fired_total",
                "Alerts that started firing.",
                &self.fired,
            ),
            (
                "widgetry_alerts_resolved_total",
                "Firing alerts that resolved.",
                &self.resolved,
            ),
            (
                "widgetry_alerts_lagged_batches_total",
                "Committed batches the rule evaluator missed because it fell behind.",
                &self.lagged,
            ),
            (
                "widgetry_alerts_webhook_sent_total",
                "Alert transitions the webhook receiver accepted (2xx).",
                &self.webhook_sent,
            ),
            (
                "widgetry_alerts_webhook_errors_total",
                "Failed webhook attempts (retried).",
                &self.webhook_errors,
            ),
            (
                "widgetry_alerts_webhook_dropped_total",
                "Alert transitions dropped: the queue was full or every attempt failed.",
                &self.webhook_dropped,
            ),
        ] {
            write_counter(out, name, help, &[("", get(v))]);
        }
        let _ = writeln!(
            out,
            "# HELP widgetry_alerts_firing Alerts firing now.\n# TYPE widgetry_alerts_firing gauge\nwidgetry_alerts_firing {}",
            self.firing.load(Ordering::Relaxed)
        );
    }
}

/// Why the statsd listener skipped a line: the parser's reasons
/// ([`widgetry_statsd::BadLine::code`], in the order of
/// [`widgetry_statsd::BadLine::ALL`]), then a `device:` tag that is not a
/// device id.
pub const STATSD_BAD_LINES: [&str; 9] = [
    "missing_colon",
    "empty_name",
    "missing_type",
    "bad_rate",
    "rate_out_of_range",
    "not_a_number",
    "not_finite",
    "unknown_type",
    "bad_device",
];

/// Counters of `serve --statsd`.
#[derive(Debug, Default)]
pub struct StatsdMetrics {
    /// Set when the listener starts; its counters are shown from then on.
    pub enabled: AtomicBool,
    pub packets: AtomicU64,
    pub lines: AtomicU64,
    /// Samples handed to the writer at flushes.
    pub samples: AtomicU64,
    bad_lines: [AtomicU64; STATSD_BAD_LINES.len()],
    /// The aggregator's drops, by [`widgetry_statsd::Dropped::ALL`]; a copy
    /// of its cumulative [`widgetry_statsd::Stats`].
    dropped: [AtomicU64; widgetry_statsd::Dropped::ALL.len()],
}

impl StatsdMetrics {
    /// Counts a skipped line under its reason ([`STATSD_BAD_LINES`]).
    pub fn bad_line(&self, reason: &str) {
        bump(&STATSD_BAD_LINES, &self.bad_lines, reason);
    }

    /// Lines skipped for `reason` so far.
    pub fn bad_lines(&self, reason: &str) -> u64 {
        count_of(&STATSD_BAD_LINES, &self.bad_lines, reason)
    }

    /// Copies the aggregator's drop counts.
    pub fn set_dropped(&self, stats: &widgetry_statsd::Stats) {
        for (slot, reason) in self.dropped.iter().zip(widgetry_statsd::Dropped::ALL) {
            slot.store(stats.dropped(reason), Ordering::Relaxed);
        }
    }

    fn render(&self, out: &mut String) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        write_counter(
            out,
            "widgetry_statsd_packets_total",
            "UDP packets received by the statsd listener.",
            &[("", get(&self.packets))],
        );
        write_counter(
            out,
            "widgetry_statsd_lines_total",
            "statsd lines received (good and bad).",
            &[("", get(&self.lines))],
        );
        write_counter(
            out,
            "widgetry_statsd_samples_total",
            "Aggregated samples handed to the ingest writer at flushes.",
            &[("", get(&self.samples))],
        );
        let bad = labelled("reason", &STATSD_BAD_LINES, &self.bad_lines, |_, _| true);
        write_counter(
            out,
            "widgetry_statsd_bad_lines_total",
            "statsd lines skipped, by reason.",
            &as_samples(&bad),
        );
        let codes = widgetry_statsd::Dropped::ALL.map(|d| d.code());
        let dropped = labelled("reason", &codes, &self.dropped, |_, _| true);
        write_counter(
            out,
            "widgetry_statsd_dropped_total",
            "statsd metrics or values the aggregator dropped (byte budget full, or not finite), by reason.",
            &as_samples(&dropped),
        );
    }
}

/// Why the embedded broker refuses a CONNECT.
pub const BROKER_REFUSALS: [&str; 4] = [
    "bad_credentials",
    "not_authorised",
    "bad_client_id",
    "server_busy",
];

/// What a client may be denied on the embedded broker.
pub const BROKER_ACTIONS: [&str; 4] = ["connect", "publish", "subscribe", "will"];

/// Upper bounds (ms) of the latency histograms' buckets.
const BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

/// A fixed-bucket latency histogram of atomics (never blocks or allocates).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Counts per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; BUCKETS_MS.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        let i = BUCKETS_MS
            .iter()
            .position(|b| ms <= *b as f64)
            .unwrap_or(BUCKETS_MS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = BUCKETS_MS
                .get(i)
                .map(|ms| format!("{}", *ms as f64 / 1000.0))
                .unwrap_or_else(|| "+Inf".into());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "{name}_sum {sum}\n{name}_count {}",
            self.count.load(Ordering::Relaxed)
        );
    }
}

impl Metrics {
    /// Counters for a process running `roles`.
    pub fn for_roles(roles: Roles) -> Self {
        Metrics {
            roles,
            ..Default::default()
        }
    }

    /// Adds a compaction pass's work.
    pub fn compacted(&self, c: &crate::store::compact::Compacted) {
        self.compacted_batches
            .fetch_add(c.batches, Ordering::Relaxed);
        self.compacted_samples
            .fetch_add(c.samples, Ordering::Relaxed);
        self.compacted_chunks.fetch_add(c.chunks, Ordering::Relaxed);
    }

    pub fn compaction_failed(&self) {
        self.compaction_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a rejected payload under its reason code.
    pub fn reject(&self, reject: &Reject) {
        bump(&Reject::CODES, &self.rejects, reject.code());
    }

    /// Counts an action the broker's policy denied (`BROKER_ACTIONS`).
    pub fn broker_denied(&self, action: &str) {
        bump(&BROKER_ACTIONS, &self.broker_denied, action);
    }

    /// Counts a refused CONNECT under its reason (`BROKER_REFUSALS`).
    pub fn broker_refused(&self, reason: &str) {
        bump(&BROKER_REFUSALS, &self.broker_refused, reason);
    }

    /// Denials of `action` counted so far.
    pub fn broker_denials(&self, action: &str) -> u64 {
        count_of(&BROKER_ACTIONS, &self.broker_denied, action)
    }

    /// Rejects counted under `code` so far.
    pub fn rejects(&self, code: &str) -> u64 {
        count_of(&Reject::CODES, &self.rejects, code)
    }

    /// Prometheus text exposition format: the counters of the roles this
    /// process runs, and no others.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        if self.roles.broker {
            self.render_broker(&mut out);
        }
        if self.roles.ingest {
            self.render_ingest(&mut out);
        }
        if self.roles.web {
            self.render_web(&mut out);
        }
        if self.statsd.enabled.load(Ordering::Relaxed) {
            self.statsd.render(&mut out);
        }
        if self.alerts.enabled.load(Ordering::Relaxed) {
            self.alerts.render(&mut out);
        }
        if self.graphite.enabled.load(Ordering::Relaxed) {
            self.graphite.render(&mut out);
        }
        if self.http_tls.enabled.load(Ordering::Relaxed) {
            self.http_tls.render(&mut out);
        }
        if self.bridge.enabled.load(Ordering::Relaxed) {
            self.bridge.render(&mut out);
        }
        out
    }

    fn render_broker(&self, out: &mut String) {
        let all = |_: &str, _: u64| true;
        write_counter(
            out,
            "widgetry_broker_denied_total",
            "Client ids, publishes, subscriptions and wills the embedded broker's access policy denied, by action.",
            &as_samples(&labelled(
                "action",
                &BROKER_ACTIONS,
                &self.broker_denied,
                all,
            )),
        );
        write_counter(
            out,
            "widgetry_broker_refused_connections_total",
            "CONNECTs the embedded broker refused (answered with a failed CONNACK), by reason.",
            &as_samples(&labelled(
                "reason",
                &BROKER_REFUSALS,
                &self.broker_refused,
                all,
            )),
        );
        write_counter(
            out,
            "widgetry_broker_dropped_messages_total",
            "Messages subscribers (the ingestor among them) missed because the embedded broker's log dropped them before they read them: a flood beyond what they keep up with ([router] max_segment_size x max_segment_count per filter).",
            &[("", self.broker_dropped.load(Ordering::Relaxed))],
        );
    }

    fn render_web(&self, out: &mut String) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
            write_counter(out, name, help, samples)
        };
        counter(
            "widgetry_web_live_lost_commits_total",
            "Committed batches websocket clients missed because they read too slowly (they were told).",
            &[("", get(&self.ws_lost_commits))],
        );
        counter(
            "widgetry_web_requests_total",
            "HTTP requests served.",
            &[("", get(&self.http_requests))],
        );
        let _ = writeln!(
            out,
            "# HELP widgetry_web_live_clients Websocket clients connected to /api/v1/live.\n# TYPE widgetry_web_live_clients gauge\nwidgetry_web_live_clients {}",
            self.ws_clients.load(Ordering::Relaxed)
        );
    }

    fn render_ingest(&self, out: &mut String) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
            write_counter(out, name, help, samples)
        };
        counter(
            "widgetry_ingest_messages_total",
            "MQTT messages received by the ingestor, by topic kind.",
            &[
                ("{kind=\"samples\"}", get(&self.messages_samples)),
                ("{kind=\"samples_json\"}", get(&self.messages_samples_json)),
                ("{kind=\"status\"}", get(&self.messages_status)),
                ("{kind=\"events\"}", get(&self.messages_events)),
                ("{kind=\"other\"}", get(&self.messages_other)),
            ],
        );
        // Plain counters without labels: name, help, value.
        let plain: [(&str, &str, &AtomicU64); 14] = [
            (
                "widgetry_ingest_batches_stored_total",
                "Batches committed to the database.",
                &self.batches_stored,
            ),
            (
                "widgetry_ingest_batches_duplicate_total",
                "Batches received again after being stored (acknowledged, not stored twice).",
                &self.batches_duplicate,
            ),
            (
                "widgetry_ingest_samples_stored_total",
                "Samples committed to the database.",
                &self.samples_stored,
            ),
            (
                "widgetry_ingest_commits_total",
                "Database transactions committed by the ingestor.",
                &self.commits,
            ),
            (
                "widgetry_ingest_db_errors_total",
                "Failed database transactions (their batches were not acknowledged).",
                &self.db_errors,
            ),
            (
                "widgetry_ingest_mqtt_reconnects_total",
                "Times the ingestor lost and re-established its broker connection.",
                &self.mqtt_reconnects,
            ),
            (
                "widgetry_ingest_acks_published_total",
                "Acknowledgements published to devices.",
                &self.acks_published,
            ),
            (
                "widgetry_ingest_gaps_reported_total",
                "Gap reports from devices (batches lost to a full device spool).",
                &self.gaps_reported,
            ),
            (
                "widgetry_compacted_batches_total",
                "Batches the compactor moved from the batch log into chunks.",
                &self.compacted_batches,
            ),
            (
                "widgetry_compacted_samples_total",
                "Samples the compactor moved from the batch log into chunks.",
                &self.compacted_samples,
            ),
            (
                "widgetry_compacted_chunks_total",
                "Compressed per-series chunks the compactor wrote.",
                &self.compacted_chunks,
            ),
            (
                "widgetry_compaction_failures_total",
                "Compaction passes that failed (retried at the next pass; nothing is lost).",
                &self.compaction_failures,
            ),
            (
                "widgetry_ingest_events_stored_total",
                "App events stored.",
                &self.events_stored,
            ),
            (
                "widgetry_ingest_events_dropped_by_devices_total",
                "App events devices reported dropping because their local queue was full.",
                &self.events_dropped_by_devices,
            ),
        ];
        for (name, help, value) in plain {
            counter(name, help, &[("", get(value))]);
        }
        // `bad_topic` cannot come from the ingestor's subscriptions (every
        // topic they match parses); it is shown only if it ever happens.
        let rejects = labelled("reason", &Reject::CODES, &self.rejects, |code, v| {
            v > 0 || code != "bad_topic"
        });
        counter(
            "widgetry_ingest_rejects_total",
            "Payloads rejected by the ingestor, by reason.",
            &as_samples(&rejects),
        );
        counter(
            "widgetry_ingest_live_published_total",
            "Live-feed messages (…/live) published after commits.",
            &[("", get(&self.live_published))],
        );
        counter(
            "widgetry_ingest_live_skipped_total",
            "Live-feed messages skipped (publisher queue full or message too large); readers fetch them from the database.",
            &[("", get(&self.live_skipped))],
        );
        let _ = writeln!(
            out,
            "# HELP widgetry_ingest_subscribed 1 while the ingestor is connected and subscribed to the broker.\n# TYPE widgetry_ingest_subscribed gauge\nwidgetry_ingest_subscribed {}",
            get(&self.ingest_subscribed)
        );
        let _ = writeln!(
            out,
            "# HELP widgetry_ingest_lag_seconds Receive-to-commit time of the oldest message in the last commit.\n# TYPE widgetry_ingest_lag_seconds gauge\nwidgetry_ingest_lag_seconds {}",
            self.ingest_lag_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        self.ingest_wait.render(
            out,
            "widgetry_ingest_wait_seconds",
            "Per transaction: from receiving its oldest message to starting the transaction.",
        );
        self.ingest_commit.render(
            out,
            "widgetry_ingest_commit_seconds",
            "Per transaction: writing and committing it.",
        );
        self.ingest_publish.render(
            out,
            "widgetry_ingest_publish_seconds",
            "Per transaction: publishing its acks, live messages and error reports after the commit.",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rejects_by_reason() {
        let m = Metrics::for_roles(Roles::ALL);
        let bad = Reject::Json("x".into());
        m.reject(&bad);
        m.reject(&bad);
        let text = m.render();
        assert!(
            text.contains("widgetry_ingest_rejects_total{reason=\"bad_json\"} 2"),
            "{text}"
        );
        assert!(!text.contains("bad_topic"), "{text}");
        m.reject(&Reject::Topic("t".into()));
        assert!(m.render().contains("{reason=\"bad_topic\"} 1"));
        assert_eq!(m.rejects("bad_json"), 2);
    }

    #[test]
    fn a_role_shows_only_its_own_counters() {
        let web = Metrics::for_roles(Roles::WEB).render();
        assert!(web.contains("widgetry_web_requests_total"), "{web}");
        assert!(!web.contains("widgetry_ingest_"), "{web}");
        let ingest = Metrics::for_roles(Roles::INGEST).render();
        assert!(ingest.contains("widgetry_ingest_samples_stored_total"));
        assert!(!ingest.contains("widgetry_web_"), "{ingest}");
    }

    #[test]
    fn bridge_counters_show_only_when_a_bridge_runs() {
        let m = Metrics::for_roles(Roles::ALL);
        assert!(!m.render().contains("widgetry_bridge_"), "off by default");
        m.bridge.enabled.store(true, Ordering::Relaxed);
        m.bridge.reject("truncated");
        m.bridge.reject("truncated");
        m.bridge.reject("not_a_reason");
        m.bridge.reconnects.fetch_add(3, Ordering::Relaxed);
        m.bridge.connected.fetch_add(1, Ordering::Relaxed);
        assert_eq!(m.bridge.rejects("truncated"), 2);
        let text = m.render();
        for line in [
            "widgetry_bridge_rejects_total{reason=\"truncated\"} 2",
            "widgetry_bridge_rejects_total{reason=\"too_large\"} 0",
            "widgetry_bridge_reconnects_total 3",
            "widgetry_bridge_connected 1",
            "widgetry_bridge_accepted_total 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains("not_a_reason"));
    }

    #[test]
    fn statsd_reasons_follow_the_parser_and_show_only_when_on() {
        let parser: Vec<&str> = widgetry_statsd::BadLine::ALL.map(|b| b.code()).to_vec();
        assert_eq!(&STATSD_BAD_LINES[..parser.len()], &parser[..]);
        let m = Metrics::for_roles(Roles::ALL);
        assert!(!m.render().contains("widgetry_statsd_"), "off by default");
        m.statsd.enabled.store(true, Ordering::Relaxed);
        m.statsd.bad_line("bad_device");
        m.statsd.bad_line("not_a_number");
        m.statsd.bad_line("not_a_number");
        assert_eq!(m.statsd.bad_lines("not_a_number"), 2);
        let text = m.render();
        for line in [
            "widgetry_statsd_bad_lines_total{reason=\"bad_device\"} 1",
            "widgetry_statsd_bad_lines_total{reason=\"not_a_number\"} 2",
            "widgetry_statsd_dropped_total{reason=\"budget_metric\"} 0",
            "widgetry_statsd_packets_total 0",
        ] {
            assert!(text.contains(line), "missing {line}: {text}");
        }
    }

    #[test]
    fn histograms_render_cumulative_buckets() {
        let m = Metrics::for_roles(Roles::ALL);
        for ms in [0, 3, 3, 70, 9000] {
            m.ingest_commit
                .observe(std::time::Duration::from_millis(ms));
        }
        let text = m.render();
        for line in [
            "widgetry_ingest_commit_seconds_bucket{le=\"0.001\"} 1",
            "widgetry_ingest_commit_seconds_bucket{le=\"0.005\"} 3",
            "widgetry_ingest_commit_seconds_bucket{le=\"0.1\"} 4",
            "widgetry_ingest_commit_seconds_bucket{le=\"5\"} 4",
            "widgetry_ingest_commit_seconds_bucket{le=\"+Inf\"} 5",
            "widgetry_ingest_commit_seconds_sum 9.076",
            "widgetry_ingest_commit_seconds_count 5",
        ] {
            assert!(text.contains(line), "missing {line}: {text}");
        }
    }
}
