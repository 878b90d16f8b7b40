//! Who may publish and subscribe where on the embedded broker
//! (`broker::policy`), tried with `mosquitto_pub` / `mosquitto_sub` on the
//! MQTT 3.1.1 and 5 listeners: without credentials nobody but the server
//! publishes acks, live data or error reports (a forged ack is data loss);
//! with device credentials a device stays in its own topics.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use widgetry_proto::SeriesKey;
use widgetry_server::config::DEFAULT_BROKER_TOML;
use widgetry_server::store::Store;

/// An agent sampling every 100 ms that resends after 1 s without an ack.
fn fast_agent(mqtt: u16, device: &str, login: Option<(&str, &str)>) -> Agent {
    let mut cfg = widgetry_agent::AgentConfig::new("127.0.0.1", mqtt, device);
    cfg.inputs = test_inputs();
    cfg.credentials = login.map(|(u, p)| (u.to_string(), p.to_string()));
    cfg.interval = Duration::from_millis(100);
    cfg.batch_max_wait = Duration::from_millis(200);
    cfg.ack_timeout = Duration::from_secs(1);
    let spool = tempfile::tempdir().expect("spool");
    cfg.spool_dir = spool.path().to_path_buf();
    Agent::with_config(cfg, spool)
}

async fn stored(store: &Store, device: &str) -> u64 {
    let mut n = 0;
    for s in SERIES {
        n += store
            .series_points(device, &SeriesKey::plain(s), 0, i64::MAX)
            .await
            .expect("query")
            .unwrap_or_default()
            .len() as u64;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_cannot_forge_acks_live_data_or_errors() {
    let stack = Stack::start().await;
    let (v4, v5) = (
        stack.mqtt.port().to_string(),
        stack.mqtt5.port().to_string(),
    );
    let victim = fast_agent(stack.mqtt.port(), "victim", None);

    // The session id is public: it is in the retained status.
    let status = mosquitto(
        "mosquitto_sub",
        &[
            "-V",
            "5",
            "-p",
            &v5,
            "-t",
            "widgetry/v1/victim/status",
            "-C",
            "1",
            "-W",
            "30",
        ],
    );
    let status: serde_json::Value =
        serde_json::from_slice(&status.stdout).unwrap_or_else(|_| panic!("{}", text(&status)));
    let session = status["session"].as_str().expect("session").to_string();

    // The issue's reproduction: a retained ack covering every seq, on both
    // listeners, plus forged live data and error reports.
    let forged = format!(r#"{{"session":"{session}","through":18446744073709551615}}"#);
    let live = r#"{"device":"victim","commit":999999,"samples":[{"series":"cpu.usage_pct","ts":1,"value":-1}],"forged":true}"#;
    for (version, port) in [("311", &v4), ("5", &v5)] {
        for (topic, payload) in [
            ("widgetry/v1/victim/ack", forged.as_str()),
            ("widgetry/v1/victim/live", live),
            ("widgetry/v1/victim/errors", r#"{"forged":true}"#),
        ] {
            let o = mosquitto(
                "mosquitto_pub",
                &[
                    "-V", version, "-p", port, "-q", "1", "-r", "-t", topic, "-m", payload,
                ],
            );
            assert!(o.status.success(), "{version} {topic}: {}", text(&o));
            if version == "5" {
                // MQTT 5 tells the publisher: PUBACK reason 0x87.
                assert!(stderr_says(&o, "Not authorized"), "{topic}: {}", text(&o));
            }
        }
    }
    // Nothing was retained: a new subscriber sees no forged message.
    let o = mosquitto(
        "mosquitto_sub",
        &[
            "-V",
            "5",
            "-p",
            &v5,
            "-t",
            "widgetry/v1/victim/+",
            "-v",
            "-W",
            "2",
        ],
    );
    let seen = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        !seen.contains("forged") && !seen.contains("18446744073709551615"),
        "{seen}"
    );

    // A short outage: another client takes the agent's client id, the agent
    // reconnects (and would now receive a retained forged ack).
    let o = mosquitto(
        "mosquitto_sub",
        &[
            "-V",
            "311",
            "-p",
            &v4,
            "-i",
            "widgetry-agent-victim",
            "-t",
            "x",
            "-E",
        ],
    );
    assert!(o.status.success(), "client id takeover: {}", text(&o));
    // The server's own client ids cannot be taken (that would disconnect
    // the ingestor).
    for (version, port) in [("311", &v4), ("5", &v5)] {
        let o = mosquitto(
            "mosquitto_sub",
            &[
                "-V",
                version,
                "-p",
                port,
                "-i",
                "widgetry-ingest",
                "-t",
                "x",
                "-E",
            ],
        );
        assert!(
            stderr_says_lower(&o, "not authori"),
            "{version}: {}",
            text(&o)
        );
    }

    let store = Store::open(&stack.db).await.expect("open db");
    wait_for(
        "the agent's samples stored",
        Duration::from_secs(60),
        || async { (stored(&store, "victim").await >= 150).then_some(()) },
    )
    .await;
    let report = victim.stop().await;
    wait_for(
        "every sample the agent took stored",
        Duration::from_secs(30),
        || async { (stored(&store, "victim").await == report.samples_taken).then_some(()) },
    )
    .await;
    assert_eq!(
        report.acks_ignored, 0,
        "no forged ack reached the agent: {report:?}"
    );
    assert_eq!(report.batches_dropped, 0, "{report:?}");
    assert_eq!(report.batches_unacked, 0, "{report:?}");
    let (_, m) = stack.get_text("/metrics").await;
    assert!(
        metric(&m, "widgetry_broker_denied_total{action=\"publish\"}") >= 6.0,
        "{m}"
    );
    assert!(
        metric(&m, "widgetry_broker_denied_total{action=\"connect\"}") >= 2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "widgetry_ingest_mqtt_reconnects_total"),
        0.0,
        "{m}"
    );
    store.close().await;
    stack.stop().await;
}

/// broker.toml with device credentials for d1, d2 and an observer.
fn with_credentials() -> String {
    DEFAULT_BROKER_TOML.replacen(
        "\n[v5.1]\n",
        "\n[v4.1.connections.auth]\nd1 = \"d1-secret\"\nd2 = \"d2-secret\"\nviewer = \"viewer-secret\"\n\n[access]\nobservers = [\"viewer\"]\n\n[v5.1]\n",
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_credentials_a_device_stays_in_its_own_topics() {
    let stack = Stack::with(Default::default(), &with_credentials()).await;
    let (v4, v5) = (
        stack.mqtt.port().to_string(),
        stack.mqtt5.port().to_string(),
    );
    let d1 = ["-u", "d1", "-P", "d1-secret"];

    // Nobody gets in without credentials, or with wrong ones; the CONNACK
    // says why.
    for (version, port) in [("311", &v4), ("5", &v5)] {
        for login in [
            &[][..],
            &["-u", "d1", "-P", "wrong"][..],
            &["-u", "nobody", "-P", "x"][..],
        ] {
            let mut args = vec![
                "-V",
                version,
                "-p",
                port,
                "-t",
                "widgetry/v1/d1/ack",
                "-W",
                "5",
            ];
            args.extend_from_slice(login);
            let o = mosquitto("mosquitto_sub", &args);
            assert!(!o.status.success(), "{version} {login:?}: {}", text(&o));
            // 3.1.1: "Connection Refused: bad user name or password";
            // MQTT 5: "Bad User Name or Password" (reason 0x86).
            assert!(
                stderr_says_lower(&o, "bad user name or password"),
                "{version} {login:?}: {}",
                text(&o)
            );
        }
    }

    // d1 connects only under its own client id.
    for (version, port) in [("311", &v4), ("5", &v5)] {
        for id in ["widgetry-agent-d2", "d2"] {
            let mut args = vec![
                "-V",
                version,
                "-p",
                port,
                "-i",
                id,
                "-t",
                "widgetry/v1/d1/ack",
                "-E",
            ];
            args.extend_from_slice(&d1);
            let o = mosquitto("mosquitto_sub", &args);
            assert!(
                stderr_says_lower(&o, "not authori"),
                "{version} {id}: {}",
                text(&o)
            );
        }
        let mut args = vec![
            "-V",
            version,
            "-p",
            port,
            "-i",
            "widgetry-agent-d1",
            "-t",
            "widgetry/v1/d1/ack",
            "-E",
        ];
        args.extend_from_slice(&d1);
        let o = mosquitto("mosquitto_sub", &args);
        assert!(o.status.success(), "{version}: {}", text(&o));
    }

    // d1 may not read d2's acks, nor everything.
    for (version, port) in [("311", &v4), ("5", &v5)] {
        for filter in ["widgetry/v1/d2/ack", "widgetry/v1/+/ack", "#"] {
            let mut args = vec!["-V", version, "-p", port, "-t", filter, "-W", "5"];
            args.extend_from_slice(&d1);
            // mosquitto_sub exits (status 0) once every filter is denied.
            let o = mosquitto("mosquitto_sub", &args);
            assert!(
                stderr_says(&o, "denied"),
                "{version} {filter}: {}",
                text(&o)
            );
        }
    }

    // d1 reads its own error reports: publish bad JSON until one arrives
    // on its subscription.
    let mut errors = Command::new(require_tool("mosquitto_sub"))
        .args([
            "-h",
            "127.0.0.1",
            "-V",
            "5",
            "-p",
            &v5,
            "-t",
            "widgetry/v1/d1/errors",
        ])
        .args(["-C", "1", "-W", "30"])
        .args(d1)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    let mut bad = vec![
        "-V",
        "5",
        "-p",
        &v5,
        "-q",
        "1",
        "-t",
        "widgetry/v1/d1/samples/json",
    ];
    bad.extend_from_slice(&d1);
    bad.extend_from_slice(&["-m", "{not json"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let o = mosquitto("mosquitto_pub", &bad);
        assert!(o.status.success(), "{}", text(&o));
        if let Some(status) = errors.try_wait().expect("poll mosquitto_sub") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no error report reached d1"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let report = errors.wait_with_output().expect("mosquitto_sub output");
    assert!(status.success(), "{}", text(&report));
    assert!(
        String::from_utf8_lossy(&report.stdout).contains("bad_json"),
        "{}",
        text(&report)
    );

    // d1 may not publish as d2, nor anything the server publishes; its own
    // samples are stored.
    for (topic, payload) in [
        (
            "widgetry/v1/d2/samples/json",
            r#"{"series":"forged","value":1}"#,
        ),
        ("widgetry/v1/d1/ack", r#"{"session":"0","through":1}"#),
        (
            "widgetry/v1/d1/samples/json",
            r#"{"series":"temp","value":21.5}"#,
        ),
    ] {
        let mut args = vec!["-V", "5", "-p", &v5, "-q", "1", "-t", topic, "-m", payload];
        args.extend_from_slice(&d1);
        let o = mosquitto("mosquitto_pub", &args);
        let denied = stderr_says(&o, "Not authorized");
        assert_eq!(
            denied,
            !topic.starts_with("widgetry/v1/d1/samples"),
            "{topic}: {}",
            text(&o)
        );
    }
    let store = Store::open(&stack.db).await.expect("open db");
    wait_for("d1's sample stored", Duration::from_secs(30), || async {
        let pts = store
            .series_points("d1", &SeriesKey::plain("temp"), 0, i64::MAX)
            .await
            .expect("query");
        pts.filter(|p| !p.is_empty()).map(|_| ())
    })
    .await;
    let d2 = store
        .series_points("d2", &SeriesKey::plain("forged"), 0, i64::MAX)
        .await
        .expect("query");
    assert!(d2.unwrap_or_default().is_empty(), "nothing stored as d2");

    // An agent with device credentials works end to end.
    let agent = fast_agent(stack.mqtt.port(), "d2", Some(("d2", "d2-secret")));
    wait_for(
        "the agent's samples stored",
        Duration::from_secs(30),
        || async { (stored(&store, "d2").await >= 30).then_some(()) },
    )
    .await;
    let agent_report = agent.stop().await;
    assert_eq!(agent_report.batches_dropped, 0, "{agent_report:?}");

    // An observer reads everything and publishes nothing.
    for (version, port) in [("311", &v4), ("5", &v5)] {
        let o = mosquitto(
            "mosquitto_sub",
            &[
                "-V",
                version,
                "-p",
                port,
                "-u",
                "viewer",
                "-P",
                "viewer-secret",
                "-t",
                "#",
                "-E",
            ],
        );
        assert!(o.status.success(), "observer subscribes to #: {}", text(&o));
    }
    let o = mosquitto(
        "mosquitto_pub",
        &[
            "-V",
            "5",
            "-p",
            &v5,
            "-u",
            "viewer",
            "-P",
            "viewer-secret",
            "-q",
            "1",
        ]
        .into_iter()
        .chain([
            "-t",
            "widgetry/v1/viewer/samples/json",
            "-m",
            r#"{"series":"x","value":1}"#,
        ])
        .collect::<Vec<_>>(),
    );
    assert!(stderr_says(&o, "Not authorized"), "{}", text(&o));

    let (_, m) = stack.get_text("/metrics").await;
    for (series, least) in [
        ("widgetry_broker_denied_total{action=\"subscribe\"}", 6.0),
        ("widgetry_broker_denied_total{action=\"publish\"}", 3.0),
        (
            "widgetry_broker_refused_connections_total{reason=\"bad_credentials\"}",
            6.0,
        ),
    ] {
        assert!(metric(&m, series) >= least, "{series} >= {least}: {m}");
    }
    store.close().await;
    stack.stop().await;
}

/// Untrusted strings reach the log escaped and short: a newline in a topic
/// cannot forge a log line, and a 65 KB topic is not a 65 KB line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_topics_cannot_forge_or_flood_log_lines() {
    let dir = tempfile::tempdir().expect("dir");
    let (mqtt, http) = (free_port(), free_port());
    let log = dir.path().join("serve.log");
    let mut serve = ChildGuard(
        Command::new(workspace_bin("widgetry"))
            .current_dir(dir.path())
            .args(["serve", "--mqtt-listen", &format!("127.0.0.1:{mqtt}")])
            .args(["--mqtt5-listen", "127.0.0.1:0"])
            .args(["--http-listen", &format!("127.0.0.1:{http}")])
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start serve"),
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{http}").parse().expect("addr");
    wait_for("serve is subscribed", Duration::from_secs(30), || async {
        std::net::TcpStream::connect(addr).ok()?;
        let (code, body) = http_get_text(addr, "/metrics").await;
        (code == 200 && body.contains("widgetry_ingest_subscribed 1")).then_some(())
    })
    .await;
    let port = mqtt.to_string();
    // mosquitto_pub refuses control characters in topics; paho sends them.
    let forged = "widgetry/v1/dev\nFORGED 2026-12-02T00:00:00Z  INFO admin logged in/samples/json";
    let script = format!(
        "import paho.mqtt.client as m\nc = m.Client('hostile-topic')\nc.connect('127.0.0.1', {mqtt})\nc.loop_start()\nc.publish({forged:?}, '{{}}', qos=1).wait_for_publish(10)\nc.disconnect()\n"
    );
    let o = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .expect("python3 with paho (scripts/test.sh installs python3-paho-mqtt)");
    assert!(o.status.success(), "{}", text(&o));
    let long = format!("widgetry/v1/{}/samples/json", "L".repeat(65_000));
    let o = mosquitto(
        "mosquitto_pub",
        &["-V", "311", "-p", &port, "-q", "1", "-t", &long, "-m", "{}"],
    );
    assert!(o.status.success(), "{}", text(&o));
    wait_for("both rejected", Duration::from_secs(30), || async {
        let (_, m) = http_get_text(addr, "/metrics").await;
        (metric(&m, "widgetry_ingest_rejects_total{reason=\"bad_device\"}") >= 2.0).then_some(())
    })
    .await;
    let _ = serve.0.kill();
    let _ = serve.0.wait();
    let text = std::fs::read_to_string(&log).expect("read log");
    assert!(text.contains("rejected message"), "{text}");
    for line in text.lines() {
        assert!(!line.starts_with("FORGED"), "forged line: {line:?}");
        assert!(line.len() < 2_000, "a {} byte log line", line.len());
    }
}

/// A payload over the ingestor's 1 MiB limit is rejected where it can be
/// reported, not dropped by the broker without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_payload_is_reported_not_dropped_in_silence() {
    let stack = Stack::start().await;
    let port = stack.mqtt.port().to_string();
    let file = stack.dir.path().join("big.bin");
    std::fs::write(&file, vec![b'x'; 1_100_000]).expect("write payload");
    let mut errors = Command::new(require_tool("mosquitto_sub"))
        .args([
            "-h",
            "127.0.0.1",
            "-V",
            "311",
            "-p",
            &port,
            "-t",
            "widgetry/v1/big/errors",
        ])
        .args(["-C", "1", "-W", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while errors.try_wait().expect("poll").is_none() {
        let o = mosquitto(
            "mosquitto_pub",
            &[
                "-V",
                "311",
                "-p",
                &port,
                "-q",
                "1",
                "-t",
                "widgetry/v1/big/samples",
            ]
            .into_iter()
            .chain(["-f", file.to_str().expect("utf-8 path")])
            .collect::<Vec<_>>(),
        );
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            std::time::Instant::now() < deadline,
            "no error report for the oversize payload"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = errors.wait_with_output().expect("output");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("oversize"),
        "{}",
        text(&out)
    );
    let (_, m) = stack.get_text("/metrics").await;
    assert!(
        metric(&m, "widgetry_ingest_rejects_total{reason=\"oversize\"}") >= 1.0,
        "{m}"
    );
    stack.stop().await;
}

/// The server's resident memory, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Opens `n` MQTT 3.1.1 connections (CONNECT, CONNACK), then closes them
/// all with DISCONNECT.
fn churn(port: u16, cycle: usize, n: usize) {
    use std::io::{Read, Write};
    let mut open = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let id = format!("churn-{cycle}-{i}");
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
        body.extend_from_slice(&(id.len() as u16).to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend_from_slice(&body);
        s.write_all(&packet).expect("CONNECT");
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).expect("CONNACK");
        assert_eq!(ack, [0x20, 2, 0, 0], "accepted");
        open.push(s);
    }
    for mut s in open {
        let _ = s.write_all(&[0xE0, 0]);
    }
}

/// Memory is returned after connections come and go (it grew 341 → 400 MB
/// over four cycles of 1,000): after the first cycle, at most 2 MB more
/// per further cycle of 1,000 connect/close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_does_not_keep_memory() {
    let dir = tempfile::tempdir().expect("dir");
    let (mqtt, http) = (free_port(), free_port());
    let serve = ServeProc::start(mqtt, http, dir.path()).await;
    let pid = serve.child.id();
    let settled = |pid| async move {
        // Disconnects are handled by the broker's router asynchronously:
        // wait until the figure stops moving (three equal readings).
        let mut last = Vec::new();
        wait_for("RSS settles", Duration::from_secs(20), || {
            last.push(rss_kib(pid));
            let n = last.len();
            let steady = n >= 3 && last[n - 3..].iter().all(|v| *v == last[n - 1]);
            let value = last[n - 1];
            async move { steady.then_some(value) }
        })
        .await
    };
    let mut after = Vec::new();
    for cycle in 0..5 {
        tokio::task::spawn_blocking(move || churn(mqtt, cycle, 1000))
            .await
            .expect("join");
        after.push(settled(pid).await);
    }
    let growth_kib = after[4].saturating_sub(after[0]);
    eprintln!(
        "RSS after each cycle of 1,000 connect/close (KiB): {after:?}; growth after the first: {growth_kib} KiB"
    );
    assert!(
        growth_kib <= 4 * 2048,
        "RSS grew {growth_kib} KiB over 4 cycles after the first (limit 2 MiB per cycle): {after:?}"
    );
    drop(serve);
}
