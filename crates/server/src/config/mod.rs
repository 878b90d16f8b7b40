//! Configuration of the server roles: the optional `widgetry.toml`, the
//! embedded broker's `broker.toml`, and their validation.
//!
//! Everything is checked before any socket is bound, and every problem is
//! reported at once, each naming its file and key (DESIGN.md §6.7). This
//! module must never bind, connect or open a database.

pub mod cli;
pub mod http_tls;
pub mod ingest;
pub mod roles;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The broker.toml shipped in the repository, used when no file is given
/// and none exists in the working directory.
pub const DEFAULT_BROKER_TOML: &str = include_str!("../../../../broker.toml");

/// Default addresses and paths.
pub const DEFAULT_MQTT_LISTEN: &str = "0.0.0.0:1883";
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_DATABASE: &str = "widgetry.db";

/// One configuration problem: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "config {}: {}", self.file, self.message)
        } else {
            write!(f, "config {}: {}: {}", self.file, self.key, self.message)
        }
    }
}

/// All problems found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError(pub Vec<Problem>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration problem(s):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, file: &str, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            file: file.to_string(),
            key: key.into(),
            message: message.into(),
        });
    }
}

/// Keys of the optional `widgetry.toml` (`--config`). Flags and
/// environment variables take precedence over it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// MQTT 3.1.1 listen address of the embedded broker (overrides broker.toml).
    pub mqtt_listen: Option<String>,
    /// MQTT 5 listen address of the embedded broker (overrides broker.toml).
    pub mqtt5_listen: Option<String>,
    /// HTTP listen address of the web service.
    pub http_listen: Option<String>,
    /// PEM certificate chain for HTTPS (with `http_tls_key`; both or neither).
    pub http_tls_cert: Option<PathBuf>,
    /// PEM private key of `http_tls_cert`.
    pub http_tls_key: Option<PathBuf>,
    /// SQLite database file, or a `postgres://` URL.
    pub database: Option<String>,
    /// Path of the embedded broker's configuration.
    pub broker_config: Option<PathBuf>,
    /// External broker (`host:port`) for the `ingest` role.
    pub broker: Option<String>,
    /// `[statsd]`: the statsd listener of `serve` and `widgetry statsd`.
    pub statsd: Option<StatsdFile>,
    /// `[graphite]`: forward committed samples to Carbon (`serve` only).
    pub graphite: Option<GraphiteFile>,
    /// `[[bridge.ws]]`: websocket source bridges run inside `serve`.
    pub bridge: Option<BridgeFile>,
    /// `[[rules]]`: health rules (crates/server/src/rules), re-applied at
    /// every start of `serve` and `web`.
    #[serde(default)]
    pub rules: Vec<crate::rules::RuleSpec>,
    /// `[alerts]`: where alert transitions go besides the database and the
    /// retained `…/alerts` topics.
    pub alerts: Option<AlertsFile>,
    /// `[presence]`: how devices are judged active, stale or silent.
    pub presence: Option<PresenceFile>,
}

/// The `[presence]` section of `widgetry.toml`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceFile {
    /// Expected interval of a device whose cadence is not learned yet (`10s`).
    pub default_interval: Option<String>,
    /// Intervals without data before a device is stale (3).
    pub stale_after: Option<u32>,
    /// Intervals without data before a device is silent (20).
    pub silent_after: Option<u32>,
    /// `[[presence.interval]]`: configured intervals by device glob.
    #[serde(default)]
    pub interval: Vec<PresenceIntervalFile>,
}

/// One `[[presence.interval]]`: devices matching `devices` are expected
/// every `every`, whatever their learned cadence.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceIntervalFile {
    pub devices: String,
    pub every: String,
}

/// The `[alerts]` section of `widgetry.toml`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsFile {
    /// `http://host:port/path` that each alert transition is POSTed to.
    pub webhook: Option<String>,
}

/// The `[bridge]` table of `widgetry.toml`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeFile {
    /// `[[bridge.ws]]`: one section per websocket upstream.
    #[serde(default)]
    pub ws: Vec<WsBridgeFile>,
}

/// One `[[bridge.ws]]` section (also what `widgetry bridge ws`'s flags
/// fill in): an upstream sending `{"timestamp": <ms>, "value": <number>}`
/// text frames.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WsBridgeFile {
    /// `ws://host[:port]/path` of the upstream (wss:// is not built in).
    pub url: String,
    /// Device id the samples are stored under.
    pub device: String,
    /// Series name, `name` or `name{key=value}` (default `value`).
    pub series: Option<String>,
    /// No frame or pong for this long means reconnect, e.g. `30s` (the default).
    pub idle_timeout: Option<String>,
    /// `ms` (the default) or `s`: what `timestamp` counts.
    pub timestamp_unit: Option<String>,
    /// Largest message accepted, in bytes (default 65536).
    pub max_message_bytes: Option<usize>,
    /// Longest wait between reconnect attempts, e.g. `10s` (the default).
    pub reconnect_max: Option<String>,
}

