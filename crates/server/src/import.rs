//! `widgetry import`: loads a `timestamp,value` CSV file (ISO 8601 or
//! epoch ms; the NAB corpus' format) into the batch log as one series of
//! one device, through the same append as the ingest writer (commit ids,
//! rollups), so everything that reads the database sees imported history
//! like ingested data.
//!
//! Idempotent: the batches' session is derived from the device, the
//! series and the file's bytes, and seqs number fixed-size batches, so
//! importing the same file again (or after an interrupted run) finds its
//! batches stored and skips them. A bad row is never skipped silently: the
//! first pass validates every row and, unless `skip_bad_rows`, nothing is
//! written when any row is bad. Reads the file twice, never whole: one row
//! of at most `widgetry_common::csv::MAX_LINE_BYTES` at a time.

use std::fmt::Write as _;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use widgetry_common::csv::{Row, SampleReader};
use widgetry_common::{excerpt, now_ms};
use widgetry_proto::validate::{validate_ts, validate_value};
use widgetry_proto::{BatchBuilder, SeriesKey, SessionId};

use crate::config::Database;
use crate::store::rollup::Rollups;
use crate::store::{Store, StoreError, write};

/// Samples per logged batch. Fixed, because seqs number batches of this
/// size: a different size would name different batches and store the file
/// twice. 3,600 is an hour of 1 Hz data, as the agent batches at most.
pub const BATCH_SAMPLES: usize = 3_600;

/// Batches per transaction (about 100k samples).
const BATCHES_PER_TX: usize = 28;

/// Bad rows listed one by one; the rest are counted.
pub const BAD_ROWS_SHOWN: usize = 20;

/// What to import; built by `config::cli` from `widgetry import`'s flags.
#[derive(Debug, Clone)]
pub struct ImportConfig {
    pub file: PathBuf,
    pub device: String,
    pub series: SeriesKey,
    pub database: Database,
    /// Store the good rows of a file with bad rows (they are still reported).
    pub skip_bad_rows: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{path}: {bad} bad row(s) of {rows}, nothing imported; fix them, or pass --skip-bad-rows to import the {good} good row(s)"
    )]
    BadRows {
        path: String,
        bad: u64,
        rows: u64,
        good: u64,
    },
    #[error("{path}: the file changed while it was imported; import it again")]
    Changed { path: String },
    #[error("import task failed: {0}")]
    Task(String),
}

/// A bad row: its line number and why.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    pub line: u64,
    pub error: String,
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ImportReport {
    /// Data rows in the file (header excluded), good and bad.
    pub rows: u64,
    pub bad_rows: u64,
    /// Good rows newly stored / found already stored by an earlier import.
    pub stored: u64,
    pub already_stored: u64,
    pub batches_stored: u64,
    pub batches_already_stored: u64,
    pub series_id: i64,
    pub session: String,
    pub elapsed: Duration,
}

impl ImportReport {
    /// One summary line.
    pub fn render(&self, cfg: &ImportConfig) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        format!(
            "imported {}: device {} series {} (id {}): {} rows, {} stored, {} already stored, {} bad rows{}; {} batches stored, {} already stored; {:.2} s, {:.0} rows/s; session {}",
            cfg.file.display(),
            cfg.device,
            cfg.series,
            self.series_id,
            self.rows,
            self.stored,
            self.already_stored,
            self.bad_rows,
            if self.bad_rows > 0 { " (skipped)" } else { "" },
            self.batches_stored,
            self.batches_already_stored,
            secs,
            self.rows as f64 / secs,
            self.session,
        )
    }
}

/// A row of the file, checked as the ingestor checks samples.
enum Checked {
    Header,
    Sample(i64, f64),
    Bad(BadRow),
}

fn check(row: Row, now: i64) -> Checked {
    match row {
        Row::Header { .. } => Checked::Header,
        Row::Bad { line, error } => Checked::Bad(BadRow { line, error }),
        Row::Sample { line, ts_ms, value } => {
            match validate_ts(ts_ms, now).and_then(|()| validate_value(value)) {
                Ok(()) => Checked::Sample(ts_ms, value),
                Err(reject) => Checked::Bad(BadRow {
                    line,
                    error: reject.to_string(),
                }),
            }
        }
    }
}

