//! `widgetry-agent`: parses flags (hand-rolled: clap would double the size
//! of this binary), validates them all at once (exit 64), then runs the
//! agent on a current-thread runtime until SIGINT/SIGTERM.

use std::process::ExitCode;
use std::time::Duration;

use widgetry_agent::{AgentConfig, run};

const USAGE: &str = "\
widgetry-agent: samples this device (CPU, memory) and publishes to a Widgetry server over MQTT

USAGE:
    widgetry-agent --broker HOST:PORT --device ID [OPTIONS]

OPTIONS:
    --broker HOST:PORT        MQTT broker [env WIDGETRY_BROKER, default 127.0.0.1:1883]
    --device ID               device id, [A-Za-z0-9_.-]{1,64} [env WIDGETRY_DEVICE, required]
    --interval DURATION       sampling interval, e.g. 1s, 500ms [default 1s]
    --batch-max-samples N     publish a batch once it holds N samples [default 300]
    --batch-max-bytes N       publish a batch before its encoded size can exceed N bytes
                              (1024-1048576) [default 262144]
    --batch-max-wait DURATION publish a batch once its oldest sample is this old [default 1s]
    --ack-timeout DURATION    resend a batch not acknowledged within this time [default 10s]
    --spool-dir DIR           disk spool of unacknowledged batches [env WIDGETRY_SPOOL_DIR,
                              default ./widgetry-spool]
    --spool-max-bytes N       spool size bound; beyond it the oldest batches are dropped
                              and reported to the server as a gap [default 67108864]
    --watch NAME              watch processes with this exact name (repeatable): CPU %,
                              RSS, threads, count, up, restarts as proc.* series
    --watch-pid PID           watch one process by pid (repeatable)
    --events-socket PATH      local protocol: Unix datagram socket for newline-delimited JSON
                              events {\"event\":\"name\",...} and samples {\"series\":..,\"value\":..}
    --events-udp ADDR         local protocol on a loopback UDP address, e.g. 127.0.0.1:8126
    --statsd ADDR             listen for statsd/DogStatsD on this UDP address, e.g.
                              127.0.0.1:8125 [env WIDGETRY_STATSD; default off]
    --statsd-flush DURATION   statsd aggregation interval [default 10s]
    --username USER           MQTT username [env WIDGETRY_MQTT_USERNAME]
    --password PASS           MQTT password [env WIDGETRY_MQTT_PASSWORD; prefer the env var]
    --events-queue N          app events kept while they cannot be published [default 10000]
    --config FILE             agent.toml: the same settings as keys with _ for -, e.g.
                              batch_max_wait = \"5s\", watch = [\"nginx\"] [env WIDGETRY_AGENT_CONFIG]
                              Precedence: flags, then environment, then the file.
    --check                   validate the arguments, print the settings and exit
    -h, --help                show this help
    -V, --version             show the version

Exit status: 0 after a clean shutdown (SIGINT/SIGTERM), 64 on bad arguments.
";

/// Parses "1s", "250ms", "2m", "1h" or a bare number of seconds, above
/// 0 and at most a day.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = widgetry_common::parse_duration(text)?;
    if d.is_zero() || d > Duration::from_secs(86_400) {
        return Err(format!("{text:?} is out of range (above 0, at most 24h)"));
    }
    Ok(d)
}

/// Every setting, as a flag name without `--`; the same names (with `_`
/// for `-`) are the keys of `agent.toml`.
const KEYS: [&str; 19] = [
    "broker",
    "device",
    "username",
    "password",
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
    "config",
];

/// Environment variables, by setting.
const ENV: [(&str, &str); 7] = [
    ("broker", "WIDGETRY_BROKER"),
    ("device", "WIDGETRY_DEVICE"),
    ("username", "WIDGETRY_MQTT_USERNAME"),
    ("password", "WIDGETRY_MQTT_PASSWORD"),
    ("spool-dir", "WIDGETRY_SPOOL_DIR"),
    ("statsd", "WIDGETRY_STATSD"),
    ("config", "WIDGETRY_AGENT_CONFIG"),
];

/// Raw settings gathered from the file, the environment and the flags
/// (later sources win; `watch` and `watch-pid` accumulate).
#[derive(Default)]
struct Raw {
    values: std::collections::HashMap<&'static str, (String, String)>,
    lists: Vec<(&'static str, String, String)>,
}

impl Raw {
    fn set(&mut self, key: &'static str, value: String, source: String) {
        if matches!(key, "watch" | "watch-pid") {
            self.lists.push((key, value, source));
        } else {
            self.values.insert(key, (value, source));
        }
    }
}

fn key_of(name: &str) -> Option<&'static str> {
    KEYS.iter().copied().find(|k| *k == name)
}

/// Reads `agent.toml`: every key is a setting name with `_` for `-`.
fn load_file(path: &str, raw: &mut Raw, problems: &mut Vec<String>) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return problems.push(format!("config {path}: cannot read: {e}")),
    };
    let entries = match widgetry_agent::conf::parse(&text) {
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
            (widgetry_agent::conf::Value::List(items), "watch" | "watch-pid") => {
                for item in items {
                    raw.set(key, item, source.clone());
                }
            }
            (widgetry_agent::conf::Value::Scalar(s), _) => raw.set(key, s, source),
            (widgetry_agent::conf::Value::List(_), _) => {
                problems.push(format!("{source}: expected a single value, not a list"))
            }
        }
    }
}

