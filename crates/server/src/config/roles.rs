//! Validated settings of the `serve` and `web` roles (the ingest role's
//! are in `config::ingest`).

use std::net::SocketAddr;
use std::time::Duration;

use super::http_tls::HttpTls;
use super::ingest::Retention;
use super::{BrokerConfig, Database};

/// Configuration of `widgetry serve`, already validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub broker: BrokerConfig,
    pub http_listen: SocketAddr,
    /// HTTPS (`--http-tls-cert`/`--http-tls-key`); None: plain HTTP.
    pub http_tls: Option<HttpTls>,
    pub database: Database,
    pub retention: Retention,
    /// Bounds on what one message may hold.
    pub limits: widgetry_proto::Limits,
    /// Password of the broker's `widgetry-server` account; None: random.
    pub server_password: Option<String>,
    /// Whether MQTT clients must log in with an account.
    pub auth: AuthMode,
    /// When set, the HTTP API and /metrics require it.
    pub api_token: Option<String>,
    /// The statsd listener (`--statsd`); None: off.
    pub statsd: Option<StatsdConfig>,
    /// The Graphite export (`[graphite]`); None: off.
    pub graphite: Option<GraphiteConfig>,
    /// Websocket source bridges (`[[bridge.ws]]`).
    pub ws_bridges: Vec<WsBridgeConfig>,
    /// `[[rules]]` and `[alerts]`.
    pub alerting: AlertingConfig,
    /// `[presence]`.
    pub presence: crate::presence::PresenceConfig,
}

/// Configuration of `widgetry web`, already validated.
#[derive(Debug, Clone)]
pub struct WebConfig {
    pub http_listen: SocketAddr,
    /// HTTPS (`--http-tls-cert`/`--http-tls-key`); None: plain HTTP.
    pub http_tls: Option<HttpTls>,
    pub database: Database,
    /// Where the live bridge gets its messages.
    pub bridge: BridgeConfig,
    /// When set, the HTTP API and /metrics require it.
    pub api_token: Option<String>,
    /// `[[rules]]` and `[alerts]`.
    pub alerting: AlertingConfig,
    /// `[presence]`.
    pub presence: crate::presence::PresenceConfig,
}

/// `[[rules]]` and `[alerts]` of `widgetry.toml`, validated.
#[derive(Debug, Clone, Default)]
pub struct AlertingConfig {
    /// The config file's rules (each validates).
    pub rules: Vec<crate::rules::RuleSpec>,
    pub webhook: Option<crate::rules::webhook::WebhookUrl>,
}

/// `[graphite]`: committed samples forwarded to Carbon's plaintext
/// protocol, in commit order, from a cursor kept in the database.
#[derive(Debug, Clone)]
pub struct GraphiteConfig {
    /// Carbon's plaintext listener.
    pub host: String,
    pub port: u16,
    /// Path template with `{device}` and `{series}`.
    pub prefix: String,
    pub flush: Duration,
    pub max_buffered_lines: usize,
    /// Which series are exported (all when empty).
    pub filter: SeriesFilter,
}

/// A sink's `filter`: series whose device and name match one of its
/// patterns. A pattern is `DEVICE_GLOB` (every series of matching devices)
/// or `DEVICE_GLOB/SERIES_GLOB` (series by name, labels ignored), with `*`
/// and `?` as in a shell. No patterns: every series.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeriesFilter {
    patterns: Vec<(String, Option<String>)>,
}

impl SeriesFilter {
    /// Most patterns in one filter.
    pub const MAX_PATTERNS: usize = 1000;
    /// Longest pattern, in bytes.
    pub const MAX_PATTERN_BYTES: usize = 256;