/// The first pass: the file's identity, its rows and its bad rows.
struct Scan {
    digest: [u8; 32],
    rows: u64,
    bad: Vec<BadRow>,
    bad_count: u64,
}

fn open(path: &Path) -> Result<HashingReader, ImportError> {
    let file = std::fs::File::open(path).map_err(|source| io_err(path, source))?;
    Ok(HashingReader {
        inner: BufReader::with_capacity(1 << 16, file),
        hash: Sha256::new(),
    })
}

fn io_err(path: &Path, source: std::io::Error) -> ImportError {
    ImportError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A `BufRead` that hashes what is consumed, so each pass hashes exactly
/// the bytes it parsed.
struct HashingReader {
    inner: BufReader<std::fs::File>,
    hash: Sha256,
}

impl std::io::Read for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

impl std::io::BufRead for HashingReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        if let Ok(buf) = self.inner.fill_buf() {
            let n = amt.min(buf.len());
            self.hash.update(&buf[..n]);
        }
        self.inner.consume(amt);
    }
}

fn scan(path: &Path, now: i64) -> Result<Scan, ImportError> {
    let mut reader = SampleReader::new(open(path)?);
    let mut s = Scan {
        digest: [0; 32],
        rows: 0,
        bad: Vec::new(),
        bad_count: 0,
    };
    while let Some(row) = reader.next_row().map_err(|e| io_err(path, e))? {
        match check(row, now) {
            Checked::Header => continue,
            Checked::Sample(..) => {}
            Checked::Bad(b) => {
                s.bad_count += 1;
                if s.bad.len() < BAD_ROWS_SHOWN {
                    s.bad.push(b);
                }
            }
        }
        s.rows += 1;
    }
    s.digest = reader.into_inner().hash.finalize().into();
    Ok(s)
}

/// The session that names this file's batches on this device and series.
fn import_session(device: &str, series: &SeriesKey, digest: &[u8; 32]) -> SessionId {
    let mut h = Sha256::new();
    h.update(b"widgetry import v1\0");
    h.update(device.as_bytes());
    h.update(b"\0");
    h.update(series.to_string().as_bytes());
    h.update(b"\0");
    h.update(digest);
    let full: [u8; 32] = h.finalize().into();
    let mut id = [0u8; 16];
    id.copy_from_slice(&full[..16]);
    SessionId(id)
}

