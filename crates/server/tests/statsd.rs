//! `serve --statsd`: real UDP packets on 127.0.0.1 to an in-process serve,
//! read back from `/api/v1/series` after a flush; bad lines and packets
//! counted on `/metrics`; what is held at shutdown is stored.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{Stack, metric, wait_for};
use widgetry_server::config::roles::StatsdConfig;
use widgetry_server::store::Store;

const WAIT: Duration = Duration::from_secs(20);

fn statsd(flush: Duration) -> StatsdConfig {
    StatsdConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        flush,
        device: "statsd".into(),
        percentiles: widgetry_statsd::Config::default().percentiles,
    }
}

fn send(stack: &Stack, packet: &str) {
    let to = stack.statsd.expect("the stack runs the statsd listener");
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP client");
    let sent = sock.send_to(packet.as_bytes(), to).expect("send a packet");
    assert_eq!(sent, packet.len(), "the whole packet was sent");
}

/// A series key as a query-string value.
fn encode(series: &str) -> String {
    series
        .replace('{', "%7B")
        .replace('}', "%7D")
        .replace('=', "%3D")
        .replace(',', "%2C")
}

/// The stored points of `device`/`series` (none while it does not exist).
async fn points(stack: &Stack, device: &str, series: &str) -> Vec<(i64, f64)> {
    let (status, body) = stack
        .get(&format!(
            "/api/v1/series?device={device}&series={}&from=0&to=99999999999999",
            encode(series)
        ))
        .await;
    if status == 404 {
        return Vec::new();
    }
    assert_eq!(status, 200, "{device}/{series}: {body}");
    serde_json::from_value(body["points"].clone()).expect("points are [ts, value] pairs")
}

