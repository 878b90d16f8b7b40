//! The compactor against `kill -9` (issue 14, acceptance 2): `widgetry
//! compact` is killed at random moments, at least 20 times, while it moves
//! imported (acknowledged) samples from the batch log into chunks. After
//! every kill the SQLite file passes `PRAGMA integrity_check` and holds
//! every sample exactly once (log + chunks); at the end every series reads
//! back bit for bit, and importing a file again stores nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::workspace_bin;
use widgetry_proto::SeriesKey;
use widgetry_server::config::Database;
use widgetry_server::import::{self, ImportConfig};
use widgetry_server::store::Store;

/// Kills that must land while the compactor is running.
const KILLS: usize = 20;
/// Of those, kills between a pass's first and last transaction.
const MIN_PARTIAL: usize = 8;
/// Bound on the loop (kills that land after it finished do not count).
const MAX_ROUNDS: usize = 80;
const POINTS_PER_FILE: usize = 40_000;

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

/// A CSV of 1 Hz epoch-ms rows (every 5 minutes when `sparse`), with
/// values that exercise the codec: a wave, steps and noise.
fn write_csv(dir: &Path, n: usize, rng: &mut Lcg, sparse: bool) -> (PathBuf, Vec<(i64, f64)>) {
    let start = 1_700_000_000_000i64 + (rng.next() % 1000) as i64 * 3_600_000;
    let step = if sparse { 300_000 } else { 1_000 };
    let mut text = String::from("timestamp,value\n");
    let mut points = Vec::with_capacity(n);
    for i in 0..n {
        let ts = start + i as i64 * step;
        let v = (i as f64 / 300.0).sin() * 40.0
            + (i / 1000) as f64
            + (rng.next() % 1000) as f64 / 997.0;
        text.push_str(&format!("{ts},{v:?}\n"));
        points.push((ts, v));
    }
    let path = dir.join(format!("s{}.csv", rng.next()));
    std::fs::write(&path, text).expect("write csv");
    (path, points)
}

struct Imported {
    cfg: ImportConfig,
    points: Vec<(i64, f64)>,
}

async fn import_one(
    dir: &Path,
    db: &Database,
    rng: &mut Lcg,
    idx: usize,
    sparse: bool,
) -> Imported {
    let n = if sparse { 9_000 } else { POINTS_PER_FILE };
    let (file, points) = write_csv(dir, n, rng, sparse);
    let cfg = ImportConfig {
        file,
        device: format!("dev-{}", idx % 6),
        series: SeriesKey::parse(&format!("s{idx}")).expect("key"),
        database: db.clone(),
        skip_bad_rows: false,
    };
    let report = import::run(&cfg, &mut |_| {}).await.expect("import");
    assert_eq!(report.stored as usize, n);
    Imported { cfg, points }
}

