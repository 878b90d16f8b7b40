//! `widgetry-agent`: parses flags (hand-rolled: clap would double the size
//! of this binary), validates them all at once (exit 64), then runs the
//! agent on a current-thread runtime until SIGINT/SIGTERM.

use std::process::ExitCode;
use std::time::Duration;

use widgetry_agent::settings::{self, ENV, Raw, build, key_of};
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
    --batch-max-wait DURATION publish a batch once its oldest sample is this old; also how
                              often the dashboard's live view of the device moves [default 4s]
    --ack-timeout DURATION    resend a batch not acknowledged within this time [default 10s]
    --spool-dir DIR           disk spool of unacknowledged batches [env WIDGETRY_SPOOL_DIR,
                              default ./widgetry-spool]
    --spool-max-bytes N       spool size bound; beyond it the oldest batches are dropped
                              and reported to the server as a gap [default 67108864]
    --watch NAME              watch processes with this exact name (repeatable): CPU %,
                              RSS, threads, count, up, restarts as proc.* series
    --watch-pid PID           watch one process by pid (repeatable)
    --inputs LIST             system inputs to collect, comma-separated, from
                              cpu,cpus,load,mem,swap,fs,disk,net,uptime,temp (README's table),
                              or all / none [default all]
    --events-socket PATH      local protocol: Unix datagram socket for newline-delimited JSON
                              events {\"event\":\"name\",...} and samples {\"series\":..,\"value\":..}
    --events-udp ADDR         local protocol on a loopback UDP address, e.g. 127.0.0.1:8126
    --statsd ADDR             listen for statsd/DogStatsD on this UDP address, e.g.
                              127.0.0.1:8125 [env WIDGETRY_STATSD; default off]
    --statsd-flush DURATION   statsd aggregation interval [default 10s]
    --username USER           MQTT username [env WIDGETRY_MQTT_USERNAME]
    --password PASS           MQTT password [env WIDGETRY_MQTT_PASSWORD; prefer the env var]
    --ca-file PATH            connect over TLS and verify the broker's certificate against the
                              CA certificate(s) in this PEM file (only those, not the system's);
                              --broker must then name a TLS listener, by a name or IP address
                              the certificate lists [env WIDGETRY_CA_FILE; default plain MQTT]
    --events-queue N          app events kept while they cannot be published [default 10000]
    --config FILE             agent.toml: the same settings as keys with _ for -, e.g.
                              batch_max_wait = \"5s\", watch = [\"nginx\"] [env WIDGETRY_AGENT_CONFIG]
                              Precedence: flags, then environment, then the file.
    --check                   validate the arguments, print the settings and exit
    -h, --help                show this help
    -V, --version             show the version

Exit status: 0 after a clean shutdown (SIGINT/SIGTERM), 64 on bad arguments.
";

/// Reads `agent.toml` into `raw`; a file that cannot be read is a problem.
fn load_file(path: &str, raw: &mut Raw, problems: &mut Vec<String>) {
    match std::fs::read_to_string(path) {
        Ok(text) => settings::load_text(path, &text, raw, problems),
        Err(e) => problems.push(format!("config {path}: cannot read: {e}")),
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

fn main() -> ExitCode {
    let cfg = match parse_args(std::env::args().skip(1).collect()) {
        Ok((c, true)) => {
            let tls = c.tls.as_ref().map_or("plain MQTT".to_string(), |t| {
                format!("TLS (CA file {})", t.ca_file.display())
            });
            let inputs: Vec<&str> = c.inputs.iter().map(|i| i.name()).collect();
            println!(
                "arguments ok: device {} broker {}:{} {tls} interval {:?} batch-max-wait {:?} inputs {}",
                c.device,
                c.broker_host,
                c.broker_port,
                c.interval,
                c.batch_max_wait,
                if inputs.is_empty() {
                    "none".to_string()
                } else {
                    inputs.join(",")
                }
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
        "widgetry-agent {}: device {} -> {}:{}{} every {:?}",
        widgetry_agent::VERSION,
        cfg.device,
        cfg.broker_host,
        cfg.broker_port,
        if cfg.tls.is_some() { " (TLS)" } else { "" },
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

    #[test]
    fn a_ca_file_is_read_when_the_arguments_are_validated() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("missing-ca.pem").display().to_string();
        let errs =
            parse_args(args(&["--device", "d", "--ca-file", &missing])).expect_err("missing");
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].contains("--ca-file") && errs[0].contains("missing-ca.pem"),
            "names the flag and the file: {errs:#?}"
        );
        let empty = dir.path().join("agent.toml");
        let not_pem = dir.path().join("not-a-cert.pem");
        std::fs::write(&not_pem, "hello\n").expect("write");
        std::fs::write(
            &empty,
            format!(
                "device = \"d\"\nca_file = {:?}\n",
                not_pem.display().to_string()
            ),
        )
        .expect("write");
        let errs = parse_args(args(&["--config", &empty.display().to_string()]))
            .expect_err("no certificate");
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].contains("key ca_file") && errs[0].contains("not-a-cert.pem"),
            "{errs:#?}"
        );
        #[cfg(feature = "tls")]
        assert!(errs[0].contains("holds no PEM certificate"), "{errs:#?}");
        #[cfg(not(feature = "tls"))]
        assert!(errs[0].contains("built without TLS"), "{errs:#?}");
    }
}