/// The `[statsd]` section of `widgetry.toml` (flags override each key).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsdFile {
    /// UDP address, e.g. `127.0.0.1:8125`; given, `serve` runs the listener.
    pub listen: Option<String>,
    /// Aggregation interval, e.g. `10s` (the default).
    pub flush_interval: Option<String>,
    /// Device the samples are stored under (default `statsd`).
    pub device: Option<String>,
    /// Timer percentiles, e.g. `[50, 90, 99.9]` (the default is 50, 90, 99).
    pub percentiles: Option<Vec<f64>>,
}

/// The `[graphite]` section of `widgetry.toml`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphiteFile {
    /// Carbon's plaintext listener, `HOST:PORT` (usually port 2003).
    pub address: String,
    /// Path of a series, with `{device}` and `{series}` replaced; labels
    /// are appended as Graphite tags (`;k=v`). Default
    /// `widgetry.{device}.{series}`.
    pub prefix: Option<String>,
    /// How often new commits are forwarded, e.g. `10s` (the default).
    pub flush_interval: Option<String>,
    /// Most lines held while Carbon is away (default 100000); beyond it the
    /// oldest are dropped and counted.
    pub max_buffered_lines: Option<usize>,
    /// Series to export: `DEVICE_GLOB` or `DEVICE_GLOB/SERIES_GLOB`
    /// patterns (`*`, `?`); default every series.
    #[serde(default)]
    pub filter: Vec<String>,
}

impl FileConfig {
    /// Reads `path`; a missing or malformed file is a problem, not a panic.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(vec![Problem {
                file: file.clone(),
                key: String::new(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        toml::from_str(&text).map_err(|e| {
            ConfigError(vec![Problem {
                file,
                key: String::new(),
                message: toml_error(&e, &text),
            }])
        })
    }
}

/// A TOML error as "TOML parse error at line L, column C: message",
/// without the excerpt of the offending line that toml's `Display` shows:
/// that line may hold a password (an `auth` table, a `postgres://` URL).
fn toml_error(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("TOML parse error at line {line}, column {column}: {message}")
        }
        None => format!("TOML parse error: {message}"),
    }
}

/// Where the broker configuration came from.
#[derive(Debug, Clone)]
pub enum BrokerSource {
    File(PathBuf),
    BuiltIn,
}

impl BrokerSource {
    fn label(&self) -> String {
        match self {
            BrokerSource::File(p) => p.display().to_string(),
            BrokerSource::BuiltIn => "broker.toml (built in)".into(),
        }
    }
}

/// The embedded broker's configuration, validated.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub rumqttd: rumqttd::Config,
    /// Address of the first MQTT 3.1.1 listener: where the ingestor connects.
    pub mqtt_listen: SocketAddr,
    /// Address of the first MQTT 5 listener, if any.
    pub mqtt5_listen: Option<SocketAddr>,
    /// The names of those listeners in broker.toml (`[v4.NAME]`, `[v5.NAME]`).
    pub mqtt_name: String,
    pub mqtt5_name: Option<String>,
    /// `[access] observers`: usernames (with credentials in an `auth`
    /// table) that may subscribe to every topic and publish nothing.
    pub observers: std::collections::HashSet<String>,
}

/// Listen addresses given on the command line, replacing broker.toml's.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListenOverride {
    /// `listen` of the first `[v4.*]` server (`--mqtt-listen`).
    pub v4: Option<SocketAddr>,
    /// `listen` of the first `[v5.*]` server (`--mqtt5-listen`).
    pub v5: Option<SocketAddr>,
}

