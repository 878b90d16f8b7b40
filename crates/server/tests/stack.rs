//! Full-stack tests: `serve` in-process on free ports (real rumqttd, real
//! SQLite in a temp dir), agents, real MQTT clients (rumqttc and the
//! mosquitto command-line tools) and real HTTP requests.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use widgetry_proto::json::{Ack, ErrorReport};
use widgetry_proto::{BatchBuilder, DecodedBatch, Limits, SeriesKey, SessionId};

const T: Duration = Duration::from_secs(20);

fn client(stack: &Stack, id: &str) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", stack.mqtt.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(2 << 20, 2 << 20);
    AsyncClient::new(o, 100)
}

/// Drives `ev` until the subscription to `filter` is acknowledged.
async fn subscribed(c: &AsyncClient, ev: &mut EventLoop, filter: &str) {
    c.subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    tokio::time::timeout(T, async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = ev.poll().await.expect("mqtt connection") {
                return;
            }
        }
    })
    .await
    .expect("SUBACK within the deadline");
}

/// Next publish received on `ev`.
async fn next_publish(ev: &mut EventLoop, what: &str) -> rumqttc::Publish {
    tokio::time::timeout(T, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = ev.poll().await.expect("mqtt connection") {
                return p;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn device_listed(stack: &Stack, device: &str) -> Option<serde_json::Value> {
    let (status, body) = stack.get("/api/v1/devices").await;
    assert_eq!(status, 200, "{body}");
    body.as_array()?
        .iter()
        .find(|d| d["device"] == device)
        .cloned()
}

async fn points(stack: &Stack, device: &str, series: &str) -> Vec<(i64, f64)> {
    let (status, body) = stack
        .get(&format!(
            "/api/v1/series?device={device}&series={series}&from=0"
        ))
        .await;
    if status == 404 {
        return Vec::new();
    }
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body["points"].clone()).expect("points are [ts, value] pairs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_are_stored_and_served() {
    let stack = Stack::start().await;
    let a = Agent::start(stack.mqtt, "agent-a");
    let b = Agent::start(stack.mqtt, "agent-b");
    for dev in ["agent-a", "agent-b"] {
        let d = wait_for(&format!("{dev} online with its series"), T, || async {
            device_listed(&stack, dev).await.filter(|d| {
                d["state"] == "online"
                    && d["series"]
                        .as_array()
                        .is_some_and(|s| s.len() == SERIES.len())
            })
        })
        .await;
        assert_eq!(d["series"], serde_json::json!(SERIES));
        let pts = wait_for(&format!("{dev} cpu points via the API"), T, || async {
            let p = points(&stack, dev, "cpu.usage_pct").await;
            (p.len() >= 2).then_some(p)
        })
        .await;
        assert!(
            pts.iter().all(|(_, v)| (0.0..=100.0).contains(v)),
            "cpu % out of range: {pts:?}"
        );
        assert!(
            pts.windows(2).all(|w| w[0].0 <= w[1].0),
            "points sorted by time"
        );
        let mem = points(&stack, dev, "mem.total_bytes").await;
        assert!(
            mem.iter().all(|(_, v)| *v > 0.0),
            "total memory must be positive: {mem:?}"
        );
    }
    // The rows are in SQLite, not only in memory.
    let rows = stack
        .count("SELECT COUNT(*) FROM batches WHERE device IN ('agent-a', 'agent-b')")
        .await;
    assert!(
        rows >= 2,
        "expected batches of both agents in SQLite, found {rows}"
    );
    let ra = a.stop().await;
    let rb = b.stop().await;
    for r in [&ra, &rb] {
        assert!(r.batches_acked >= 1, "{r:?}");
        assert_eq!((r.batches_dropped, r.batches_unacked), (0, 0), "{r:?}");
    }
    // Every acknowledged batch is in the database.
    let stored = stack
        .count("SELECT COUNT(*) FROM batches WHERE device IN ('agent-a', 'agent-b')")
        .await;
    assert_eq!(stored as u64, ra.batches_acked + rb.batches_acked);
    // A graceful stop publishes the offline status.
    for dev in ["agent-a", "agent-b"] {
        wait_for(&format!("{dev} offline after stop"), T, || async {
            device_listed(&stack, dev)
                .await
                .filter(|d| d["state"] == "offline")
        })
        .await;
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_json_is_stored_and_queryable() {
    let pub_bin = require_tool("mosquitto_pub");
    let stack = Stack::start().await;
    let port = stack.mqtt.port().to_string();
    let send = |topic: &str, msg: &str| {
        let status = std::process::Command::new(&pub_bin)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-q",
                "1",
                "-t",
                topic,
                "-m",
                msg,
            ])
            .status()
            .expect("run mosquitto_pub");
        assert!(status.success(), "mosquitto_pub {topic} {msg}: {status}");
    };
    send(
        "widgetry/v1/demo/samples/json",
        r#"{"series":"temp","value":21.5}"#,
    );
    // An explicit time an hour ago (see `recent_ts`).
    let earlier = recent_ts(Duration::from_secs(3600));
    send(
        "widgetry/v1/demo/samples/json",
        &format!(
            r#"{{"samples":[{{"series":"temp","ts":{earlier},"value":19.25}},{{"series":"rh","labels":{{"room":"lab"}},"value":40}}]}}"#
        ),
    );
    let pts = wait_for("both temp points", T, || async {
        let p = points(&stack, "demo", "temp").await;
        (p.len() == 2).then_some(p)
    })
    .await;
    assert_eq!(pts[0], (earlier, 19.25));
    assert_eq!(pts[1].1, 21.5);
    let now = widgetry_common::now_ms();
    assert!(
        (now - pts[1].0).abs() < 60_000,
        "ts defaults to arrival time: {}",
        pts[1].0
    );
    let rh = points(&stack, "demo", "rh%7Broom=lab%7D").await;
    assert_eq!(rh.len(), 1, "labelled series is queryable by its key");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_receives_agent_batches() {
    let sub_bin = require_tool("mosquitto_sub");
    let stack = Stack::start().await;
    // -F %x prints each payload as hex; -C 2 exits after two messages.
    let mut child = tokio::process::Command::new(sub_bin)
        .args(["-h", "127.0.0.1", "-p", &stack.mqtt.port().to_string()])
        .args([
            "-t",
            "widgetry/v1/subdev/samples",
            "-q",
            "1",
            "-C",
            "2",
            "-F",
            "%x",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run mosquitto_sub");
    // mosquitto_sub has no "subscribed" signal: the agent keeps publishing,
    // so the subscriber gets the next two batches whenever it is ready.
    let agent = Agent::start(stack.mqtt, "subdev");
    let out = tokio::time::timeout(T, async {
        let mut out = Vec::new();
        let mut stdout = child.stdout.take().expect("stdout");
        tokio::io::AsyncReadExt::read_to_end(&mut stdout, &mut out)
            .await
            .expect("read");
        out
    })
    .await
    .expect("mosquitto_sub received two messages in time");
    let text = String::from_utf8(out).expect("hex is utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let mut seqs = Vec::new();
    for hex in lines {
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let batch = DecodedBatch::decode(&bytes, &Limits::default(), widgetry_common::now_ms())
            .expect("mosquitto_sub payload decodes as a Batch");
        assert!(batch.sample_count() >= 3, "{batch:?}");
        seqs.push(batch.seq);
    }
    assert!(seqs[0] < seqs[1], "batches arrive in seq order: {seqs:?}");
    agent.stop().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payload_is_rejected_and_others_keep_flowing() {
    let pub_bin = require_tool("mosquitto_pub");
    let stack = Stack::start().await;
    let agent = Agent::start(stack.mqtt, "good");
    let (c, mut ev) = client(&stack, "test-errors");
    subscribed(&c, &mut ev, "widgetry/v1/bad/errors").await;
    let status = std::process::Command::new(&pub_bin)
        .args(["-h", "127.0.0.1", "-p", &stack.mqtt.port().to_string()])
        .args([
            "-t",
            "widgetry/v1/bad/samples",
            "-m",
            "this is not protobuf",
        ])
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success());
    let p = next_publish(&mut ev, "an error report for device bad").await;
    let report: ErrorReport = serde_json::from_slice(&p.payload).expect("error report is JSON");
    assert_eq!(report.code, "bad_protobuf", "{report:?}");
    assert_eq!(report.topic, "widgetry/v1/bad/samples");
    assert!(report.message.contains("protobuf"), "{report:?}");
    // The operator sees it too: counter and device reject count.
    let (_, metrics) = stack.get_text("/metrics").await;
    assert!(
        metrics.contains("widgetry_ingest_rejects_total{reason=\"bad_protobuf\"} 1"),
        "{metrics}"
    );
    let bad = wait_for("device bad listed with 1 reject", T, || async {
        device_listed(&stack, "bad")
            .await
            .filter(|d| d["rejects"] == 1)
    })
    .await;
    assert_eq!(bad["series"], serde_json::json!([]));
    // The good device's data keeps arriving after the reject.
    let before = stack
        .count("SELECT COUNT(*) FROM batches WHERE device = 'good'")
        .await;
    wait_for("more batches from the good device", T, || async {
        let n = stack
            .count("SELECT COUNT(*) FROM batches WHERE device = 'good'")
            .await;
        (n > before).then_some(())
    })
    .await;
    // Oversize, bad JSON and bad timestamps are rejected with their reasons.
    let send = |topic: &str, msg: &str| {
        std::process::Command::new(&pub_bin)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &stack.mqtt.port().to_string(),
                "-t",
                topic,
                "-m",
                msg,
            ])
            .status()
            .expect("mosquitto_pub")
    };
    send(
        "widgetry/v1/bad/samples/json",
        r#"{"series":"t","value":1,"ts":12}"#,
    );
    let p = next_publish(&mut ev, "bad timestamp report").await;
    let report: ErrorReport = serde_json::from_slice(&p.payload).expect("json");
    assert_eq!(report.code, "bad_timestamp", "{report:?}");
    send("widgetry/v1/bad/samples/json", r#"{"series":"t"}"#);
    let p = next_publish(&mut ev, "bad json report").await;
    let report: ErrorReport = serde_json::from_slice(&p.payload).expect("json");
    assert_eq!(report.code, "bad_json", "{report:?}");
    agent.stop().await;
    stack.stop().await;
}

fn test_batch(session: SessionId, seq: u64) -> Vec<u8> {
    let mut b = BatchBuilder::default();
    let now = widgetry_common::now_ms();
    for i in 0..10 {
        b.push(0, now - 10_000 + i * 1000, i as f64);
    }
    b.finish(session, seq, vec![(0, SeriesKey::plain("dup.test"))])
        .encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_published_twice_is_stored_once_and_acked_twice() {
    let stack = Stack::start().await;
    let (c, mut ev) = client(&stack, "dup-device");
    subscribed(&c, &mut ev, "widgetry/v1/dup/ack").await;
    let session = SessionId::generate();
    let payload = test_batch(session, 1);
    for round in 1..=2 {
        c.publish(
            "widgetry/v1/dup/samples",
            QoS::AtLeastOnce,
            false,
            payload.clone(),
        )
        .await
        .expect("publish");
        let p = next_publish(&mut ev, &format!("ack #{round}")).await;
        let ack: Ack = serde_json::from_slice(&p.payload).expect("ack is JSON");
        assert_eq!(
            ack,
            Ack {
                session,
                through: 1,
                seqs: vec![]
            },
            "round {round}"
        );
    }
    assert_eq!(
        stack
            .count("SELECT COUNT(*) FROM batches WHERE device = 'dup'")
            .await,
        1
    );
    assert_eq!(points(&stack, "dup", "dup.test").await.len(), 10);
    // Out-of-order seqs are acknowledged selectively, then contiguously.
    c.publish(
        "widgetry/v1/dup/samples",
        QoS::AtLeastOnce,
        false,
        test_batch(session, 3),
    )
    .await
    .expect("publish");
    let ack: Ack =
        serde_json::from_slice(&next_publish(&mut ev, "ack of 3").await.payload).expect("json");
    assert_eq!((ack.through, ack.seqs.clone()), (1, vec![3]));
    c.publish(
        "widgetry/v1/dup/samples",
        QoS::AtLeastOnce,
        false,
        test_batch(session, 2),
    )
    .await
    .expect("publish");
    let ack: Ack =
        serde_json::from_slice(&next_publish(&mut ev, "ack of 2").await.payload).expect("json");
    assert_eq!((ack.through, ack.seqs), (3, vec![]));
    let (_, metrics) = stack.get_text("/metrics").await;
    assert!(
        metrics.contains("widgetry_ingest_batches_duplicate_total 1"),
        "{metrics}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_batches_survive_a_restart_and_redelivery() {
    let mut stack = Stack::start().await;
    let (c, mut ev) = client(&stack, "restart-device");
    subscribed(&c, &mut ev, "widgetry/v1/rs/ack").await;
    let session = SessionId::generate();
    c.publish(
        "widgetry/v1/rs/samples",
        QoS::AtLeastOnce,
        false,
        test_batch(session, 1),
    )
    .await
    .expect("publish");
    let _ = next_publish(&mut ev, "ack before restart").await;
    // Stop the server roles and reopen the same database on a new stack.
    let db = stack.db.clone();
    let dir = std::mem::replace(&mut stack.dir, tempfile::tempdir().expect("dir"));
    stack.stop().await;
    drop(c);
    let store = widgetry_server::store::Store::open(&db)
        .await
        .expect("reopen");
    let n: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM batches WHERE device = 'rs'")
        .fetch_one(store.reader())
        .await
        .expect("count");
    assert_eq!(n.0, 1, "the acknowledged batch is on disk after shutdown");
    let through: (i64,) = sqlx::query_as("SELECT through FROM sessions WHERE device = 'rs'")
        .fetch_one(store.reader())
        .await
        .expect("session row");
    assert_eq!(through.0, 1);
    store.close().await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_are_json_with_4xx() {
    let stack = Stack::start().await;
    for (path, status, needle) in [
        ("/api/v1/series?series=x", 400, "device"),
        (
            "/api/v1/series?device=bad%20id&series=x",
            400,
            "bad device id",
        ),
        (
            "/api/v1/series?device=d&series=x&from=10&to=5",
            400,
            "after",
        ),
        (
            "/api/v1/series?device=d&series=x&max_points=0",
            400,
            "max_points",
        ),
        ("/api/v1/series?device=d&series=x&from=abc", 400, "from"),
        ("/api/v1/series?device=d&series=nope", 404, "no series"),
        ("/api/v1/nothing", 404, "no route"),
    ] {
        let (got, body) = stack.get(path).await;
        assert_eq!(got, status, "{path}: {body}");
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{path}: {body}");
        assert!(body["error"]["code"].is_string(), "{path}: {body}");
    }
    let (status, body) = stack.get("/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, html) = stack.get_text("/").await;
    assert_eq!(status, 200);
    assert!(html.contains("Widgetry"));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statsd_packets_become_series_after_one_flush() {
    let stack = Stack::start().await;
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let statsd_addr = udp.local_addr().expect("addr");
    drop(udp);
    let spool = tempfile::tempdir().expect("spool");
    let mut cfg = widgetry_agent::AgentConfig::new("127.0.0.1", stack.mqtt.port(), "statsd-dev");
    cfg.interval = Duration::from_secs(3600);
    cfg.batch_max_wait = Duration::from_millis(100);
    cfg.spool_dir = spool.path().to_path_buf();
    cfg.statsd = Some(statsd_addr);
    cfg.statsd_flush = Duration::from_millis(300);
    let agent = Agent::with_config(cfg, spool);
    // The agent binds its statsd socket before it reports itself online.
    wait_for("statsd-dev online", T, || async {
        device_listed(&stack, "statsd-dev")
            .await
            .filter(|d| d["state"] == "online")
    })
    .await;
    // One multi-metric packet, so every line lands in the same flush.
    let packet = "gorets:1|c\ngorets:1|c|@0.1\ngaugor:333|g\ngaugor:-10|g\ngaugor:+4|g\n\
                  uniques:765|s\nuniques:766|s\nuniques:765|s\nglork:320|ms\nglork:100|ms\n\
                  glork:200|ms|@0.5\npage.views:2|c|#env:prod\nnot a metric";
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    sender
        .send_to(packet.as_bytes(), statsd_addr)
        .expect("send");
    let first = |series: &'static str| {
        let stack = &stack;
        async move {
            wait_for(series, T, || async {
                points(stack, "statsd-dev", series)
                    .await
                    .first()
                    .map(|p| p.1)
            })
            .await
        }
    };
    assert_eq!(first("gorets.count").await, 11.0, "1 + 1/0.1");
    assert_eq!(first("gaugor").await, 327.0);
    assert_eq!(first("uniques.count").await, 2.0);
    assert_eq!(first("glork.count").await, 4.0);
    assert_eq!(first("glork.min").await, 100.0);
    assert_eq!(first("glork.max").await, 320.0);
    assert_eq!(first("glork.p50").await, 200.0);
    assert_eq!(first("page.views.count%7Benv=prod%7D").await, 2.0);
    let rate = first("gorets.rate").await;
    assert!((rate - 11.0 / 0.3).abs() < 1e-6, "rate per second: {rate}");
    let report = agent.stop().await;
    assert_eq!(
        (report.statsd_bad_lines, report.statsd_dropped),
        (1, 0),
        "\"not a metric\" is the one bad line; nothing exceeds the budget"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_protocol_events_and_samples_reach_the_server() {
    let stack = Stack::start().await;
    let spool = tempfile::tempdir().expect("spool");
    let sock_path = spool.path().join("events.sock");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let udp_addr = udp.local_addr().expect("addr");
    drop(udp);
    let mut cfg = widgetry_agent::AgentConfig::new("127.0.0.1", stack.mqtt.port(), "app-dev");
    cfg.interval = Duration::from_secs(3600);
    cfg.batch_max_wait = Duration::from_millis(100);
    cfg.spool_dir = spool.path().join("spool");
    cfg.events_socket = Some(sock_path.clone());
    cfg.events_udp = Some(udp_addr);
    let agent = Agent::with_config(cfg, spool);
    // The sockets are bound before the agent reports itself online.
    wait_for("app-dev online", T, || async {
        device_listed(&stack, "app-dev")
            .await
            .filter(|d| d["state"] == "online")
    })
    .await;
    // Any MQTT client sees the agent's events on `…/events` once stored.
    let (sub, mut sub_ev) = client(&stack, "events-watcher");
    subscribed(&sub, &mut sub_ev, "widgetry/v1/app-dev/events").await;
    let unix = std::os::unix::net::UnixDatagram::unbound().expect("unix socket");
    unix.send_to(
        b"{\"event\":\"upload_started\",\"size\":123}\n{\"series\":\"queue.depth\",\"value\":3,\"labels\":{\"queue\":\"uploads\"}}\nnot json\n",
        &sock_path,
    )
    .expect("send to the events socket");
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let earlier = recent_ts(Duration::from_secs(3600));
    sender
        .send_to(
            format!(r#"{{"event":"upload_done","ts":{earlier},"ok":true}}"#).as_bytes(),
            udp_addr,
        )
        .expect("send udp");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let p = next_publish(&mut sub_ev, "the agent's events on …/events").await;
        let (_, evs) = widgetry_proto::json::parse_events(
            &p.payload,
            &Default::default(),
            widgetry_common::now_ms(),
        )
        .expect("an events message");
        seen.extend(evs.into_iter().map(|e| e.name));
    }
    seen.sort();
    assert_eq!(seen, ["upload_done", "upload_started"]);
    let events = wait_for("both events stored", T, || async {
        let (status, body) = stack.get("/api/v1/events?device=app-dev&from=0").await;
        assert_eq!(status, 200, "{body}");
        let ev = body["events"].as_array().cloned().unwrap_or_default();
        (ev.len() == 2).then_some(ev)
    })
    .await;
    assert_eq!(
        events[0]["event"], "upload_done",
        "oldest first: {events:?}"
    );
    assert_eq!(events[0]["ts"], earlier);
    assert_eq!(events[0]["body"]["ok"], true);
    assert_eq!(events[1]["event"], "upload_started");
    assert_eq!(events[1]["body"]["size"], 123);
    let depth = wait_for("local sample stored", T, || async {
        points(&stack, "app-dev", "queue.depth%7Bqueue=uploads%7D")
            .await
            .first()
            .map(|p| p.1)
    })
    .await;
    assert_eq!(depth, 3.0);
    let report = agent.stop().await;
    assert_eq!(
        (report.events_dropped, report.local_bad_lines),
        (0, 1),
        "{report:?}"
    );
    let (status, body) = stack.get("/api/v1/events?device=bad%20id").await;
    assert_eq!(status, 400, "{body}");
    stack.stop().await;
}

/// A device's gap claims cannot break the fleet-wide answers: a gap
/// claiming 2^63 - 1 lost samples is refused, and gaps stored before that
/// check existed sum without overflowing (`/api/v1/devices` and
/// `/api/v1/fleet` answered 500 for everyone with two of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_claims_cannot_break_fleet_answers() {
    let stack = Stack::start().await;
    let (c, mut ev) = client(&stack, "gap-claims");
    tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let session = SessionId([3; 16]);
    c.publish(
        "widgetry/v1/gap-claims/samples/json",
        QoS::AtLeastOnce,
        false,
        br#"{"series":"t","value":1}"#.to_vec(),
    )
    .await
    .expect("queue");
    for seq in [5, 6] {
        let batch = DecodedBatch {
            session,
            seq,
            series: Vec::new(),
            runs: Vec::new(),
            events: Vec::new(),
            gaps: vec![widgetry_proto::Gap {
                session,
                from_seq: 1,
                to_seq: 2,
                samples: i64::MAX as u64,
                from_ts_ms: 0,
                to_ts_ms: 0,
            }],
            settled_through: 0,
        };
        c.publish(
            "widgetry/v1/gap-claims/samples",
            QoS::AtLeastOnce,
            false,
            batch.encode(),
        )
        .await
        .expect("queue");
    }
    wait_for("both refused", Duration::from_secs(30), || async {
        let (_, m) = stack.get_text("/metrics").await;
        (metric(&m, "widgetry_ingest_rejects_total{reason=\"bad_session\"}") >= 2.0).then_some(())
    })
    .await;
    // Gaps an older server stored unchecked.
    let store = widgetry_server::store::Store::open(&stack.db)
        .await
        .expect("open");
    let mut tx = store.begin().await.expect("begin");
    for from_seq in [1, 3] {
        let gap = widgetry_proto::Gap {
            session,
            from_seq,
            to_seq: from_seq,
            samples: i64::MAX as u64,
            from_ts_ms: 0,
            to_ts_ms: 0,
        };
        widgetry_server::store::write::insert_gap(&mut tx, "gap-claims", &gap, 0)
            .await
            .expect("insert gap");
    }
    tx.commit().await.expect("commit");
    store.close().await;
    let (code, devices) = stack.get("/api/v1/devices").await;
    assert_eq!(code, 200, "{devices}");
    let lost = devices
        .as_array()
        .and_then(|a| a.iter().find(|d| d["device"] == "gap-claims"))
        .map(|d| d["lost_samples"].as_i64().unwrap_or(-1));
    assert!(
        lost.is_some_and(|l| l >= 9_000_000_000_000_000_000),
        "{devices}"
    );
    let (code, fleet) = stack.get("/api/v1/fleet").await;
    assert_eq!(code, 200, "{fleet}");
    // Time ranges are clamped: no overflowing bucket widths.
    for range in [
        "from=0&to=9223372036854775806",
        "from=-9223372036854775808&to=9223372036854775807",
        "to=-9223372036854775808",
    ] {
        let (code, v) = stack
            .get(&format!(
                "/api/v1/series?device=gap-claims&series=t&{range}&max_points=1"
            ))
            .await;
        assert_eq!(code, 200, "{range}: {v}");
        assert!(
            v["bucket_ms"].as_i64().is_none_or(|w| w > 0),
            "{range}: {v}"
        );
    }
    stack.stop().await;
}

/// One device cannot create series without bound (a flood of distinct
/// names grew `/api/v1/devices` to 400 KB): past its limit a message that
/// would create one is rejected with `series_limit` on `…/errors` and
/// counted, while its existing series and other devices keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_create_more_series_than_its_limit() {
    assert_eq!(
        widgetry_proto::Limits::default().max_series_per_device,
        10_000
    );
    let limits = widgetry_proto::Limits {
        max_series_per_device: 5,
        ..Default::default()
    };
    let stack = Stack::with_limits(limits).await;
    let (c, mut ev) = client(&stack, "test-series-limit");
    subscribed(&c, &mut ev, "widgetry/v1/many/errors").await;
    let port = stack.mqtt.port().to_string();
    let send = |device: &str, body: &str| {
        let o = mosquitto(
            "mosquitto_pub",
            &[
                "-p",
                &port,
                "-q",
                "1",
                "-t",
                &format!("widgetry/v1/{device}/samples/json"),
                "-m",
                body,
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
    };
    // Five series fit; one message with three new ones is refused whole.
    send(
        "many",
        r#"{"samples":[{"series":"s0","value":0},{"series":"s1","value":1},{"series":"s2","value":2}]}"#,
    );
    send(
        "many",
        r#"{"samples":[{"series":"s3","value":3},{"series":"s4","value":4}]}"#,
    );
    send(
        "many",
        r#"{"samples":[{"series":"s4","value":44},{"series":"s5","value":5},{"series":"s6","value":6}]}"#,
    );
    let p = next_publish(&mut ev, "a series_limit report").await;
    let report: ErrorReport = serde_json::from_slice(&p.payload).expect("JSON");
    assert_eq!(report.code, "series_limit", "{report:?}");
    assert!(report.message.contains("limit of 5 series"), "{report:?}");
    // Existing series still take samples; other devices are not limited by it.
    send("many", r#"{"series":"s0","value":10}"#);
    send("other", r#"{"series":"s9","value":9}"#);
    wait_for("s0's new sample and the other device", T, || async {
        let s0 = points(&stack, "many", "s0").await;
        let other = points(&stack, "other", "s9").await;
        (s0.len() == 2 && other.len() == 1).then_some(())
    })
    .await;
    let many = device_listed(&stack, "many").await.expect("listed");
    let series: Vec<&str> = many["series"]
        .as_array()
        .expect("series")
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert_eq!(series, ["s0", "s1", "s2", "s3", "s4"], "{many}");
    assert!(
        points(&stack, "many", "s4").await.len() == 1,
        "the refused message stored nothing"
    );
    let (_, metrics) = stack.get_text("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "widgetry_ingest_rejects_total{reason=\"series_limit\"}"
        ),
        1.0
    );
    stack.stop().await;
}

/// One device flooding the broker is cut to its rate (a burst, then so many
/// messages per second): the rest are dropped unread and counted, the
/// device is told once, and other devices are served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_held_to_its_rate_and_others_are_not() {
    let limits = widgetry_proto::Limits {
        device_messages_per_s: 5,
        device_burst: 10,
        ..Default::default()
    };
    let stack = Stack::with_limits(limits).await;
    let (c, mut ev) = client(&stack, "test-flood");
    subscribed(&c, &mut ev, "widgetry/v1/flood/errors").await;
    let port = stack.mqtt.port().to_string();
    let now = widgetry_common::now_ms();
    let lines: String = (0..200)
        .map(|i| {
            format!(
                "{{\"series\":\"x\",\"value\":{i},\"ts\":{}}}\n",
                now - 200 + i
            )
        })
        .collect();
    let started = std::time::Instant::now();
    mosquitto_lines(
        stack.mqtt.port(),
        "widgetry/v1/flood/samples/json",
        1,
        &lines,
    );
    let o = mosquitto(
        "mosquitto_pub",
        &[
            "-p",
            &port,
            "-q",
            "1",
            "-t",
            "widgetry/v1/calm/samples/json",
            "-m",
            r#"{"series":"y","value":1}"#,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let p = next_publish(&mut ev, "a rate_limited report").await;
    let report: ErrorReport = serde_json::from_slice(&p.payload).expect("JSON");
    assert_eq!(report.code, "rate_limited", "{report:?}");
    // Every message is either stored or counted as dropped.
    let (stored, dropped) = wait_for("all 200 messages accounted for", T, || async {
        let stored = points(&stack, "flood", "x").await.len() as f64;
        let (_, m) = stack.get_text("/metrics").await;
        let dropped = metric(&m, "widgetry_ingest_rejects_total{reason=\"rate_limited\"}");
        let calm = points(&stack, "calm", "y").await.len();
        (stored + dropped == 200.0 && calm == 1).then_some((stored, dropped))
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(stored >= 10.0, "the burst passes: {stored}");
    assert!(
        stored <= 10.0 + 5.0 * elapsed + 1.0,
        "at most the burst and 5/s over {elapsed:.1} s: {stored} stored, {dropped} dropped"
    );
    stack.stop().await;
}
