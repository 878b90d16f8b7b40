//! The command line: clap definitions of every command and the
//! resolution of flags, environment variables and files into validated
//! role configurations. Every problem is collected and reported at once,
//! with its source and key, before anything binds (exit 64).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::ingest::IngestConfig;
use super::roles::{
    BridgeConfig, GraphiteConfig, SeriesFilter, ServeConfig, StatsdConfig, TimestampUnit,
    WebConfig, WsBridgeConfig,
};
use super::{ConfigError, DEFAULT_DATABASE, DEFAULT_HTTP_LISTEN, Database, FileConfig, Problem};

/// Exit status for bad configuration (EX_CONFIG is 78; DESIGN.md §6.7 fixes 64, EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "widgetry",
    version,
    about = "Widgetry telemetry server: embedded MQTT broker, ingestor (MQTT -> SQLite) and web dashboard"
)]
pub struct Cli {
    /// Log output format.
    #[arg(
        long,
        global = true,
        env = "WIDGETRY_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the embedded broker, the ingestor and the web service in one process.
    Serve(ServeArgs),
    /// Run the ingestor alone against an MQTT broker (embedded or external).
    Ingest(IngestArgs),
    /// Run the web service alone against a database.
    Web(WebArgs),
    /// Validate the `serve` configuration and exit: 0 when valid, 64 otherwise.
    CheckConfig(ServeArgs),
    /// Simulate devices publishing batches to a broker and report what the server committed.
    Loadgen(LoadgenArgs),
    /// Manage the MQTT accounts of devices and read-only observers (argon2id hashes in the database).
    Device(DeviceArgs),
    /// Load a CSV file of `timestamp,value` rows as one series of a device.
    Import(ImportArgs),
    /// Move the batch log's closed hours into compressed chunks now (the server does it every minute).
    Compact(CompactArgs),
    /// Take in an upstream feed as samples of a device (a source role of its own).
    #[command(subcommand)]
    Bridge(BridgeCmd),
    /// Run the statsd listener alone, storing its aggregates in the database (to scale out statsd).
    Statsd(StatsdRoleArgs),
}

/// `widgetry statsd`: see `crate::sources::statsd`.
#[derive(Args)]
#[command(
    after_help = "The same listener as `serve --statsd`: counters (with @rate), gauges (with +/-), \
timers, histograms and distributions (count, sum, min, max, mean, percentiles), sets, DogStatsD \
|#tags as labels and a device:NAME tag for the device, several lines per packet. Packets are \
received and parsed on a thread of their own; what it holds between flushes stays within a 1 MiB \
budget, and the interval in progress is stored on SIGTERM. Several `widgetry statsd` processes \
may write to one PostgreSQL database; web roles show their samples from it."
)]
pub struct StatsdRoleArgs {
    /// Optional widgetry.toml: its [statsd] section (listen, flush_interval, device, percentiles) and database.
    #[arg(long, env = "WIDGETRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// UDP address to receive statsd/DogStatsD lines on (port 0 picks a free port) [default: 0.0.0.0:8125].
    #[arg(long, env = "WIDGETRY_STATSD")]
    pub listen: Option<String>,
    /// Aggregation interval: one sample per aggregate per interval, e.g. 10s, 500ms [default: 10s].
    #[arg(long, env = "WIDGETRY_STATSD_FLUSH")]
    pub flush: Option<String>,
    /// Device id the samples are stored under; a `device:NAME` tag overrides it per metric [default: statsd].
    #[arg(long, env = "WIDGETRY_STATSD_DEVICE")]
    pub device: Option<String>,
    /// Timer percentiles stored as `x.pNN`, comma-separated, e.g. 50,90,99.9 [default: 50,90,99].
    #[arg(long, env = "WIDGETRY_STATSD_PERCENTILES")]
    pub percentiles: Option<String>,
    /// SQLite database file (created if missing) or postgres://user:password@host:port/db [default: widgetry.db].
    #[arg(long, env = "WIDGETRY_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// Serve the listener's counters as Prometheus text on GET /metrics at this address (port 0 picks one) [default: off].
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Validate the flags and the file, print the settings and exit without binding.
    #[arg(long)]
    pub check: bool,
}

/// The validated settings of `widgetry statsd`.
#[derive(Debug, Clone)]
pub struct StatsdRole {
    pub statsd: StatsdConfig,
    pub database: Database,
    pub metrics_listen: Option<SocketAddr>,
}

/// Validates `widgetry statsd`'s flags and file.
pub fn resolve_statsd_role(args: &StatsdRoleArgs) -> Result<StatsdRole, ConfigError> {
    let file = load_file(&args.config)?;
    let label = file_label(&args.config);
    let mut problems = Vec::new();
    let flags = StatsdArgs {
        listen: args.listen.clone(),
        flush: args.flush.clone(),
        device: args.device.clone(),
        percentiles: args.percentiles.clone(),
    };
    let statsd = resolve_statsd(
        StatsdInput {
            flags: &flags,
            keys: ["listen", "flush", "device", "percentiles"],
            default_listen: Some("0.0.0.0:8125"),
        },
        file.statsd.as_ref(),
        &label,
        &mut problems,
    );
    let database = resolve_database(&args.database, &file, &label, &mut problems);
    let metrics_listen = args.metrics_listen.as_ref().and_then(|t| {
        super::parse_addr(t, FLAG, "metrics-listen", true)
            .map_err(|p| problems.push(p))
            .ok()
    });
    match (statsd, database) {
        (Some(statsd), Some(database)) if problems.is_empty() => Ok(StatsdRole {
            statsd,
            database,
            metrics_listen,
        }),
        _ => Err(ConfigError(problems)),
    }
}

#[derive(Subcommand)]
pub enum BridgeCmd {
    /// Store the `{"timestamp": <ms>, "value": <number>}` text frames of a websocket upstream as one series of a device.
    Ws(BridgeWsArgs),
}

/// `widgetry bridge ws`: see `crate::sources::ws`.
#[derive(Args)]
#[command(
    after_help = "Each valid message is committed to the database before it counts as \
accepted (widgetry_bridge_accepted_total), so a crash (kill -9) loses no accepted message, \
and SIGTERM stores every message read before it. An exact duplicate (same timestamp and \
value), also one resent after a restart, is stored once. Invalid messages are counted by \
reason (widgetry_bridge_rejects_total) and logged once per reason per 10 s. The connection \
is made again, with jittered backoff, after a refusal, a close, an error or --idle-timeout \
without any frame (pings go out every third of it). The same bridge runs inside `serve` \
from a [[bridge.ws]] section of widgetry.toml (keys url, device, series, idle_timeout, \
timestamp_unit, max_message_bytes, reconnect_max)."
)]
pub struct BridgeWsArgs {
    /// Upstream URL, ws://host[:port]/path.
    #[arg(long)]
    pub url: String,
    /// Device id to store the samples under ([A-Za-z0-9_.-], 1-64 characters).
    #[arg(long)]
    pub device: String,
    /// Series, `name` or `name{key=value,...}`.
    #[arg(long, default_value = "value")]
    pub series: String,
    /// Reconnect when no frame (data or pong) arrives for this long, e.g. 30s, 500ms.
    #[arg(long, default_value = "30s")]
    pub idle_timeout: String,
    /// What the upstream's `timestamp` counts; a value that reads as the other unit is rejected.
    #[arg(long, value_enum, default_value = "ms")]
    pub timestamp_unit: super::roles::TimestampUnit,
    /// Largest websocket message accepted, in bytes; a bigger one is counted as too_large.
    #[arg(long, default_value_t = super::roles::WsBridgeConfig::DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Longest wait between reconnect attempts, e.g. 10s.
    #[arg(long, default_value = "10s")]
    pub reconnect_max: String,
    /// SQLite database file (created if missing) or postgres://user:password@host:port/db [default: widgetry.db].
    #[arg(long, env = "WIDGETRY_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// Serve the bridge's counters as Prometheus text on GET /metrics at this address (port 0 picks one) [default: off].
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Validate the flags, print them and exit without connecting.
    #[arg(long)]
    pub check: bool,
}

