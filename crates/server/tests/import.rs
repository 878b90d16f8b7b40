//! `widgetry import` against real SQLite files in temp dirs: what is
//! stored equals the file bit for bit, a second import stores nothing,
//! bad rows are reported with line numbers and stop the import unless
//! skipped, an overlong line is refused without being held, and the
//! command line works as `--help` says.

use std::path::{Path, PathBuf};
use std::process::Command;

use widgetry_proto::SeriesKey;
use widgetry_server::config::Database;
use widgetry_server::import::{self, BATCH_SAMPLES, ImportConfig, ImportError};
use widgetry_server::store::Store;

fn config(dir: &Path, file: &Path, series: &str) -> ImportConfig {
    ImportConfig {
        file: file.to_path_buf(),
        device: "nab-1".into(),
        series: SeriesKey::parse(series).expect("series key"),
        database: Database::Sqlite(dir.join("w.db")),
        skip_bad_rows: false,
    }
}

/// A NAB-like file: 5-minute steps, decimal values, more than two batches.
fn nab_like(dir: &Path, name: &str, rows: usize) -> (PathBuf, Vec<(i64, f64)>) {
    let start = 1_396_310_400_000i64; // 2014-04-01 00:00:00 UTC
    let mut text = String::from("timestamp,value\n");
    let mut points = Vec::new();
    for i in 0..rows {
        let ts = start + i as i64 * 300_000;
        let secs = ts / 1000;
        let (day, rem) = (secs / 86_400 - 16_161, secs % 86_400);
        // April 2014 has 30 days; rows stay within April and May.
        let (month, dom) = if day < 30 {
            (4, day + 1)
        } else {
            (5, day - 29)
        };
        let value = 60.0 + (i as f64 * 0.37).sin() * 12.345678901 + i as f64 * 1e-7;
        text.push_str(&format!(
            "2014-{month:02}-{dom:02} {:02}:{:02}:{:02},{value:?}\n",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        ));
        points.push((ts, value));
    }
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write csv");
    (path, points)
}

async fn stored(cfg: &ImportConfig) -> (Vec<(i64, f64)>, i64, i64) {
    let store = Store::open(&cfg.database).await.expect("open");
    let points = store
        .series_points(&cfg.device, &cfg.series, i64::MIN, i64::MAX)
        .await
        .expect("read")
        .unwrap_or_default();
    let (batches, minute_count): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM batches),
                (SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) FROM rollup_1m)",
    )
    .fetch_one(store.reader())
    .await
    .expect("counts");
    store.close().await;
    (points, batches, minute_count)
}

fn bits(points: &[(i64, f64)]) -> Vec<(i64, u64)> {
    points.iter().map(|(t, v)| (*t, v.to_bits())).collect()
}

#[tokio::test]
async fn a_file_imported_twice_is_stored_once_bit_for_bit() {
    let dir = tempfile::tempdir().expect("dir");
    let rows = 2 * BATCH_SAMPLES + 123;
    let (file, want) = nab_like(dir.path(), "machine.csv", rows);
    let cfg = config(dir.path(), &file, "machine_temperature");
    let mut lines = Vec::new();
    let first = import::run(&cfg, &mut |l| lines.push(l.to_string()))
        .await
        .expect("first import");
    assert_eq!(first.rows, rows as u64);
    assert_eq!(first.stored, rows as u64, "{first:?}");
    assert_eq!(first.batches_stored, 3, "{first:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("{rows}/{rows} rows (100 %)"))),
        "progress lines: {lines:?}"
    );
    let (points, batches, minute_count) = stored(&cfg).await;
    assert_eq!(
        bits(&points),
        bits(&want),
        "stored points differ from the file"
    );
    assert_eq!((batches, minute_count), (3, rows as i64));

    let second = import::run(&cfg, &mut |_| {}).await.expect("second import");
    assert_eq!(
        (
            second.stored,
            second.already_stored,
            second.batches_already_stored
        ),
        (0, rows as u64, 3),
        "{second:?}"
    );
    assert_eq!(second.session, first.session);
    // The same bytes under another name are the same data.
    let copy = dir.path().join("copy.csv");
    std::fs::copy(&file, &copy).expect("copy");
    let third = import::run(
        &config(dir.path(), &copy, "machine_temperature"),
        &mut |_| {},
    )
    .await
    .expect("import of a copy");
    assert_eq!(third.stored, 0, "{third:?}");
    let (points, batches, minute_count) = stored(&cfg).await;
    assert_eq!(points.len(), rows, "duplicates after re-imports");
    assert_eq!(
        (batches, minute_count),
        (3, rows as i64),
        "rollups counted twice"
    );

    // Another series of the same device is another import.
    let other = import::run(&config(dir.path(), &file, "other{site=a}"), &mut |_| {})
        .await
        .expect("import into another series");
    assert_eq!(other.stored, rows as u64);
    assert_ne!(other.session, first.session);
}

