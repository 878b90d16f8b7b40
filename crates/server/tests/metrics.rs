//! Every series on `/metrics` moves: each counter, gauge and histogram of
//! `serve` is driven above zero here by the input that should move it, so
//! a counter cannot silently stop counting while its log line goes on.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use widgetry_proto::{BatchBuilder, Gap, Limits, SeriesKey, SessionId, pb};

const T: Duration = Duration::from_secs(30);

/// Every sample line of a Prometheus text, `series → value`.
fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

struct Client {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    fn connect(stack: &Stack, id: &str) -> Client {
        Client::with(MqttOptions::new(id, "127.0.0.1", stack.mqtt.port()))
    }

    fn connect_as(stack: &Stack, id: &str, (user, pass): (&str, &str)) -> Client {
        let mut opts = MqttOptions::new(id, "127.0.0.1", stack.mqtt.port());
        opts.set_credentials(user, pass);
        Client::with(opts)
    }

    fn with(mut opts: MqttOptions) -> Client {
        opts.set_max_packet_size(2 << 20, 2 << 20);
        let (client, mut ev) = AsyncClient::new(opts, 64);
        let task = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
        Client { client, task }
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queue publish");
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn batch(session: SessionId, seq: u64, samples: usize, defs: bool) -> Vec<u8> {
    let mut b = BatchBuilder::default();
    let now = widgetry_common::now_ms() - 600_000;
    for i in 0..samples {
        b.push(0, now + i as i64, i as f64);
    }
    let defs = if defs {
        vec![(0, SeriesKey::plain("m.value"))]
    } else {
        vec![]
    };
    b.finish(session, seq, defs).encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_on_metrics_moves() {
    // A small payload limit, so an oversize payload gets past the broker
    // (whose own limit is 1 MiB) and is rejected by the ingestor.
    // And a small series limit, so one message can go past it.
    let limits = Limits {
        max_payload_bytes: 64 * 1024,
        max_series_per_device: 50,
        // And a rate limit one device can go past.
        device_messages_per_s: 100,
        device_burst: 200,
        ..Limits::default()
    };
    // And a tiny broker log for `flood/#`, so a subscriber that is away
    // during a flood misses messages.
    let broker_toml = widgetry_server::config::DEFAULT_BROKER_TOML.replacen(
        "\n[router.custom_segment.\"widgetry/v1/+/ack\"]",
        "\n[router.custom_segment.\"flood/#\"]\nmax_segment_size = 1024\nmax_segment_count = 1\n\n[router.custom_segment.\"widgetry/v1/+/ack\"]",
        1,
    );
    let stack = Stack::with_compaction(limits, &broker_toml).await;
    let dev = Client::connect(&stack, "metrics-dev");
    let s = SessionId([7; 16]);
    let topic = "widgetry/v1/m1/samples";

    // Batches: stored, duplicate, acknowledged, live, histograms.
    dev.publish(topic, batch(s, 1, 10, true)).await;
    dev.publish(topic, batch(s, 1, 10, true)).await;
    // A gap report.
    let mut with_gap = widgetry_proto::DecodedBatch::decode(
        &batch(s, 3, 5, false),
        &Limits::default(),
        widgetry_common::now_ms(),
    )
    .expect("valid");
    with_gap.gaps.push(Gap {
        session: s,
        from_seq: 2,
        to_seq: 2,
        samples: 4,
        from_ts_ms: 1_700_000_000_000,
        to_ts_ms: 1_700_000_000_000,
    });
    dev.publish(topic, with_gap.encode()).await;
    // A batch whose live message exceeds the publisher's packet size
    // (limit + 64 KiB): committed, but its live message is skipped.
    dev.publish(topic, batch(s, 4, 9_000, false)).await;
    // JSON, status, events with a drop count.
    dev.publish(
        "widgetry/v1/m1/samples/json",
        br#"{"series":"t","value":1}"#.to_vec(),
    )
    .await;
    dev.publish(
        "widgetry/v1/m1/status",
        br#"{"state":"online","session":"07070707070707070707070707070707"}"#.to_vec(),
    )
    .await;
    dev.publish(
        "widgetry/v1/m1/events",
        br#"{"session":"07070707070707070707070707070707","seq":1,"events":[{"event":"boot"}],"dropped":3}"#.to_vec(),
    )
    .await;
    wait_for("batches, events and gaps stored", T, || async {
        let (_, m) = stack.get_text("/metrics").await;
        (metric(&m, "widgetry_ingest_batches_stored_total") >= 3.0
            && metric(&m, "widgetry_ingest_events_stored_total") >= 1.0
            && metric(&m, "widgetry_ingest_batches_duplicate_total") >= 1.0)
            .then_some(())
    })
    .await;
    // One payload per reject reason, each from its own connection (the
    // broker may close a connection over what it is sent).
    let bad_session = pb::Batch {
        session: vec![1, 2, 3],
        seq: 1,
        ..Default::default()
    };
    let bad_value = pb::Batch {
        session: vec![9; 16],
        seq: 1,
        series: vec![pb::SeriesDef {
            id: 0,
            name: "v".into(),
            labels: Default::default(),
        }],
        points: vec![pb::Points {
            series_id: 0,
            ts_delta_ms: vec![1_700_000_000_000],
            values: vec![f64::NAN],
            ..Default::default()
        }],
        ..Default::default()
    };
    let many_series = format!(
        r#"{{"samples":[{}]}}"#,
        (0..51)
            .map(|i| format!(r#"{{"series":"c{i}","value":1}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let too_many = pb::Batch {
        session: vec![9; 16],
        seq: 2,
        gaps: (0..1001u64)
            .map(|i| pb::Gap {
                session: vec![9; 16],
                from_seq: i + 1,
                to_seq: i + 1,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut rejects = 0.0;
    for (topic, payload) in [
        ("widgetry/v1/bad%device/samples", b"x".to_vec()),
        (topic, vec![0u8; 70 * 1024]),
        (topic, b"\xff\xff\xff".to_vec()),
        ("widgetry/v1/m1/samples/json", b"{".to_vec()),
        (topic, bad_session.encode_to_vec()),
        (
            "widgetry/v1/m1/samples/json",
            br#"{"series":"bad name","value":1}"#.to_vec(),
        ),
        (
            "widgetry/v1/m1/samples/json",
            br#"{"series":"t","value":1,"ts":5}"#.to_vec(),
        ),
        (topic, bad_value.encode_to_vec()),
        (topic, too_many.encode_to_vec()),
        ("widgetry/v1/m-card/samples/json", many_series.into_bytes()),
        (topic, batch(SessionId([8; 16]), 1, 1, false)),
    ] {
        let c = Client::connect(&stack, "metrics-bad");
        c.publish(topic, payload).await;
        let code = topic.to_string();
        wait_for(&format!("a reject for a payload on {code}"), T, || async {
            let (_, m) = stack.get_text("/metrics").await;
            let n = metric_sum(&m, "widgetry_ingest_rejects_total");
            (n > rejects).then_some(())
        })
        .await;
        rejects += 1.0;
    }

    // A database error: a trigger makes the next batch insert fail; the
    // device resends later, so nothing is lost.
    let widgetry_server::config::Database::Sqlite(path) = &stack.db else {
        panic!("this test runs on SQLite");
    };
    let admin = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(Duration::from_secs(10)),
    )
    .await
    .expect("a second connection to the database");
    sqlx::query(
        "CREATE TRIGGER fail_once BEFORE INSERT ON batches BEGIN SELECT RAISE(ABORT, 'test'); END",
    )
    .execute(&admin)
    .await
    .expect("create trigger");
    dev.publish(topic, batch(s, 5, 1, false)).await;
    wait_for("a failed transaction", T, || async {
        let (_, m) = stack.get_text("/metrics").await;
        (metric(&m, "widgetry_ingest_db_errors_total") >= 1.0).then_some(())
    })
    .await;
    sqlx::query("DROP TRIGGER fail_once")
        .execute(&admin)
        .await
        .expect("drop trigger");

    // Compaction: a pass that fails (a trigger refuses chunk rows), then,
    // without it, one that moves a batch of older samples into a chunk.
    sqlx::query(
        "CREATE TRIGGER fail_chunks BEFORE INSERT ON chunks BEGIN SELECT RAISE(ABORT, 'test'); END",
    )
    .execute(&admin)
    .await
    .expect("create trigger");
    // Three hours old: in a closed hour, within raw retention.
    let mut old = BatchBuilder::default();
    let three_hours_ago = widgetry_common::now_ms() - 3 * 3_600_000;
    for i in 0..20 {
        old.push(0, three_hours_ago + i * 1000, i as f64);
    }
    dev.publish(topic, old.finish(s, 6, vec![]).encode()).await;
    wait_for("a failed compaction pass", T, || async {
        let (_, m) = stack.get_text("/metrics").await;
        (metric(&m, "widgetry_compaction_failures_total") >= 1.0).then_some(())
    })
    .await;
    sqlx::query("DROP TRIGGER fail_chunks")
        .execute(&admin)
        .await
        .expect("drop trigger");
    wait_for("a batch compacted into a chunk", T, || async {
        let (_, m) = stack.get_text("/metrics").await;
        (metric(&m, "widgetry_compacted_chunks_total") >= 1.0).then_some(())
    })
    .await;

    // The broker's policy: a forged ack (denied publish), a will on an
    // ack topic (denied will, refused CONNECT), a wrong server password and
    // a client id the broker cannot take (refused CONNECTs).
    dev.publish("widgetry/v1/m1/ack", b"{}".to_vec()).await;
    for (id, will, login) in [
        ("widgetry-web-thief", false, None),
        ("metrics-will", true, None),
        (
            "metrics-bad-login",
            false,
            Some(("widgetry-server", "wrong")),
        ),
        ("metrics/bad-id", false, None),
    ] {
        let mut opts = MqttOptions::new(id, "127.0.0.1", stack.mqtt.port());
        if will {
            opts.set_last_will(rumqttc::LastWill::new(
                "widgetry/v1/m1/ack",
                "{}",
                QoS::AtLeastOnce,
                false,
            ));
        }
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        let (_c, mut ev) = AsyncClient::new(opts, 8);
        let refused = tokio::time::timeout(T, async {
            loop {
                match ev.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                        break Some(a.code);
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => break Some(code),
                    Err(_) => break None,
                }
            }
        })
        .await;
        assert!(
            matches!(refused, Ok(Some(c)) if c != rumqttc::ConnectReturnCode::Success),
            "{id} is refused: {refused:?}"
        );
    }

    // A reconnect: a client taking the ingestor's client id makes the
    // broker drop the ingestor's connection.
    // (Only the server may use that id: log in as the server.)
    let thief = Client::connect_as(
        &stack,
        "widgetry-ingest",
        ("widgetry-server", TEST_SERVER_PASSWORD),
    );
    wait_for("the ingestor reconnected", T, || async {
        let (_, m) = stack.get_text("/metrics").await;
        (metric(&m, "widgetry_ingest_mqtt_reconnects_total") >= 1.0).then_some(())
    })
    .await;
    drop(thief);

    // A websocket client, and one resuming from a cursor too far behind:
    // a commit id far ahead makes the backlog larger than is replayed.
    let url = format!("ws://{}/api/v1/live", stack.http);
    let (mut ws, _) = tokio_tungstenite::connect_async(url.clone())
        .await
        .expect("websocket");
    sqlx::query(
        "INSERT INTO batches (device, session, seq, received_ms, min_ts, max_ts, samples, payload, commit_id)
         VALUES ('m-far', x'00000000000000000000000000000000', 1, 0, 0, 0, 0, x'', 500000)",
    )
    .execute(&admin)
    .await
    .expect("insert a far commit");
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        r#"{"subscribe":{"devices":null,"series":null,"since":1}}"#.into(),
    ))
    .await
    .expect("subscribe");
    let lost = tokio::time::timeout(T, async {
        while let Some(Ok(msg)) = ws.next().await {
            if msg.to_text().is_ok_and(|t| t.contains("\"lost\"")) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        lost,
        Ok(true),
        "a client too far behind is told it lost data"
    );

    // A persistent subscriber away while 200 QoS 0 messages go by misses
    // most of them (the log holds 1 KiB) and, back, is skipped ahead.
    let port = stack.mqtt.port().to_string();
    let sub = |extra: &[&str]| {
        let mut args = vec!["-p", &port, "-c", "-i", "flood-sub", "-t", "flood/#"];
        args.extend_from_slice(extra);
        let o = mosquitto("mosquitto_sub", &args);
        assert!(o.status.success(), "{}", text(&o));
    };
    sub(&["-E"]);
    let lines: String = (0..200)
        .map(|i| format!("message {i:04} {}\n", "x".repeat(90)))
        .collect();
    mosquitto_lines(stack.mqtt.port(), "flood/x", 0, &lines);
    sub(&["-C", "1", "-W", "10"]);
    // A device sending 400 messages at once goes past its rate limit.
    let burst: String = (0..400)
        .map(|i| format!("{{\"series\":\"r\",\"value\":{i}}}\n"))
        .collect();
    mosquitto_lines(
        stack.mqtt.port(),
        "widgetry/v1/m-rate/samples/json",
        0,
        &burst,
    );

    let m = wait_for("every series above zero", T, || async {
        let (_, text) = stack.get_text("/metrics").await;
        let all = parse(&text);
        // Moved elsewhere: a denied subscription needs device credentials
        // (broker_access.rs), a full broker a small connection limit
        // (conformance.rs).
        let elsewhere = [
            "widgetry_broker_denied_total{action=\"subscribe\"}",
            "widgetry_broker_refused_connections_total{reason=\"server_busy\"}",
        ];
        let zero: Vec<String> = all
            .iter()
            .filter(|(k, v)| {
                **v <= 0.0 && !k.contains("_bucket{") && !elsewhere.contains(&k.as_str())
            })
            .map(|(k, _)| k.clone())
            .collect();
        zero.is_empty().then_some(all).or_else(|| {
            eprintln!("still zero: {zero:?}");
            None
        })
    })
    .await;
    for series in [
        "widgetry_ingest_rejects_total{reason=\"oversize\"}",
        "widgetry_ingest_rejects_total{reason=\"unknown_series\"}",
        "widgetry_ingest_live_skipped_total",
        "widgetry_ingest_gaps_reported_total",
        "widgetry_ingest_events_dropped_by_devices_total",
        "widgetry_web_live_lost_commits_total",
        "widgetry_web_live_clients",
    ] {
        assert!(m.get(series).is_some_and(|v| *v > 0.0), "{series}: {m:?}");
    }
    assert_eq!(m["widgetry_ingest_events_dropped_by_devices_total"], 3.0);
    drop(ws);
    stack.stop().await;
}