#[derive(Args)]
pub struct DeviceArgs {
    #[command(subcommand)]
    pub action: DeviceAction,
    /// Optional widgetry.toml (key database).
    #[arg(long, env = "WIDGETRY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// SQLite database file (created if missing) or postgres://user:password@host:port/db [default: widgetry.db].
    #[arg(long, env = "WIDGETRY_DATABASE", hide_env_values = true, global = true)]
    pub database: Option<String>,
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum DeviceAction {
    /// Add an account and print its new password on stdout, once (only its hash is kept).
    Add {
        /// The device id (the account's username), e.g. kiosk-1.
        id: String,
        /// A read-only observer account (subscribes to everything, publishes nothing) instead of a device.
        #[arg(long)]
        observer: bool,
        /// Read the password from the first line of stdin instead of generating one.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Give an account a new password (printed on stdout, once); the old one stops working within a second.
    Rotate {
        id: String,
        /// Read the new password from the first line of stdin instead of generating one.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove an account: it cannot log in again (open connections stay until they end).
    Remove { id: String },
    /// List the accounts (name, kind, created, password last changed).
    List,
}

/// `widgetry import`: see `crate::import`.
#[derive(Args)]
#[command(
    after_help = "Rows are `timestamp,value`: the timestamp in epoch milliseconds or ISO 8601 \
(`2014-04-01 00:00:00`, UTC unless it carries Z or an offset); a first line such as \
`timestamp,value` is a header. Importing the same file into the same device and series \
again stores nothing twice (its batches are named by the file's content). Any bad row is \
reported with its line number and, without --skip-bad-rows, nothing is imported and the \
exit status is 1. Progress goes to stderr, the summary to stdout."
)]
pub struct ImportArgs {
    /// The CSV file.
    pub file: PathBuf,
    /// Device id to store the series under ([A-Za-z0-9_.-], 1-64 characters).
    #[arg(long)]
    pub device: String,
    /// Series, `name` or `name{key=value,...}`, e.g. machine_temperature.
    #[arg(long)]
    pub series: String,
    /// SQLite database file (created if missing) or postgres://user:password@host:port/db [default: widgetry.db].
    #[arg(long, env = "WIDGETRY_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// Import the good rows of a file that has bad ones (still listed and counted).
    #[arg(long)]
    pub skip_bad_rows: bool,
}

/// `widgetry compact`: see `crate::store::compact`.
#[derive(Args)]
#[command(
    after_help = "Safe beside a running server: each step is one transaction that moves \
batches into chunks and deletes them, so it can be stopped or killed at any moment. \
Progress goes to stderr, the summary to stdout."
)]
pub struct CompactArgs {
    /// SQLite database file or postgres://user:password@host:port/db [default: widgetry.db].
    #[arg(long, env = "WIDGETRY_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// Compact the current hour too (everything but the newest batch), not only closed hours.
    #[arg(long)]
    pub everything: bool,
}

#[derive(Args)]
pub struct LoadgenArgs {
    /// MQTT broker, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub broker: String,
    /// Web service base URL (e.g. http://127.0.0.1:8080) to read samples back and count duplicates.
    #[arg(long)]
    pub http: Option<String>,
    /// Simulated devices (one MQTT connection each).
    #[arg(long, default_value_t = 2000)]
    pub devices: usize,
    /// Batches per second per device, e.g. 1/s, 10/s or 0.5.
    #[arg(long, default_value = "1/s")]
    pub rate: String,
    /// Samples per batch (spread over up to 10 series per device).
    #[arg(long, default_value_t = 10)]
    pub samples_per_batch: usize,
    /// How long to publish, e.g. 60s, 10m.
    #[arg(long, default_value = "60s")]
    pub duration: String,
    /// MQTT QoS of the publishes (0 or 1).
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// Resend a batch not acknowledged within this many seconds.
    #[arg(long, default_value_t = 5.0)]
    pub ack_timeout: f64,
    /// Seconds to wait for outstanding acknowledgements after the run.
    #[arg(long, default_value_t = 30.0)]
    pub grace: f64,
    /// Device id prefix.
    #[arg(long, default_value = "load-")]
    pub prefix: String,
    /// Pid of the server (and embedded broker) process, to report its RSS and CPU.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Leave batches created in this first part of the run out of the latency figures, e.g. 10s.
    #[arg(long, default_value = "0s")]
    pub warmup: String,
    /// Also run this many concurrent API clients against --http while devices publish
    /// (3 of 4 loop over devices, fleet and series queries; 1 of 4 follow the live websocket).
    #[arg(long, default_value_t = 0)]
    pub api_clients: usize,
    /// Start a burst this long into the run (e.g. 20s): every device publishes
    /// --burst-factor times faster for --burst-for.
    #[arg(long)]
    pub burst_at: Option<String>,
    /// Length of the burst.
    #[arg(long, default_value = "5s")]
    pub burst_for: String,
    /// Rate multiplier during the burst.
    #[arg(long, default_value_t = 10.0)]
    pub burst_factor: f64,
    /// Validate the flags and configuration, print them and exit without connecting.
    #[arg(long)]
    pub check: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Optional widgetry.toml with keys mqtt_listen, mqtt5_listen, http_listen, http_tls_cert, http_tls_key, database, broker_config.
    #[arg(long, env = "WIDGETRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Embedded broker configuration [default: ./broker.toml if present, else the built-in copy].
    #[arg(long, env = "WIDGETRY_BROKER_CONFIG")]
    pub broker_config: Option<PathBuf>,
    /// MQTT listen address (port 0 picks a free port); overrides `listen` of the first [v4.*] server in broker.toml [default: 0.0.0.0:1883].
    #[arg(long, env = "WIDGETRY_MQTT_LISTEN")]
    pub mqtt_listen: Option<String>,
    /// MQTT 5 listen address (port 0 picks a free port); overrides `listen` of the first [v5.*] server in broker.toml [default: 0.0.0.0:1884].
    #[arg(long, env = "WIDGETRY_MQTT5_LISTEN")]
    pub mqtt5_listen: Option<String>,
    /// HTTP listen address of the API and dashboard (port 0 picks a free port) [default: 0.0.0.0:8080].
    #[arg(long, env = "WIDGETRY_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Serve HTTPS instead of HTTP: PEM certificate chain (server certificate first, then
    /// intermediates); needs --http-tls-key. The websocket is then wss:// [default: plain HTTP].
    #[arg(long, env = "WIDGETRY_HTTP_TLS_CERT")]
    pub http_tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or EC) of --http-tls-cert; checked against it at start.
    #[arg(long, env = "WIDGETRY_HTTP_TLS_KEY")]
    pub http_tls_key: Option<PathBuf>,
    /// SQLite database file (created if missing) or postgres://user:password@host:port/db [default: widgetry.db].
    #[arg(long, env = "WIDGETRY_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// Password of the `widgetry-server` account on the embedded broker, the
    /// only one allowed to publish acks, live data and error reports; give it
    /// to `widgetry ingest`/`web` run elsewhere (--username widgetry-server)
    /// [default: a random one per start, used by this process only].
    #[arg(long, env = "WIDGETRY_SERVER_PASSWORD", hide_env_values = true)]
    pub server_password: Option<String>,
    /// Whether MQTT clients must log in with an account (`widgetry device add`): auto = required
    /// when a listener is not loopback-only or any account exists.
    #[arg(long, env = "WIDGETRY_AUTH", value_enum, default_value = "auto")]
    pub auth: super::roles::AuthMode,
    /// Read-only API token: when set, /api/* and /metrics need `Authorization: Bearer TOKEN`
    /// (or the cookie that `GET /login?token=TOKEN` sets for the dashboard) [default: none, open].
    #[arg(long, env = "WIDGETRY_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    #[command(flatten)]
    pub retention: RetentionArgs,
    #[command(flatten)]
    pub statsd: StatsdArgs,
}

/// The statsd listener of `serve` (off unless `--statsd` or `[statsd] listen` is given).
#[derive(Args)]
pub struct StatsdArgs {
    /// Receive statsd/DogStatsD lines on this UDP address, e.g. 127.0.0.1:8125 (`[statsd] listen`) [default: off].
    #[arg(long = "statsd", env = "WIDGETRY_STATSD")]
    pub listen: Option<String>,
    /// statsd aggregation interval: one sample per aggregate per interval, e.g. 10s, 500ms (`[statsd] flush_interval`) [default: 10s].
    #[arg(long = "statsd-flush", env = "WIDGETRY_STATSD_FLUSH")]
    pub flush: Option<String>,
    /// Device id the statsd samples are stored under ([A-Za-z0-9_.-], 1-64 characters);
    /// a DogStatsD `device:NAME` tag overrides it per metric (`[statsd] device`) [default: statsd].
    #[arg(long = "statsd-device", env = "WIDGETRY_STATSD_DEVICE")]
    pub device: Option<String>,
    /// Timer/histogram percentiles stored as `x.pNN` (`x.p99_9` for 99.9), comma-separated,
    /// 1-16 of them, each in (0, 100] (`[statsd] percentiles`) [default: 50,90,99].
    #[arg(long = "statsd-percentiles", env = "WIDGETRY_STATSD_PERCENTILES")]
    pub percentiles: Option<String>,
}

/// Retention flags of the roles that write (`serve`, `ingest`).
#[derive(Args)]
pub struct RetentionArgs {
    /// Keep raw samples and events this long (by sample time), e.g. 30d, 12h, or forever.
    #[arg(long, env = "WIDGETRY_RETAIN_RAW", default_value = "30d")]
    pub retain_raw: String,
    /// Keep per-minute rollups this long.
    #[arg(long, env = "WIDGETRY_RETAIN_1M", default_value = "90d")]
    retain_1m: String,
    /// Keep per-hour rollups this long.
    #[arg(long, env = "WIDGETRY_RETAIN_1H", default_value = "forever")]
    retain_1h: String,
    /// How often the compactor moves closed hours of the batch log into
    /// compressed per-series chunks (e.g. 1m), or off.
    #[arg(long, env = "WIDGETRY_COMPACT_EVERY", default_value = "1m")]
    compact_every: String,
}

