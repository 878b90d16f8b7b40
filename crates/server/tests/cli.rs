//! Process-level tests of the `widgetry` and `widgetry-agent` binaries:
//! configuration errors (exit 64, nothing bound), the last will after
//! `kill -9`, graceful SIGTERM, `--help`, and the docker-compose commands.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} failed");
}

fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + T;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not exit within {T:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_broker_config_exits_64_naming_file_and_key_before_binding() {
    let dir = tempfile::tempdir().expect("dir");
    let bad = dir.path().join("bad-broker.toml");
    let text = widgetry_server::config::DEFAULT_BROKER_TOML
        .replace(
            "max_segment_count = 3",
            "max_segment_count = 3\nmax_segmnt_size = 10",
        )
        .replace("max_inflight_count = 500", "max_inflight_count = -3");
    std::fs::write(&bad, text).expect("write");
    let db = dir.path().join("never-created.db");
    let (mqtt, http) = (free_port(), free_port());
    let out = Command::new(workspace_bin("widgetry"))
        .arg("serve")
        .arg("--broker-config")
        .arg(&bad)
        .args(["--mqtt-listen", &format!("127.0.0.1:{mqtt}")])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .arg("--database")
        .arg(&db)
        .output()
        .expect("run widgetry");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("bad-broker.toml"),
        "names the file: {stderr}"
    );
    assert!(
        stderr.contains("[router] max_segmnt_size"),
        "names the first key: {stderr}"
    );
    assert!(
        stderr.contains("[v4.1.connections] max_inflight_count") && stderr.contains("-3"),
        "reports every problem: {stderr}"
    );
    assert!(
        !db.exists(),
        "the database must not be touched on bad config"
    );
    for port in [mqtt, http] {
        std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("port {port} should be free: {e}"));
    }
    // Bad flags are configuration problems too, all reported at once.
    let out = Command::new(workspace_bin("widgetry"))
        .args([
            "check-config",
            "--mqtt-listen",
            "0.0.0.0:99999",
            "--http-listen",
            "nope",
        ])
        .arg("--database")
        .arg(dir.path().join("missing-dir/x.db"))
        .output()
        .expect("run widgetry");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for needle in ["mqtt_listen", "http_listen", "missing-dir"] {
        assert!(stderr.contains(needle), "missing {needle}: {stderr}");
    }
}

#[test]
fn help_on_every_command() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["ingest", "--help"],
        vec!["web", "--help"],
        vec!["check-config", "--help"],
        vec!["loadgen", "--help"],
        vec!["bridge", "--help"],
        vec!["bridge", "ws", "--help"],
    ] {
        let out = Command::new(workspace_bin("widgetry"))
            .args(&args)
            .output()
            .expect("run widgetry");
        assert!(out.status.success(), "widgetry {args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "widgetry {args:?}"
        );
    }
    // The bridge's help says what accepted means; bad flags exit 64
    // before anything connects.
    let out = Command::new(workspace_bin("widgetry"))
        .args(["bridge", "ws", "--help"])
        .output()
        .expect("run widgetry bridge ws --help");
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--url",
        "--device",
        "--idle-timeout",
        "--timestamp-unit",
        "kill -9",
        "[[bridge.ws]]",
    ] {
        assert!(
            help.contains(needle),
            "{needle} missing from bridge ws --help: {help}"
        );
    }
    let out = Command::new(workspace_bin("widgetry"))
        .args(["bridge", "ws", "--url", "wss://x/", "--device", "ok"])
        .output()
        .expect("run widgetry bridge ws");
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("url: \"wss://x/\": wss:// is not built in")
    );
    // A PostgreSQL URL is accepted and its password never printed.
    let out = Command::new(workspace_bin("widgetry"))
        .args([
            "ingest",
            "--check",
            "--database",
            "postgres://w:s3cret@db:5432/w",
        ])
        .output()
        .expect("run widgetry ingest --check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("postgres://w:***@db:5432/w") && !stdout.contains("s3cret"),
        "{stdout}"
    );
    let out = Command::new(workspace_bin("widgetry-agent"))
        .arg("--help")
        .output()
        .expect("run agent");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--broker HOST:PORT"));
    let out = Command::new(workspace_bin("widgetry-agent"))
        .args(["--device", "bad id"])
        .output()
        .expect("run agent");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad device id"));
}

async fn devices(http: SocketAddr) -> Vec<serde_json::Value> {
    let (status, body) = http_get_json(http, "/api/v1/devices").await;
    assert_eq!(status, 200);
    body.as_array().cloned().unwrap_or_default()
}