/// Parses and validates a broker.toml text, applying `listen_override` to
/// the first `[v4.*]` and `[v5.*]` servers.
pub fn parse_broker_config(
    source: &BrokerSource,
    text: &str,
    listen_override: ListenOverride,
) -> Result<BrokerConfig, ConfigError> {
    let file = source.label();
    let mut p = Problems::default();
    let table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            p.add(&file, "", toml_error(&e, text));
            return Err(ConfigError(p.0));
        }
    };
    check_broker_table(&file, &table, &mut p);
    let Some(first_v4) = table
        .get("v4")
        .and_then(|v| v.as_table())
        .and_then(|t| t.keys().min().cloned())
    else {
        if !p.0.iter().any(|x| x.key == "v4") {
            p.add(
                &file,
                "v4",
                "no [v4.*] listener: add one (e.g. [v4.1] listen = \"0.0.0.0:1883\")",
            );
        }
        return Err(ConfigError(p.0));
    };
    if !p.0.is_empty() {
        return Err(ConfigError(p.0));
    }
    // `[access]` is Widgetry's, not rumqttd's.
    let mut table = table;
    let observers: std::collections::HashSet<String> = table
        .remove("access")
        .and_then(|a| a.get("observers").and_then(|o| o.as_array()).cloned())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let mut value = toml::Value::Table(table);
    let first_v5 = value
        .get("v5")
        .and_then(|v| v.as_table())
        .and_then(|t| t.keys().min().cloned());
    for (version, name, addr) in [
        ("v4", Some(first_v4.clone()), listen_override.v4),
        ("v5", first_v5.clone(), listen_override.v5),
    ] {
        if let (Some(name), Some(addr)) = (name, addr)
            && let Some(server) = value
                .get_mut(version)
                .and_then(|v| v.get_mut(&name))
                .and_then(|v| v.as_table_mut())
        {
            server.insert("listen".into(), toml::Value::String(addr.to_string()));
        }
    }
    let rumqttd: rumqttd::Config = value.try_into().map_err(|e: toml::de::Error| {
        ConfigError(vec![Problem {
            file: file.clone(),
            key: String::new(),
            message: e.to_string().trim().replace('\n', " "),
        }])
    })?;
    let mqtt_listen = rumqttd
        .v4
        .as_ref()
        .and_then(|m| m.get(&first_v4))
        .map(|s| s.listen)
        .ok_or_else(|| {
            ConfigError(vec![Problem {
                file: file.clone(),
                key: format!("[v4.{first_v4}] listen"),
                message: "missing".into(),
            }])
        })?;
    let accounts = device_credentials(&rumqttd).unwrap_or_default();
    let unknown: Vec<&String> = observers
        .iter()
        .filter(|o| !accounts.contains_key(*o))
        .collect();
    if !unknown.is_empty() {
        return Err(ConfigError(vec![Problem {
            file: file.clone(),
            key: "[access] observers".into(),
            message: format!(
                "{unknown:?} have no password in any [v4.*.connections.auth] or [v5.*.connections.auth] table: add one, or remove them from observers"
            ),
        }]));
    }
    let mqtt5_name = first_v5.clone();
    let mqtt5_listen = first_v5.and_then(|name| {
        rumqttd
            .v5
            .as_ref()
            .and_then(|m| m.get(&name))
            .map(|s| s.listen)
    });
    Ok(BrokerConfig {
        rumqttd,
        mqtt_listen,
        mqtt5_listen,
        mqtt_name: first_v4,
        mqtt5_name,
        observers,
    })
}

enum Kind {
    Int { min: i64, max: i64 },
    Bool,
    Str,
    Addr,
    Strategy,
}

fn check_value(file: &str, key: &str, v: &toml::Value, kind: Kind, p: &mut Problems) {
    match kind {
        Kind::Int { min, max } => match v.as_integer() {
            Some(i) if (min..=max).contains(&i) => {}
            Some(i) => p.add(file, key, format!("{i} is out of range ({min}-{max})")),
            None => p.add(file, key, format!("{v} is not an integer")),
        },
        Kind::Bool => {
            if v.as_bool().is_none() {
                p.add(file, key, format!("{v} is not true or false"));
            }
        }
        Kind::Str => {
            if v.as_str().is_none() {
                p.add(file, key, format!("{v} is not a string"));
            }
        }
        Kind::Addr => match v.as_str().map(str::parse::<SocketAddr>) {
            Some(Ok(_)) => {}
            Some(Err(e)) => p.add(
                file,
                key,
                format!("{v}: {e} (expected IP:PORT, e.g. \"0.0.0.0:1883\")"),
            ),
            None => p.add(file, key, format!("{v} is not a string")),
        },
        Kind::Strategy => match v.as_str() {
            Some("roundrobin" | "random" | "sticky") => {}
            _ => p.add(
                file,
                key,
                format!("{v}: expected \"roundrobin\", \"random\" or \"sticky\""),
            ),
        },
    }
}

const USIZE_MAX: i64 = i64::MAX;