#[derive(Args)]
pub struct IngestArgs {
    /// Optional widgetry.toml (keys broker, database).
    #[arg(long, env = "WIDGETRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// MQTT broker to subscribe to, HOST:PORT [default: 127.0.0.1:1883].
    #[arg(long, env = "WIDGETRY_BROKER")]
    pub broker: Option<String>,
    /// SQLite database file (created if missing) or postgres://user:password@host:port/db [default: widgetry.db].
    #[arg(long, env = "WIDGETRY_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// MQTT client id (persistent session; give each ingestor its own).
    #[arg(long, env = "WIDGETRY_CLIENT_ID", default_value = "widgetry-ingest")]
    pub client_id: String,
    /// Share the work with other ingestors: subscribe as members of this MQTT
    /// shared-subscription group ($share/GROUP/...); give each its own --client-id.
    #[arg(long, env = "WIDGETRY_SHARED_GROUP")]
    pub shared_group: Option<String>,
    /// MQTT username, if the broker requires one.
    #[arg(long, env = "WIDGETRY_MQTT_USERNAME")]
    pub username: Option<String>,
    /// MQTT password (prefer the environment variable: flags show in `ps`).
    #[arg(long, env = "WIDGETRY_MQTT_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Validate the flags and configuration, print them and exit without connecting.
    #[arg(long)]
    pub check: bool,
}

#[derive(Args)]
pub struct WebArgs {
    /// Optional widgetry.toml (keys http_listen, http_tls_cert, http_tls_key, database).
    #[arg(long, env = "WIDGETRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP listen address [default: 0.0.0.0:8080].
    #[arg(long, env = "WIDGETRY_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Serve HTTPS instead of HTTP: PEM certificate chain (server certificate first, then
    /// intermediates); needs --http-tls-key. The websocket is then wss:// [default: plain HTTP].
    #[arg(long, env = "WIDGETRY_HTTP_TLS_CERT")]
    pub http_tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or EC) of --http-tls-cert; checked against it at start.
    #[arg(long, env = "WIDGETRY_HTTP_TLS_KEY")]
    pub http_tls_key: Option<PathBuf>,
    /// SQLite database file or postgres://user:password@host:port/db [default: widgetry.db].
    #[arg(long, env = "WIDGETRY_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// MQTT broker (HOST:PORT) whose `widgetry/v1/+/live` feed the live
    /// websocket bridges; without it the bridge polls the database each second.
    #[arg(long, env = "WIDGETRY_BROKER")]
    pub broker: Option<String>,
    /// MQTT username for --broker, if it requires one.
    #[arg(long, env = "WIDGETRY_MQTT_USERNAME")]
    pub username: Option<String>,
    /// MQTT password for --broker (prefer the environment variable).
    #[arg(long, env = "WIDGETRY_MQTT_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Validate the flags and configuration, print them and exit without connecting.
    #[arg(long)]
    pub check: bool,
    /// Read-only API token: when set, /api/* and /metrics need `Authorization: Bearer TOKEN`
    /// (or the cookie that `GET /login?token=TOKEN` sets for the dashboard) [default: none, open].
    #[arg(long, env = "WIDGETRY_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
}

const FLAG: &str = "command line/environment";

fn resolve_retention(
    args: &RetentionArgs,
    problems: &mut Vec<Problem>,
) -> super::ingest::Retention {
    let mut r = super::ingest::Retention::default();
    for (text, key, slot) in [
        (&args.retain_raw, "retain-raw", &mut r.raw),
        (&args.retain_1m, "retain-1m", &mut r.minute),
        (&args.retain_1h, "retain-1h", &mut r.hour),
    ] {
        match super::parse_retention(text, FLAG, key) {
            Ok(d) => *slot = d,
            Err(p) => problems.push(p),
        }
    }
    match args.compact_every.as_str() {
        "off" => r.compact_every = None,
        text => match widgetry_common::parse_duration(text) {
            Ok(d) if !d.is_zero() => r.compact_every = Some(d),
            _ => problems.push(Problem {
                file: FLAG.to_string(),
                key: "compact-every".to_string(),
                message: format!(
                    "{text:?} is not a compaction interval: use a duration such as 1m or 30s, or off"
                ),
            }),
        },
    }
    r
}

fn load_file(path: &Option<PathBuf>) -> Result<FileConfig, ConfigError> {
    match path {
        Some(p) => FileConfig::load(p),
        None => Ok(FileConfig::default()),
    }
}

/// Picks flag (or env) over file value, naming where the value came from.
fn pick<T: Clone>(flag: &Option<T>, file: &Option<T>, file_label: &str) -> Option<(T, String)> {
    flag.clone()
        .map(|v| (v, FLAG.to_string()))
        .or_else(|| file.clone().map(|v| (v, file_label.to_string())))
}

