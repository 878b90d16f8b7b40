//! Fault tests of the agent's spool and end-to-end acknowledgements: the
//! server SIGKILLed for 30 s, the agent SIGKILLed and restarted, and a
//! spool too small for an outage. Each counts what is stored against what
//! was sampled.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use widgetry_agent::AgentConfig;
use widgetry_agent::spool::Spool;
use widgetry_server::store::Store;

/// Asserts every series has strictly increasing timestamps (no duplicate
/// sample) and returns the total number of samples stored.
async fn stored_samples_without_duplicates(http: SocketAddr, device: &str) -> usize {
    let mut total = 0;
    for s in SERIES {
        let pts = series_points(http, device, s).await;
        for w in pts.windows(2) {
            assert!(
                w[0].0 < w[1].0,
                "{device}/{s}: duplicate or unordered sample at ts {}",
                w[1].0
            );
        }
        total += pts.len();
    }
    total
}

async fn open_db(dir: &std::path::Path) -> Store {
    Store::open(&widgetry_server::config::Database::Sqlite(
        dir.join("widgetry.db"),
    ))
    .await
    .expect("open the server's database")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_for_30s_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let (mqtt, http) = (free_port(), free_port());
    let mut serve = ServeProc::start(mqtt, http, dir.path()).await;
    let spool = tempfile::tempdir().expect("spool");
    let mut cfg = AgentConfig::new("127.0.0.1", mqtt, "tenhz");
    cfg.inputs = test_inputs();
    cfg.interval = Duration::from_millis(100);
    cfg.batch_max_wait = Duration::from_millis(300);
    cfg.ack_timeout = Duration::from_secs(3);
    cfg.spool_dir = spool.path().to_path_buf();
    let agent = Agent::with_config(cfg, spool);
    wait_for("first samples stored", Duration::from_secs(20), || async {
        (series_points(serve.http, "tenhz", "cpu.usage_pct")
            .await
            .len()
            >= 5)
            .then_some(())
    })
    .await;
    serve.kill9();
    let killed_at = widgetry_common::now_ms();
    // The outage itself (scenario time, not synchronisation).
    tokio::time::sleep(Duration::from_secs(30)).await;
    let serve = ServeProc::start(mqtt, http, dir.path()).await;
    // Samples taken after the restart arrive only after the spooled ones
    // were sent (in order); wait for them.
    wait_for(
        "post-outage samples stored",
        Duration::from_secs(90),
        || async {
            let pts = series_points(serve.http, "tenhz", "cpu.usage_pct").await;
            pts.last()
                .is_some_and(|p| p.0 > killed_at + 31_000)
                .then_some(())
        },
    )
    .await;
    let report = agent.stop().await;
    assert_eq!(
        report.batches_unacked, 0,
        "everything acknowledged: {report:?}"
    );
    assert_eq!(report.batches_dropped, 0, "{report:?}");
    let stored = stored_samples_without_duplicates(serve.http, "tenhz").await;
    assert_eq!(
        stored as u64, report.samples_taken,
        "every sample exactly once: {report:?}"
    );
    // In order: batches in seq order cover increasing, disjoint time ranges.
    let store = open_db(dir.path()).await;
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT seq, min_ts, max_ts FROM batches WHERE device = 'tenhz' ORDER BY seq",
    )
    .fetch_all(store.reader())
    .await
    .expect("batches");
    // ~35 s of 10 Hz sampling in batches of up to 300 ms.
    assert!(rows.len() > 50, "{} batches", rows.len());
    for w in rows.windows(2) {
        assert_eq!(w[0].0 + 1, w[1].0, "no seq missing");
        assert!(
            w[0].2 < w[1].1,
            "batch {} overlaps batch {} in time",
            w[0].0,
            w[1].0
        );
    }
    let outage: i64 = sqlx::query_scalar(
        "SELECT SUM(samples) FROM batches WHERE device = 'tenhz' AND min_ts > ? AND max_ts < ?",
    )
    .bind(killed_at + 1000)
    .bind(killed_at + 29_000)
    .fetch_one(store.reader())
    .await
    .expect("sum");
    assert!(
        outage >= 3 * 10 * 25,
        "samples taken during the outage are stored: {outage}"
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_and_restarted_resends_its_spool_without_duplicates() {
    let dir = tempfile::tempdir().expect("dir");
    let (mqtt, http) = (free_port(), free_port());
    let mut serve = ServeProc::start(mqtt, http, dir.path()).await;
    let spool_dir = dir.path().join("agent-spool");
    let start_agent = || {
        Command::new(workspace_bin("widgetry-agent"))
            .args([
                "--broker",
                &format!("127.0.0.1:{mqtt}"),
                "--device",
                "phoenix",
                "--inputs",
                INPUTS,
            ])
            .args([
                "--interval",
                "50ms",
                "--batch-max-wait",
                "100ms",
                "--ack-timeout",
                "2s",
            ])
            .arg("--spool-dir")
            .arg(&spool_dir)
            .stderr(Stdio::null())
            .spawn()
            .expect("start agent")
    };
    let mut first = ChildGuard(start_agent());
    wait_for(
        "first run stores samples",
        Duration::from_secs(20),
        || async {
            (series_points(serve.http, "phoenix", "cpu.usage_pct")
                .await
                .len()
                >= 10)
                .then_some(())
        },
    )
    .await;
    // Take the server away so the agent has unacknowledged batches in its
    // spool, then kill the agent too.
    serve.kill9();
    let spooled = spool_dir.clone();
    wait_for(
        "batches spooled while the server is down",
        Duration::from_secs(20),
        || async {
            let bytes: u64 = std::fs::read_dir(&spooled)
                .map(|d| {
                    d.filter_map(|e| e.ok()?.metadata().ok())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            (bytes > 4096).then_some(())
        },
    )
    .await;
    first.0.kill().expect("kill -9");
    first.0.wait().expect("reap");
    // What the killed run had spooled but not yet seen acknowledged.
    let (spool, _) = Spool::open(&spool_dir, 64 << 20, 1 << 20).expect("open spool");
    let pending: Vec<(String, i64)> = spool
        .pending()
        .map(|e| (e.session.to_string(), e.seq as i64))
        .collect();
    drop(spool);
    assert!(
        pending.len() > 5,
        "the killed run left {} batches in its spool",
        pending.len()
    );
    let serve = ServeProc::start(mqtt, http, dir.path()).await;
    let store = open_db(dir.path()).await;
    let stored_batches = || async {
        let rows: Vec<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT session, seq FROM batches WHERE device = 'phoenix'")
                .fetch_all(store.reader())
                .await
                .expect("batches");
        rows.into_iter()
            .map(|(s, q)| (s.iter().map(|b| format!("{b:02x}")).collect::<String>(), q))
            .collect::<HashSet<_>>()
    };
    let first_session: HashSet<String> = stored_batches().await.into_iter().map(|k| k.0).collect();
    assert_eq!(first_session.len(), 1);
    let mut second = ChildGuard(start_agent());
    wait_for(
        "every spooled batch of the killed run is stored, and the new run's batches too",
        Duration::from_secs(30),
        || async {
            let stored = stored_batches().await;
            let new_run = stored.iter().any(|k| !first_session.contains(&k.0));
            (new_run && pending.iter().all(|k| stored.contains(k))).then_some(())
        },
    )
    .await;
    let sessions: i64 =
        sqlx::query_scalar("SELECT COUNT(DISTINCT session) FROM batches WHERE device = 'phoenix'")
            .fetch_one(store.reader())
            .await
            .expect("sessions");
    assert_eq!(sessions, 2, "two runs, two sessions");
    let status = Command::new("kill")
        .args(["-TERM", &second.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    assert_eq!(second.0.wait().expect("wait").code(), Some(0));
    stored_samples_without_duplicates(serve.http, "phoenix").await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_reports_the_gap_and_keeps_going() {
    let dir = tempfile::tempdir().expect("dir");
    let (mqtt, http) = (free_port(), free_port());
    let spool = tempfile::tempdir().expect("spool");
    let mut cfg = AgentConfig::new("127.0.0.1", mqtt, "tiny");
    cfg.inputs = test_inputs();
    cfg.interval = Duration::from_millis(20);
    cfg.batch_max_samples = 3;
    cfg.spool_max_bytes = 16 * 1024;
    // Batches published before the restarted ingestor has subscribed are
    // lost by the broker and resent after the ack timeout: keep it short so
    // the agent's 5 s drain at stop sees every batch acknowledged.
    cfg.ack_timeout = Duration::from_secs(1);
    cfg.spool_dir = spool.path().to_path_buf();
    let started = widgetry_common::now_ms();
    // No server yet: the agent samples into its spool until it overflows.
    let agent = Agent::with_config(cfg, spool);
    let spool_path = agent.spool.path().to_path_buf();
    wait_for("spool overflows", Duration::from_secs(30), || async {
        let bytes: u64 = std::fs::read_dir(&spool_path)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        // The spool stays bounded; give it time to drop several segments.
        assert!(bytes <= 16 * 1024, "spool grew past its bound: {bytes}");
        let elapsed = widgetry_common::now_ms() - started;
        (elapsed > 4000).then_some(())
    })
    .await;
    let serve = ServeProc::start(mqtt, http, dir.path()).await;
    wait_for(
        "gap reported on the device",
        Duration::from_secs(60),
        || async {
            let (_, body) = http_get_json(serve.http, "/api/v1/devices").await;
            body.as_array()?
                .iter()
                .find(|d| d["device"] == "tiny" && d["gaps"].as_i64() > Some(0))
                .cloned()
        },
    )
    .await;
    let report = agent.stop().await;
    assert!(report.batches_dropped > 0, "{report:?}");
    assert_eq!(
        report.batches_unacked, 0,
        "the watermark moved past the gap: {report:?}"
    );
    // Read the device again: gap reports kept arriving until the agent
    // stopped, and /api/v1/devices may answer from its 1 s cache, so wait
    // (with a deadline) for the final figures: stored + lost = taken,
    // nothing unaccounted for.
    let (device, lost) = wait_for(
        "stored + lost = samples taken",
        Duration::from_secs(10),
        || async {
            let (_, body) = http_get_json(serve.http, "/api/v1/devices").await;
            let device = body
                .as_array()
                .and_then(|a| a.iter().find(|d| d["device"] == "tiny").cloned())
                .expect("device tiny");
            let lost = device["lost_samples"].as_u64().expect("lost_samples");
            let stored = stored_samples_without_duplicates(serve.http, "tiny").await as u64;
            (stored + lost == report.samples_taken).then_some((device, lost))
        },
    )
    .await;
    // The agent counts every batch it dropped; the server counts only those
    // it never received (some reached it before the agent dropped them).
    assert!(
        lost > 0 && lost <= report.samples_dropped,
        "{device} vs {report:?}"
    );
    let store = open_db(dir.path()).await;
    let (from_ts, to_ts, lost_batches): (i64, i64, i64) = sqlx::query_as(
        "SELECT MIN(from_ts), MAX(to_ts), SUM(batches) FROM gaps WHERE device = 'tiny'",
    )
    .fetch_one(store.reader())
    .await
    .expect("gaps");
    assert!(lost_batches > 0 && lost_batches as u64 <= report.batches_dropped);
    assert!(
        from_ts >= started && from_ts <= to_ts,
        "gap time range {from_ts}..{to_ts}"
    );
    store.close().await;
}

/// A disk whose fsync takes 2 s (the spool's test hook) stalls neither
/// the agent's event loop nor statsd: while the server is away the agent
/// spools (and fsyncs) its batches, statsd packets keep arriving, and once
/// the server is up every counted hit is stored and every batch acked; no
/// wake-up of the event loop took 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_fsync_stalls_neither_acks_nor_statsd() {
    let dir = tempfile::tempdir().expect("dir");
    let (mqtt, http) = (free_port(), free_port());
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let statsd_addr = udp.local_addr().expect("addr");
    drop(udp);
    let spool = tempfile::tempdir().expect("spool");
    let mut cfg = AgentConfig::new("127.0.0.1", mqtt, "slowdisk");
    cfg.inputs = test_inputs();
    cfg.interval = Duration::from_millis(100);
    cfg.batch_max_wait = Duration::from_millis(100);
    cfg.ack_timeout = Duration::from_secs(2);
    cfg.spool_dir = spool.path().to_path_buf();
    cfg.statsd = Some(statsd_addr);
    cfg.statsd_flush = Duration::from_millis(100);
    cfg.test_fsync_delay = Duration::from_secs(2);
    let agent = Agent::with_config(cfg, spool);
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let hits = |n: usize| {
        let sender = &sender;
        async move {
            for _ in 0..n {
                sender.send_to(b"hits:1|c", statsd_addr).expect("send");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    };
    // The agent has bound its statsd socket once the address is taken.
    wait_for("the agent's statsd socket", Duration::from_secs(20), || {
        let bound = std::net::UdpSocket::bind(statsd_addr).is_err();
        async move { bound.then_some(()) }
    })
    .await;
    // The server is away: batches wait in the spool for their fsync.
    hits(40).await;
    let serve = ServeProc::start(mqtt, http, dir.path()).await;
    hits(40).await;
    let stored = wait_for("all 80 hits stored", Duration::from_secs(60), || async {
        let sum: f64 = series_points(serve.http, "slowdisk", "hits.count")
            .await
            .iter()
            .map(|p| p.1)
            .sum();
        (sum >= 80.0).then_some(sum)
    })
    .await;
    assert_eq!(stored, 80.0, "every hit once");
    let report = agent.stop().await;
    assert!(
        report.spool_syncs >= 1 && report.spool_sync_time >= Duration::from_secs(2),
        "the slow fsync was exercised: {report:?}"
    );
    assert!(
        report.longest_stall < Duration::from_millis(100),
        "the event loop waited for the disk: {report:?}"
    );
    assert_eq!(report.samples_acked, report.samples_taken, "{report:?}");
    assert_eq!(report.batches_dropped, 0, "{report:?}");
}

/// App events take the samples' road: sent while the broker is down, they
/// are sealed into spooled batches, survive a `kill -9` of the agent, and
/// the next run delivers each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sent_while_the_broker_is_down_survive_an_agent_kill9() {
    let dir = tempfile::tempdir().expect("dir");
    let (mqtt, http) = (free_port(), free_port());
    let spool_dir = dir.path().join("agent-spool");
    let sock = dir.path().join("events.sock");
    let start_agent = || {
        ChildGuard(
            Command::new(workspace_bin("widgetry-agent"))
                .args(["--broker", &format!("127.0.0.1:{mqtt}")])
                .args(["--device", "eventful", "--interval", "1h"])
                .args(["--batch-max-wait", "100ms"])
                .arg("--spool-dir")
                .arg(&spool_dir)
                .arg("--events-socket")
                .arg(&sock)
                .stderr(Stdio::null())
                .spawn()
                .expect("start agent"),
        )
    };
    let mut first = start_agent();
    wait_for(
        "the events socket is bound",
        Duration::from_secs(20),
        || {
            let ready = sock.exists();
            async move { ready.then_some(()) }
        },
    )
    .await;
    let app = std::os::unix::net::UnixDatagram::unbound().expect("unix socket");
    const N: usize = 50;
    for n in 0..N {
        let line = format!("{{\"event\":\"job_done\",\"n\":{n}}}\n");
        app.send_to(line.as_bytes(), &sock).expect("send an event");
    }
    // The last event is in a spool segment (the kernel keeps what was
    // written when a process is killed).
    let last = format!("\"n\":{}", N - 1);
    wait_for("the last event is spooled", Duration::from_secs(20), || {
        let found = std::fs::read_dir(&spool_dir).ok().is_some_and(|d| {
            d.filter_map(|e| std::fs::read(e.ok()?.path()).ok())
                .any(|bytes| bytes.windows(last.len()).any(|w| w == last.as_bytes()))
        });
        async move { found.then_some(()) }
    })
    .await;
    first.0.kill().expect("kill -9");
    first.0.wait().expect("reap");
    let serve = ServeProc::start(mqtt, http, dir.path()).await;
    let _second = start_agent();
    let events = wait_for("all events stored", Duration::from_secs(30), || async {
        let (status, body) =
            http_get_json(serve.http, "/api/v1/events?device=eventful&from=0").await;
        assert_eq!(status, 200, "{body}");
        let ev = body["events"].as_array().cloned().unwrap_or_default();
        (ev.len() >= N).then_some(ev)
    })
    .await;
    let mut ns: Vec<i64> = events
        .iter()
        .map(|e| e["body"]["n"].as_i64().expect("n"))
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..N as i64).collect::<Vec<_>>(), "each event once");
}
