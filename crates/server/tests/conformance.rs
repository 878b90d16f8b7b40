//! MQTT 3.1.1 and 5 conformance of the embedded broker (vendored rumqttd,
//! see vendor/rumqttd/PATCHES.md), with real clients: every case of
//! `conformance/conformance.py` (paho-mqtt, and a raw-socket client where
//! paho cannot express the case) on the 3.1.1 listener and on the MQTT 5
//! listener of a running `serve`. Cases that break a broker when they fail
//! (the connection limit, a refused client id retried) get a stack each.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/conformance.py")
}

/// Debian's python3, which has python3-paho-mqtt (a pyenv `python3` on
/// PATH may not).
fn python() -> PathBuf {
    let p = PathBuf::from("/usr/bin/python3");
    let ok = Command::new(&p)
        .args(["-c", "import paho.mqtt"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "/usr/bin/python3 with paho-mqtt is missing: run the README's test command (scripts/test.sh), which installs python3-paho-mqtt"
    );
    p
}

/// Runs `cases` (all default cases when empty) against `port`; returns the
/// failures as "case [version]: detail" lines.
fn run(port: u16, version: &str, cases: &[&str], extra: &[&str]) -> Vec<String> {
    let mut cmd = Command::new(python());
    cmd.arg(script())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--version", version])
        .args(extra);
    for c in cases {
        cmd.args(["--case", c]);
    }
    let out = cmd.output().expect("run conformance.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut failures = Vec::new();
    let mut seen = 0;
    for line in stdout.lines() {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        seen += 1;
        let case = v["case"].as_str().unwrap_or("?");
        eprintln!(
            "{} {case} [{version}]: {}",
            if v["ok"] == true { "pass" } else { "FAIL" },
            v["detail"].as_str().unwrap_or("")
        );
        if v["ok"] != true {
            failures.push(format!("{case} [{version}]: {}", v["detail"]));
        }
    }
    assert!(
        seen > 0 && (cases.is_empty() || seen == cases.len()),
        "conformance.py printed {seen} results (status {:?}); stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    failures
}

/// Fails with every failed case, sorted, if there are any.
fn assert_passed(failures: &mut [String]) {
    failures.sort();
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_311_and_5_cases_pass_on_both_listeners() {
    let stack = Stack::start().await;
    let (v4, v5) = (stack.mqtt.port(), stack.mqtt5.port());
    let mut failures = tokio::task::spawn_blocking(move || {
        [run(v4, "311", &[], &[]), run(v5, "5", &[], &[])].concat()
    })
    .await
    .expect("join");
    stack.stop().await;
    assert_passed(&mut failures);
}

/// A small `max_connections`: the client beyond it gets a clean refusal,
/// and the broker keeps serving (also a client id the router refuses,
/// retried, must not wedge the listener).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_and_refused_client_ids_leave_the_listener_serving() {
    // serve holds 2 connections of its own (ingestor, web bridge).
    let toml = widgetry_server::config::DEFAULT_BROKER_TOML
        .replace("max_connections = 10010", "max_connections = 7");
    let stack = Stack::with(Default::default(), &toml).await;
    let (v4, v5) = (stack.mqtt.port(), stack.mqtt5.port());
    let mut failures = tokio::task::spawn_blocking(move || {
        let limit = ["--max-connections", "5"];
        [
            run(
                v4,
                "311",
                &["connection_limit", "stale_will_handler"],
                &limit,
            ),
            run(v5, "5", &["connection_limit", "stale_will_handler"], &limit),
            // Still serving everyone after all that.
            run(v4, "311", &["retained", "will_abnormal"], &[]),
            run(v5, "5", &["retained", "will_abnormal"], &[]),
        ]
        .concat()
    })
    .await
    .expect("join");
    let (_, m) = stack.get_text("/metrics").await;
    stack.stop().await;
    assert_passed(&mut failures);
    assert!(
        metric(
            &m,
            "widgetry_broker_refused_connections_total{reason=\"server_busy\"}"
        ) >= 2.0
            && metric(
                &m,
                "widgetry_broker_refused_connections_total{reason=\"bad_client_id\"}"
            ) >= 2.0,
        "refusals at the limit are counted: {m}"
    );
}

/// A client that drops and reconnects at once, 50 times on each listener:
/// every time the will of the dropped connection is published, and never
/// the will of the connection that replaced it (also on session takeover).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_will_survives_a_reconnect_race_50_times() {
    let stack = Stack::start().await;
    let (v4, v5) = (stack.mqtt.port(), stack.mqtt5.port());
    let mut failures = tokio::task::spawn_blocking(move || {
        let rounds = ["--will-race-rounds", "50"];
        [
            run(v4, "311", &["will_reconnect_race"], &rounds),
            run(v5, "5", &["will_reconnect_race"], &rounds),
        ]
        .concat()
    })
    .await
    .expect("join");
    stack.stop().await;
    assert_passed(&mut failures);
}