fn file_label(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// A value from the flag, the config file or `default`, parsed by `parse`
/// (given the text and where it came from); a problem is collected.
fn resolve<T>(
    flag: &Option<String>,
    file_value: &Option<String>,
    label: &str,
    default: &str,
    parse: impl FnOnce(&str, &str) -> Result<T, Problem>,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let (text, src) =
        pick(flag, file_value, label).unwrap_or_else(|| (default.to_string(), "default".into()));
    parse(&text, &src).map_err(|p| problems.push(p)).ok()
}

fn resolve_database(
    flag: &Option<String>,
    file: &FileConfig,
    label: &str,
    problems: &mut Vec<Problem>,
) -> Option<Database> {
    resolve(
        flag,
        &file.database,
        label,
        DEFAULT_DATABASE,
        |t, s| Database::parse(t, s, "database"),
        problems,
    )
}

fn resolve_http(
    flag: &Option<String>,
    file: &FileConfig,
    label: &str,
    problems: &mut Vec<Problem>,
) -> Option<SocketAddr> {
    resolve(
        flag,
        &file.http_listen,
        label,
        DEFAULT_HTTP_LISTEN,
        |t, s| super::parse_addr(t, s, "http_listen", true),
        problems,
    )
}

/// `--http-tls-cert`/`--http-tls-key` (or the file's keys), validated.
fn resolve_http_tls(
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    file: &FileConfig,
    label: &str,
    problems: &mut Vec<Problem>,
) -> Option<super::http_tls::HttpTls> {
    super::http_tls::resolve(
        pick(cert, &file.http_tls_cert, label),
        pick(key, &file.http_tls_key, label),
        problems,
    )
}

pub fn resolve_serve(args: &ServeArgs) -> Result<ServeConfig, ConfigError> {
    let file = load_file(&args.config)?;
    let label = file_label(&args.config);
    let mut problems = Vec::new();
    let mqtt_override = pick(&args.mqtt_listen, &file.mqtt_listen, &label).and_then(|(t, src)| {
        super::parse_addr(&t, &src, "mqtt_listen", true)
            .map_err(|p| problems.push(p))
            .ok()
    });
    let mqtt5_override =
        pick(&args.mqtt5_listen, &file.mqtt5_listen, &label).and_then(|(t, src)| {
            super::parse_addr(&t, &src, "mqtt5_listen", true)
                .map_err(|p| problems.push(p))
                .ok()
        });
    let http_listen = resolve_http(&args.http_listen, &file, &label, &mut problems);
    let http_tls = resolve_http_tls(
        &args.http_tls_cert,
        &args.http_tls_key,
        &file,
        &label,
        &mut problems,
    );
    let database = resolve_database(&args.database, &file, &label, &mut problems);
    let broker_path = pick(&args.broker_config, &file.broker_config, &label).map(|(p, _)| p);
    let listen = super::ListenOverride {
        v4: mqtt_override,
        v5: mqtt5_override,
    };
    let broker = match super::load_broker_config(broker_path.as_deref(), listen) {
        Ok(b) => Some(b),
        Err(e) => {
            problems.extend(e.0);
            None
        }
    };
    let retention = resolve_retention(&args.retention, &mut problems);
    let server_password = match &args.server_password {
        Some(p) if p.len() < 16 => {
            problems.push(Problem {
                file: FLAG.into(),
                key: "server-password".into(),
                // Never echo the value: it is a password.
                message: "too short: use at least 16 characters (e.g. `openssl rand -hex 16`)"
                    .into(),
            });
            None
        }
        p => p.clone(),
    };
    let api_token = resolve_api_token(&args.api_token, &mut problems);
    let statsd = resolve_statsd(
        StatsdInput {
            flags: &args.statsd,
            keys: [
                "statsd",
                "statsd-flush",
                "statsd-device",
                "statsd-percentiles",
            ],
            default_listen: None,
        },
        file.statsd.as_ref(),
        &label,
        &mut problems,
    );
    let graphite = file
        .graphite
        .as_ref()
        .and_then(|g| resolve_graphite(g, &label, &mut problems));
    let ws_sections = file.bridge.as_ref().map_or(&[][..], |b| &b.ws[..]);
    let ws_bridges: Vec<WsBridgeConfig> = ws_sections
        .iter()
        .enumerate()
        .filter_map(|(i, w)| {
            resolve_ws_bridge(w, &label, &format!("bridge.ws[{i}]."), &mut problems)
        })
        .collect();
    let alerting = resolve_alerting(&file, &label, &mut problems);
    let presence = resolve_presence(&file, &label, &mut problems);
    match (broker, http_listen, database) {
        (Some(broker), Some(http_listen), Some(database)) if problems.is_empty() => {
            Ok(ServeConfig {
                broker,
                http_listen,
                http_tls,
                database,
                retention,
                limits: Default::default(),
                server_password,
                auth: args.auth,
                api_token,
                statsd,
                graphite,
                ws_bridges,
                alerting,
                presence,
            })
        }
        _ => Err(ConfigError(problems)),
    }
}

/// `[[rules]]` (each validated, names unique, at most
/// [`crate::rules::MAX_RULES`]) and `[alerts]` of `file`; problems are keyed
/// `rules[N].field` and `alerts.webhook`.
fn resolve_alerting(
    file: &super::FileConfig,
    label: &str,
    problems: &mut Vec<Problem>,
) -> super::roles::AlertingConfig {
    let mut push = |key: String, message: String| {
        problems.push(Problem {
            file: label.to_string(),
            key,
            message,
        })
    };
    if file.rules.len() > crate::rules::MAX_RULES {
        push(
            "rules".into(),
            format!(
                "{} rules: at most {} are allowed",
                file.rules.len(),
                crate::rules::MAX_RULES
            ),
        );
    }
    let mut rules = Vec::new();
    for (i, r) in file.rules.iter().enumerate() {
        if file.rules[..i].iter().any(|o| o.name == r.name) {
            push(
                format!("rules[{i}].name"),
                format!(
                    "{:?} is the name of an earlier rule: names are unique",
                    r.name
                ),
            );
            continue;
        }
        match r.clone().validate() {
            Ok(_) => rules.push(r.clone()),
            Err(e) => {
                let (field, msg) = e.split_once(": ").unwrap_or(("", e.as_str()));
                push(format!("rules[{i}].{field}"), msg.to_string());
            }
        }
    }
    let webhook = file
        .alerts
        .as_ref()
        .and_then(|a| a.webhook.as_deref())
        .and_then(|w| match crate::rules::webhook::WebhookUrl::parse(w) {
            Ok(u) => Some(u),
            Err(e) => {
                push("alerts.webhook".into(), e);
                None
            }
        });
    super::roles::AlertingConfig { rules, webhook }
}

/// `[presence]` of `file`; problems are keyed `presence.key` and
/// `presence.interval[N].key`.
fn resolve_presence(
    file: &super::FileConfig,
    label: &str,
    problems: &mut Vec<Problem>,
) -> crate::presence::PresenceConfig {
    let mut cfg = crate::presence::PresenceConfig::default();
    let Some(p) = &file.presence else {
        return cfg;
    };
    let mut push = |key: String, message: String| {
        problems.push(Problem {
            file: label.to_string(),
            key,
            message,
        })
    };
    let interval = |text: &str| -> Result<i64, String> {
        let d = widgetry_common::parse_duration(text)?;
        if d < Duration::from_millis(100) || d > Duration::from_secs(86_400) {
            return Err(format!("{text:?}: between 100ms and 1d"));
        }
        Ok(d.as_millis() as i64)
    };
    if let Some(d) = &p.default_interval {
        match interval(d) {
            Ok(ms) => cfg.default_interval_ms = ms,
            Err(e) => push("presence.default_interval".into(), e),
        }
    }
    if let Some(n) = p.stale_after {
        cfg.stale_after = n;
    }
    if let Some(n) = p.silent_after {
        cfg.silent_after = n;
    }
    if cfg.stale_after == 0 || cfg.silent_after <= cfg.stale_after || cfg.silent_after > 10_000 {
        push(
            "presence.silent_after".into(),
            format!(
                "stale_after {} and silent_after {}: need 1 <= stale_after < silent_after <= 10000 (intervals)",
                cfg.stale_after, cfg.silent_after
            ),
        );
    }
    if p.interval.len() > 1000 {
        push(
            "presence.interval".into(),
            format!("{} sections: at most 1000", p.interval.len()),
        );
    }
    for (i, s) in p.interval.iter().enumerate().take(1000) {
        if s.devices.is_empty() || s.devices.len() > 256 || s.devices.contains(char::is_whitespace)
        {
            push(
                format!("presence.interval[{i}].devices"),
                format!(
                    "{:?}: a device glob of 1 to 256 bytes without spaces",
                    s.devices
                ),
            );
            continue;
        }
        match interval(&s.every) {
            Ok(ms) => cfg.intervals.push((s.devices.clone(), ms)),
            Err(e) => push(format!("presence.interval[{i}].every"), e),
        }
    }
    cfg
}

/// One websocket bridge's settings (a `[[bridge.ws]]` section of `file`,
/// or `widgetry bridge ws`'s flags with `file` = [`FLAG`]); problems name
/// `prefix` + key.
pub fn resolve_ws_bridge(
    w: &super::WsBridgeFile,
    file: &str,
    prefix: &str,
    problems: &mut Vec<Problem>,
) -> Option<WsBridgeConfig> {
    let before = problems.len();
    let mut problem = |key: &str, message: String| {
        problems.push(Problem {
            file: file.to_string(),
            key: format!("{prefix}{key}"),
            message,
        })
    };
    match w.url.parse::<tokio_tungstenite::tungstenite::http::Uri>() {
        Ok(u) if u.scheme_str() == Some("ws") && u.host().is_some_and(|h| !h.is_empty()) => {}
        Ok(u) if u.scheme_str() == Some("wss") => problem(
            "url",
            format!(
                "{:?}: wss:// is not built in; use ws:// (e.g. behind a TLS-terminating proxy on the same host)",
                widgetry_common::excerpt(&w.url)
            ),
        ),
        _ => problem(
            "url",
            format!(
                "{:?}: expected ws://host[:port]/path",
                widgetry_common::excerpt(&w.url)
            ),
        ),
    }
    if widgetry_proto::validate::validate_device(&w.device).is_err() {
        problem(
            "device",
            format!(
                "{:?}: a device id is 1-64 characters of A-Z a-z 0-9 _ . -",
                widgetry_common::excerpt(&w.device)
            ),
        );
    }
    let series_text = w
        .series
        .as_deref()
        .unwrap_or(WsBridgeConfig::DEFAULT_SERIES);
    let series = match widgetry_proto::SeriesKey::parse(series_text) {
        Ok(k) => Some(k),
        Err(e) => {
            problem(
                "series",
                format!("{:?}: {e}", widgetry_common::excerpt(series_text)),
            );
            None
        }
    };
    let mut duration = |key: &str, text: Option<&str>, default: Duration| match text
        .map(widgetry_common::parse_duration)
    {
        None => Some(default),
        Some(Ok(d)) if d >= Duration::from_millis(100) => Some(d),
        Some(Ok(_)) => {
            problem(key, "use at least 100ms".into());
            None
        }
        Some(Err(e)) => {
            problem(key, e);
            None
        }
    };
    let idle_timeout = duration(
        "idle_timeout",
        w.idle_timeout.as_deref(),
        WsBridgeConfig::DEFAULT_IDLE_TIMEOUT,
    );
    let reconnect_cap = duration(
        "reconnect_max",
        w.reconnect_max.as_deref(),
        WsBridgeConfig::DEFAULT_RECONNECT_CAP,
    );
    let timestamp_unit = match w.timestamp_unit.as_deref() {
        None | Some("ms") => Some(TimestampUnit::Ms),
        Some("s") => Some(TimestampUnit::S),
        Some(other) => {
            problem(
                "timestamp_unit",
                format!("{:?}: use ms or s", widgetry_common::excerpt(other)),
            );
            None
        }
    };
    let max_message_bytes = w
        .max_message_bytes
        .unwrap_or(WsBridgeConfig::DEFAULT_MAX_MESSAGE_BYTES);
    if !(64..=16 * 1024 * 1024).contains(&max_message_bytes) {
        problem(
            "max_message_bytes",
            format!("{max_message_bytes}: use 64 to 16777216"),
        );
    }
    if problems.len() > before {
        return None;
    }
    Some(WsBridgeConfig {
        url: w.url.clone(),
        device: w.device.clone(),
        series: series?,
        idle_timeout: idle_timeout?,
        timestamp_unit: timestamp_unit?,
        max_message_bytes,
        reconnect_cap: reconnect_cap?,
    })
}

/// `widgetry bridge ws`: the bridge, its database and the optional
/// metrics address.
pub fn resolve_bridge_ws(args: &BridgeWsArgs) -> Result<BridgeRole, ConfigError> {
    let mut problems = Vec::new();
    let unit = match args.timestamp_unit {
        TimestampUnit::Ms => "ms",
        TimestampUnit::S => "s",
    };
    let raw = super::WsBridgeFile {
        url: args.url.clone(),
        device: args.device.clone(),
        series: Some(args.series.clone()),
        idle_timeout: Some(args.idle_timeout.clone()),
        timestamp_unit: Some(unit.into()),
        max_message_bytes: Some(args.max_message_bytes),
        reconnect_max: Some(args.reconnect_max.clone()),
    };
    let bridge = resolve_ws_bridge(&raw, FLAG, "", &mut problems);
    let database = resolve_database(&args.database, &FileConfig::default(), "", &mut problems);
    let metrics_listen = args.metrics_listen.as_ref().and_then(|t| {
        super::parse_addr(t, FLAG, "metrics-listen", true)
            .map_err(|p| problems.push(p))
            .ok()
    });
    match (bridge, database) {
        (Some(bridge), Some(database)) if problems.is_empty() => Ok(BridgeRole {
            bridge,
            database,
            metrics_listen,
        }),
        _ => Err(ConfigError(problems)),
    }
}

/// The validated settings of `widgetry bridge ws`.
#[derive(Debug, Clone)]
pub struct BridgeRole {
    pub bridge: WsBridgeConfig,
    pub database: Database,
    pub metrics_listen: Option<SocketAddr>,
}

/// Where the statsd listener's settings come from: `serve`'s `--statsd*`
/// flags or `widgetry statsd`'s own ([`StatsdRoleArgs`]), over a
/// `[statsd]` section of the config file, over the defaults.
struct StatsdInput<'a> {
    flags: &'a StatsdArgs,
    /// The flags' names, for problems: listen, flush, device, percentiles.
    keys: [&'static str; 4],
    /// Listen address when neither flag nor file gives one; None: off.
    default_listen: Option<&'static str>,
}

/// The default timer percentiles.
const DEFAULT_PERCENTILES: &str = "50,90,99";

/// The statsd listener's settings, or None when it is off (no listen
/// address from flag, file or default); every other setting is checked
/// even then, so a typo is reported rather than ignored.
fn resolve_statsd(
    input: StatsdInput<'_>,
    section: Option<&super::StatsdFile>,
    label: &str,
    problems: &mut Vec<Problem>,
) -> Option<StatsdConfig> {
    let [listen_key, flush_key, device_key, percentiles_key] = input.keys;
    let args = input.flags;
    let none = super::StatsdFile::default();
    let file = section.unwrap_or(&none);
    // A problem names the flag, or `statsd.KEY` of the file.
    let key = |src: &str, flag: &str, file_key: &str| {
        if src == FLAG {
            flag.to_string()
        } else {
            format!("statsd.{file_key}")
        }
    };
    let flush = resolve(
        &args.flush,
        &file.flush_interval,
        label,
        "10s",
        |t, src| {
            let k = key(src, flush_key, "flush_interval");
            match parse_secs(t, &k) {
                Ok(s) if s >= 0.001 => Ok(Duration::from_secs_f64(s)),
                Ok(_) => Err(Problem {
                    file: src.into(),
                    key: k,
                    message: format!("{t:?}: use at least 1ms"),
                }),
                Err(mut p) => {
                    p.file = src.into();
                    Err(p)
                }
            }
        },
        problems,
    );
    let device = resolve(
        &args.device,
        &file.device,
        label,
        "statsd",
        |t, src| match widgetry_proto::validate::validate_device(t) {
            Ok(()) => Ok(t.to_string()),
            Err(_) => Err(Problem {
                file: src.into(),
                key: key(src, device_key, "device"),
                message: format!(
                    "{:?}: a device id is 1-64 characters of A-Z a-z 0-9 _ . -",
                    widgetry_common::excerpt(t)
                ),
            }),
        },
        problems,
    );
    let file_percentiles = file.percentiles.as_ref().map(|ps| {
        ps.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",")
    });
    let percentiles = resolve(
        &args.percentiles,
        &file_percentiles,
        label,
        DEFAULT_PERCENTILES,
        |t, src| parse_percentiles(t, src, &key(src, percentiles_key, "percentiles")),
        problems,
    );
    let listen_text = pick(&args.listen, &file.listen, label).or_else(|| {
        input
            .default_listen
            .map(|d| (d.to_string(), "default".to_string()))
    });
    let listen = listen_text.and_then(|(t, src)| {
        super::parse_addr(&t, &src, &key(&src, listen_key, "listen"), true)
            .map_err(|p| problems.push(p))
            .ok()
    })?;
    Some(StatsdConfig {
        listen,
        flush: flush?,
        device: device?,
        percentiles: percentiles?,
    })
}