fn check_broker_table(file: &str, t: &toml::Table, p: &mut Problems) {
    for (k, v) in t {
        match k.as_str() {
            "id" => check_value(file, "id", v, Kind::Int { min: 0, max: USIZE_MAX }, p),
            "router" => match v.as_table() {
                Some(r) => check_router(file, r, p),
                None => p.add(file, "router", "must be a table [router]"),
            },
            "v4" | "v5" => match v.as_table() {
                Some(servers) if !servers.is_empty() => {
                    for (name, s) in servers {
                        let path = format!("[{k}.{name}]");
                        match s.as_table() {
                            Some(s) => check_server(file, &path, s, p),
                            None => p.add(file, path, "must be a table"),
                        }
                    }
                }
                _ => p.add(file, k.as_str(), format!("must contain listeners such as [{k}.1]")),
            },
            "access" => match v.as_table() {
                Some(a) => {
                    for (ak, av) in a {
                        match ak.as_str() {
                            "observers" => match av.as_array() {
                                Some(list) if list.iter().all(|u| u.is_str()) => {}
                                _ => p.add(file, "[access] observers", "must be a list of usernames"),
                            },
                            other => p.add(file, format!("[access] {other}"), "unknown key (expected observers)"),
                        }
                    }
                }
                None => p.add(file, "access", "must be a table [access]"),
            },
            "ws" | "prometheus" | "console" | "metrics" | "cluster" | "bridge" => p.add(
                file,
                k.as_str(),
                format!(
                    "[{k}] is not supported by Widgetry's embedded broker (built without it); remove it, or run an external broker such as Mosquitto and point `widgetry ingest --broker` at it"
                ),
            ),
            other => p.add(file, other, "unknown key; see the comments in the shipped broker.toml for the keys that take effect"),
        }
    }
    if !t.contains_key("router") {
        p.add(file, "router", "missing [router] table");
    }
}

fn check_router(file: &str, r: &toml::Table, p: &mut Problems) {
    let required = [
        "max_connections",
        "max_outgoing_packet_count",
        "max_segment_size",
        "max_segment_count",
    ];
    for key in required {
        if !r.contains_key(key) {
            p.add(file, format!("[router] {key}"), "missing");
        }
    }
    for (k, v) in r {
        let key = format!("[router] {k}");
        match k.as_str() {
            "max_connections" => check_value(file, &key, v, Kind::Int { min: 1, max: 1_000_000 }, p),
            "max_outgoing_packet_count" => check_value(file, &key, v, Kind::Int { min: 1, max: USIZE_MAX }, p),
            // rumqttd panics below 1 KiB.
            "max_segment_size" => check_value(file, &key, v, Kind::Int { min: 1024, max: USIZE_MAX }, p),
            "max_segment_count" => check_value(file, &key, v, Kind::Int { min: 1, max: 100_000 }, p),
            "shared_subscriptions_strategy" => check_value(file, &key, v, Kind::Strategy, p),
            "initialized_filters" => match v.as_array() {
                Some(a) if a.iter().all(|f| f.is_str()) => {}
                _ => p.add(file, key, "must be a list of topic filter strings"),
            },
            "custom_segment" => match v.as_table() {
                Some(filters) => {
                    for (filter, seg) in filters {
                        let base = format!("[router.custom_segment.'{filter}']");
                        let Some(seg) = seg.as_table() else {
                            p.add(file, base, "must be a table");
                            continue;
                        };
                        for need in ["max_segment_size", "max_segment_count"] {
                            if !seg.contains_key(need) {
                                p.add(file, format!("{base} {need}"), "missing");
                            }
                        }
                        for (sk, sv) in seg {
                            let skey = format!("{base} {sk}");
                            match sk.as_str() {
                                "max_segment_size" => check_value(file, &skey, sv, Kind::Int { min: 1024, max: USIZE_MAX }, p),
                                "max_segment_count" => check_value(file, &skey, sv, Kind::Int { min: 1, max: 100_000 }, p),
                                _ => p.add(file, skey, "unknown key (expected max_segment_size, max_segment_count)"),
                            }
                        }
                    }
                }
                None => p.add(file, key, "must be a table of filter = { max_segment_size, max_segment_count }"),
            },
            _ => p.add(file, key, "unknown key (expected max_connections, max_outgoing_packet_count, max_segment_size, max_segment_count, shared_subscriptions_strategy, initialized_filters, custom_segment)"),
        }
    }
}

fn check_server(file: &str, path: &str, s: &toml::Table, p: &mut Problems) {
    for need in ["name", "listen", "next_connection_delay_ms", "connections"] {
        if !s.contains_key(need) {
            p.add(file, format!("{path} {need}"), "missing");
        }
    }
    for (k, v) in s {
        let key = format!("{path} {k}");
        match k.as_str() {
            "name" => check_value(file, &key, v, Kind::Str, p),
            "listen" => check_value(file, &key, v, Kind::Addr, p),
            "next_connection_delay_ms" => check_value(
                file,
                &key,
                v,
                Kind::Int {
                    min: 0,
                    max: 60_000,
                },
                p,
            ),
            "tls" => match v.as_table() {
                Some(t) => check_tls(
                    file,
                    &format!("[{}.tls]", path.trim_matches(['[', ']'])),
                    t,
                    p,
                ),
                None => p.add(file, key, "must be a table with certpath and keypath"),
            },
            "connections" => match v.as_table() {
                Some(c) => check_connections(
                    file,
                    &format!("[{}.connections]", path.trim_matches(['[', ']'])),
                    c,
                    p,
                ),
                None => p.add(file, key, "must be a table"),
            },
            _ => p.add(
                file,
                key,
                "unknown key (expected name, listen, next_connection_delay_ms, tls, connections)",
            ),
        }
    }
}

