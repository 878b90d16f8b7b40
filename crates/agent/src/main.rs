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
    --check                   validate the arguments, print the settings and exit
    -h, --help                show this help
    -V, --version             show the version

Exit status: 0 after a clean shutdown (SIGINT/SIGTERM), 64 on bad arguments.
";

/// Parses "1s", "250ms", "2m", "1h" or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (num, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 1s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ));
        }
    };
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("{text:?} is out of range (above 0, at most 24h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_args(args: Vec<String>) -> Result<(AgentConfig, bool), Vec<String>> {
    let env = |k: &str| std::env::var(k).ok();
    let mut broker = env("WIDGETRY_BROKER").unwrap_or_else(|| "127.0.0.1:1883".into());
    let mut device = env("WIDGETRY_DEVICE");
    let mut username = env("WIDGETRY_MQTT_USERNAME");
    let mut password = env("WIDGETRY_MQTT_PASSWORD");
    let mut spool_dir = env("WIDGETRY_SPOOL_DIR");
    let mut statsd = env("WIDGETRY_STATSD");
    let mut problems = Vec::new();
    let mut cfg = AgentConfig::new("", 0, "");
    let mut check = false;
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (flag, None),
        };
        let mut value = || inline.clone().or_else(|| it.next());
        let mut need = |name: &str| match value() {
            Some(v) => Some(v),
            None => {
                problems.push(format!("{name} needs a value"));
                None
            }
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
            "--broker" => broker = need("--broker").unwrap_or_default(),
            "--device" => device = need("--device"),
            "--username" => username = need("--username"),
            "--password" => password = need("--password"),
            "--watch" => {
                if let Some(v) = need(&flag) {
                    if v.is_empty() || v.len() > 64 {
                        problems.push(format!("--watch: {v:?} must be 1-64 characters"));
                    } else {
                        cfg.watch.push(widgetry_agent::sampler::Target::Name(v));
                    }
                }
            }
            "--watch-pid" => {
                if let Some(v) = need(&flag) {
                    match v.parse::<u32>() {
                        Ok(p) if p > 0 => cfg.watch.push(widgetry_agent::sampler::Target::Pid(p)),
                        _ => problems.push(format!("--watch-pid: {v:?} is not a process id")),
                    }
                }
            }
            "--events-socket" => {
                if let Some(v) = need(&flag) {
                    cfg.events_socket = Some(v.into());
                }
            }
            "--events-udp" => {
                if let Some(v) = need(&flag) {
                    match v.parse::<std::net::SocketAddr>() {
                        Ok(a) if a.ip().is_loopback() => cfg.events_udp = Some(a),
                        Ok(a) => problems.push(format!(
                            "--events-udp: {a} is not a loopback address; the local protocol is for apps on this device (use 127.0.0.1)"
                        )),
                        Err(_) => problems.push(format!("--events-udp: {v:?} is not IP:PORT")),
                    }
                }
            }
            "--statsd" => {
                if let Some(v) = need(&flag) {
                    statsd = Some(v);
                }
            }
            "--interval" | "--batch-max-wait" | "--ack-timeout" | "--statsd-flush" => {
                if let Some(v) = need(&flag) {
                    match parse_duration(&v) {
                        Ok(d) if flag == "--interval" => cfg.interval = d,
                        Ok(d) if flag == "--batch-max-wait" => cfg.batch_max_wait = d,
                        Ok(d) if flag == "--statsd-flush" => cfg.statsd_flush = d,
                        Ok(d) => cfg.ack_timeout = d,
                        Err(e) => problems.push(format!("{flag}: {e}")),
                    }
                }
            }
            "--batch-max-samples" => {
                if let Some(v) = need(&flag) {
                    match v.parse::<usize>() {
                        Ok(n) if (1..=100_000).contains(&n) => cfg.batch_max_samples = n,
                        _ => {
                            problems.push(format!("{flag}: {v:?} is not a number from 1 to 100000"))
                        }
                    }
                }
            }
            "--spool-dir" => {
                if let Some(v) = need(&flag) {
                    spool_dir = Some(v);
                }
            }
            "--spool-max-bytes" => {
                if let Some(v) = need(&flag) {
                    match v.parse::<u64>() {
                        Ok(n) if n >= 64 * 1024 => cfg.spool_max_bytes = n,
                        _ => problems.push(format!(
                            "{flag}: {v:?} is not a number of bytes of at least 65536"
                        )),
                    }
                }
            }
            other => problems.push(format!("unknown argument {other:?}; see --help")),
        }
    }
    match broker.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>())) {
        Some((host, Ok(port))) if !host.is_empty() && port != 0 => {
            cfg.broker_host = host.trim_matches(['[', ']']).to_string();
            cfg.broker_port = port;
        }
        _ => problems.push(format!(
            "--broker: {broker:?} is not HOST:PORT (e.g. 127.0.0.1:1883)"
        )),
    }
    match device {
        Some(d) => match widgetry_proto::validate::validate_device(&d) {
            Ok(()) => cfg.device = d,
            Err(e) => problems.push(format!("--device: {e}")),
        },
        None => problems.push("--device is required (or env WIDGETRY_DEVICE)".into()),
    }
    if let Some(addr) = statsd {
        match addr.parse() {
            Ok(a) => cfg.statsd = Some(a),
            Err(_) => problems.push(format!(
                "--statsd: {addr:?} is not IP:PORT (e.g. 127.0.0.1:8125)"
            )),
        }
    }
    if let Some(d) = spool_dir {
        cfg.spool_dir = d.into();
    }
    match (username, password) {
        (Some(u), Some(p)) => cfg.credentials = Some((u, p)),
        (None, None) => {}
        _ => problems.push("give both --username and --password, or neither".into()),
    }
    if problems.is_empty() {
        Ok((cfg, check))
    } else {
        Err(problems)
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
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
    match rt.block_on(run(cfg, shutdown_signal(), Duration::from_secs(5))) {
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