#[tokio::test]
async fn bad_rows_are_listed_by_line_and_stop_the_import_unless_skipped() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("bad.csv");
    std::fs::write(
        &file,
        "timestamp,value\n\
         2014-04-01 00:00:00,1.5\n\
         2014-04-01 00:05:00,abc\n\
         1396311000000,2.5\n\
         2014-02-30 00:00:00,3\n\
         1999-12-31 23:59:59,4\n\
         2014-04-01 00:15:00,inf\n\
         2014-04-01 00:20:00\n\
         2014-04-01 00:25:00,-0.0\n",
    )
    .expect("write");
    let cfg = config(dir.path(), &file, "t");
    let mut lines = Vec::new();
    let err = import::run(&cfg, &mut |l| lines.push(l.to_string()))
        .await
        .expect_err("bad rows must stop the import");
    match &err {
        ImportError::BadRows {
            bad, rows, good, ..
        } => assert_eq!((*bad, *rows, *good), (5, 8, 3)),
        other => panic!("expected BadRows, got {other}"),
    }
    assert!(err.to_string().contains("--skip-bad-rows"), "{err}");
    for (line, why) in [
        (3, "not a number"),
        (5, "day out of range"),
        (6, "before 2000-01-01"),
        (7, "not a finite number"),
        (8, "expected `timestamp,value`"),
    ] {
        let prefix = format!("{}:{line}: ", file.display());
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&prefix) && l.contains(why)),
            "line {line} ({why}) not reported: {lines:?}"
        );
    }
    assert_eq!(stored(&cfg).await.1, 0, "nothing may be stored");

    let skip = ImportConfig {
        skip_bad_rows: true,
        ..cfg.clone()
    };
    let report = import::run(&skip, &mut |_| {})
        .await
        .expect("import with --skip-bad-rows");
    assert_eq!((report.rows, report.bad_rows, report.stored), (8, 5, 3));
    let (points, _, _) = stored(&cfg).await;
    assert_eq!(
        bits(&points),
        bits(&[
            (1_396_310_400_000, 1.5),
            (1_396_311_000_000, 2.5),
            (1_396_311_900_000, -0.0)
        ])
    );
}

#[tokio::test]
async fn an_overlong_line_is_a_bad_row_not_a_memory_hog() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("long.csv");
    let mut text = b"1396310400000,1\n1396310700000,".to_vec();
    text.extend(std::iter::repeat_n(b'7', 8 << 20)); // an 8 MiB value
    text.extend_from_slice(b"\n1396311000000,3\n");
    std::fs::write(&file, text).expect("write");
    let cfg = config(dir.path(), &file, "t");
    let mut lines = Vec::new();
    let err = import::run(&cfg, &mut |l| lines.push(l.to_string()))
        .await
        .expect_err("an overlong line is a bad row");
    assert!(
        matches!(
            err,
            ImportError::BadRows {
                bad: 1,
                rows: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(":2: line longer than 4096 bytes")),
        "{lines:?}"
    );
}

#[test]
fn the_command_line_imports_reports_and_fails_on_bad_rows() {
    let bin = env!("CARGO_BIN_EXE_widgetry");
    let help = Command::new(bin)
        .args(["import", "--help"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{text}");
    for needle in [
        "--device",
        "--series",
        "--database",
        "--skip-bad-rows",
        "line number",
    ] {
        assert!(
            text.contains(needle),
            "{needle} missing from --help: {text}"
        );
    }

    let dir = tempfile::tempdir().expect("dir");
    let (file, _) = nab_like(dir.path(), "ok.csv", 10);
    let db = dir.path().join("w.db");
    let run = |file: &Path, extra: &[&str]| {
        let mut c = Command::new(bin);
        c.args(["import", "--device", "d1", "--series", "temp", "--database"])
            .arg(&db)
            .arg(file)
            .args(extra)
            .env_remove("WIDGETRY_DATABASE");
        c.output().expect("run widgetry import")
    };
    let out = run(&file, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout {stdout} stderr {stderr}");
    assert!(
        stdout.contains("10 rows, 10 stored, 0 already stored"),
        "{stdout}"
    );
    assert!(stderr.contains("import: 10/10 rows (100 %)"), "{stderr}");
    let out = run(&file, &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("10 rows, 0 stored, 10 already stored"));

    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "1396310400000,1\noops\n").expect("write");
    let out = run(&bad, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad.csv:2: ") && stderr.contains("1 bad row(s) of 2"),
        "{stderr}"
    );
    let out = run(&bad, &["--skip-bad-rows"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 bad rows (skipped)"));

    let out = Command::new(bin)
        .args([
            "import",
            "--device",
            "no spaces",
            "--series",
            "t",
            "/nonexistent.csv",
        ])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("device") && stderr.contains("/nonexistent.csv"),
        "{stderr}"
    );
}