/// `50,90,99.9` into timer percentiles (1 to 16 of them).
fn parse_percentiles(
    text: &str,
    src: &str,
    key: &str,
) -> Result<Vec<widgetry_statsd::Percentile>, Problem> {
    let problem = |message: String| Problem {
        file: src.into(),
        key: key.into(),
        message,
    };
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    if parts.len() > 16 {
        return Err(problem(format!("{} percentiles: at most 16", parts.len())));
    }
    parts
        .iter()
        .map(|p| {
            let n: f64 = p.parse().map_err(|_| {
                problem(format!(
                    "{:?} is not a number: give percentiles such as 50,90,99.9",
                    widgetry_common::excerpt(p)
                ))
            })?;
            widgetry_statsd::Percentile::new(n).map_err(|e| problem(e.to_string()))
        })
        .collect()
}

/// The `[graphite]` section of `file`.
fn resolve_graphite(
    g: &super::GraphiteFile,
    file: &str,
    problems: &mut Vec<Problem>,
) -> Option<GraphiteConfig> {
    let problem = |key: &str, message: String| Problem {
        file: file.to_string(),
        key: format!("graphite.{key}"),
        message,
    };
    let target = super::parse_host_port(&g.address, file, "graphite.address")
        .map_err(|p| problems.push(p))
        .ok();
    let flush = match widgetry_common::parse_duration(g.flush_interval.as_deref().unwrap_or("10s"))
    {
        Ok(d) if !d.is_zero() => Some(d),
        Ok(_) => {
            problems.push(problem("flush_interval", "must be more than 0".into()));
            None
        }
        Err(e) => {
            problems.push(problem("flush_interval", e));
            None
        }
    };
    let prefix = g
        .prefix
        .clone()
        .unwrap_or_else(|| GraphiteConfig::DEFAULT_PREFIX.to_string());
    if !prefix.contains("{series}") || prefix.contains([' ', '\n', ';']) {
        problems.push(problem(
            "prefix",
            format!("{prefix:?}: must contain {{series}} and no space, newline or ';'"),
        ));
        return None;
    }
    let max_buffered_lines = g
        .max_buffered_lines
        .unwrap_or(GraphiteConfig::DEFAULT_MAX_BUFFERED_LINES);
    if max_buffered_lines == 0 {
        problems.push(problem("max_buffered_lines", "must be at least 1".into()));
        return None;
    }
    let filter = match SeriesFilter::parse(&g.filter) {
        Ok(f) => f,
        Err(e) => {
            problems.push(problem("filter", e));
            return None;
        }
    };
    let (host, port) = target?;
    Some(GraphiteConfig {
        host,
        port,
        prefix,
        flush: flush?,
        max_buffered_lines,
        filter,
    })
}

pub fn resolve_ingest(args: &IngestArgs) -> Result<(IngestConfig, Database), ConfigError> {
    let file = load_file(&args.config)?;
    let label = file_label(&args.config);
    let mut problems = Vec::new();
    let database = resolve_database(&args.database, &file, &label, &mut problems);
    let (broker, src) = pick(&args.broker, &file.broker, &label)
        .unwrap_or_else(|| ("127.0.0.1:1883".into(), "default".into()));
    // Every setting is checked, also when an earlier one is bad, so that
    // all problems are reported at once.
    let shared_group = match &args.shared_group {
        Some(g) if g.is_empty() || g.len() > 64 || g.contains(['/', '+', '#', '$']) => {
            problems.push(Problem {
                file: FLAG.into(),
                key: "shared-group".into(),
                message: format!("{g:?}: use 1-64 characters without / + # $"),
            });
            None
        }
        g => g.clone(),
    };
    let credentials = resolve_credentials(&args.username, &args.password, &mut problems);
    let retention = resolve_retention(&args.retention, &mut problems);
    let cfg = match super::parse_host_port(&broker, &src, "broker") {
        Ok((host, port)) => {
            let mut c = IngestConfig::new(host, port);
            c.client_id = args.client_id.clone();
            c.shared_group = shared_group;
            c.credentials = credentials;
            c.retention = retention;
            Some(c)
        }
        Err(p) => {
            problems.push(p);
            None
        }
    };
    match (cfg, database) {
        (Some(c), Some(database)) if problems.is_empty() => Ok((c, database)),
        _ => Err(ConfigError(problems)),
    }
}

/// `--api-token`, at least 16 characters (never echoed).
fn resolve_api_token(token: &Option<String>, problems: &mut Vec<Problem>) -> Option<String> {
    match token {
        Some(t) if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c == ';') => {
            problems.push(Problem {
                file: FLAG.into(),
                key: "api-token".into(),
                message:
                    "use at least 16 characters without spaces or `;` (e.g. `openssl rand -hex 16`)"
                        .into(),
            });
            None
        }
        t => t.clone(),
    }
}

pub fn resolve_web(args: &WebArgs) -> Result<WebConfig, ConfigError> {
    let file = load_file(&args.config)?;
    let label = file_label(&args.config);
    let mut problems = Vec::new();
    let http = resolve_http(&args.http_listen, &file, &label, &mut problems);
    let http_tls = resolve_http_tls(
        &args.http_tls_cert,
        &args.http_tls_key,
        &file,
        &label,
        &mut problems,
    );
    let database = resolve_database(&args.database, &file, &label, &mut problems);
    let mut bridge = BridgeConfig {
        broker: None,
        credentials: resolve_credentials(&args.username, &args.password, &mut problems),
        poll: std::time::Duration::from_secs(1),
    };
    if let Some((text, src)) = pick(&args.broker, &file.broker, &label) {
        match super::parse_host_port(&text, &src, "broker") {
            Ok(hp) => bridge.broker = Some(hp),
            Err(p) => problems.push(p),
        }
    }
    let token = resolve_api_token(&args.api_token, &mut problems);
    let alerting = resolve_alerting(&file, &label, &mut problems);
    let presence = resolve_presence(&file, &label, &mut problems);
    match (http, database) {
        (Some(http_listen), Some(database)) if problems.is_empty() => Ok(WebConfig {
            http_listen,
            http_tls,
            database,
            bridge,
            api_token: token,
            alerting,
            presence,
        }),
        _ => Err(ConfigError(problems)),
    }
}

