//! The live websocket bridge (`GET /api/v1/live`), rollups behind
//! `GET /api/v1/series`, and the fleet overview, against an in-process
//! `serve` (real broker, real SQLite) with real MQTT publishers and a real
//! websocket client.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_tungstenite::tungstenite::Message;
use widgetry_proto::{BatchBuilder, SeriesKey, SessionId};

const T: Duration = Duration::from_secs(30);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(stack: &Stack) -> Ws {
    let url = format!("ws://{}/api/v1/live", stack.http);
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connects");
    ws
}

async fn ws_send(ws: &mut Ws, v: serde_json::Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send subscription");
}

/// Next JSON message, or `None` after `timeout` without one.
async fn ws_next(ws: &mut Ws, timeout: Duration) -> Option<serde_json::Value> {
    loop {
        match tokio::time::timeout(timeout, ws.next()).await {
            Err(_) => return None,
            Ok(None) => panic!("websocket closed by the server"),
            Ok(Some(Err(e))) => panic!("websocket error: {e}"),
            Ok(Some(Ok(Message::Text(t)))) => {
                return Some(serde_json::from_str(t.as_str()).expect("server sends JSON"));
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// A device publishing protobuf batches over its own MQTT connection,
/// driven by a background task.
struct Publisher {
    client: AsyncClient,
    session: SessionId,
    device: String,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    async fn connect(stack: &Stack, device: &str) -> Publisher {
        let mut o = MqttOptions::new(format!("pub-{device}"), "127.0.0.1", stack.mqtt.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut ev) = AsyncClient::new(o, 1000);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(T, ready_rx)
            .await
            .expect("publisher connects")
            .expect("connack");
        Publisher {
            client,
            session: SessionId::generate(),
            device: device.to_string(),
            task,
        }
    }

    /// Publishes batch `seq` of `series` with the given points.
    async fn publish(&self, seq: u64, series: &[(&str, Vec<(i64, f64)>)]) {
        let mut b = BatchBuilder::default();
        let mut defs = Vec::new();
        for (i, (name, points)) in series.iter().enumerate() {
            defs.push((i as u32, SeriesKey::plain(*name)));
            for (ts, v) in points {
                b.push(i as u32, *ts, *v);
            }
        }
        let payload = b.finish(self.session, seq, defs).encode();
        self.client
            .publish(
                format!("widgetry/v1/{}/samples", self.device),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .expect("queue publish");
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Batches seen on a websocket: (device, seq) → (commit, samples).
type Seen = BTreeMap<(String, u64), (u64, usize)>;

/// Records a `samples` message; returns its commit id.
fn record(seen: &mut Seen, dupes: &mut Vec<String>, m: &serde_json::Value) -> u64 {
    let device = m["device"].as_str().expect("device").to_string();
    let seq = m["seq"].as_u64().expect("seq");
    let commit = m["commit"].as_u64().expect("commit");
    let samples: usize = m["series"]
        .as_object()
        .expect("series")
        .values()
        .map(|p| p.as_array().map_or(0, |a| a.len()))
        .sum();
    if seen
        .insert((device.clone(), seq), (commit, samples))
        .is_some()
    {
        dupes.push(format!("{device} seq {seq} (commit {commit})"));
    }
    commit
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_since_receives_every_batch_exactly_once() {
    let stack = Stack::start().await;
    let devices = ["ws-a", "ws-b"];
    const BATCHES: u64 = 150;

    let mut ws = ws_connect(&stack).await;
    ws_send(
        &mut ws,
        serde_json::json!({"subscribe": {"devices": null, "series": null}}),
    )
    .await;
    let hello = ws_next(&mut ws, T).await.expect("hello");
    assert_eq!(hello["type"], "hello", "{hello}");
    let start_cursor = hello["cursor"].as_u64().expect("cursor");

    // Two devices publish 150 batches each, 4 samples per batch, while the
    // websocket client disconnects and resumes in the middle.
    let pubs = [
        Publisher::connect(&stack, devices[0]).await,
        Publisher::connect(&stack, devices[1]).await,
    ];
    let base = widgetry_common::now_ms() - 60_000;
    let publishing = tokio::spawn(async move {
        for seq in 1..=BATCHES {
            for p in &pubs {
                let ts = base + seq as i64 * 10;
                p.publish(
                    seq,
                    &[
                        ("temp", vec![(ts, seq as f64), (ts + 1, seq as f64 + 0.5)]),
                        ("hum", vec![(ts, 40.0), (ts + 2, 41.0)]),
                    ],
                )
                .await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        pubs
    });

    let mut seen = Seen::new();
    let mut dupes = Vec::new();
    let mut last = start_cursor;
    // First connection: take 40 batches, then drop the socket abruptly.
    while seen.len() < 40 {
        let m = ws_next(&mut ws, T).await.expect("samples before the drop");
        if m["type"] == "samples" {
            let c = record(&mut seen, &mut dupes, &m);
            assert!(c > last, "commit ids increase: {c} after {last}");
            last = c;
        }
    }
    drop(ws);
    // Let at least 60 more batches commit while nobody listens.
    let target = seen.len() as i64 + 60;
    wait_for("batches to commit while disconnected", T, || async {
        (stack.count("SELECT COUNT(*) FROM batches").await >= target).then_some(())
    })
    .await;

    let mut ws = ws_connect(&stack).await;
    ws_send(
        &mut ws,
        serde_json::json!({"subscribe": {"devices": null, "series": null, "since": last}}),
    )
    .await;
    let mut hello_seen = false;
    let deadline = Instant::now() + T;
    while seen.len() < (BATCHES as usize) * devices.len() {
        assert!(
            Instant::now() < deadline,
            "only {} of {} batches arrived; missing e.g. {:?}",
            seen.len(),
            BATCHES as usize * devices.len(),
            missing(&seen, &devices, BATCHES)
        );
        let Some(m) = ws_next(&mut ws, Duration::from_secs(5)).await else {
            continue;
        };
        match m["type"].as_str() {
            Some("samples") => {
                let c = record(&mut seen, &mut dupes, &m);
                assert!(c > last, "commit ids increase: {c} after {last}");
                last = c;
            }
            Some("hello") => {
                // The replay from the database comes before the hello.
                assert!(!hello_seen, "one hello per subscription");
                hello_seen = true;
                assert_eq!(m["cursor"].as_u64(), Some(last), "{m}");
            }
            _ => panic!("unexpected message {m}"),
        }
    }
    assert!(hello_seen, "the resumed subscription was answered");
    assert!(dupes.is_empty(), "delivered twice: {dupes:?}");
    assert!(
        seen.values().all(|(_, n)| *n == 4),
        "every batch carries its 4 samples"
    );
    // Nothing more arrives (no duplicate after the last batch).
    let _pubs = publishing.await.expect("publisher task");
    if let Some(m) = ws_next(&mut ws, Duration::from_millis(700)).await {
        panic!("unexpected message after all batches: {m}");
    }
    stack.stop().await;
}

fn missing(seen: &Seen, devices: &[&str], batches: u64) -> Vec<(String, u64)> {
    devices
        .iter()
        .flat_map(|d| (1..=batches).map(move |s| (d.to_string(), s)))
        .filter(|k| !seen.contains_key(k))
        .take(5)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_filters_by_device_and_series_and_forwards_status() {
    let stack = Stack::start().await;
    let mut ws = ws_connect(&stack).await;
    ws_send(
        &mut ws,
        serde_json::json!({"subscribe": {"devices": ["bad id!"]}}),
    )
    .await;
    let err = ws_next(&mut ws, T).await.expect("error message");
    assert_eq!(err["type"], "error", "{err}");
    let mut ws = ws_connect(&stack).await;
    ws_send(&mut ws, serde_json::json!({"subscribe": {"nonsense": 1}})).await;
    let err = ws_next(&mut ws, T).await.expect("error message");
    assert!(
        err["message"]
            .as_str()
            .unwrap_or_default()
            .contains("subscribe"),
        "{err}"
    );
    ws_send(
        &mut ws,
        serde_json::json!({"subscribe": {"devices": ["f-1"], "series": ["temp"], "status": true}}),
    )
    .await;
    assert_eq!(ws_next(&mut ws, T).await.expect("hello")["type"], "hello");
    let one = Publisher::connect(&stack, "f-1").await;
    let two = Publisher::connect(&stack, "f-2").await;
    let now = widgetry_common::now_ms();
    two.publish(1, &[("temp", vec![(now, 1.0)])]).await;
    one.publish(1, &[("temp", vec![(now, 2.0)]), ("hum", vec![(now, 3.0)])])
        .await;
    let m = ws_next(&mut ws, T).await.expect("samples of f-1");
    assert_eq!(m["type"], "samples", "{m}");
    assert_eq!(m["device"], "f-1");
    assert_eq!(m["series"], serde_json::json!({"temp": [[now, 2.0]]}));
    // Presence from a status message (an agent's retained status).
    one.client
        .publish(
            "widgetry/v1/f-1/status",
            QoS::AtLeastOnce,
            true,
            r#"{"state":"offline"}"#,
        )
        .await
        .expect("status");
    let m = ws_next(&mut ws, T).await.expect("status");
    assert_eq!(
        (m["type"].as_str(), m["state"].as_str()),
        (Some("status"), Some("offline")),
        "{m}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_lists_devices_with_latest_cpu_and_memory() {
    let stack = Stack::start().await;
    let p = Publisher::connect(&stack, "fleet-1").await;
    let now = widgetry_common::now_ms();
    p.publish(
        1,
        &[
            (
                "cpu.usage_pct",
                vec![(now - 120_000, 10.0), (now - 1000, 30.0)],
            ),
            ("mem.used_bytes", vec![(now - 1000, 1.0e9)]),
            ("mem.total_bytes", vec![(now - 1000, 4.0e9)]),
        ],
    )
    .await;
    let d = wait_for("fleet-1 in the fleet with CPU", T, || async {
        let (status, body) = stack.get("/api/v1/fleet").await;
        assert_eq!(status, 200, "{body}");
        body["devices"]
            .as_array()?
            .iter()
            .find(|d| d["device"] == "fleet-1" && d["cpu"].is_number())
            .cloned()
    })
    .await;
    assert_eq!(d["cpu"], 30.0, "{d}");
    assert_eq!(d["mem_pct"], 25.0, "{d}");
    assert_eq!(d["series_count"], 3, "{d}");
    let spark: Vec<(i64, f64)> = serde_json::from_value(d["cpu_spark"].clone()).expect("spark");
    assert_eq!(spark.len(), 2, "one point per minute: {spark:?}");
    assert_eq!(
        spark.iter().map(|p| p.1).collect::<Vec<_>>(),
        vec![10.0, 30.0]
    );
    stack.stop().await;
}

/// Acceptance: 7 days of 1 Hz data, answered within `max_points` from the
/// rollups, and every bucket equal to a direct SQL computation over the
/// raw samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seven_days_of_1hz_data_match_sql_within_max_points() {
    let stack = Stack::start().await;
    let p = Publisher::connect(&stack, "week").await;
    let hour = 3_600_000i64;
    let end = widgetry_common::now_ms() / 1000 * 1000;
    let start = end - 7 * 24 * hour;
    // Deterministic, varied values: a daily wave, a slow trend, and noise
    // from a linear congruential generator.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut all: Vec<(i64, f64)> = Vec::with_capacity(7 * 24 * 3600);
    let mut seq = 0;
    const STORED: &str =
        "SELECT CAST(COALESCE(SUM(samples), 0) AS BIGINT) FROM batches WHERE device = 'week'";
    let t0 = Instant::now();
    let mut ts = start;
    while ts < end {
        let mut chunk = Vec::with_capacity(3600);
        for _ in 0..3600 {
            if ts >= end {
                break;
            }
            rng = rng
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let noise = (rng >> 40) as f64 / (1u64 << 24) as f64;
            let day = ((ts - start) as f64 / (24.0 * hour as f64)) * std::f64::consts::TAU;
            let v = 50.0 + 20.0 * day.sin() + (ts - start) as f64 * 1e-8 + noise;
            chunk.push((ts, v));
            ts += 1000;
        }
        seq += 1;
        p.publish(seq, &[("temp", chunk.clone())]).await;
        all.extend(chunk);
        // This publisher never resends (an agent resends what was not
        // acknowledged), so it stays within the broker's log for the
        // ingestor (broker.toml: 3 x 1 MiB per filter; the week is ~6 MB):
        // a slow ingestor (a debug build on PostgreSQL in CI) must not be
        // skipped ahead past batches that would then never come again.
        const WINDOW: i64 = 8;
        let through = all.len() as i64 - WINDOW * 3600;
        if through > 0 {
            wait_for(
                "the ingestor within 8 batches of the publisher",
                Duration::from_secs(60),
                || async { (stack.count(STORED).await >= through).then_some(()) },
            )
            .await;
        }
    }
    let n = all.len() as i64;
    wait_for(
        "a week of samples stored",
        Duration::from_secs(120),
        || async { (stack.count(STORED).await == n).then_some(()) },
    )
    .await;
    eprintln!("stored {n} samples in {:?}", t0.elapsed());

    // The raw samples in a plain SQL table, for the reference computation.
    let reference = sqlx::SqlitePool::connect("sqlite::memory:")
        .await
        .expect("memory db");
    sqlx::query("CREATE TABLE raw (ts INTEGER NOT NULL, v REAL NOT NULL)")
        .execute(&reference)
        .await
        .expect("create");
    let mut tx = reference.begin().await.expect("begin");
    for rows in all.chunks(4000) {
        let mut q = sqlx::QueryBuilder::new("INSERT INTO raw (ts, v) ");
        q.push_values(rows, |mut b, (ts, v)| {
            b.push_bind(*ts).push_bind(*v);
        });
        q.build().execute(&mut *tx).await.expect("insert");
    }
    tx.commit().await.expect("commit");
    sqlx::query("CREATE INDEX raw_by_ts ON raw (ts)")
        .execute(&reference)
        .await
        .expect("index");

    let from = start + 12_345; // not aligned to a minute or an hour
    let to = end - 6_789;
    // The same queries from the batch log, then from chunks after the
    // compactor moved every batch into them (store/compact.rs).
    let log = check_week(&stack, &reference, from, to, "batch log").await;
    let store = &stack.running.as_ref().expect("running").store;
    let t = Instant::now();
    let c = store
        .compact(i64::MIN..i64::MAX, &|| false, &mut |_| {})
        .await
        .expect("compaction");
    eprintln!("compacted {c:?} in {:?}", t.elapsed());
    assert_eq!(c.samples as i64, n, "every sample moved into chunks");
    assert_eq!(stack.count("SELECT COUNT(*) FROM batches").await, 0);
    assert_eq!(
        stack
            .count("SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) FROM chunks")
            .await,
        n
    );
    let chunks = check_week(&stack, &reference, from, to, "chunks").await;
    for ((label, old), (_, new)) in log.iter().zip(&chunks) {
        eprintln!("{label}: batch log {old:?}, chunks {new:?}");
    }
    // Redelivered batches are recognised after compaction: nothing stored twice.
    let dups_before = stack.duplicates().await;
    let again: Vec<(i64, f64)> = all[..3600].to_vec();
    p.publish(1, &[("temp", again)]).await;
    wait_for("the redelivery counted as a duplicate", T, || async {
        (stack.duplicates().await > dups_before).then_some(())
    })
    .await;
    assert_eq!(stack.count("SELECT COUNT(*) FROM batches").await, 0);
    let whole = check_week(&stack, &reference, from, to, "after the redelivery").await;
    assert_eq!(whole.len(), chunks.len());
    stack.stop().await;
}

/// Every bucket of the week's queries equals SQL over the raw samples, and
/// an hour of raw points equals them exactly; returns each query's time.
async fn check_week(
    stack: &Stack,
    reference: &sqlx::SqlitePool,
    from: i64,
    to: i64,
    what: &str,
) -> Vec<(String, Duration)> {
    let mut times = Vec::new();
    for (max_points, source) in [(1000usize, "1m"), (500, "1m"), (40, "1h")] {
        let t = Instant::now();
        let (status, body) = stack
            .get(&format!(
                "/api/v1/series?device=week&series=temp&from={from}&to={to}&max_points={max_points}"
            ))
            .await;
        let took = t.elapsed();
        times.push((format!("7 days, max_points {max_points}"), took));
        assert_eq!(status, 200, "{what}: {body}");
        assert_eq!(body["source"], source, "{what}: max_points {max_points}");
        let width = body["bucket_ms"].as_i64().expect("bucket_ms");
        let buckets = body["buckets"].as_array().expect("buckets");
        assert!(
            !buckets.is_empty() && buckets.len() <= max_points,
            "{what}: {} buckets for max_points {max_points}",
            buckets.len()
        );
        eprintln!(
            "{what}: 7 days, max_points {max_points}: {} buckets of {} s from {source} rollups in {took:?}",
            buckets.len(),
            width / 1000
        );
        let mut total = 0;
        for b in buckets {
            let bts = b["ts"].as_i64().expect("ts");
            let lo = bts.max(from);
            let hi = (bts + width - 1).min(to);
            let (count, min, avg, max): (i64, f64, f64, f64) = sqlx::query_as(
                "SELECT COUNT(*), MIN(v), AVG(v), MAX(v) FROM raw WHERE ts BETWEEN ? AND ?",
            )
            .bind(lo)
            .bind(hi)
            .fetch_one(reference)
            .await
            .expect("reference query");
            assert_eq!(
                b["count"].as_i64(),
                Some(count),
                "{what}: bucket {bts}: {b}"
            );
            assert_eq!(b["min"].as_f64(), Some(min), "{what}: bucket {bts}: {b}");
            assert_eq!(b["max"].as_f64(), Some(max), "{what}: bucket {bts}: {b}");
            // Sums in a different order differ in the last bits only.
            let got = b["avg"].as_f64().expect("avg");
            assert!(
                (got - avg).abs() <= avg.abs() * 1e-12,
                "{what}: bucket {bts}: avg {got} vs SQL {avg}"
            );
            total += count;
        }
        let (expected,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM raw WHERE ts BETWEEN ? AND ?")
                .bind(from)
                .bind(to)
                .fetch_one(reference)
                .await
                .expect("count");
        assert_eq!(
            total, expected,
            "{what}: the buckets cover every sample of the range once"
        );
    }
    // An hour and a half of raw points across an hour boundary (two chunks),
    // through the API and, bit for bit, from the store.
    let (lo, hi) = (from + 24 * 3_600_000, from + 24 * 3_600_000 + 5_400_000);
    let t = Instant::now();
    let (status, body) = stack
        .get(&format!(
            "/api/v1/series?device=week&series=temp&from={lo}&to={hi}&max_points=100000"
        ))
        .await;
    times.push(("90 min raw".into(), t.elapsed()));
    assert_eq!(status, 200, "{what}: {body}");
    assert_eq!(body["source"], "raw", "{what}");
    let want: Vec<(i64, f64)> =
        sqlx::query_as("SELECT ts, v FROM raw WHERE ts BETWEEN ? AND ? ORDER BY ts")
            .bind(lo)
            .bind(hi)
            .fetch_all(reference)
            .await
            .expect("reference points");
    assert_eq!(
        body["points"].as_array().map(|a| a.len()),
        Some(want.len()),
        "{what}"
    );
    let store = &stack.running.as_ref().expect("running").store;
    let key = widgetry_proto::SeriesKey::parse("temp").expect("key");
    let got = store
        .series_points("week", &key, lo, hi)
        .await
        .expect("points")
        .expect("series");
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.0, w.0, "{what}");
        assert_eq!(g.1.to_bits(), w.1.to_bits(), "{what}: bit-exact values");
    }
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_only_data_past_each_period() {
    let stack = Stack::without_retention().await;
    let p = Publisher::connect(&stack, "old").await;
    let day = 86_400_000i64;
    let now = widgetry_common::now_ms();
    p.publish(
        1,
        &[(
            "temp",
            vec![(now - 40 * day, 1.0), (now - 40 * day + 1, 2.0)],
        )],
    )
    .await;
    p.publish(2, &[("temp", vec![(now - 10 * day, 3.0)])]).await;
    p.publish(3, &[("temp", vec![(now, 4.0)])]).await;
    wait_for("three batches stored", T, || async {
        (stack
            .count("SELECT COUNT(*) FROM batches WHERE device = 'old'")
            .await
            == 3)
            .then_some(())
    })
    .await;
    assert_eq!(stack.count("SELECT COUNT(*) FROM rollup_1m").await, 3);
    let store = &stack.running.as_ref().expect("running").store;
    // Raw kept 30 days, minutes 5 days, hours forever.
    let pruned = store
        .prune(Some(now - 30 * day), Some(now - 5 * day), None)
        .await
        .expect("prune");
    assert_eq!(
        (pruned.batches, pruned.rollup_1m, pruned.rollup_1h),
        (1, 2, 0)
    );
    assert_eq!(stack.count("SELECT COUNT(*) FROM batches").await, 2);
    assert_eq!(stack.count("SELECT COUNT(*) FROM rollup_1m").await, 1);
    assert_eq!(stack.count("SELECT COUNT(*) FROM rollup_1h").await, 3);
    // Long ranges still answer from the hour rollups.
    let (status, body) = stack
        .get(&format!(
            "/api/v1/series?device=old&series=temp&from={}&to={now}&max_points=2",
            now - 50 * day
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "1h", "{body}");
    let total: u64 = body["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .map(|b| b["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        total, 4,
        "all four samples, the 40-day-old ones from rollups: {body}"
    );
    stack.stop().await;
}
