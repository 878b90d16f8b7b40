//! The agent's settings: `agent.toml`, environment variables and flags
//! gathered into [`Raw`] (later sources win) and validated into an
//! [`AgentConfig`] by [`build`], every problem at once, each naming its
//! source. `main.rs` parses the flags; [`from_file_text`] is the
//! `agent.toml` loader on its own (the fuzz target `agent_toml`).

use std::time::Duration;

use crate::AgentConfig;
use crate::conf;

/// Parses "1s", "250ms", "2m", "1h" or a bare number of seconds, above
/// 0 and at most a day.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = widgetry_common::parse_duration(text)?;
    if d.is_zero() || d > Duration::from_secs(86_400) {
        return Err(format!("{text:?} is out of range (above 0, at most 24h)"));
    }
    Ok(d)
}

/// Every setting, as a flag name without `--`; the same names (with `_`
/// for `-`) are the keys of `agent.toml`.
pub const KEYS: [&str; 21] = [
    "broker",
    "device",
    "username",
    "password",
    "ca-file",
    "interval",
    "batch-max-samples",
    "batch-max-bytes",
    "batch-max-wait",
    "ack-timeout",
    "spool-dir",
    "spool-max-bytes",
    "watch",
    "watch-pid",
    "events-socket",
    "events-udp",
    "statsd",
    "statsd-flush",
    "events-queue",
    "inputs",
    "config",
];

/// Environment variables, by setting.
pub const ENV: [(&str, &str); 8] = [
    ("broker", "WIDGETRY_BROKER"),
    ("device", "WIDGETRY_DEVICE"),
    ("username", "WIDGETRY_MQTT_USERNAME"),
    ("password", "WIDGETRY_MQTT_PASSWORD"),
    ("ca-file", "WIDGETRY_CA_FILE"),
    ("spool-dir", "WIDGETRY_SPOOL_DIR"),
    ("statsd", "WIDGETRY_STATSD"),
    ("config", "WIDGETRY_AGENT_CONFIG"),
];

/// Raw settings gathered from the file, the environment and the flags
/// (later sources win; `watch` and `watch-pid` accumulate).
#[derive(Default)]
pub struct Raw {
    pub values: std::collections::HashMap<&'static str, (String, String)>,
    pub lists: Vec<(&'static str, String, String)>,
}

impl Raw {
    /// Records `value` for `key` from `source` (a later call wins).
    pub fn set(&mut self, key: &'static str, value: String, source: String) {
        if matches!(key, "watch" | "watch-pid") {
            self.lists.push((key, value, source));
        } else {
            self.values.insert(key, (value, source));
        }
    }
}

/// The setting named `name` (flag spelling), if there is one.
pub fn key_of(name: &str) -> Option<&'static str> {
    KEYS.iter().copied().find(|k| *k == name)
}

/// Reads `agent.toml`: every key is a setting name with `_` for `-`.
pub fn load_text(path: &str, text: &str, raw: &mut Raw, problems: &mut Vec<String>) {
    let entries = match conf::parse(text) {
        Ok(e) => e,
        Err(errs) => {
            problems.extend(errs.into_iter().map(|e| format!("config {path}: {e}")));
            return;
        }
    };
    for (k, v) in entries {
        let source = format!("config {path}: key {k}");
        let Some(key) = key_of(&k.replace('_', "-")).filter(|k| *k != "config") else {
            problems.push(format!(
                "{source}: unknown key (see widgetry-agent --help for the settings)"
            ));
            continue;
        };
        match (v, key) {
            (conf::Value::List(items), "watch" | "watch-pid") => {
                for item in items {
                    raw.set(key, item, source.clone());
                }
            }
            (conf::Value::List(items), "inputs") => raw.set(key, items.join(","), source),
            (conf::Value::Scalar(s), _) => raw.set(key, s, source),
            (conf::Value::List(_), _) => {
                problems.push(format!("{source}: expected a single value, not a list"))
            }
        }
    }
}

fn bad(problems: &mut Vec<String>, (value, source): &(String, String), why: &str) {
    problems.push(format!("{source}: {value:?} {why}"));
}

