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
