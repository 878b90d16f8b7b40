//! No state on either side can make a device's later batches fail forever
//! (DESIGN.md §6.9): a server restarted on an empty database while agents
//! run, and a forged ack published while the ingestor is down. In both,
//! every sample the agents take is stored (counted against what they took).

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use widgetry_agent::{AgentConfig, Report};
use widgetry_proto::SeriesKey;
use widgetry_server::config::Database;
use widgetry_server::store::Store;

fn agent(mqtt: u16, device: &str) -> Agent {
    let spool = tempfile::tempdir().expect("spool dir");
    let mut cfg = AgentConfig::new("127.0.0.1", mqtt, device);
    cfg.inputs = test_inputs();
    cfg.interval = Duration::from_millis(100);
    cfg.batch_max_wait = Duration::from_millis(200);
    cfg.ack_timeout = Duration::from_secs(1);
    cfg.spool_dir = spool.path().to_path_buf();
    Agent::with_config(cfg, spool)
}

/// Every `(series, ts)` of `device` stored in `store`.
async fn samples(store: &Store, device: &str) -> BTreeSet<(usize, i64)> {
    let mut out = BTreeSet::new();
    for (i, s) in SERIES.iter().enumerate() {
        let pts = store
            .series_points(device, &SeriesKey::plain(*s), 0, i64::MAX)
            .await
            .expect("query")
            .unwrap_or_default();
        out.extend(pts.into_iter().map(|(ts, _)| (i, ts)));
    }
    out
}