/// Validates the gathered settings; every problem names its source.
pub fn build(raw: Raw, problems: &mut Vec<String>) -> Option<AgentConfig> {
    let mut cfg = AgentConfig::new("", 0, "");
    let get = |k: &str| raw.values.get(k).cloned();
    let (broker, src) = get("broker").unwrap_or(("127.0.0.1:1883".into(), "default".into()));
    match broker.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>())) {
        Some((host, Ok(port))) if !host.is_empty() && port != 0 => {
            cfg.broker_host = host.trim_matches(['[', ']']).to_string();
            cfg.broker_port = port;
        }
        _ => bad(
            problems,
            &(broker, src),
            "is not HOST:PORT (e.g. 127.0.0.1:1883)",
        ),
    }
    match get("device") {
        Some(d) => match widgetry_proto::validate::validate_device(&d.0) {
            Ok(()) => cfg.device = d.0,
            Err(e) => problems.push(format!("{}: {e}", d.1)),
        },
        None => problems
            .push("--device is required (or env WIDGETRY_DEVICE, or device in agent.toml)".into()),
    }
    for (key, slot) in [
        ("interval", &mut cfg.interval),
        ("batch-max-wait", &mut cfg.batch_max_wait),
        ("ack-timeout", &mut cfg.ack_timeout),
        ("statsd-flush", &mut cfg.statsd_flush),
    ] {
        if let Some(v) = get(key) {
            match parse_duration(&v.0) {
                Ok(d) => *slot = d,
                Err(e) => problems.push(format!("{}: {e}", v.1)),
            }
        }
    }
    let mut number = |key: &str, min: u64, max: u64| -> Option<u64> {
        let v = get(key)?;
        match v.0.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                bad(
                    problems,
                    &v,
                    &format!("is not a number from {min} to {max}"),
                );
                None
            }
        }
    };
    if let Some(n) = number("batch-max-samples", 1, 100_000) {
        cfg.batch_max_samples = n as usize;
    }
    // The broker's default max_payload_size is 1 MiB (broker.toml).
    if let Some(n) = number("batch-max-bytes", 1024, 1024 * 1024) {
        cfg.batch_max_bytes = n as usize;
    }
    if let Some(n) = number("spool-max-bytes", 64 * 1024, u64::MAX / 2) {
        cfg.spool_max_bytes = n;
    }
    if let Some(n) = number("events-queue", 1, 1_000_000) {
        cfg.events_queue = n as usize;
    }
    if let Some(v) = get("inputs") {
        match crate::system::Input::parse_list(&v.0) {
            Ok(list) => cfg.inputs = list,
            Err(e) => problems.push(format!("{}: {e}", v.1)),
        }
    }
    if let Some(v) = get("spool-dir") {
        cfg.spool_dir = v.0.into();
    }
    if let Some(v) = get("events-socket") {
        cfg.events_socket = Some(v.0.into());
    }
    if let Some(v) = get("events-udp") {
        match v.0.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => cfg.events_udp = Some(a),
            Ok(_) => bad(
                problems,
                &v,
                "is not a loopback address; the local protocol is for apps on this device (use 127.0.0.1)",
            ),
            Err(_) => bad(problems, &v, "is not IP:PORT (e.g. 127.0.0.1:8126)"),
        }
    }
    if let Some(v) = get("statsd") {
        match v.0.parse() {
            Ok(a) => cfg.statsd = Some(a),
            Err(_) => bad(problems, &v, "is not IP:PORT (e.g. 127.0.0.1:8125)"),
        }
    }
    for (key, value, source) in &raw.lists {
        let item = (value.clone(), source.clone());
        match *key {
            "watch" if !value.is_empty() && value.len() <= 64 => {
                cfg.watch.push(crate::sampler::Target::Name(value.clone()))
            }
            "watch" => bad(problems, &item, "must be 1-64 characters"),
            _ => match value.parse::<u32>() {
                Ok(p) if p > 0 => cfg.watch.push(crate::sampler::Target::Pid(p)),
                _ => bad(problems, &item, "is not a process id"),
            },
        }
    }
    match (get("username"), get("password")) {
        (Some(u), Some(p)) => cfg.credentials = Some((u.0, p.0)),
        (None, None) => {}
        // Never echo a password.
        _ => problems.push("give both username and password, or neither".into()),
    }
    // The CA file is read and parsed now, before anything connects.
    if let Some(v) = get("ca-file") {
        match crate::tls::ClientTls::load(&v.0) {
            Ok(tls) => cfg.tls = Some(tls),
            Err(why) => problems.push(format!("{}: {:?}: {why}", v.1, v.0)),
        }
    }
    Some(cfg)
}

/// Loads an `agent.toml` text (named `path` in problems) with no flags
/// and no environment: the settings, or every problem.
pub fn from_file_text(path: &str, text: &str) -> Result<AgentConfig, Vec<String>> {
    let mut raw = Raw::default();
    let mut problems = Vec::new();
    load_text(path, text, &mut raw, &mut problems);
    match build(raw, &mut problems) {
        Some(cfg) if problems.is_empty() => Ok(cfg),
        _ => Err(problems),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5x").is_err());
    }

    #[test]
    fn a_file_alone_loads_or_names_every_problem() {
        let cfg =
            from_file_text("a.toml", "device = \"kiosk-1\"\nwatch_pid = [12]\n").expect("valid");
        assert_eq!(cfg.device, "kiosk-1");
        assert_eq!(cfg.watch.len(), 1);
        assert_eq!(cfg.inputs.len(), 10, "every input by default");
        let cfg = from_file_text("a.toml", "device = \"k\"\ninputs = [\"cpu\", \"net\"]\n")
            .expect("valid");
        assert_eq!(
            cfg.inputs,
            vec![crate::system::Input::Cpu, crate::system::Input::Net]
        );
        let errs =
            from_file_text("a.toml", "device = \"k\"\ninputs = \"cpu,gpu\"\n").expect_err("gpu");
        assert!(
            errs[0].contains("key inputs") && errs[0].contains("gpu"),
            "{errs:?}"
        );
        let errs = from_file_text("a.toml", "interval = \"0s\"\nbogus = 1\n").expect_err("invalid");
        // interval, bogus, and the missing device.
        assert_eq!(errs.len(), 3, "{errs:#?}");
    }
}