/// Runs the import; `progress` receives the lines for stderr (bad rows,
/// then progress after each transaction).
pub async fn run(
    cfg: &ImportConfig,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<ImportReport, ImportError> {
    let started = Instant::now();
    let now = now_ms();
    let path = cfg.file.clone();
    let scanned = tokio::task::spawn_blocking(move || scan(&path, now))
        .await
        .map_err(|e| ImportError::Task(e.to_string()))??;
    let shown = cfg.file.display().to_string();
    for b in &scanned.bad {
        progress(&format!("{shown}:{}: {}", b.line, excerpt(&b.error)));
    }
    if scanned.bad_count > scanned.bad.len() as u64 {
        progress(&format!(
            "{shown}: … and {} more bad row(s)",
            scanned.bad_count - scanned.bad.len() as u64
        ));
    }
    let good = scanned.rows - scanned.bad_count;
    if scanned.bad_count > 0 && !cfg.skip_bad_rows {
        return Err(ImportError::BadRows {
            path: shown,
            bad: scanned.bad_count,
            rows: scanned.rows,
            good,
        });
    }
    let session = import_session(&cfg.device, &cfg.series, &scanned.digest);
    let mut report = ImportReport {
        rows: scanned.rows,
        bad_rows: scanned.bad_count,
        session: session.to_string(),
        ..Default::default()
    };

    // The second pass reads on a blocking thread and hands over batches.
    let (tx_batches, mut rx) = mpsc::channel::<Vec<(i64, f64)>>(4);
    let path = cfg.file.clone();
    let reader = tokio::task::spawn_blocking(move || -> Result<[u8; 32], ImportError> {
        let mut reader = SampleReader::new(open(&path)?);
        let mut batch = Vec::with_capacity(BATCH_SAMPLES);
        while let Some(row) = reader.next_row().map_err(|e| io_err(&path, e))? {
            if let Checked::Sample(ts, v) = check(row, now) {
                batch.push((ts, v));
                if batch.len() == BATCH_SAMPLES {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_SAMPLES));
                    if tx_batches.blocking_send(full).is_err() {
                        break;
                    }
                }
            }
        }
        if !batch.is_empty() {
            let _ = tx_batches.blocking_send(batch);
        }
        Ok(reader.into_inner().hash.finalize().into())
    });

    let store = Store::open(&cfg.database).await?;
    let result = write_batches(
        &store,
        cfg,
        session,
        &mut rx,
        &mut report,
        good,
        started,
        progress,
    )
    .await;
    store.close().await;
    // Let the reader finish (it stops early if the writer failed).
    drop(rx);
    let digest = reader
        .await
        .map_err(|e| ImportError::Task(e.to_string()))??;
    result?;
    if digest != scanned.digest {
        return Err(ImportError::Changed { path: shown });
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn write_batches(
    store: &Store,
    cfg: &ImportConfig,
    session: SessionId,
    rx: &mut mpsc::Receiver<Vec<(i64, f64)>>,
    report: &mut ImportReport,
    good: u64,
    started: Instant,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<(), ImportError> {
    let mut seq = 0u64;
    let mut series_id = None;
    let mut done = false;
    while !done {
        let mut tx = store.begin().await?;
        let id = match series_id {
            Some(id) => id,
            None => write::upsert_series(&mut tx, &cfg.device, &cfg.series).await?,
        };
        let local = u32::try_from(id)
            .map_err(|_| StoreError::Corrupt(format!("series id {id} exceeds u32")))?;
        let mut next_commit = None;
        let mut rollups = Rollups::default();
        let (mut stored, mut already, mut b_stored, mut b_already) = (0u64, 0u64, 0u64, 0u64);
        for _ in 0..BATCHES_PER_TX {
            let Some(points) = rx.recv().await else {
                done = true;
                break;
            };
            seq += 1;
            let mut builder = BatchBuilder::default();
            for &(ts, v) in &points {
                builder.push(local, ts, v);
            }
            let batch = builder.finish(session, seq, Vec::new());
            let appended = write::append_batch(
                &mut tx,
                &cfg.device,
                &batch,
                now_ms(),
                &mut next_commit,
                &mut rollups,
            )
            .await?;
            match appended {
                Some(_) => {
                    stored += points.len() as u64;
                    b_stored += 1;
                }
                None => {
                    already += points.len() as u64;
                    b_already += 1;
                }
            }
        }
        rollups.flush(&mut tx).await.map_err(StoreError::from)?;
        let now = now_ms();
        write::touch_device(&mut tx, &cfg.device, now, 0).await?;
        if seq > 0 {
            write::set_session_through(&mut tx, &cfg.device, &session, seq, now).await?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        series_id = Some(id);
        report.series_id = id;
        report.stored += stored;
        report.already_stored += already;
        report.batches_stored += b_stored;
        report.batches_already_stored += b_already;
        let so_far = report.stored + report.already_stored;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let mut line = String::new();
        let _ = write!(
            line,
            "import: {so_far}/{good} rows ({:.0} %), {:.0} rows/s",
            if good == 0 {
                100.0
            } else {
                so_far as f64 * 100.0 / good as f64
            },
            so_far as f64 / secs
        );
        if report.already_stored > 0 {
            let _ = write!(line, ", {} already stored", report.already_stored);
        }
        progress(&line);
    }
    Ok(())
}
