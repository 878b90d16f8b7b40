//! The fault suite: each fault is injected under load from `loadgen`
//! (simulated devices with the agent's protocol) and from real agents, and
//! then what was taken, acknowledged, stored, duplicated and reported as a
//! gap is counted. Nothing acknowledged may be lost, nothing stored twice,
//! every process recovers by itself and `PRAGMA integrity_check` says ok.
//!
//! Faults: (a) `kill -9` of `serve` ten times at random moments; (b) the
//! broker (Mosquitto, the scale-out deployment) killed and restarted while
//! a separate `widgetry ingest` runs; (c) the ingestor stopped for 30 s;
//! (d) the database's file system full, then freed; (e) `serve` frozen by
//! SIGSTOP for 20 s; (f) an agent `kill -9`ed while it spools, and its
//! spool's tail torn as by a power cut.
//!
//! Every test prints its rows; they are also appended to
//! `target/tmp/fault-suite.txt`, which the test command prints at the end.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use widgetry_agent::AgentConfig;
use widgetry_agent::spool::Spool;
use widgetry_loadgen::{LoadConfig, LoadReport};
use widgetry_server::config::Database;
use widgetry_server::store::Store;

const AGENTS: usize = 2;

/// One line of the per-fault table.
#[derive(Debug, Clone)]
struct Row {
    fault: &'static str,
    source: &'static str,
    taken: u64,
    acknowledged: u64,
    stored: u64,
    duplicated: u64,
    /// Samples the devices reported as lost (spool full), as the server
    /// counts them.
    gaps: u64,
    /// Acknowledged samples not stored: must be 0.
    lost: u64,
}

fn print_rows(rows: &[Row]) {
    let mut text = String::new();
    for r in rows {
        text.push_str(&format!(
            "| {:<34} | {:<8} | {:>7} | {:>12} | {:>7} | {:>10} | {:>13} | {:>5} |\n",
            r.fault, r.source, r.taken, r.acknowledged, r.stored, r.duplicated, r.gaps, r.lost
        ));
    }
    print!("{text}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-suite.txt");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("open the fault table");
    f.write_all(text.as_bytes()).expect("write the fault table");
}

fn assert_rows(rows: &[Row]) {
    for r in rows {
        assert_eq!(r.lost, 0, "acknowledged samples lost: {r:?}");
        assert_eq!(r.duplicated, 0, "samples stored twice: {r:?}");
        assert!(
            r.stored >= r.acknowledged,
            "fewer stored than acknowledged: {r:?}"
        );
        assert_eq!(
            r.stored + r.gaps,
            r.taken,
            "every sample taken is stored or reported as a gap: {r:?}"
        );
    }
}

/// Deterministic moments for a fault schedule: the seed is printed so a
/// failing run can be repeated (`WIDGETRY_FAULT_SEED`).
struct Moments(u64);

impl Moments {
    fn new() -> Moments {
        let seed = std::env::var("WIDGETRY_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| widgetry_common::now_ms() as u64);
        println!("fault schedule seed {seed} (set WIDGETRY_FAULT_SEED to repeat it)");
        Moments(seed | 1)
    }

    /// A duration between `lo` and `hi`.
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let span = (hi - lo).as_millis() as u64;
        lo + Duration::from_millis(self.0 % span.max(1))
    }
}

/// (samples stored, samples stored more than once) of an agent's series.
async fn agent_stored(http: SocketAddr, device: &str) -> (u64, u64) {
    let (mut stored, mut dup) = (0, 0);
    for s in SERIES {
        let pts = series_points(http, device, s).await;
        dup += pts.windows(2).filter(|w| w[0].0 >= w[1].0).count() as u64;
        stored += pts.len() as u64;
    }
    (stored, dup)
}

async fn lost_samples(http: SocketAddr, device: &str) -> u64 {
    let (status, body) = http_get_json(http, "/api/v1/devices").await;
    assert_eq!(status, 200, "{body}");
    body.as_array()
        .and_then(|a| a.iter().find(|d| d["device"] == device))
        .and_then(|d| d["lost_samples"].as_u64())
        .unwrap_or(0)
}

/// Real agents and a `loadgen` fleet publishing while a fault happens.
struct Workload {
    agents: Vec<(String, Agent)>,
    load: tokio::task::JoinHandle<LoadReport>,
}