fn resolve_credentials(
    username: &Option<String>,
    password: &Option<String>,
    problems: &mut Vec<Problem>,
) -> Option<(String, String)> {
    match (username, password) {
        (Some(u), Some(p)) => Some((u.clone(), p.clone())),
        (None, None) => None,
        _ => {
            problems.push(Problem {
                file: FLAG.into(),
                key: "username/password".into(),
                message: "give both --username and --password, or neither".into(),
            });
            None
        }
    }
}

fn parse_secs(text: &str, what: &str) -> Result<f64, Problem> {
    let (num, mult) = match text {
        t if t.ends_with("ms") => (&t[..t.len() - 2], 0.001),
        t if t.ends_with('s') => (&t[..t.len() - 1], 1.0),
        t if t.ends_with('m') => (&t[..t.len() - 1], 60.0),
        t if t.ends_with('h') => (&t[..t.len() - 1], 3600.0),
        t => (t, 1.0),
    };
    match num.parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() => Ok(n * mult),
        _ => Err(Problem {
            file: FLAG.into(),
            key: what.into(),
            message: format!("{text:?} is not a positive duration (e.g. 60s, 10m)"),
        }),
    }
}

pub fn resolve_loadgen(a: &LoadgenArgs) -> Result<widgetry_loadgen::LoadConfig, ConfigError> {
    let mut problems = Vec::new();
    let (host, port) = super::parse_host_port(&a.broker, FLAG, "broker")
        .map_err(|p| problems.push(p))
        .unwrap_or_default();
    let rate = match a.rate.trim_end_matches("/s").parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1000.0 => r,
        _ => {
            problems.push(Problem {
                file: FLAG.into(),
                key: "rate".into(),
                message: format!(
                    "{:?} is not a rate from 0 to 1000 batches/s (e.g. 1/s)",
                    a.rate
                ),
            });
            1.0
        }
    };
    let warmup = if a.warmup.trim_end_matches(['m', 's', 'h']).parse::<f64>() == Ok(0.0) {
        0.0
    } else {
        parse_secs(&a.warmup, "warmup")
            .map_err(|p| problems.push(p))
            .unwrap_or(0.0)
    };
    let duration = parse_secs(&a.duration, "duration")
        .map_err(|p| problems.push(p))
        .unwrap_or(1.0);
    if a.devices == 0 || a.devices > 100_000 {
        problems.push(Problem {
            file: FLAG.into(),
            key: "devices".into(),
            message: format!("{} is out of range (1-100000)", a.devices),
        });
    }
    if a.samples_per_batch == 0 || a.samples_per_batch > 100_000 {
        problems.push(Problem {
            file: FLAG.into(),
            key: "samples-per-batch".into(),
            message: format!("{} is out of range (1-100000)", a.samples_per_batch),
        });
    }
    let qos = match a.qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        q => {
            problems.push(Problem {
                file: FLAG.into(),
                key: "qos".into(),
                message: format!("{q}: use 0 or 1"),
            });
            rumqttc::QoS::AtLeastOnce
        }
    };
    if let Some(h) = &a.http
        && !h.starts_with("http://")
    {
        problems.push(Problem {
            file: FLAG.into(),
            key: "http".into(),
            message: format!("{h:?}: expected http://HOST:PORT"),
        });
    }
    let burst = a.burst_at.as_ref().and_then(|at| {
        let at = parse_secs(at, "burst-at");
        let len = parse_secs(&a.burst_for, "burst-for");
        if !(1.0..=1000.0).contains(&a.burst_factor) {
            problems.push(Problem {
                file: FLAG.into(),
                key: "burst-factor".into(),
                message: format!("{}: use 1 to 1000", a.burst_factor),
            });
        }
        match (at, len) {
            (Ok(at), Ok(len)) => Some(widgetry_loadgen::Burst {
                at: std::time::Duration::from_secs_f64(at),
                len: std::time::Duration::from_secs_f64(len),
                factor: a.burst_factor,
            }),
            (at, len) => {
                problems.extend(at.err());
                problems.extend(len.err());
                None
            }
        }
    });
    if a.api_clients > 0 && a.http.is_none() {
        problems.push(Problem {
            file: FLAG.into(),
            key: "api-clients".into(),
            message: "needs --http (the web service to load)".into(),
        });
    }
    if a.api_clients > 10_000 {
        problems.push(Problem {
            file: FLAG.into(),
            key: "api-clients".into(),
            message: format!("{}: use at most 10000", a.api_clients),
        });
    }
    if !problems.is_empty() {
        return Err(ConfigError(problems));
    }
    Ok(widgetry_loadgen::LoadConfig {
        broker_host: host,
        broker_port: port,
        http: a.http.clone(),
        devices: a.devices,
        rate,
        samples_per_batch: a.samples_per_batch,
        duration: std::time::Duration::from_secs_f64(duration),
        qos,
        ack_timeout: std::time::Duration::from_secs_f64(a.ack_timeout.max(0.1)),
        grace: std::time::Duration::from_secs_f64(a.grace.max(0.0)),
        prefix: a.prefix.clone(),
        server_pid: a.server_pid,
        warmup: std::time::Duration::from_secs_f64(warmup),
        api_clients: a.api_clients,
        burst,
    })
}

pub fn resolve_import(a: &ImportArgs) -> Result<crate::import::ImportConfig, ConfigError> {
    let mut problems = Vec::new();
    let mut problem = |key: &str, message: String| {
        problems.push(Problem {
            file: FLAG.into(),
            key: key.into(),
            message,
        })
    };
    if let Err(r) = widgetry_proto::validate::validate_device(&a.device) {
        problem("device", r.to_string());
    }
    let series =
        match widgetry_proto::SeriesKey::parse(&a.series).and_then(|k| k.validate().map(|()| k)) {
            Ok(k) => Some(k),
            Err(r) => {
                problem("series", r.to_string());
                None
            }
        };
    match std::fs::metadata(&a.file) {
        Ok(m) if m.is_file() => {}
        Ok(_) => problem("file", format!("{}: not a regular file", a.file.display())),
        Err(e) => problem("file", format!("{}: {e}", a.file.display())),
    }
    let database = resolve_database(&a.database, &FileConfig::default(), "", &mut problems);
    match (series, database) {
        (Some(series), Some(database)) if problems.is_empty() => Ok(crate::import::ImportConfig {
            file: a.file.clone(),
            device: a.device.clone(),
            series,
            database,
            skip_bad_rows: a.skip_bad_rows,
        }),
        _ => Err(ConfigError(problems)),
    }
}

/// What the command line asks for, once validated.
pub enum Role {
    Serve(Box<ServeConfig>),
    Ingest(Box<IngestConfig>, Database),
    Web(Box<WebConfig>),
    Loadgen(Box<widgetry_loadgen::LoadConfig>),
    Device(DeviceAction, Database),
    Import(Box<crate::import::ImportConfig>),
    /// `widgetry compact`: the database and `--everything`.
    Compact(Database, bool),
    Bridge(Box<BridgeRole>),
    Statsd(Box<StatsdRole>),
}