/// A listener's `[….tls]`: PEM files of the server's certificate chain
/// (`certpath`) and private key (`keypath`), both readable now.
fn check_tls(file: &str, path: &str, t: &toml::Table, p: &mut Problems) {
    for need in ["certpath", "keypath"] {
        if !t.contains_key(need) {
            p.add(file, format!("{path} {need}"), "missing (a PEM file)");
        }
    }
    for (k, v) in t {
        let key = format!("{path} {k}");
        match (k.as_str(), v.as_str()) {
            ("certpath" | "keypath", Some(f)) => {
                let marker = if k == "certpath" { "CERTIFICATE-----" } else { "PRIVATE KEY-----" };
                match std::fs::read_to_string(f) {
                    Err(e) => p.add(file, key, format!("{f:?}: {e}")),
                    Ok(text) if !text.contains(marker) => p.add(
                        file,
                        key,
                        format!("{f:?} holds no PEM \"{}\" block", marker.trim_end_matches('-')),
                    ),
                    Ok(_) => {}
                }
            }
            ("certpath" | "keypath", None) => p.add(file, key, "must be a file path (string)"),
            ("capath", _) => p.add(
                file,
                key,
                "client certificates are not checked by the embedded broker; remove capath (devices log in with accounts)",
            ),
            _ => p.add(file, key, "unknown key (expected certpath, keypath)"),
        }
    }
}

fn check_connections(file: &str, path: &str, c: &toml::Table, p: &mut Problems) {
    for need in [
        "connection_timeout_ms",
        "max_payload_size",
        "max_inflight_count",
    ] {
        if !c.contains_key(need) {
            p.add(file, format!("{path} {need}"), "missing");
        }
    }
    for (k, v) in c {
        let key = format!("{path} {k}");
        match k.as_str() {
            "connection_timeout_ms" => check_value(file, &key, v, Kind::Int { min: 1, max: 65_535 }, p),
            "max_payload_size" => check_value(file, &key, v, Kind::Int { min: 1024, max: 256 * 1024 * 1024 }, p),
            "max_inflight_count" => check_value(file, &key, v, Kind::Int { min: 1, max: 65_535 }, p),
            "dynamic_filters" => {
                check_value(file, &key, v, Kind::Bool, p);
                if v.as_bool() == Some(false) {
                    p.add(file, key, "false disconnects any client that publishes to a topic nobody subscribed to; set it to true");
                }
            }
            "auth" => match v.as_table() {
                Some(users) => {
                    for (user, pass) in users {
                        if !pass.is_str() {
                            // Never echo the value: it is a password.
                            p.add(file, format!("{path} auth.{user}"), "password must be a string");
                        }
                    }
                }
                None => p.add(file, key, "must be a table of user = \"password\""),
            },
            _ => p.add(file, key, "unknown key (expected connection_timeout_ms, max_payload_size, max_inflight_count, dynamic_filters, auth)"),
        }
    }
    if !c.contains_key("dynamic_filters") {
        p.add(
            file,
            format!("{path} dynamic_filters"),
            "missing; set it to true",
        );
    }
}

/// Reads the broker configuration from `path`, or from ./broker.toml if it
/// exists, or the built-in default.
pub fn load_broker_config(
    path: Option<&Path>,
    listen_override: ListenOverride,
) -> Result<BrokerConfig, ConfigError> {
    let local = Path::new("broker.toml");
    let (source, text) = match path {
        Some(p) => (BrokerSource::File(p.to_path_buf()), read(p)?),
        None if local.exists() => (BrokerSource::File(local.to_path_buf()), read(local)?),
        None => (BrokerSource::BuiltIn, DEFAULT_BROKER_TOML.to_string()),
    };
    parse_broker_config(&source, &text, listen_override)
}

fn read(p: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(p).map_err(|e| {
        ConfigError(vec![Problem {
            file: p.display().to_string(),
            key: String::new(),
            message: format!("cannot read: {e}"),
        }])
    })
}

/// Parses an address given by flag, env or config file; `what` names it.
pub fn parse_addr(
    value: &str,
    source: &str,
    key: &str,
    allow_port_zero: bool,
) -> Result<SocketAddr, Problem> {
    let problem = |message: String| Problem {
        file: source.to_string(),
        key: key.to_string(),
        message,
    };
    let addr: SocketAddr = value.parse().map_err(|e| {
        problem(format!(
            "{value:?}: {e} (expected IP:PORT, e.g. 0.0.0.0:8080)"
        ))
    })?;
    if addr.port() == 0 && !allow_port_zero {
        return Err(problem(format!(
            "{value:?}: port 0 is not allowed here; pick a free port"
        )));
    }
    Ok(addr)
}