async fn state_of(http: SocketAddr, device: &str) -> Option<String> {
    devices(http)
        .await
        .iter()
        .find(|d| d["device"] == device)
        .and_then(|d| d["state"].as_str().map(String::from))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_goes_offline_and_serve_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("dir");
    let (mqtt, http) = (free_port(), free_port());
    let mut serve = ServeProc::start(mqtt, http, dir.path()).await;
    let http_addr = serve.http;
    let agent = |device: &str| {
        ChildGuard(
            Command::new(workspace_bin("widgetry-agent"))
                .current_dir(dir.path())
                .args(["--broker", &format!("127.0.0.1:{mqtt}"), "--device", device])
                .args(["--spool-dir", &format!("spool-{device}")])
                .args(["--interval", "200ms", "--batch-max-wait", "200ms"])
                .stderr(Stdio::null())
                .spawn()
                .expect("start widgetry-agent"),
        )
    };
    // A graceful stop first: it exits 0 and reports itself offline. (It
    // also used to make the next agent's last will go missing: see
    // `drive` in crates/agent/src/lib.rs.)
    let mut grace = agent("grace");
    wait_for("grace online", T, || async {
        (state_of(http_addr, "grace").await.as_deref() == Some("online")).then_some(())
    })
    .await;
    signal(&grace.0, "-TERM");
    assert_eq!(
        wait_exit(&mut grace.0, "agent after SIGTERM").code(),
        Some(0)
    );
    wait_for("grace offline after SIGTERM", T, || async {
        (state_of(http_addr, "grace").await.as_deref() == Some("offline")).then_some(())
    })
    .await;
    let agent = agent("demo");
    wait_for("demo online", T, || async {
        (state_of(http_addr, "demo").await.as_deref() == Some("online")).then_some(())
    })
    .await;
    wait_for("demo has cpu points", T, || async {
        let (s, body) =
            http_get_json(http_addr, "/api/v1/series?device=demo&series=cpu.usage_pct").await;
        (s == 200 && body["points"].as_array().is_some_and(|p| !p.is_empty())).then_some(())
    })
    .await;
    signal(&agent.0, "-KILL");
    wait_for("demo offline through its last will", T, || async {
        (state_of(http_addr, "demo").await.as_deref() == Some("offline")).then_some(())
    })
    .await;
    signal(&serve.child, "-TERM");
    let status = wait_exit(&mut serve.child, "widgetry serve after SIGTERM");
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
    assert!(
        dir.path().join("widgetry.db").exists(),
        "default database path is ./widgetry.db"
    );
}

/// Extracts `command: [...]` lists (JSON flow sequences) per service.
fn compose_commands(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut service = String::new();
    let mut in_services = false;
    for line in text.lines() {
        if line.starts_with("services:") {
            in_services = true;
            continue;
        }
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_services = false;
        }
        if !in_services {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if indent == 2 && trimmed.ends_with(':') {
            service = trimmed.trim_end_matches(':').to_string();
        } else if let Some(list) = trimmed.strip_prefix("command:") {
            let args: Vec<String> = serde_json::from_str(list.trim()).unwrap_or_else(|e| {
                panic!("service {service}: command must be a [\"...\"] list: {e}")
            });
            out.push((service.clone(), args));
        }
    }
    out
}

#[test]
fn docker_compose_commands_are_valid_invocations() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docker-compose.yml");
    let text = std::fs::read_to_string(path).expect("read docker-compose.yml");
    let commands = compose_commands(&text);
    assert!(
        commands.len() >= 9,
        "expected the all-in-one and scale services: {commands:?}"
    );
    let roles: Vec<&str> = commands
        .iter()
        .filter(|(_, a)| a[0] == "widgetry")
        .map(|(_, a)| a[1].as_str())
        .collect();
    for role in ["serve", "loadgen", "ingest", "web"] {
        assert!(roles.contains(&role), "no `widgetry {role}` service");
    }
    let dir = tempfile::tempdir().expect("dir");
    for (service, args) in commands {
        let (bin, rest) = args.split_first().expect("non-empty command");
        if bin == "mosquitto" {
            // A third-party image (the scale profile's broker).
            continue;
        }
        let mut cmd = Command::new(workspace_bin(bin));
        cmd.current_dir(dir.path());
        match (bin.as_str(), rest.first().map(String::as_str)) {
            ("widgetry", Some("serve")) => {
                cmd.arg("check-config").args(&rest[1..]);
            }
            ("widgetry", Some("ingest" | "web" | "loadgen")) | ("widgetry-agent", _) => {
                cmd.args(rest).arg("--check");
            }
            _ => panic!("service {service}: unexpected command {args:?}"),
        }
        // Paths inside the container (/data) do not exist here.
        cmd.env("WIDGETRY_DATABASE", dir.path().join("compose.db"));
        let out = cmd.output().expect("run");
        assert!(
            out.status.success(),
            "service {service}: {args:?} is not a valid invocation: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