fn assert_nothing_lost(device: &str, report: &Report, stored: usize) {
    assert_eq!(report.batches_unacked, 0, "{device}: {report:?}");
    assert_eq!(report.batches_dropped, 0, "{device}: {report:?}");
    assert_eq!(
        stored as u64, report.samples_taken,
        "{device}: every sample taken is stored ({report:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_restarted_on_an_empty_database_stores_everything_agents_take() {
    let (first_dir, second_dir) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (mqtt, http) = (free_port(), free_port());
    let mut serve = ServeProc::start(mqtt, http, first_dir.path()).await;
    let devices = ["heal-a", "heal-b"];
    let agents: Vec<Agent> = devices.iter().map(|d| agent(mqtt, d)).collect();
    let first = Store::open(&Database::Sqlite(first_dir.path().join("widgetry.db")))
        .await
        .expect("open the first database");
    for d in devices {
        wait_for(
            "samples in the first database",
            Duration::from_secs(30),
            || async { (samples(&first, d).await.len() >= 30).then_some(()) },
        )
        .await;
    }
    // The database is gone (deleted, or the server pointed at a new one):
    // it knows neither the sessions nor their series definitions.
    serve.kill9();
    let serve = ServeProc::start(mqtt, http, second_dir.path()).await;
    let second = Store::open(&Database::Sqlite(second_dir.path().join("widgetry.db")))
        .await
        .expect("open the second database");
    for d in devices {
        wait_for(
            "the agents' later batches stored in the new database",
            Duration::from_secs(60),
            || async { (samples(&second, d).await.len() >= 60).then_some(()) },
        )
        .await;
    }
    let (_, m) = http_get_text(serve.http, "/metrics").await;
    assert!(
        metric(
            &m,
            "widgetry_ingest_rejects_total{reason=\"unknown_series\"}"
        ) >= 1.0,
        "the new server asked for the definitions at least once"
    );
    for (d, a) in devices.iter().zip(agents) {
        let report = a.stop().await;
        let mut all = samples(&first, d).await;
        all.extend(samples(&second, d).await);
        assert_nothing_lost(d, &report, all.len());
    }
    first.close().await;
    second.close().await;
}

/// Runs `mosquitto_sub` until it has received `count` messages on `topic`
/// (retained ones included) or 30 s pass; returns their payloads.
fn receive(port: u16, topic: &str, count: usize) -> Vec<String> {
    let out = Command::new(require_tool("mosquitto_sub"))
        .args(["-V", "311", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", topic, "-C", &count.to_string(), "-W", "30", "-N"])
        .args(["-F", "%x\n"])
        .stderr(Stdio::null())
        .output()
        .expect("run mosquitto_sub");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), count, "{count} messages on {topic}");
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_ack_while_the_ingestor_is_down_loses_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let _broker = start_mosquitto(dir.path(), port).await;
    let victim = agent(port, "victim");
    // The session id is public: it is in the retained status.
    let status_hex = receive(port, "widgetry/v1/victim/status", 1).remove(0);
    let status_bytes: Vec<u8> = (0..status_hex.len() / 2)
        .map(|i| u8::from_str_radix(&status_hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    let status: serde_json::Value = serde_json::from_slice(&status_bytes).expect("status JSON");
    let session = status["session"].as_str().expect("session").to_string();
    // The agent spools and publishes; nobody stores yet.
    receive(port, "widgetry/v1/victim/samples", 3);
    let forged = format!(r#"{{"session":"{session}","through":1000000,"seqs":[]}}"#);
    let port_arg = port.to_string();
    let o = mosquitto(
        "mosquitto_pub",
        &[
            "-V",
            "311",
            "-p",
            &port_arg,
            "-q",
            "1",
            "-t",
            "widgetry/v1/victim/ack",
            "-m",
            &forged,
        ],
    );
    assert!(o.status.success(), "publish the forged ack: {}", text(&o));
    // Later batches are published after the agent received the ack.
    receive(port, "widgetry/v1/victim/samples", 3);
    let db = test_database(dir.path()).await;
    let _ingest = start_ingest(port, &db, "ingest-late");
    let store = Store::open(&db).await.expect("open db");
    wait_for(
        "the agent's data stored",
        Duration::from_secs(60),
        || async { (samples(&store, "victim").await.len() >= 90).then_some(()) },
    )
    .await;
    let report = victim.stop().await;
    assert!(
        report.acks_ignored >= 1,
        "the forged ack was seen and ignored: {report:?}"
    );
    assert_nothing_lost("victim", &report, samples(&store, "victim").await.len());
    store.close().await;
}

/// Retained messages (every device's last status, and any client's) are
/// kept in the database: after `serve` is killed and started again, a new
/// subscriber still gets them, and a cleared one stays cleared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_restart_of_serve() {
    let dir = tempfile::tempdir().expect("dir");
    let (mqtt, http) = (free_port(), free_port());
    let mut serve = ServeProc::start(mqtt, http, dir.path()).await;
    let keeper = agent(mqtt, "keeper");
    let mqtt_arg = mqtt.to_string();
    let publish = |args: &[&str]| {
        let mut all = vec!["-V", "311", "-p", &mqtt_arg, "-q", "1", "-r"];
        all.extend_from_slice(args);
        let o = mosquitto("mosquitto_pub", &all);
        assert!(o.status.success(), "mosquitto_pub {args:?}: {}", text(&o));
    };
    publish(&["-t", "site/hall-1/config", "-m", "cfg-v1"]);
    publish(&["-t", "site/cleared", "-m", "soon gone"]);
    publish(&["-t", "site/cleared", "-n"]);
    // The agent's last status is "offline" (it says so when it stops).
    let report = keeper.stop().await;
    assert_eq!(report.batches_unacked, 0, "{report:?}");
    let store = Store::open(&Database::Sqlite(dir.path().join("widgetry.db")))
        .await
        .expect("open db");
    wait_for(
        "the retained messages stored",
        Duration::from_secs(20),
        || async {
            let rows = store.retained().await.expect("read retained");
            let offline = rows.iter().any(|(t, p, _)| {
                t == "widgetry/v1/keeper/status" && String::from_utf8_lossy(p).contains("offline")
            });
            (offline && rows.len() == 2).then_some(rows)
        },
    )
    .await;
    store.close().await;
    serve.kill9();

    let mqtt = free_port();
    let _serve = ServeProc::start(mqtt, free_port(), dir.path()).await;
    let mqtt_arg = mqtt.to_string();
    let out = mosquitto(
        "mosquitto_sub",
        &[
            "-V",
            "311",
            "-p",
            &mqtt_arg,
            "-t",
            "widgetry/v1/+/status",
            "-t",
            "site/#",
            "-v",
            "-C",
            "2",
            "-W",
            "20",
        ],
    );
    let got = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        got.contains("site/hall-1/config cfg-v1"),
        "{got:?} {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        got.lines()
            .any(|l| l.starts_with("widgetry/v1/keeper/status ") && l.contains("offline")),
        "{got}"
    );
    assert!(!got.contains("site/cleared"), "{got}");
}