/// Parses `HOST:PORT` (an IPv6 host may be bracketed) for a broker address.
pub fn parse_host_port(value: &str, source: &str, key: &str) -> Result<(String, u16), Problem> {
    widgetry_common::parse_host_port(value).map_err(|message| Problem {
        file: source.to_string(),
        key: key.to_string(),
        message,
    })
}

/// Parses a retention period: `forever`, or a number with a unit s, m, h,
/// d or w (e.g. `30d`).
pub fn parse_retention(
    value: &str,
    source: &str,
    key: &str,
) -> Result<Option<std::time::Duration>, Problem> {
    let problem = || Problem {
        file: source.to_string(),
        key: key.to_string(),
        message: format!(
            "{value:?} is not a retention period: use forever or a number with s, m, h, d or w (e.g. 30d)"
        ),
    };
    if value == "forever" {
        return Ok(None);
    }
    // A bare number has no obvious unit for a retention period.
    if value.ends_with(|c: char| c.is_ascii_digit()) {
        return Err(problem());
    }
    match widgetry_common::parse_duration(value) {
        Ok(d)
            if d >= std::time::Duration::from_secs(1)
                && d < std::time::Duration::from_secs(1_000_000 * 86_400) =>
        {
            Ok(Some(d))
        }
        _ => Err(problem()),
    }
}

/// Where the data lives: a SQLite file (the default) or a PostgreSQL
/// server (`postgres://user:password@host:port/database`).
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Database {
    /// Parses a `--database` value: a `postgres://` or `postgresql://` URL,
    /// otherwise a file path. Checks what can be checked without
    /// connecting: the SQLite file's directory exists, the URL parses.
    pub fn parse(value: &str, source: &str, key: &str) -> Result<Database, Problem> {
        let problem = |message: String| Problem {
            file: source.to_string(),
            key: key.to_string(),
            message,
        };
        let lower = value.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            let rest = &value[value.find("://").map(|i| i + 3).unwrap_or(0)..];
            let host = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
            let host = host.split(['/', '?']).next().unwrap_or("");
            if host.is_empty() {
                return Err(problem(format!(
                    "{}: no host; expected postgres://user:password@host:port/database",
                    redact_url(value)
                )));
            }
            return Ok(Database::Postgres(value.to_string()));
        }
        if lower.contains("://") {
            return Err(problem(format!(
                "{}: unsupported database URL; use a SQLite file path or postgres://user:password@host:port/database",
                redact_url(value)
            )));
        }
        if value.is_empty() {
            return Err(problem(
                "empty; give a SQLite file path or a postgres:// URL".into(),
            ));
        }
        let path = PathBuf::from(value);
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if dir.is_dir() {
            Ok(Database::Sqlite(path))
        } else {
            Err(problem(format!(
                "{}: directory {} does not exist; create it or choose another path",
                path.display(),
                dir.display()
            )))
        }
    }

    /// The value to pass back as `--database` (with any password: keep it
    /// out of logs; `Display` redacts it).
    pub fn to_arg(&self) -> String {
        match self {
            Database::Sqlite(p) => p.display().to_string(),
            Database::Postgres(url) => url.clone(),
        }
    }
}