fn parse_args(args: Vec<String>) -> Result<(AgentConfig, bool), Vec<String>> {
    let mut problems = Vec::new();
    let mut flags = Raw::default();
    let mut check = false;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        match flag.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "-V" | "--version" => {
                println!("widgetry-agent {}", widgetry_agent::VERSION);
                std::process::exit(0);
            }
            "--check" => check = true,
            _ => match flag.strip_prefix("--").and_then(key_of) {
                Some(key) => match inline.or_else(|| it.next()) {
                    Some(v) => flags.set(key, v, format!("--{key}")),
                    None => problems.push(format!("--{key} needs a value")),
                },
                None => problems.push(format!("unknown argument {flag:?}; see --help")),
            },
        }
    }
    // Lowest precedence first: file, then environment, then flags.
    let mut raw = Raw::default();
    let config_path = flags
        .values
        .get("config")
        .map(|(v, _)| v.clone())
        .or_else(|| std::env::var("WIDGETRY_AGENT_CONFIG").ok());
    if let Some(path) = config_path {
        load_file(&path, &mut raw, &mut problems);
    }
    for (key, var) in ENV {
        if let Ok(v) = std::env::var(var) {
            raw.set(key, v, format!("env {var}"));
        }
    }
    for (k, v) in flags.values {
        raw.values.insert(k, v);
    }
    raw.lists.extend(flags.lists);
    match build(raw, &mut problems) {
        Some(cfg) if problems.is_empty() => Ok((cfg, check)),
        _ => Err(problems),
    }
}

fn bad(problems: &mut Vec<String>, (value, source): &(String, String), why: &str) {
    problems.push(format!("{source}: {value:?} {why}"));
}

/// Validates the gathered settings; every problem names its source.
fn build(raw: Raw, problems: &mut Vec<String>) -> Option<AgentConfig> {
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
            "watch" if !value.is_empty() && value.len() <= 64 => cfg
                .watch
                .push(widgetry_agent::sampler::Target::Name(value.clone())),
            "watch" => bad(problems, &item, "must be 1-64 characters"),
            _ => match value.parse::<u32>() {
                Ok(p) if p > 0 => cfg.watch.push(widgetry_agent::sampler::Target::Pid(p)),
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
    Some(cfg)
}

fn main() -> ExitCode {
    let cfg = match parse_args(std::env::args().skip(1).collect()) {
        Ok((c, true)) => {
            println!(
                "arguments ok: device {} broker {}:{} interval {:?}",
                c.device, c.broker_host, c.broker_port, c.interval
            );
            return ExitCode::SUCCESS;
        }
        Ok((c, false)) => c,
        Err(problems) => {
            for p in problems {
                eprintln!("widgetry-agent: {p}");
            }
            return ExitCode::from(64);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("widgetry-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "widgetry-agent {}: device {} -> {}:{} every {:?}",
        widgetry_agent::VERSION,
        cfg.device,
        cfg.broker_host,
        cfg.broker_port,
        cfg.interval
    );
    match rt.block_on(run(
        cfg,
        widgetry_common::shutdown_signal(),
        Duration::from_secs(5),
    )) {
        Ok(report) => {
            eprintln!(
                "widgetry-agent: stopped; {} samples taken, {} batches acknowledged, {} unacknowledged (kept in the spool), {} dropped ({} samples, reported as gaps)",
                report.samples_taken,
                report.batches_acked,
                report.batches_unacked,
                report.batches_dropped,
                report.samples_dropped
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("widgetry-agent: {e}");
            ExitCode::FAILURE
        }
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
    fn all_problems_reported() {
        let args = [
            "--device",
            "bad id",
            "--broker",
            "nope",
            "--interval",
            "zz",
            "--bogus",
        ];
        let errs = parse_args(args.iter().map(|s| s.to_string()).collect()).expect_err("invalid");
        assert_eq!(errs.len(), 4, "{errs:#?}");
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn config_file_keys_with_flag_precedence_and_all_errors() {
        let dir = tempfile::tempdir().expect("dir");
        let good = dir.path().join("agent.toml");
        std::fs::write(
            &good,
            "device = \"kiosk-1\"\nbroker = \"10.0.0.5:1883\"\nbatch_max_wait = \"5s\"\n\
             watch = [\"nginx\", \"sshd\"]\nspool_max_bytes = 1048576\n",
        )
        .expect("write");
        let path = good.display().to_string();
        let (cfg, _) =
            parse_args(args(&["--config", &path, "--batch-max-wait", "2s"])).expect("valid");
        assert_eq!(cfg.device, "kiosk-1");
        assert_eq!(cfg.broker_host, "10.0.0.5");
        assert_eq!(
            cfg.batch_max_wait,
            Duration::from_secs(2),
            "the flag wins over the file"
        );
        assert_eq!(cfg.watch.len(), 2);
        assert_eq!(cfg.spool_max_bytes, 1_048_576);
        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "device = \"ok\"\ninterval = \"fast\"\nbogus = 1\nspool_max_bytes = 5\n",
        )
        .expect("write");
        let errs =
            parse_args(args(&["--config", &bad.display().to_string()])).expect_err("invalid");
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert!(errs.iter().all(|e| e.contains("bad.toml")), "{errs:#?}");
        assert!(
            errs.iter()
                .any(|e| e.contains("key bogus") && e.contains("unknown")),
            "{errs:#?}"
        );
        assert!(errs.iter().any(|e| e.contains("key interval")), "{errs:#?}");
    }
}