    /// Parses `patterns`; an error names the first bad one.
    pub fn parse(patterns: &[String]) -> Result<SeriesFilter, String> {
        if patterns.len() > Self::MAX_PATTERNS {
            return Err(format!(
                "{} patterns: at most {} are allowed",
                patterns.len(),
                Self::MAX_PATTERNS
            ));
        }
        let mut out = Vec::with_capacity(patterns.len());
        for p in patterns {
            if p.is_empty() || p.len() > Self::MAX_PATTERN_BYTES {
                return Err(format!(
                    "{p:?}: a pattern has 1 to {} bytes",
                    Self::MAX_PATTERN_BYTES
                ));
            }
            if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("{p:?}: no spaces or control characters"));
            }
            out.push(match p.split_once('/') {
                Some((d, s)) if !d.is_empty() && !s.is_empty() && !s.contains('/') => {
                    (d.to_string(), Some(s.to_string()))
                }
                Some(_) => {
                    return Err(format!(
                        "{p:?}: use DEVICE_GLOB or DEVICE_GLOB/SERIES_GLOB, e.g. \"line-1-*\" or \"*/cpu.*\""
                    ));
                }
                None => (p.clone(), None),
            });
        }
        Ok(SeriesFilter { patterns: out })
    }

    /// Whether the series `key` (its text form, `name{k=v}`) of `device`
    /// passes.
    pub fn admits(&self, device: &str, key: &str) -> bool {
        if self.patterns.is_empty() {
            return true;
        }
        let name = key.split_once('{').map_or(key, |(n, _)| n);
        self.patterns.iter().any(|(d, s)| {
            widgetry_common::glob::matches(d, device)
                && s.as_ref()
                    .is_none_or(|s| widgetry_common::glob::matches(s, name))
        })
    }
}

impl GraphiteConfig {
    /// The default path template.
    pub const DEFAULT_PREFIX: &str = "widgetry.{device}.{series}";
    /// The default bound on lines held while Carbon is away.
    pub const DEFAULT_MAX_BUFFERED_LINES: usize = 100_000;
}

/// `serve --statsd`: a UDP listener whose statsd/DogStatsD lines are
/// aggregated per flush interval and stored as samples of a device.
#[derive(Debug, Clone)]
pub struct StatsdConfig {
    /// UDP address to receive packets on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Aggregation interval: one sample per aggregate per interval.
    pub flush: Duration,
    /// Device the samples are stored under, unless a `device:NAME` tag
    /// names another.
    pub device: String,
    /// Timer percentiles stored as `x.pNN`.
    pub percentiles: Vec<widgetry_statsd::Percentile>,
}

/// `serve --auth`: whether MQTT clients must log in with an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AuthMode {
    /// Required when a listener is not loopback-only or any account
    /// exists (in broker.toml or made with `widgetry device add`); off
    /// otherwise.
    #[default]
    Auto,
    /// Every client logs in with an account; anonymous ones are refused.
    Required,
    /// Anyone may connect (a username is not checked); only the server's
    /// own topics stay protected.
    Off,
}

/// Where the bridge gets its live messages.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Broker to subscribe to; `None` polls the database only.
    pub broker: Option<(String, u16)>,
    pub credentials: Option<(String, String)>,
    /// How often the database is checked for batches the broker did not
    /// bring (lost live messages, or no broker).
    pub poll: Duration,
}

/// How an upstream's `timestamp` field counts time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TimestampUnit {
    /// Milliseconds since the Unix epoch (the protocol's unit); a value
    /// that reads as seconds is rejected, not guessed.
    #[default]
    Ms,
    /// Seconds since the Unix epoch; a value that reads as milliseconds is
    /// rejected.
    S,
}

/// One websocket source bridge (`widgetry bridge ws`, or a `[[bridge.ws]]`
/// section run inside `serve`): an upstream sending
/// `{"timestamp": <ms>, "value": <number>}` text frames, stored as one
/// series of one device.
#[derive(Debug, Clone)]
pub struct WsBridgeConfig {
    /// `ws://host[:port]/path` of the upstream.
    pub url: String,
    /// Device the samples are stored under.
    pub device: String,
    /// Series the samples are stored as (default `value`).
    pub series: widgetry_proto::SeriesKey,
    /// No frame (data, pong or other) for this long means the connection
    /// is half-open: it is dropped and made again. Pings go out every
    /// third of it.
    pub idle_timeout: Duration,
    pub timestamp_unit: TimestampUnit,
    /// Largest websocket message (and frame) accepted; a bigger one is
    /// counted as `too_large` and the connection is made again.
    pub max_message_bytes: usize,
    /// Longest wait between reconnect attempts.
    pub reconnect_cap: Duration,
}

impl WsBridgeConfig {
    pub const DEFAULT_SERIES: &str = "value";
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
    pub const DEFAULT_RECONNECT_CAP: Duration = Duration::from_secs(10);
}