/// Shown in logs and errors: a PostgreSQL URL without its password.
impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "{}", p.display()),
            Database::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Database({self})")
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…`.
pub fn redact_url(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[start..];
    let auth_end = rest.find('/').unwrap_or(rest.len());
    match rest[..auth_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{}{}:***{}", &url[..start], &rest[..colon], &rest[at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Every MQTT listener's address (3.1.1 and 5).
pub fn listen_addrs(cfg: &rumqttd::Config) -> Vec<SocketAddr> {
    [&cfg.v4, &cfg.v5]
        .into_iter()
        .flatten()
        .flat_map(|m| m.values().map(|s| s.listen))
        .collect()
}

/// The device credentials of every listener's `auth` table, merged: with
/// any of them set, every listener requires credentials.
pub fn device_credentials(cfg: &rumqttd::Config) -> Option<HashMap<String, String>> {
    let mut all: Option<HashMap<String, String>> = None;
    for servers in [&cfg.v4, &cfg.v5].into_iter().flatten() {
        for server in servers.values() {
            if let Some(auth) = &server.connections.auth {
                all.get_or_insert_with(HashMap::new).extend(auth.clone());
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_a_path_or_a_postgres_url() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("w.db");
        assert_eq!(
            Database::parse(&file.display().to_string(), "flag", "database").expect("path"),
            Database::Sqlite(file)
        );
        let url = "postgres://w:s3cret@db.example:5432/widgetry";
        let db = Database::parse(url, "flag", "database").expect("url");
        assert_eq!(db, Database::Postgres(url.into()));
        assert_eq!(db.to_string(), "postgres://w:***@db.example:5432/widgetry");
        assert_eq!(db.to_arg(), url);
        assert!(
            Database::parse("postgresql://h/db", "f", "database").is_ok(),
            "postgresql:// is accepted too"
        );
        let e = Database::parse("postgres:///db", "f", "database").expect_err("no host");
        assert!(e.message.contains("no host"), "{}", e.message);
        let e = Database::parse("mysql://u:pw@h/db", "f", "database").expect_err("mysql");
        assert!(
            e.message.contains("unsupported") && !e.message.contains("pw"),
            "{}",
            e.message
        );
        let e = Database::parse("/no/such/dir/w.db", "f", "database").expect_err("dir");
        assert!(e.message.contains("does not exist"), "{}", e.message);
    }

    #[test]
    fn retention_periods() {
        let d = |s| parse_retention(s, "f", "k");
        assert_eq!(d("forever"), Ok(None));
        assert_eq!(
            d("30d"),
            Ok(Some(std::time::Duration::from_secs(30 * 86_400)))
        );
        assert_eq!(
            d("2w"),
            Ok(Some(std::time::Duration::from_secs(14 * 86_400)))
        );
        assert_eq!(d("90m"), Ok(Some(std::time::Duration::from_secs(5400))));
        for bad in ["", "0d", "30", "d", "-1d", "0.1s", "30x"] {
            assert!(d(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn problems(text: &str) -> Vec<String> {
        match parse_broker_config(
            &BrokerSource::File("b.toml".into()),
            text,
            Default::default(),
        ) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn a_tls_listener_needs_readable_pem_files_and_no_client_ca() {
        let dir = tempfile::tempdir().expect("dir");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        std::fs::write(&key, "not a key").expect("write");
        let with_tls = |tls: &str| {
            format!(
                "{DEFAULT_BROKER_TOML}\n[v4.2]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nnext_connection_delay_ms = 0\n[v4.2.tls]\n{tls}\n[v4.2.connections]\nconnection_timeout_ms = 2000\nmax_payload_size = 1114112\nmax_inflight_count = 500\n"
            )
        };
        let c = cert.display().to_string();
        let k = key.display().to_string();
        let got = problems(&with_tls(&format!(
            "certpath = {c:?}\nkeypath = {k:?}\ncapath = {c:?}"
        )));
        assert!(
            got.iter()
                .any(|p| p.contains("[v4.2.tls] keypath") && p.contains("PRIVATE KEY")),
            "{got:?}"
        );
        assert!(
            got.iter().any(|p| p.contains("[v4.2.tls] capath")),
            "{got:?}"
        );
        assert!(
            !got.iter().any(|p| p.contains("certpath")),
            "the certificate is fine: {got:?}"
        );
        let got = problems(&with_tls("certpath = \"/nonexistent/cert.pem\""));
        assert!(
            got.iter()
                .any(|p| p.contains("[v4.2.tls] keypath") && p.contains("missing")),
            "{got:?}"
        );
        assert!(
            got.iter().any(|p| p.contains("/nonexistent/cert.pem")),
            "{got:?}"
        );
    }

    #[test]
    fn shipped_broker_toml_is_valid() {
        let cfg = parse_broker_config(
            &BrokerSource::BuiltIn,
            DEFAULT_BROKER_TOML,
            Default::default(),
        )
        .expect("the shipped broker.toml must be valid");
        assert_eq!(cfg.mqtt_listen.to_string(), DEFAULT_MQTT_LISTEN);
        // MQTT 5 clients get their own listener by default.
        assert_eq!(cfg.mqtt5_listen.map(|a| a.port()), Some(1884));
        // Per-device ack logs stay small (memory grows with the fleet otherwise).
        let ack = cfg
            .rumqttd
            .router
            .custom_segment
            .as_ref()
            .and_then(|c| c.get(&widgetry_proto::topic::TopicKind::Ack.filter()))
            .expect("a custom segment for the ack filter");
        assert!(ack.max_segment_size * ack.max_segment_count <= 8192);
        let over: SocketAddr = "127.0.0.1:4444".parse().expect("addr");
        let over5: SocketAddr = "127.0.0.1:4445".parse().expect("addr");
        let both = ListenOverride {
            v4: Some(over),
            v5: Some(over5),
        };
        let cfg =
            parse_broker_config(&BrokerSource::BuiltIn, DEFAULT_BROKER_TOML, both).expect("valid");
        assert_eq!(cfg.mqtt_listen, over);
        assert_eq!(cfg.mqtt5_listen, Some(over5));
    }

    #[test]
    fn reports_every_problem_with_key() {
        let text = DEFAULT_BROKER_TOML
            .replace("listen = \"0.0.0.0:1883\"", "listen = \"0.0.0.0:99999\"")
            .replace("max_segment_count = 3", "max_segment_count = 3\nbogus = 1")
            .replacen(
                "connection_timeout_ms = 5000",
                "connection_timeout_ms = 70000",
                1,
            );
        let got = problems(&text);
        assert_eq!(got.len(), 3, "{got:#?}");
        assert!(got[0].contains("b.toml") || got.iter().all(|g| g.starts_with("config b.toml")));
        assert!(
            got.iter()
                .any(|g| g.contains("[router] bogus") && g.contains("unknown key")),
            "{got:#?}"
        );
        assert!(
            got.iter()
                .any(|g| g.contains("[v4.1] listen") && g.contains("99999")),
            "{got:#?}"
        );
        assert!(
            got.iter()
                .any(|g| g.contains("[v4.1.connections] connection_timeout_ms")
                    && g.contains("out of range")),
            "{got:#?}"
        );
    }

    #[test]
    fn rejects_unsupported_sections_and_false_dynamic_filters() {
        let text = DEFAULT_BROKER_TOML.replace("dynamic_filters = true", "dynamic_filters = false")
            + "\n[console]\nlisten = \"0.0.0.0:3030\"\n";
        let got = problems(&text);
        assert!(
            got.iter().any(|g| g.contains("dynamic_filters")),
            "{got:#?}"
        );
        assert!(
            got.iter()
                .any(|g| g.contains("console") && g.contains("not supported")),
            "{got:#?}"
        );
        assert!(!problems("id = 0\n").is_empty());
        assert!(!problems("this is not toml").is_empty());
    }

    #[test]
    fn observers_need_a_password_and_a_list_of_names() {
        let with = |access: &str| {
            DEFAULT_BROKER_TOML.replacen(
                "\n[v5.1]\n",
                &format!("\n[v4.1.connections.auth]\nviewer = \"pw\"\n\n{access}\n\n[v5.1]\n"),
                1,
            )
        };
        let ok = parse_broker_config(
            &BrokerSource::BuiltIn,
            &with("[access]\nobservers = [\"viewer\"]"),
            Default::default(),
        )
        .expect("an observer with a password");
        assert!(ok.observers.contains("viewer"));
        let got = problems(&with("[access]\nobservers = [\"ghost\"]")).join("\n");
        assert!(
            got.contains("[access] observers") && got.contains("ghost"),
            "{got}"
        );
        let got = problems(&with("[access]\nobservers = \"viewer\"")).join("\n");
        assert!(got.contains("must be a list of usernames"), "{got}");
        let got = problems(&with("[access]\nreaders = []")).join("\n");
        assert!(
            got.contains("[access] readers") && got.contains("unknown key"),
            "{got}"
        );
    }

    #[test]
    fn auth_values_are_never_echoed() {
        let text = DEFAULT_BROKER_TOML.replacen(
            "\n[v5.1]\n",
            "\n[v4.1.connections.auth]\ndemo = 12345678\n\n[v5.1]\n",
            1,
        );
        assert_ne!(text, DEFAULT_BROKER_TOML);
        let got = problems(&text).join("\n");
        assert!(got.contains("auth.demo"), "{got}");
        assert!(!got.contains("12345678"), "password leaked: {got}");
    }

    /// Found by the fuzz target `broker_toml`: toml's error text quotes
    /// the offending line, here a password of a duplicate user.
    #[test]
    fn a_toml_syntax_error_never_shows_the_offending_line() {
        let text = DEFAULT_BROKER_TOML.replacen(
            "\n[v5.1]\n",
            "\n[v4.1.connections.auth]\nd1 = \"d1-secret\"\nd1 = \"d2-secret\"\n\n[v5.1]\n",
            1,
        );
        let line = text
            .lines()
            .position(|l| l.contains("d2-secret"))
            .expect("inserted")
            + 1;
        let got = problems(&text).join("\n");
        assert!(
            got.contains(&format!("line {line}, column 1")) && got.contains("duplicate key"),
            "{got}"
        );
        assert!(!got.contains("secret"), "password leaked: {got}");
        // Any bad line, e.g. an unterminated string, in widgetry.toml too.
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("widgetry.toml");
        std::fs::write(&file, "database = \"postgres://w:hunter22@db/w\nx = 1\n").expect("write");
        let got = FileConfig::load(&file)
            .expect_err("unterminated")
            .to_string();
        assert!(got.contains("line 1"), "{got}");
        assert!(!got.contains("hunter22"), "password leaked: {got}");
    }
}