/// `50,90,99.9`.
fn percentile_list(ps: &[widgetry_statsd::Percentile]) -> String {
    ps.iter()
        .map(|p| p.value().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Validates the command line into a role, or the line `--check` and
/// `check-config` print.
pub fn resolve_command(cmd: &Cmd) -> Result<Result<Role, String>, ConfigError> {
    Ok(match cmd {
        Cmd::CheckConfig(args) => {
            let cfg = resolve_serve(args)?;
            let mqtt5 = cfg.broker.mqtt5_listen.map(|a| a.to_string());
            let statsd = cfg.statsd.as_ref().map_or("off".to_string(), |s| {
                format!(
                    "{} (flush {:?}, device {}, percentiles {})",
                    s.listen,
                    s.flush,
                    s.device,
                    percentile_list(&s.percentiles)
                )
            });
            let graphite = cfg
                .graphite
                .as_ref()
                .map_or("off".to_string(), |g| format!("{}:{}", g.host, g.port));
            let bridges = cfg.ws_bridges.len();
            Err(format!(
                "configuration ok: mqtt {} mqtt5 {} {} {} database {} statsd {statsd} graphite {graphite} websocket bridges {bridges}",
                cfg.broker.mqtt_listen,
                mqtt5.as_deref().unwrap_or("off"),
                if cfg.http_tls.is_some() {
                    "https"
                } else {
                    "http"
                },
                cfg.http_listen,
                cfg.database
            ))
        }
        Cmd::Serve(args) => Ok(Role::Serve(Box::new(resolve_serve(args)?))),
        Cmd::Ingest(args) => match resolve_ingest(args)? {
            (c, db) if args.check => Err(format!(
                "configuration ok: ingest broker {}:{} database {db}",
                c.broker_host, c.broker_port
            )),
            (c, db) => Ok(Role::Ingest(Box::new(c), db)),
        },
        Cmd::Web(args) => match resolve_web(args)? {
            c if args.check => Err(format!(
                "configuration ok: web {} {} database {}",
                if c.http_tls.is_some() {
                    "https"
                } else {
                    "http"
                },
                c.http_listen,
                c.database
            )),
            c => Ok(Role::Web(Box::new(c))),
        },
        Cmd::Loadgen(args) => match resolve_loadgen(args)? {
            cfg if args.check => Err(format!(
                "configuration ok: loadgen broker {}:{} devices {} duration {:?}",
                cfg.broker_host, cfg.broker_port, cfg.devices, cfg.duration
            )),
            cfg => Ok(Role::Loadgen(Box::new(cfg))),
        },
        Cmd::Device(args) => Ok(resolve_device(args)?),
        Cmd::Import(args) => Ok(Role::Import(Box::new(resolve_import(args)?))),
        Cmd::Compact(args) => {
            let mut problems = Vec::new();
            match resolve_database(&args.database, &FileConfig::default(), "", &mut problems) {
                Some(db) if problems.is_empty() => Ok(Role::Compact(db, args.everything)),
                _ => return Err(ConfigError(problems)),
            }
        }
        Cmd::Bridge(BridgeCmd::Ws(args)) => match resolve_bridge_ws(args)? {
            b if args.check => Err(format!(
                "configuration ok: bridge ws {} device {} series {} database {}",
                b.bridge.url, b.bridge.device, b.bridge.series, b.database
            )),
            b => Ok(Role::Bridge(Box::new(b))),
        },
        Cmd::Statsd(args) => match resolve_statsd_role(args)? {
            r if args.check => Err(format!(
                "configuration ok: statsd {} (flush {:?}, device {}, percentiles {}) database {}",
                r.statsd.listen,
                r.statsd.flush,
                r.statsd.device,
                percentile_list(&r.statsd.percentiles),
                r.database
            )),
            r => Ok(Role::Statsd(Box::new(r))),
        },
    })
}

/// Validates `widgetry device …`: the account name and the database.
pub fn resolve_device(args: &DeviceArgs) -> Result<Role, ConfigError> {
    let file = load_file(&args.config)?;
    let label = file_label(&args.config);
    let mut problems = Vec::new();
    let database = resolve_database(&args.database, &file, &label, &mut problems);
    let id = match &args.action {
        DeviceAction::Add { id, .. } | DeviceAction::Rotate { id, .. } => Some(id),
        DeviceAction::Remove { .. } | DeviceAction::List => None,
    };
    if let Some(Err(message)) = id.map(|id| crate::device_cmd::check_account_name(id)) {
        problems.push(Problem {
            file: FLAG.into(),
            key: "ID".into(),
            message,
        });
    }
    match database {
        Some(db) if problems.is_empty() => Ok(Role::Device(args.action.clone(), db)),
        _ => Err(ConfigError(problems)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resolves a command line (environment variables of the test process
    /// may not name WIDGETRY_* settings: the test command sets none).
    fn run(args: &[&str]) -> Result<Result<Role, String>, String> {
        let cli = Cli::try_parse_from(std::iter::once("widgetry").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        resolve_command(&cli.cmd).map_err(|e| e.to_string())
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("widgetry.toml");
        let db = dir.path().join("w.db");
        std::fs::write(
            &file,
            format!(
                "http_listen = \"127.0.0.1:9001\"\ndatabase = {:?}\n",
                db.display()
            ),
        )
        .expect("write");
        let file = file.to_str().expect("utf-8 path");
        let Ok(Ok(Role::Serve(cfg))) = run(&["serve", "--config", file]) else {
            panic!("valid serve configuration");
        };
        assert_eq!(cfg.http_listen.to_string(), "127.0.0.1:9001");
        assert_eq!(cfg.database, Database::Sqlite(db.clone()));
        let Ok(Ok(Role::Serve(cfg))) =
            run(&["serve", "--config", file, "--http-listen", "127.0.0.1:9002"])
        else {
            panic!("valid serve configuration");
        };
        assert_eq!(
            cfg.http_listen.to_string(),
            "127.0.0.1:9002",
            "the flag wins"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_key() {
        let err = match run(&[
            "ingest",
            "--broker",
            "nohost",
            "--retain-raw",
            "30x",
            "--database",
            "/nonexistent-dir/w.db",
        ]) {
            Err(e) => e,
            Ok(_) => panic!("bad flags accepted"),
        };
        for needle in [
            "3 configuration problem(s)",
            "broker",
            "retain-raw",
            "/nonexistent-dir",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from: {err}");
        }
    }

    #[test]
    fn compaction_interval_is_validated() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("w.db");
        let db = db.to_str().expect("utf-8 path");
        for bad in ["0s", "soon", "5 parsecs"] {
            let err = match run(&["serve", "--database", db, "--compact-every", bad]) {
                Err(e) => e,
                Ok(_) => panic!("--compact-every {bad} accepted"),
            };
            assert!(
                err.contains("compact-every") && err.contains(bad),
                "{bad}: the error names the flag and the value: {err}"
            );
        }
        let Ok(Ok(Role::Serve(off))) = run(&["serve", "--database", db, "--compact-every", "off"])
        else {
            panic!("off accepted");
        };
        assert_eq!(off.retention.compact_every, None);
        let Ok(Ok(Role::Serve(d))) = run(&["serve", "--database", db]) else {
            panic!("defaults accepted");
        };
        assert_eq!(d.retention.compact_every, Some(Duration::from_secs(60)));
    }

    #[test]
    fn statsd_flags_are_validated_together() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("w.db");
        let db = db.to_str().expect("utf-8 path");
        let Ok(Ok(Role::Serve(cfg))) = run(&["serve", "--database", db]) else {
            panic!("defaults accepted");
        };
        assert!(cfg.statsd.is_none(), "statsd is off by default");
        let Ok(Ok(Role::Serve(cfg))) =
            run(&["serve", "--database", db, "--statsd", "127.0.0.1:8125"])
        else {
            panic!("--statsd accepted");
        };
        let statsd = cfg.statsd.expect("statsd on");
        assert_eq!(statsd.listen.to_string(), "127.0.0.1:8125");
        assert_eq!(statsd.flush, Duration::from_secs(10));
        assert_eq!(statsd.device, "statsd");
        let err = match run(&[
            "serve",
            "--database",
            db,
            "--statsd",
            "localhost:8125",
            "--statsd-flush",
            "soon",
            "--statsd-device",
            "no/slash",
        ]) {
            Err(e) => e,
            Ok(_) => panic!("bad statsd flags accepted"),
        };
        for needle in [
            "3 configuration problem(s)",
            "statsd-flush",
            "statsd-device",
            "localhost:8125",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from: {err}");
        }
    }

    #[test]
    fn the_statsd_section_and_the_statsd_role_are_validated() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("w.db");
        let file = dir.path().join("widgetry.toml");
        let file_s = file.to_str().expect("utf-8 path");
        std::fs::write(
            &file,
            format!(
                "database = {db:?}\n[statsd]\nlisten = \"127.0.0.1:9125\"\nflush_interval = \"2s\"\n\
                 device = \"apps\"\npercentiles = [75, 99.9]\n"
            ),
        )
        .expect("write");
        // The section alone turns the listener on in `serve`.
        let Ok(Ok(Role::Serve(cfg))) = run(&["serve", "--config", file_s]) else {
            panic!("a valid [statsd] accepted");
        };
        let s = cfg.statsd.expect("statsd on from the file");
        assert_eq!(s.listen.to_string(), "127.0.0.1:9125");
        assert_eq!(s.flush, Duration::from_secs(2));
        assert_eq!(s.device, "apps");
        assert_eq!(percentile_list(&s.percentiles), "75,99.9");
        // Flags beat the section; the role has its own defaults.
        let Ok(Ok(Role::Statsd(r))) = run(&[
            "statsd",
            "--config",
            file_s,
            "--percentiles",
            "50",
            "--device",
            "edge-1",
        ]) else {
            panic!("statsd role accepted");
        };
        assert_eq!(r.statsd.listen.to_string(), "127.0.0.1:9125");
        assert_eq!(r.statsd.device, "edge-1");
        assert_eq!(percentile_list(&r.statsd.percentiles), "50");
        let dbs = db.to_str().expect("utf-8");
        let Ok(Ok(Role::Statsd(r))) = run(&["statsd", "--database", dbs]) else {
            panic!("statsd role defaults accepted");
        };
        assert_eq!(r.statsd.listen.to_string(), "0.0.0.0:8125");
        assert_eq!(percentile_list(&r.statsd.percentiles), "50,90,99");
        // Bad values name the flag or the file key.
        let err = match run(&["statsd", "--database", dbs, "--percentiles", "50,101,x"]) {
            Err(e) => e,
            Ok(_) => panic!("bad percentiles accepted"),
        };
        assert!(err.contains("percentiles"), "{err}");
        std::fs::write(
            &file,
            format!("database = {db:?}\n[statsd]\nlisten = \"127.0.0.1:9125\"\npercentiles = [0]\nflush_interval = \"never\"\n"),
        )
        .expect("write");
        let err = match run(&["serve", "--config", file_s]) {
            Err(e) => e,
            Ok(_) => panic!("a bad [statsd] accepted"),
        };
        for needle in [
            "statsd.percentiles",
            "statsd.flush_interval",
            "2 configuration problem(s)",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from: {err}");
        }
    }

    #[test]
    fn graphite_filters_are_globs_of_device_and_series() {
        let f = SeriesFilter::parse(&["line-1-*".into(), "*/cpu.*_pct".into()]).expect("valid");
        assert!(f.admits("line-1-press", "anything{k=v}"));
        assert!(f.admits("kiosk", "cpu.usage_pct"));
        assert!(f.admits("kiosk", "cpu.usage_pct{core=1}"));
        assert!(!f.admits("kiosk", "mem.used_bytes"));
        assert!(SeriesFilter::default().admits("any", "thing"));
        for bad in ["", "a/b/c", "/x", "a b"] {
            assert!(
                SeriesFilter::parse(&[bad.into()]).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn bridge_ws_sections_and_flags_are_validated_together() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("w.db");
        let file = dir.path().join("widgetry.toml");
        let path = file.to_str().expect("utf-8 path");
        let good = "[[bridge.ws]]\nurl = \"ws://127.0.0.1:9000/feed\"\ndevice = \"hrm-1\"\n";
        std::fs::write(&file, format!("database = {db:?}\n{good}")).expect("write config");
        let Ok(Ok(Role::Serve(cfg))) = run(&["serve", "--config", path]) else {
            panic!("a valid [[bridge.ws]] accepted");
        };
        let [b] = cfg.ws_bridges.as_slice() else {
            panic!("one bridge: {:?}", cfg.ws_bridges);
        };
        assert_eq!(b.url, "ws://127.0.0.1:9000/feed");
        assert_eq!(b.device, "hrm-1");
        assert_eq!(b.series.to_string(), WsBridgeConfig::DEFAULT_SERIES);
        assert_eq!(b.idle_timeout, Duration::from_secs(30));
        assert_eq!(b.timestamp_unit, TimestampUnit::Ms);
        assert_eq!(b.max_message_bytes, 65_536);
        let bad = "[[bridge.ws]]\nurl = \"wss://feed.example/x\"\ndevice = \"a/b\"\nidle_timeout = \"10ms\"\ntimestamp_unit = \"us\"\nmax_message_bytes = 1\nseries = \"\"\n";
        std::fs::write(&file, format!("database = {db:?}\n{good}{bad}")).expect("write config");
        let err = match run(&["serve", "--config", path]) {
            Err(e) => e,
            Ok(_) => panic!("a bad [[bridge.ws]] accepted"),
        };
        for needle in [
            "6 configuration problem(s)",
            "bridge.ws[1].url",
            "wss:// is not built in",
            "bridge.ws[1].device",
            "bridge.ws[1].idle_timeout",
            "bridge.ws[1].timestamp_unit",
            "bridge.ws[1].max_message_bytes",
            "bridge.ws[1].series",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from: {err}");
        }
        assert!(
            !err.contains("bridge.ws[0]"),
            "the good section is fine: {err}"
        );
        std::fs::write(
            &file,
            format!(
                "database = {db:?}\n[[bridge.ws]]\nurl = \"ws://h/x\"\ndevice = \"d\"\nport = 1\n"
            ),
        )
        .expect("write config");
        assert!(
            run(&["serve", "--config", path]).is_err_and(|e| e.contains("port")),
            "unknown keys are refused"
        );

        let dbs = db.to_str().expect("utf-8 path");
        let flags = [
            "bridge",
            "ws",
            "--url",
            "ws://127.0.0.1:9/x",
            "--device",
            "d1",
            "--database",
            dbs,
        ];
        let Ok(Ok(Role::Bridge(b))) = run(&[
            &flags[..],
            &["--timestamp-unit", "s", "--series", "hr{sensor=chest}"],
        ]
        .concat()) else {
            panic!("valid bridge ws flags accepted");
        };
        assert_eq!(b.bridge.timestamp_unit, TimestampUnit::S);
        assert_eq!(b.bridge.series.to_string(), "hr{sensor=chest}");
        assert!(b.metrics_listen.is_none());
        let err = match run(&[
            "bridge",
            "ws",
            "--url",
            "http://x/",
            "--device",
            "",
            "--idle-timeout",
            "x",
            "--database",
            dbs,
        ]) {
            Err(e) => e,
            Ok(_) => panic!("bad bridge ws flags accepted"),
        };
        for needle in [
            "3 configuration problem(s)",
            "url",
            "device",
            "idle_timeout",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from: {err}");
        }
        assert!(
            matches!(run(&[&flags[..], &["--check"]].concat()), Ok(Err(line)) if line.starts_with("configuration ok: bridge ws"))
        );
    }

    #[test]
    fn the_graphite_section_is_validated() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("w.db");
        let file = dir.path().join("widgetry.toml");
        let write = |graphite: &str| {
            std::fs::write(&file, format!("database = {db:?}\n[graphite]\n{graphite}"))
                .expect("write config");
        };
        let path = file.to_str().expect("utf-8 path");
        write("address = \"127.0.0.1:2003\"\n");
        let Ok(Ok(Role::Serve(cfg))) = run(&["serve", "--config", path]) else {
            panic!("a valid [graphite] accepted");
        };
        let g = cfg.graphite.expect("graphite on");
        assert_eq!((g.host.as_str(), g.port), ("127.0.0.1", 2003));
        assert_eq!(g.prefix, GraphiteConfig::DEFAULT_PREFIX);
        assert_eq!(g.flush, Duration::from_secs(10));
        write("address = \"nowhere\"\nflush_interval = \"often\"\nprefix = \"a b\"\n");
        let err = match run(&["serve", "--config", path]) {
            Err(e) => e,
            Ok(_) => panic!("a bad [graphite] accepted"),
        };
        for needle in [
            "3 configuration problem(s)",
            "graphite.address",
            "graphite.flush_interval",
            "graphite.prefix",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from: {err}");
        }
    }

    #[test]
    fn rules_alerts_and_presence_sections_are_validated() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("w.db");
        let file = dir.path().join("widgetry.toml");
        let path = file.to_str().expect("utf-8 path");
        let write = |body: &str| {
            std::fs::write(&file, format!("database = {db:?}\n{body}")).expect("write config");
        };
        write(
            "[presence]\ndefault_interval = \"30s\"\n[[presence.interval]]\ndevices = \"slow-*\"\nevery = \"5m\"\n\
             [[rules]]\nname = \"hot\"\nseries = \"temp\"\nwhen = \"> 5\"\n[alerts]\nwebhook = \"http://127.0.0.1:9/h\"\n",
        );
        let Ok(Ok(Role::Web(cfg))) = run(&["web", "--config", path]) else {
            panic!("valid sections accepted");
        };
        assert_eq!(cfg.presence.default_interval_ms, 30_000);
        assert_eq!(
            cfg.presence.intervals,
            vec![("slow-*".to_string(), 300_000)]
        );
        assert_eq!(cfg.alerting.rules.len(), 1);
        assert!(cfg.alerting.webhook.is_some());
        write(
            "[presence]\nstale_after = 5\nsilent_after = 2\n[[presence.interval]]\ndevices = \"a\"\nevery = \"1ms\"\n\
             [[rules]]\nname = \"x\"\nwhen = \"> 1\"\n[[rules]]\nname = \"x\"\nwhen = \"stale\"\n[alerts]\nwebhook = \"https://a/\"\n\
             [[rules]]\nname = \"r\"\nseries = \"t\"\nwhen = \"rate > 5\"\n\
             [[rules]]\nname = \"n\"\nseries = \"t\"\nwhen = \"no data\"\nfor = \"soon\"\n\
             [[rules]]\nname = \"j\"\nwhen = \"rejects > 1 in 2d\"\n",
        );
        let err = match run(&["serve", "--config", path]) {
            Err(e) => e,
            Ok(_) => panic!("bad sections accepted"),
        };
        for needle in [
            "presence.silent_after",
            "presence.interval[0].every",
            "rules[0].series",
            "rules[1].name",
            "alerts.webhook",
            "rules[2].when",
            "\"rate > 5\": give the rate's unit",
            "rules[3].for",
            "\"soon\"",
            "rules[4].when",
            "\"2d\" is longer than 24 hours",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from: {err}");
        }
    }

    #[test]
    fn a_short_server_password_is_refused_and_never_echoed() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("w.db");
        let db = db.to_str().expect("utf-8 path");
        let err = match run(&["serve", "--database", db, "--server-password", "hunter2"]) {
            Err(e) => e,
            Ok(_) => panic!("a 7-character server password accepted"),
        };
        assert!(
            err.contains("server-password") && err.contains("at least 16"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "password echoed: {err}");
        let long = "0123456789abcdef0123";
        match run(&["serve", "--database", db, "--server-password", long]) {
            Ok(Ok(Role::Serve(cfg))) => assert_eq!(cfg.server_password.as_deref(), Some(long)),
            _ => panic!("a 20-character server password is valid"),
        }
    }

    #[test]
    fn check_prints_the_resolved_settings_instead_of_running() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("w.db");
        let db = db.to_str().expect("utf-8 path");
        match run(&[
            "ingest",
            "--broker",
            "127.0.0.1:1884",
            "--database",
            db,
            "--check",
        ]) {
            Ok(Err(line)) => assert!(line.contains("ingest broker 127.0.0.1:1884"), "{line}"),
            _ => panic!("--check prints the configuration"),
        }
        match run(&["web", "--http-listen", "127.0.0.1:0", "--database", db]) {
            Ok(Ok(Role::Web(c))) => {
                assert_eq!(c.http_listen.port(), 0);
                assert!(c.http_tls.is_none(), "plain HTTP by default");
                assert!(c.bridge.broker.is_none(), "no --broker: the bridge polls");
            }
            _ => panic!("valid web configuration"),
        }
    }
}
