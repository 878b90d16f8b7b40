//! The websocket source bridge against the fault-injecting upstream
//! (`widgetry-wsfault`): the real `widgetry serve` binary with a
//! `[[bridge.ws]]` section, two full fault cycles, then a stream that is
//! interrupted by `kill -9` of the server and resumed after a restart.
//! Every valid message is read back exactly once from `/api/v1/series`,
//! every invalid one is counted under its reason on `/metrics`, the live
//! stream carries the bridge's samples, and what the bridge had accepted
//! before the kill is in the database.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ChildGuard, free_port, http_get_text, metric, wait_for, workspace_bin};
use widgetry_server::metrics::BRIDGE_REJECTS;
use widgetry_wsfault::{Config, Fault, Tail, Upstream};

const DEVICE: &str = "hrm-1";
const SERIES: &str = "value";
/// The bridge's idle timeout: pings every third of it.
const IDLE: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(60);

/// `widgetry serve` as a process with the bridge configured in `config`.
struct Serve {
    child: ChildGuard,
    http: SocketAddr,
}

async fn start_serve(dir: &Path, config: &Path, run: u32) -> Serve {
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let log = std::fs::File::create(dir.join(format!("serve-{run}.log"))).expect("log file");
    let child = Command::new(workspace_bin("widgetry"))
        .current_dir(dir)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--mqtt5-listen", "127.0.0.1:0"])
        .args(["--http-listen", &http.to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start widgetry serve");
    let serve = Serve {
        child: ChildGuard(child),
        http,
    };
    wait_for("serve's ingestor subscribed", WAIT, || async {
        let up = tokio::task::spawn_blocking(move || std::net::TcpStream::connect(http).is_ok())
            .await
            .expect("join");
        if !up {
            return None;
        }
        let (status, body) = http_get_text(http, "/metrics").await;
        (status == 200 && body.contains("widgetry_ingest_subscribed 1")).then_some(())
    })
    .await;
    serve
}

impl Serve {
    async fn metrics(&self) -> String {
        let (status, body) = http_get_text(self.http, "/metrics").await;
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    /// Every stored point of the bridge's series in `[from, to]`.
    async fn points(&self, from: i64, to: i64) -> Vec<(i64, i64)> {
        let path = format!(
            "/api/v1/series?device={DEVICE}&series={SERIES}&from={from}&to={to}&max_points=100000"
        );
        let (status, body) = http_get_text(self.http, &path).await;
        if status == 404 {
            return Vec::new();
        }
        assert_eq!(status, 200, "{path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert!(
            v.get("bucket_ms").is_none(),
            "the range must be answered raw: {body}"
        );
        points_of(&v["points"])
    }
}

fn points_of(v: &serde_json::Value) -> Vec<(i64, i64)> {
    let pairs: Vec<(i64, f64)> = serde_json::from_value(v.clone()).expect("[ts, value] pairs");
    let mut points: Vec<(i64, i64)> = pairs
        .into_iter()
        .map(|(ts, value)| {
            assert_eq!(value.fract(), 0.0, "values were integers: {value}");
            (ts, value as i64)
        })
        .collect();
    points.sort_unstable();
    points
}

fn kill(child: &std::process::Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} failed");
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON message of a live stream, within [`WAIT`].
async fn ws_next(ws: &mut Ws) -> serde_json::Value {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let next = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str::<serde_json::Value>(t.as_str())
                        .expect("the server sends JSON");
                }
                Some(Ok(_)) => continue,
                other => panic!("live websocket ended: {other:?}"),
            }
        }
    };
    tokio::time::timeout(WAIT, next)
        .await
        .expect("a live message within the deadline")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_valid_message_is_stored_once_through_faults_and_a_kill() {
    use futures_util::SinkExt;

    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("widgetry.db");
    let mut cfg = Config::new(
        15,
        2,
        Tail::Stream {
            every: Duration::from_millis(5),
        },
        IDLE,
        widgetry_common::now_ms(),
    );
    // Every later connection first resends the last 300 valid messages:
    // duplicates within a run and across the restart, and what was in
    // flight at the kill comes again.
    cfg.replay = 300;
    let upstream = Upstream::start(cfg.clone())
        .await
        .expect("upstream listens");
    // The tail waits until the fault cycles are checked.
    upstream.set_sending(false);
    let config = dir.path().join("widgetry.toml");
    std::fs::write(
        &config,
        format!(
            "database = {:?}\n\n[[bridge.ws]]\nurl = {:?}\ndevice = \"{DEVICE}\"\nidle_timeout = \"2s\"\nreconnect_max = \"500ms\"\n",
            db.display().to_string(),
            upstream.url()
        ),
    )
    .expect("write widgetry.toml");
    let serve = start_serve(dir.path(), &config, 1).await;

    // A live subscriber from the start.
    let (mut live, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/v1/live", serve.http))
            .await
            .expect("live websocket connects");
    let subscribe = serde_json::json!({"subscribe": {"devices": [DEVICE]}});
    live.send(tokio_tungstenite::tungstenite::Message::Text(
        subscribe.to_string().into(),
    ))
    .await
    .expect("subscribe");
    let hello = ws_next(&mut live).await;
    assert_eq!(hello["type"], "hello", "{hello}");

    // Two full cycles: every fault twice.
    tokio::time::timeout(Duration::from_secs(180), upstream.cycles_done(2))
        .await
        .expect("two fault cycles within 180 s");
    let sent = upstream.log();
    for f in Fault::ALL {
        assert_eq!(sent.faults.get(&f), Some(&2), "{f:?} played in each cycle");
    }
    let from = cfg.first_ts - 1_000;
    let to = cfg.first_ts + 86_400_000;
    let expected: Vec<(i64, i64)> = sent.valid_set().into_iter().collect();
    assert_eq!(
        expected.len(),
        sent.valid.len(),
        "the upstream sent each valid message once as new"
    );
    wait_for("every valid message of the cycles stored", WAIT, || async {
        (serve.points(from, to).await.len() >= expected.len()).then_some(())
    })
    .await;
    assert_eq!(
        serve.points(from, to).await,
        expected,
        "stored exactly the valid messages, each once"
    );
    let m = wait_for("every invalid message counted", WAIT, || async {
        let m = serve.metrics().await;
        let counted: u64 = BRIDGE_REJECTS
            .iter()
            .map(|r| {
                metric(
                    &m,
                    &format!("widgetry_bridge_rejects_total{{reason=\"{r}\"}}"),
                ) as u64
            })
            .sum();
        (counted >= sent.invalid_total()).then_some(m)
    })
    .await;
    for reason in BRIDGE_REJECTS {
        let want = sent.invalid.get(reason).copied().unwrap_or(0);
        assert_eq!(
            metric(
                &m,
                &format!("widgetry_bridge_rejects_total{{reason=\"{reason}\"}}")
            ) as u64,
            want,
            "rejects of reason {reason}"
        );
    }
    assert!(
        sent.invalid.len() >= 11,
        "the cycles sent every kind of invalid message: {:?}",
        sent.invalid
    );
    assert_eq!(
        metric(&m, "widgetry_bridge_accepted_total") as usize,
        expected.len()
    );
    assert_eq!(
        metric(&m, "widgetry_bridge_duplicates_total") as u64,
        sent.duplicates,
        "every exact resend (duplicates and replays) committed as a duplicate"
    );
    assert_eq!(
        metric(&m, "widgetry_bridge_idle_timeouts_total"),
        2.0,
        "the two half-open sockets, and not the long silences (pongs kept them alive)"
    );
    // Each connection-ending fault made the bridge connect again (refused
    // attempts add more).
    assert!(
        metric(&m, "widgetry_bridge_reconnects_total") >= 10.0,
        "{m}"
    );
    assert!(sent.connections >= 9, "connections: {}", sent.connections);
    eprintln!(
        "fault cycles: {} valid, {} exact resends, {} invalid {:?}, {} connections, {} reconnects",
        sent.valid.len(),
        sent.duplicates,
        sent.invalid_total(),
        sent.invalid,
        sent.connections,
        metric(&m, "widgetry_bridge_reconnects_total")
    );

    // Streaming: the live subscriber sees the bridge's samples.
    upstream.set_sending(true);
    let samples = loop {
        let msg = ws_next(&mut live).await;
        if msg["type"] == "samples" && msg["device"] == DEVICE {
            break msg;
        }
    };
    assert!(
        samples["series"][SERIES]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "live samples of {DEVICE}/{SERIES}: {samples}"
    );
    let before = expected.len() as f64;
    let accepted = wait_for("the bridge streams", WAIT, || async {
        let a = metric(&serve.metrics().await, "widgetry_bridge_accepted_total");
        (a >= before + 200.0).then_some(a)
    })
    .await;

    // kill -9 in the middle of the stream.
    let mut serve = serve;
    kill(&serve.child.0, "-KILL");
    let _ = serve.child.0.wait();
    {
        let store = widgetry_server::store::Store::open(
            &widgetry_server::config::Database::Sqlite(db.clone()),
        )
        .await
        .expect("open the database after the kill");
        let key = widgetry_proto::SeriesKey::plain(SERIES);
        let id = store
            .series_id(DEVICE, &key)
            .await
            .expect("query")
            .expect("the series exists");
        let stored: Vec<(i64, i64)> = store
            .points(DEVICE, id, from, to)
            .await
            .expect("points")
            .into_iter()
            .map(|(ts, v)| (ts, v as i64))
            .collect();
        let distinct: BTreeSet<_> = stored.iter().copied().collect();
        assert_eq!(distinct.len(), stored.len(), "nothing stored twice");
        assert!(
            stored.len() as f64 >= accepted,
            "every message accepted before the kill is stored: {} stored, {accepted} accepted",
            stored.len()
        );
        let sent_now = upstream.log().valid_set();
        assert!(
            distinct.is_subset(&sent_now),
            "only messages the upstream sent are stored"
        );
        store.close().await;
    }

    // Restarted under the same feed: the replay and the stream go on.
    let serve = start_serve(dir.path(), &config, 2).await;
    wait_for("the restarted bridge streams", WAIT, || async {
        let a = metric(&serve.metrics().await, "widgetry_bridge_accepted_total");
        (a >= 100.0).then_some(())
    })
    .await;
    upstream.set_sending(false);
    let expected: Vec<(i64, i64)> = upstream.log().valid_set().into_iter().collect();
    wait_for("every valid message ever sent stored", WAIT, || async {
        (serve.points(from, to).await.len() >= expected.len()).then_some(())
    })
    .await;
    assert_eq!(
        serve.points(from, to).await,
        expected,
        "after the kill and restart: every valid message stored exactly once"
    );
    let m = serve.metrics().await;
    eprintln!(
        "after the kill: {} stored ({accepted} accepted before it), {} accepted and {} duplicates after the restart",
        expected.len(),
        metric(&m, "widgetry_bridge_accepted_total"),
        metric(&m, "widgetry_bridge_duplicates_total")
    );
    assert_eq!(
        metric(&m, "widgetry_bridge_connected"),
        1.0,
        "connected at the end"
    );
    assert!(
        upstream.log().connected,
        "the upstream is serving the bridge"
    );
    assert_eq!(
        metric(
            &m,
            "widgetry_bridge_rejects_total{reason=\"store_rejected\"}"
        ),
        0.0
    );

    // SIGTERM: a clean drain.
    let mut serve = serve;
    kill(&serve.child.0, "-TERM");
    let status = wait_for("serve exits after SIGTERM", Duration::from_secs(30), || {
        let s = serve.child.0.try_wait().expect("try_wait");
        async move { s }
    })
    .await;
    assert!(status.success(), "serve drains and exits 0: {status:?}");
}