impl Workload {
    /// `tag` keeps the device ids of concurrent tests apart; the fleet
    /// publishes for `duration`, then waits for its last acknowledgements.
    fn start(mqtt: u16, http: SocketAddr, tag: &str, duration: Duration) -> Workload {
        let agents = (0..AGENTS)
            .map(|n| {
                let device = format!("{tag}-agent{n}");
                let spool = tempfile::tempdir().expect("spool");
                let mut cfg = AgentConfig::new("127.0.0.1", mqtt, &device);
                cfg.inputs = test_inputs();
                cfg.interval = Duration::from_millis(100);
                cfg.batch_max_wait = Duration::from_millis(300);
                cfg.ack_timeout = Duration::from_secs(2);
                cfg.spool_dir = spool.path().to_path_buf();
                (device, Agent::with_config(cfg, spool))
            })
            .collect();
        let cfg = LoadConfig {
            broker_host: "127.0.0.1".into(),
            broker_port: mqtt,
            http: Some(format!("http://{http}")),
            devices: 10,
            rate: 2.0,
            samples_per_batch: 10,
            duration,
            qos: rumqttc::QoS::AtLeastOnce,
            ack_timeout: Duration::from_secs(2),
            grace: Duration::from_secs(90),
            prefix: format!("{tag}-load"),
            server_pid: None,
            warmup: Duration::ZERO,
            api_clients: 0,
            burst: None,
        };
        let load = tokio::spawn(widgetry_loadgen::run(cfg, |_| {}));
        Workload { agents, load }
    }

    /// Waits for the fleet to finish and for each agent to have delivered
    /// what it took up to `recovered_ms` and later, stops the agents and
    /// counts.
    async fn finish(self, http: SocketAddr, fault: &'static str, recovered_ms: i64) -> Vec<Row> {
        let load = self.load.await.expect("loadgen task");
        let mut agents = Row {
            fault,
            source: "agents",
            taken: 0,
            acknowledged: 0,
            stored: 0,
            duplicated: 0,
            gaps: 0,
            lost: 0,
        };
        for (device, agent) in self.agents {
            // An agent sends its spool in order: once a sample taken after
            // the recovery is stored, everything before it was sent.
            wait_for(
                &format!("{device} delivers samples taken after the recovery"),
                Duration::from_secs(90),
                || async {
                    series_points(http, &device, "cpu.usage_pct")
                        .await
                        .last()
                        .is_some_and(|p| p.0 > recovered_ms + 1000)
                        .then_some(())
                },
            )
            .await;
            let report = agent.stop().await;
            assert_eq!(
                report.batches_unacked, 0,
                "{device}: all acknowledged: {report:?}"
            );
            let (stored, dup) = agent_stored(http, &device).await;
            agents.taken += report.samples_taken;
            agents.acknowledged += report.samples_acked;
            agents.stored += stored;
            agents.duplicated += dup;
            agents.gaps += lost_samples(http, &device).await;
            agents.lost += report.samples_acked.saturating_sub(stored);
        }
        let (above, below) = load.readback.expect("loadgen read back over HTTP");
        let per_batch = load.samples_committed / load.batches_acked.max(1);
        let fleet = Row {
            fault,
            source: "loadgen",
            taken: (load.batches_acked + load.batches_lost) * per_batch,
            acknowledged: load.samples_committed,
            stored: load.samples_committed + above - below,
            duplicated: above,
            gaps: load.batches_lost * per_batch,
            lost: below,
        };
        assert_eq!(load.batches_lost, 0, "fleet batches never acknowledged");
        vec![agents, fleet]
    }
}