/// (samples in the log, samples in chunks), and the integrity check.
async fn census(db: &Database) -> (i64, i64, String) {
    let store = Store::open(db).await.expect("open after a kill");
    let pool = store.reader();
    let (log,): (i64,) =
        sqlx::query_as("SELECT CAST(COALESCE(SUM(samples), 0) AS BIGINT) FROM batches")
            .fetch_one(pool)
            .await
            .expect("log count");
    let (chunks,): (i64,) =
        sqlx::query_as("SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) FROM chunks")
            .fetch_one(pool)
            .await
            .expect("chunk count");
    let (check,): (String,) = sqlx::query_as("PRAGMA integrity_check")
        .fetch_one(pool)
        .await
        .expect("integrity_check");
    store.close().await;
    (log, chunks, check)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_compaction_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Database::Sqlite(dir.path().join("w.db"));
    let seed = widgetry_common::now_ms() as u64;
    eprintln!("seed {seed}");
    let mut rng = Lcg(seed);
    let mut imported = Vec::new();
    for i in 0..6 {
        imported.push(import_one(dir.path(), &db, &mut rng, i, i == 5).await);
    }
    let bin = workspace_bin("widgetry");
    let db_arg = dir.path().join("w.db");
    // How long a whole pass takes here, to aim the kills inside one.
    let mut kills = 0;
    let mut rounds = 0;
    // Kills after some of a pass's transactions committed and before the
    // rest: proof that the kills land inside compaction, not only before.
    let mut partial = 0;
    let mut spread_ms = 400u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while kills < KILLS || partial < MIN_PARTIAL {
        rounds += 1;
        assert!(
            rounds <= MAX_ROUNDS && Instant::now() < deadline,
            "only {kills} of {KILLS} kills landed during compaction ({partial} of {MIN_PARTIAL} mid-pass) in {rounds} rounds"
        );
        let (mut log, _, _) = census(&db).await;
        if log < 2 * POINTS_PER_FILE as i64 {
            let i = imported.len();
            imported.push(import_one(dir.path(), &db, &mut rng, i, i % 4 == 0).await);
            log = census(&db).await.0;
        }
        let log_before = log;
        let mut child = Command::new(&bin)
            .args(["compact", "--everything", "--database"])
            .arg(&db_arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn widgetry compact");
        let delay = 20 + rng.next() % spread_ms;
        // The fault's timing (a random moment), not a synchronisation.
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let finished = child.try_wait().expect("try_wait").is_some();
        if !finished {
            child.kill().expect("kill -9");
            kills += 1;
        } else {
            // It finished first: aim earlier next time.
            spread_ms = (spread_ms / 2).max(40);
        }
        child.wait().expect("reap");
        let expected: i64 = imported.iter().map(|i| i.points.len() as i64).sum();
        let (log, chunks, check) = census(&db).await;
        if !finished && log > 0 && log < log_before {
            partial += 1;
        } else if !finished && log == log_before {
            // Killed before its first commit: aim later next time.
            spread_ms = spread_ms * 3 / 2;
        }
        assert_eq!(check, "ok", "integrity after round {rounds} (seed {seed})");
        assert_eq!(
            log + chunks,
            expected,
            "round {rounds} (killed after {delay} ms, seed {seed}): {log} in the log + {chunks} in chunks"
        );
    }
    eprintln!(
        "{kills} kills during compaction in {rounds} rounds, {partial} in the middle of a pass"
    );
    assert!(
        partial >= 5,
        "only {partial} kills landed mid-pass (seed {seed})"
    );
    // Finish the compaction and read every series back.
    let out = Command::new(&bin)
        .args(["compact", "--everything", "--database"])
        .arg(&db_arg)
        .output()
        .expect("run widgetry compact");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (log, chunks, check) = census(&db).await;
    assert_eq!((log, check.as_str()), (0, "ok"));
    let expected: i64 = imported.iter().map(|i| i.points.len() as i64).sum();
    assert_eq!(chunks, expected);
    let store = Store::open(&db).await.expect("open");
    for i in &imported {
        let got = store
            .series_points(&i.cfg.device, &i.cfg.series, i64::MIN, i64::MAX)
            .await
            .expect("read")
            .expect("series exists");
        assert_eq!(got.len(), i.points.len(), "{}", i.cfg.series);
        for (g, w) in got.iter().zip(&i.points) {
            assert_eq!(g.0, w.0, "{}", i.cfg.series);
            assert_eq!(g.1.to_bits(), w.1.to_bits(), "{}: bit-exact", i.cfg.series);
        }
    }
    store.close().await;
    // Idempotent after compaction: the same file again stores nothing.
    let again = import::run(&imported[0].cfg, &mut |_| {})
        .await
        .expect("import again");
    assert_eq!(
        (again.stored, again.already_stored as usize),
        (0, imported[0].points.len())
    );
    let (log, chunks, _) = census(&db).await;
    assert_eq!((log, chunks), (0, expected));
}