/// The first stored value of `device`/`series`, waiting for it.
async fn first_value(stack: &Stack, device: &str, series: &str) -> f64 {
    wait_for(&format!("{device}/{series} stored"), WAIT, || async {
        points(stack, device, series).await.first().map(|p| p.1)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_percentiles_are_the_ones_stored() {
    let mut cfg = statsd(Duration::from_millis(300));
    cfg.percentiles = [25.0, 99.9]
        .into_iter()
        .map(|p| widgetry_statsd::Percentile::new(p).expect("valid"))
        .collect();
    let stack = Stack::with_statsd(cfg).await;
    // 1..=1000 in one packet (about 10 KB), so all in one interval.
    let packet: Vec<String> = (1..=1000).map(|v| format!("lat:{v}|ms")).collect();
    send(&stack, &packet.join("\n"));
    assert_eq!(first_value(&stack, "statsd", "lat.count").await, 1000.0);
    // Nearest rank: ceil(p/100 * 1000).
    assert_eq!(first_value(&stack, "statsd", "lat.p25").await, 250.0);
    assert_eq!(first_value(&stack, "statsd", "lat.p99_9").await, 999.0);
    assert!(
        points(&stack, "statsd", "lat.p50").await.is_empty(),
        "only the configured percentiles are stored"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statsd_packets_are_stored_as_series_after_one_flush() {
    let stack = Stack::with_statsd(statsd(Duration::from_millis(300))).await;
    // One multi-metric packet, so that every line lands in one interval.
    send(
        &stack,
        concat!(
            "orders:1|c\n",
            "orders:2|c|@0.5\n",
            "temp:10|g\n",
            "temp:+5|g\n",
            "temp:-3|g\n",
            "latency:10|ms\n",
            "latency:30|ms|@0.5\n",
            "latency:20|h\n",
            "users:alice|s\n",
            "users:bob|s\n",
            "users:alice|s\n",
            "requests:3|c|#env:prod,region:eu\n",
            "pump.rpm:1200|g|#device:pump-7,site:north\n",
        ),
    );
    // Bad lines, one per reason, in a second packet.
    send(
        &stack,
        "nocolon\nx:1|zz\ny:abc|c\n:1|c\nz:1|c|@2\nw:1|c|#device:bad/dev",
    );

    // Counters: value / rate, summed over the interval.
    assert_eq!(first_value(&stack, "statsd", "orders.count").await, 5.0);
    let rate = first_value(&stack, "statsd", "orders.rate").await;
    assert!(
        (rate - 5.0 / 0.3).abs() < 1e-6,
        "orders.rate is count per second of the 300 ms interval: {rate}"
    );
    // Gauges: set, then + and - relative to the held value.
    assert_eq!(first_value(&stack, "statsd", "temp").await, 12.0);
    // Timers and histograms: a value at rate 0.5 counts twice in `count`.
    assert_eq!(first_value(&stack, "statsd", "latency.count").await, 4.0);
    assert_eq!(first_value(&stack, "statsd", "latency.sum").await, 60.0);
    assert_eq!(first_value(&stack, "statsd", "latency.min").await, 10.0);
    assert_eq!(first_value(&stack, "statsd", "latency.max").await, 30.0);
    assert_eq!(first_value(&stack, "statsd", "latency.mean").await, 20.0);
    assert_eq!(first_value(&stack, "statsd", "latency.p50").await, 20.0);
    // Sets: distinct members.
    assert_eq!(first_value(&stack, "statsd", "users.count").await, 2.0);
    // DogStatsD tags become labels.
    assert_eq!(
        first_value(&stack, "statsd", "requests.count{env=prod,region=eu}").await,
        3.0
    );
    // A `device:` tag names the device; it is not kept as a label.
    assert_eq!(
        first_value(&stack, "pump-7", "pump.rpm{site=north}").await,
        1200.0
    );
    assert!(
        points(&stack, "statsd", "pump.rpm{site=north}")
            .await
            .is_empty(),
        "a metric tagged with a device is stored under that device only"
    );
    // A gauge is kept across flushes (one point per flush); a counter is
    // emitted only in the interval it moved in.
    wait_for("temp re-emitted at the next flush", WAIT, || async {
        (points(&stack, "statsd", "temp").await.len() >= 2).then_some(())
    })
    .await;
    assert_eq!(
        points(&stack, "statsd", "orders.count").await.len(),
        1,
        "orders did not move after the first flush"
    );

    let (_, m) = stack.get_text("/metrics").await;
    assert_eq!(metric(&m, "widgetry_statsd_packets_total"), 2.0);
    assert_eq!(metric(&m, "widgetry_statsd_lines_total"), 19.0);
    for reason in [
        "missing_colon",
        "unknown_type",
        "not_a_number",
        "empty_name",
        "rate_out_of_range",
        "bad_device",
    ] {
        assert_eq!(
            metric(
                &m,
                &format!("widgetry_statsd_bad_lines_total{{reason=\"{reason}\"}}")
            ),
            1.0,
            "one bad line of reason {reason}"
        );
    }
    assert_eq!(
        metric(&m, "widgetry_statsd_bad_lines_total{reason=\"bad_rate\"}"),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            "widgetry_statsd_dropped_total{reason=\"budget_metric\"}"
        ),
        0.0
    );
    assert!(metric(&m, "widgetry_statsd_samples_total") >= 16.0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statsd_flushes_what_it_holds_at_shutdown() {
    // An hour-long interval: only the shutdown flush can store this.
    let mut stack = Stack::with_statsd(statsd(Duration::from_secs(3600))).await;
    send(&stack, "jobs:7|c\nqueue:42|g");
    wait_for("the packet received", WAIT, || async {
        let (_, m) = stack.get_text("/metrics").await;
        (metric(&m, "widgetry_statsd_lines_total") == 2.0).then_some(())
    })
    .await;
    let running = stack.running.take().expect("running");
    running.shutdown();
    running.wait().await.expect("serve stops cleanly");

    let store = Store::open(&stack.db).await.expect("reopen the database");
    for (series, value) in [("jobs.count", 7.0), ("queue", 42.0)] {
        let key = widgetry_proto::SeriesKey::parse(series).expect("key");
        let id = store
            .series_id("statsd", &key)
            .await
            .expect("query")
            .unwrap_or_else(|| panic!("{series} was not stored at shutdown"));
        let points = store
            .points("statsd", id, 0, i64::MAX / 2)
            .await
            .expect("points");
        assert_eq!(
            points.iter().map(|p| p.1).collect::<Vec<_>>(),
            vec![value],
            "{series}"
        );
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statsd_samples_reach_the_live_stream() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let stack = Stack::with_statsd(statsd(Duration::from_millis(200))).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/api/v1/live", stack.http))
        .await
        .expect("websocket connects");
    let subscribe =
        serde_json::json!({"subscribe": {"devices": ["statsd"], "series": ["orders.count"]}});
    ws.send(Message::Text(subscribe.to_string().into()))
        .await
        .expect("send subscription");
    let hello = ws_next(&mut ws).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    send(&stack, "orders:4|c\nother:1|c");
    let samples = ws_next(&mut ws).await;
    assert_eq!(samples["type"], "samples", "{samples}");
    assert_eq!(samples["device"], "statsd", "{samples}");
    assert_eq!(samples["series"]["orders.count"][0][1], 4.0, "{samples}");
    assert!(
        samples["series"].get("other.count").is_none(),
        "the series filter applies: {samples}"
    );
    stack.stop().await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON message of the live stream, within [`WAIT`].
async fn ws_next(ws: &mut Ws) -> serde_json::Value {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let next = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str::<serde_json::Value>(t.as_str())
                        .expect("server sends JSON");
                }
                Some(Ok(_)) => continue,
                other => panic!("websocket ended: {other:?}"),
            }
        }
    };
    tokio::time::timeout(WAIT, next)
        .await
        .expect("a live message within the deadline")
}