async fn integrity_ok(db: &Path) {
    let store = Store::open(&Database::Sqlite(db.to_path_buf()))
        .await
        .expect("open the database");
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(store.reader())
        .await
        .expect("integrity_check");
    assert_eq!(check, "ok", "PRAGMA integrity_check of {}", db.display());
    store.close().await;
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

/// Stops `serve` with SIGTERM and asserts it exits cleanly.
fn stop_serve(mut serve: ServeProc) {
    signal(serve.child.id(), "TERM");
    let status = serve.child.wait().expect("wait for serve");
    assert!(status.success(), "serve exits cleanly: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_a_serve_killed_ten_times() {
    let dir = tempfile::tempdir().expect("dir");
    let (mqtt, http) = (free_port(), free_port());
    let mut serve = ServeProc::start(mqtt, http, dir.path()).await;
    let work = Workload::start(mqtt, serve.http, "ka", Duration::from_secs(40));
    let mut moments = Moments::new();
    for _ in 0..10 {
        tokio::time::sleep(moments.between(Duration::from_millis(500), Duration::from_secs(3)))
            .await;
        serve.kill9();
        serve = ServeProc::start(mqtt, http, dir.path()).await;
    }
    let recovered = widgetry_common::now_ms();
    let rows = work
        .finish(serve.http, "(a) kill -9 serve x10", recovered)
        .await;
    print_rows(&rows);
    stop_serve(serve);
    integrity_ok(&dir.path().join("widgetry.db")).await;
    assert_rows(&rows);
}

/// `widgetry web` on an external broker, for the API the counts read.
fn start_web(mqtt: u16, db: &Path, http: SocketAddr) -> ChildGuard {
    ChildGuard(
        Command::new(workspace_bin("widgetry"))
            .args(["web", "--broker", &format!("127.0.0.1:{mqtt}")])
            .arg("--database")
            .arg(db)
            .args(["--http-listen", &http.to_string()])
            .stderr(Stdio::null())
            .spawn()
            .expect("start widgetry web"),
    )
}

async fn healthy(http: SocketAddr) {
    wait_for("web answers /healthz", Duration::from_secs(20), || async {
        tokio::task::spawn_blocking(move || {
            std::net::TcpStream::connect(http)
                .ok()
                .map(|_| http_get(http, "/healthz"))
        })
        .await
        .ok()
        .flatten()
        .filter(|(s, _)| *s == 200)
    })
    .await;
}

/// Mosquitto, one `widgetry ingest` and `widgetry web` on one SQLite file.
struct ScaleOut {
    dir: tempfile::TempDir,
    mqtt: u16,
    http: SocketAddr,
    broker: Option<ChildGuard>,
    ingest: Option<ChildGuard>,
    _web: ChildGuard,
}

impl ScaleOut {
    async fn start() -> ScaleOut {
        let dir = tempfile::tempdir().expect("dir");
        let mqtt = free_port();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let broker = start_mosquitto(dir.path(), mqtt).await;
        let db = dir.path().join("widgetry.db");
        let ingest = start_ingest(mqtt, &Database::Sqlite(db.clone()), "ingest-f");
        let web = start_web(mqtt, &db, http);
        healthy(http).await;
        ScaleOut {
            dir,
            mqtt,
            http,
            broker: Some(broker),
            ingest: Some(ingest),
            _web: web,
        }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("widgetry.db")
    }

    async fn wait_stored(&self, device: &str, n: usize) {
        wait_for(
            &format!("{device} has {n} samples stored"),
            Duration::from_secs(30),
            || async {
                (series_points(self.http, device, "cpu.usage_pct")
                    .await
                    .len()
                    >= n)
                    .then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_b_broker_restarted_under_a_separate_ingestor() {
    let mut s = ScaleOut::start().await;
    let work = Workload::start(s.mqtt, s.http, "kb", Duration::from_secs(25));
    s.wait_stored("kb-agent0", 20).await;
    for _ in 0..2 {
        drop(s.broker.take()); // kill -9
        s.broker = Some(start_mosquitto(s.dir.path(), s.mqtt).await);
        s.wait_stored("kb-agent0", 20).await;
        tokio::time::sleep(Duration::from_secs(3)).await; // traffic between the faults
    }
    let recovered = widgetry_common::now_ms();
    let rows = work
        .finish(s.http, "(b) broker restarted, own ingestor", recovered)
        .await;
    print_rows(&rows);
    assert!(
        s.ingest
            .as_mut()
            .expect("ingest")
            .0
            .try_wait()
            .expect("poll")
            .is_none(),
        "the ingestor stays up through the broker's restarts"
    );
    integrity_ok(&s.db()).await;
    assert_rows(&rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_c_ingestor_stopped_for_30s() {
    let mut s = ScaleOut::start().await;
    let work = Workload::start(s.mqtt, s.http, "kc", Duration::from_secs(45));
    s.wait_stored("kc-agent0", 20).await;
    let mut ingest = s.ingest.take().expect("ingest");
    signal(ingest.0.id(), "TERM");
    let status = ingest.0.wait().expect("wait for ingest");
    assert!(status.success(), "ingest stops cleanly: {status}");
    // The outage itself (scenario time, not synchronisation).
    tokio::time::sleep(Duration::from_secs(30)).await;
    s.ingest = Some(start_ingest(s.mqtt, &Database::Sqlite(s.db()), "ingest-f"));
    let recovered = widgetry_common::now_ms();
    let rows = work
        .finish(s.http, "(c) ingestor stopped 30 s", recovered)
        .await;
    print_rows(&rows);
    integrity_ok(&s.db()).await;
    assert_rows(&rows);
}

/// A tmpfs of `mb` MiB mounted on `dir`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mb: u32) -> Tmpfs {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {mb} MiB tmpfs on {} failed (the full-disk fault needs root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).expect("create the filler");
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = f.sync_all();
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_d_database_disk_full_then_freed() {
    let outer = tempfile::tempdir().expect("dir");
    let mount = outer.path().join("fs");
    std::fs::create_dir(&mount).expect("mount point");
    let fs = Tmpfs::mount(&mount, 64);
    let (mqtt, http) = (free_port(), free_port());
    let serve = ServeProc::start(mqtt, http, &mount).await;
    let work = Workload::start(mqtt, serve.http, "kd", Duration::from_secs(30));
    wait_for("samples stored", Duration::from_secs(20), || async {
        (series_points(serve.http, "kd-agent0", "cpu.usage_pct")
            .await
            .len()
            >= 20)
            .then_some(())
    })
    .await;
    let filler = mount.join("filler");
    let filled = fill(&filler);
    println!("(d) filled the database's file system with {filled} bytes");
    let errors = |text: &str| metric(text, "widgetry_ingest_db_errors_total");
    let failing = wait_for(
        "commits fail on the full disk",
        Duration::from_secs(30),
        || async {
            let (_, text) = http_get_text(serve.http, "/metrics").await;
            (errors(&text) > 0.0).then_some(errors(&text))
        },
    )
    .await;
    // Keep it full for a while (scenario time): commits keep failing and
    // are retried; nothing is acknowledged that was not stored.
    tokio::time::sleep(Duration::from_secs(5)).await;
    std::fs::remove_file(&filler).expect("free the disk");
    let recovered = widgetry_common::now_ms();
    let rows = work
        .finish(serve.http, "(d) database disk full, freed", recovered)
        .await;
    print_rows(&rows);
    println!("(d) {failing} failed commits at the first check");
    stop_serve(serve);
    integrity_ok(&mount.join("widgetry.db")).await;
    drop(fs);
    assert_rows(&rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_e_serve_frozen_20s() {
    let dir = tempfile::tempdir().expect("dir");
    let (mqtt, http) = (free_port(), free_port());
    let serve = ServeProc::start(mqtt, http, dir.path()).await;
    let work = Workload::start(mqtt, serve.http, "ke", Duration::from_secs(35));
    wait_for("samples stored", Duration::from_secs(20), || async {
        (series_points(serve.http, "ke-agent0", "cpu.usage_pct")
            .await
            .len()
            >= 20)
            .then_some(())
    })
    .await;
    signal(serve.child.id(), "STOP");
    // The freeze itself (scenario time, not synchronisation).
    tokio::time::sleep(Duration::from_secs(20)).await;
    signal(serve.child.id(), "CONT");
    let recovered = widgetry_common::now_ms();
    let rows = work
        .finish(serve.http, "(e) serve frozen (SIGSTOP) 20 s", recovered)
        .await;
    print_rows(&rows);
    stop_serve(serve);
    integrity_ok(&dir.path().join("widgetry.db")).await;
    assert_rows(&rows);
}

fn spool_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The spool's newest segment file.
fn newest_segment(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .expect("spool dir")
        .filter_map(|e| {
            let e = e.ok()?;
            let m = e.metadata().ok()?;
            (m.is_file() && m.len() > 0).then(|| (e.file_name(), e.path()))
        })
        .max()
        .map(|(_, p)| p)
        .expect("a spool segment")
}

/// (session hex, seq) → samples of the batches a spool holds.
fn spooled(dir: &Path) -> Vec<((String, i64), u64)> {
    let (spool, _) = Spool::open(dir, 64 << 20, 1 << 20).expect("open spool");
    spool
        .pending()
        .map(|e| ((e.session.to_string(), e.seq as i64), u64::from(e.samples)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_f_agent_killed_while_spooling_and_power_cut() {
    let dir = tempfile::tempdir().expect("dir");
    let (mqtt, http) = (free_port(), free_port());
    let mut serve = ServeProc::start(mqtt, http, dir.path()).await;
    let spool_dir = dir.path().join("agent-spool");
    let device = "kf-agent";
    let start_agent = || {
        Command::new(workspace_bin("widgetry-agent"))
            .args(["--broker", &format!("127.0.0.1:{mqtt}"), "--device", device])
            .args(["--inputs", INPUTS])
            .args(["--interval", "50ms", "--batch-max-wait", "100ms"])
            .args(["--ack-timeout", "2s"])
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
            (series_points(serve.http, device, "cpu.usage_pct")
                .await
                .len()
                >= 10)
                .then_some(())
        },
    )
    .await;
    // The server goes away, so the agent spools; then the agent is killed
    // and its newest spool record torn, as by a power cut mid-write.
    serve.kill9();
    wait_for(
        "batches spooled while the server is down",
        Duration::from_secs(20),
        || async { (spool_bytes(&spool_dir) > 8192).then_some(()) },
    )
    .await;
    first.0.kill().expect("kill -9 the agent");
    first.0.wait().expect("reap");
    let segment = newest_segment(&spool_dir);
    let before_cut = spooled(&spool_dir);
    let len = std::fs::metadata(&segment).expect("segment").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .expect("open the segment");
    f.set_len(len - 7).expect("tear the tail");
    drop(f);
    let after_cut = spooled(&spool_dir);
    let torn: u64 = before_cut
        .iter()
        .filter(|(k, _)| !after_cut.iter().any(|(a, _)| a == k))
        .map(|(_, s)| s)
        .sum();
    assert!(
        after_cut.len() > 5 && torn > 0,
        "the cut tore the newest record and kept {} older ones",
        after_cut.len()
    );
    let serve = ServeProc::start(mqtt, http, dir.path()).await;
    let store = Store::open(&Database::Sqlite(dir.path().join("widgetry.db")))
        .await
        .expect("open db");
    // (session hex, seq) → samples of every stored batch of the device.
    let stored_batches = || async {
        let rows: Vec<(Vec<u8>, i64, i64)> =
            sqlx::query_as("SELECT session, seq, samples FROM batches WHERE device = 'kf-agent'")
                .fetch_all(store.reader())
                .await
                .expect("batches");
        rows.into_iter()
            .map(|(s, q, n)| {
                let hex = s.iter().map(|b| format!("{b:02x}")).collect::<String>();
                ((hex, q), n as u64)
            })
            .collect::<std::collections::HashMap<_, _>>()
    };
    let first_session = before_cut[0].0.0.clone();
    // Acknowledged before the kill: stored then, and gone from the spool.
    let acknowledged: u64 = stored_batches()
        .await
        .iter()
        .filter(|((s, q), _)| {
            *s == first_session && !before_cut.iter().any(|((bs, bq), _)| bs == s && bq == q)
        })
        .map(|(_, n)| n)
        .sum();
    let mut second = ChildGuard(start_agent());
    wait_for(
        "every intact spooled batch of the killed run is stored",
        Duration::from_secs(40),
        || async {
            let stored = stored_batches().await;
            after_cut
                .iter()
                .all(|(k, _)| stored.contains_key(k))
                .then_some(())
        },
    )
    .await;
    signal(second.0.id(), "TERM");
    assert_eq!(second.0.wait().expect("wait").code(), Some(0));
    let batches = stored_batches().await;
    store.close().await;
    let torn_stored = before_cut
        .iter()
        .filter(|(k, _)| !after_cut.iter().any(|(a, _)| a == k) && batches.contains_key(k))
        .count();
    let first_run_stored: u64 = batches
        .iter()
        .filter(|((s, _), _)| *s == first_session)
        .map(|(_, n)| n)
        .sum();
    let (_, duplicated) = agent_stored(serve.http, device).await;
    let spooled_samples: u64 = before_cut.iter().map(|(_, s)| s).sum();
    // The killed run's samples: acknowledged before the kill, or in its
    // spool. The torn record was never published, so never acknowledged;
    // the agent logs the bytes it discarded ("gaps" counts its samples).
    let first_run = Row {
        fault: "(f) agent kill -9 + torn spool",
        source: "agent",
        taken: acknowledged + spooled_samples,
        acknowledged,
        stored: first_run_stored,
        duplicated,
        gaps: torn,
        lost: acknowledged.saturating_sub(first_run_stored),
    };
    print_rows(std::slice::from_ref(&first_run));
    stop_serve(serve);
    integrity_ok(&dir.path().join("widgetry.db")).await;
    assert_eq!(torn_stored, 0, "the torn batch was never published");
    assert_rows(&[first_run]);
}
