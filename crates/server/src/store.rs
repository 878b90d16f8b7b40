//! SQLite storage through sqlx: opening (WAL, `synchronous = FULL`,
//! migrations), the writes the ingestor makes inside one transaction, and
//! the reads the web service makes.
//!
//! This module owns every SQL statement. It must never decide what to
//! acknowledge: callers commit, then ack.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use prost::Message;
use serde::Serialize;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Row, Transaction};
use widgetry_proto::json::Status;
use widgetry_proto::{SeriesKey, SessionId, pb};

/// Errors from the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database {path}: migration failed: {source}")]
    Migrate {
        path: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("stored batch is corrupt: {0}")]
    Corrupt(String),
}

/// Handle on the database: one writer connection, a few readers, and one
/// connection for WAL checkpoints.
#[derive(Clone)]
pub struct Store {
    writer: SqlitePool,
    reader: SqlitePool,
    maint: SqlitePool,
}

/// A write transaction.
pub type WriteTx = Transaction<'static, sqlx::Sqlite>;

impl Store {
    /// Opens (creating if needed) the database at `path` and runs migrations.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        let label = path.display().to_string();
        let opts = SqliteConnectOptions::from_str("sqlite:")
            .map_err(|source| StoreError::Open {
                path: label.clone(),
                source,
            })?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Acks promise durability (DESIGN.md §4): FULL costs 0-15 % here.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .pragma("foreign_keys", "ON");
        // The writer never checkpoints itself: a checkpoint inside a commit
        // stalls ingest for its fsyncs. `checkpoint()` runs them from
        // another connection (see the ingestor's checkpoint task).
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone().pragma("wal_autocheckpoint", "0"))
            .await
            .map_err(|source| StoreError::Open {
                path: label.clone(),
                source,
            })?;
        sqlx::migrate!("./migrations")
            .run(&writer)
            .await
            .map_err(|source| StoreError::Migrate {
                path: label.clone(),
                source,
            })?;
        let maint = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await
            .map_err(|source| StoreError::Open {
                path: label.clone(),
                source,
            })?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.read_only(true))
            .await
            .map_err(|source| StoreError::Open {
                path: label,
                source,
            })?;
        Ok(Store {
            writer,
            reader,
            maint,
        })
    }

    /// Starts a write transaction.
    pub async fn begin(&self) -> Result<WriteTx, StoreError> {
        Ok(self.writer.begin().await?)
    }

    /// Copies committed WAL frames into the database file. Normally a
    /// PASSIVE checkpoint, which never blocks the writer or readers; when
    /// the WAL has grown past `max_wal_pages` (the writer never paused long
    /// enough for it to be reset) a TRUNCATE checkpoint briefly waits for
    /// the writer and shrinks the file, so the WAL cannot fill the disk.
    pub async fn checkpoint(&self, max_wal_pages: i64) -> Result<(), StoreError> {
        let (_busy, log, _done): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&self.maint)
            .await?;
        if log > max_wal_pages {
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.maint)
                .await?;
        }
        Ok(())
    }

    /// Closes the pools, waiting for in-flight statements, after a final
    /// checkpoint.
    pub async fn close(&self) {
        let _ = self.checkpoint(0).await;
        self.writer.close().await;
        self.reader.close().await;
        self.maint.close().await;
    }

    /// Raw reader pool, for tests and tools.
    pub fn reader(&self) -> &SqlitePool {
        &self.reader
    }
}

// ---- writes (inside the ingestor's transaction) ----

/// Returns the id of `key` on `device`, creating the series if new.
pub async fn upsert_series(
    conn: &mut SqliteConnection,
    device: &str,
    key: &SeriesKey,
) -> Result<i64, StoreError> {
    let text = key.to_string();
    let labels = serde_json::to_string(&key.labels).unwrap_or_else(|_| "{}".into());
    let row = sqlx::query(
        "INSERT INTO series (device, key, name, labels) VALUES (?, ?, ?, ?)
         ON CONFLICT (device, key) DO UPDATE SET name = excluded.name
         RETURNING id",
    )
    .bind(device)
    .bind(&text)
    .bind(&key.name)
    .bind(labels)
    .fetch_one(&mut *conn)
    .await?;
    Ok(row.get(0))
}

/// The series a session-local id was bound to, if any.
pub async fn session_series(
    conn: &mut SqliteConnection,
    device: &str,
    session: &SessionId,
    local_id: u32,
) -> Result<Option<i64>, StoreError> {
    let row = sqlx::query(
        "SELECT series_id FROM session_series WHERE device = ? AND session = ? AND local_id = ?",
    )
    .bind(device)
    .bind(&session.0[..])
    .bind(local_id as i64)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Binds a session-local id to a series.
pub async fn bind_session_series(
    conn: &mut SqliteConnection,
    device: &str,
    session: &SessionId,
    local_id: u32,
    series_id: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT OR IGNORE INTO session_series (device, session, local_id, series_id) VALUES (?, ?, ?, ?)",
    )
    .bind(device)
    .bind(&session.0[..])
    .bind(local_id as i64)
    .bind(series_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A batch to append to the batch log.
pub struct BatchRow<'a> {
    pub device: &'a str,
    pub session: &'a SessionId,
    pub seq: u64,
    pub received_ms: i64,
    pub min_ts: i64,
    pub max_ts: i64,
    pub samples: i64,
    pub payload: &'a [u8],
}

/// Appends a batch; returns false when (device, session, seq) was already
/// stored (a redelivery), in which case nothing is written.
pub async fn insert_batch(
    conn: &mut SqliteConnection,
    b: &BatchRow<'_>,
) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "INSERT OR IGNORE INTO batches (device, session, seq, received_ms, min_ts, max_ts, samples, payload)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(b.device)
    .bind(&b.session.0[..])
    .bind(b.seq as i64)
    .bind(b.received_ms)
    .bind(b.min_ts)
    .bind(b.max_ts)
    .bind(b.samples)
    .bind(b.payload)
    .execute(&mut *conn)
    .await?;
    Ok(res.rows_affected() == 1)
}

/// The stored ack watermark of a session, if the session is known.
pub async fn session_through(
    conn: &mut SqliteConnection,
    device: &str,
    session: &SessionId,
) -> Result<Option<u64>, StoreError> {
    let row = sqlx::query("SELECT through FROM sessions WHERE device = ? AND session = ?")
        .bind(device)
        .bind(&session.0[..])
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(|r| r.get::<i64, _>(0) as u64))
}

/// Stored seqs of a session above `through`, ascending.
pub async fn seqs_above(
    conn: &mut SqliteConnection,
    device: &str,
    session: &SessionId,
    through: u64,
) -> Result<Vec<u64>, StoreError> {
    let rows = sqlx::query(
        "SELECT seq FROM batches WHERE device = ? AND session = ? AND seq > ? ORDER BY seq",
    )
    .bind(device)
    .bind(&session.0[..])
    .bind(through as i64)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.iter().map(|r| r.get::<i64, _>(0) as u64).collect())
}

/// Records a session's ack watermark.
pub async fn set_session_through(
    conn: &mut SqliteConnection,
    device: &str,
    session: &SessionId,
    through: u64,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO sessions (device, session, through, started_ms) VALUES (?, ?, ?, ?)
         ON CONFLICT (device, session) DO UPDATE SET through = MAX(through, excluded.through)",
    )
    .bind(device)
    .bind(&session.0[..])
    .bind(through as i64)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records a gap report, counting only batches of its range that were
/// never stored (a batch may reach the server and then be dropped from the
/// device's spool before its ack arrived). Returns the samples really lost,
/// or `None` if the report was already recorded or nothing was lost.
pub async fn insert_gap(
    conn: &mut SqliteConnection,
    device: &str,
    gap: &widgetry_proto::Gap,
    now_ms: i64,
) -> Result<Option<i64>, StoreError> {
    let (stored_batches, stored_samples): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COALESCE(SUM(samples), 0) FROM batches
         WHERE device = ? AND session = ? AND seq BETWEEN ? AND ?",
    )
    .bind(device)
    .bind(&gap.session.0[..])
    .bind(gap.from_seq as i64)
    .bind(gap.to_seq as i64)
    .fetch_one(&mut *conn)
    .await?;
    let batches = (gap.to_seq - gap.from_seq + 1) as i64 - stored_batches;
    let samples = (gap.samples.min(i64::MAX as u64) as i64 - stored_samples).max(0);
    if batches <= 0 {
        return Ok(None);
    }
    let res = sqlx::query(
        "INSERT OR IGNORE INTO gaps (device, session, from_seq, to_seq, batches, samples, from_ts, to_ts, reported_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(device)
    .bind(&gap.session.0[..])
    .bind(gap.from_seq as i64)
    .bind(gap.to_seq as i64)
    .bind(batches)
    .bind(samples)
    .bind(gap.from_ts_ms)
    .bind(gap.to_ts_ms)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    Ok((res.rows_affected() == 1).then_some(samples))
}

/// Stores one event; returns false if it was already stored.
pub async fn insert_event(
    conn: &mut SqliteConnection,
    device: &str,
    session: &SessionId,
    seq: u64,
    idx: usize,
    event: &widgetry_proto::json::Event,
) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "INSERT OR IGNORE INTO events (device, session, seq, idx, ts, name, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(device)
    .bind(&session.0[..])
    .bind(seq as i64)
    .bind(idx as i64)
    .bind(event.ts_ms)
    .bind(&event.name)
    .bind(serde_json::Value::Object(event.body.clone()).to_string())
    .execute(&mut *conn)
    .await?;
    Ok(res.rows_affected() == 1)
}

/// Marks a device as seen at `now_ms`, adding `rejects` to its count.
pub async fn touch_device(
    conn: &mut SqliteConnection,
    device: &str,
    now_ms: i64,
    rejects: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO devices (device, first_seen_ms, last_seen_ms, rejects) VALUES (?, ?, ?, ?)
         ON CONFLICT (device) DO UPDATE SET
           last_seen_ms = MAX(last_seen_ms, excluded.last_seen_ms),
           rejects = rejects + excluded.rejects",
    )
    .bind(device)
    .bind(now_ms)
    .bind(now_ms)
    .bind(rejects)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records a device's presence from its status message.
pub async fn set_status(
    conn: &mut SqliteConnection,
    device: &str,
    status: &Status,
    now_ms: i64,
) -> Result<(), StoreError> {
    touch_device(conn, device, now_ms, 0).await?;
    sqlx::query(
        "UPDATE devices SET state = ?, session = COALESCE(?, session), agent = COALESCE(?, agent),
           host = COALESCE(?, host), status_ms = ? WHERE device = ?",
    )
    .bind(status.state.as_str())
    .bind(status.session.map(|s| s.to_string()))
    .bind(status.agent.as_deref())
    .bind(status.host.as_deref())
    .bind(now_ms)
    .bind(device)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

// ---- reads (web service) ----

/// A device as listed by `GET /api/v1/devices`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeviceInfo {
    pub device: String,
    pub state: String,
    pub session: Option<String>,
    pub agent: Option<String>,
    pub host: Option<String>,
    pub first_seen: i64,
    pub last_seen: i64,
    pub rejects: i64,
    /// Gap reports from the device (batches lost to a full spool).
    pub gaps: i64,
    /// Samples lost in those gaps.
    pub lost_samples: i64,
    pub series: Vec<String>,
}

impl Store {
    /// Every device with its series, ordered by id.
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.device, d.state, d.session, d.agent, d.host, d.first_seen_ms, d.last_seen_ms,
                    d.rejects, COUNT(g.device), COALESCE(SUM(g.samples), 0)
             FROM devices d LEFT JOIN gaps g ON g.device = d.device
             GROUP BY d.device ORDER BY d.device",
        )
        .fetch_all(&self.reader)
        .await?;
        let mut out: Vec<DeviceInfo> = rows
            .iter()
            .map(|r| DeviceInfo {
                device: r.get(0),
                state: r.get(1),
                session: r.get(2),
                agent: r.get(3),
                host: r.get(4),
                first_seen: r.get(5),
                last_seen: r.get(6),
                rejects: r.get(7),
                gaps: r.get(8),
                lost_samples: r.get(9),
                series: Vec::new(),
            })
            .collect();
        let series = sqlx::query("SELECT device, key FROM series ORDER BY device, key")
            .fetch_all(&self.reader)
            .await?;
        let mut by_device: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in &series {
            by_device.entry(r.get(0)).or_default().push(r.get(1));
        }
        for d in &mut out {
            d.series = by_device.remove(&d.device).unwrap_or_default();
        }
        Ok(out)
    }

    /// Events of a device in `[from, to]` (ms), oldest first, at most `limit`.
    pub async fn events(
        &self,
        device: &str,
        from: i64,
        to: i64,
        limit: i64,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let rows = sqlx::query(
            "SELECT ts, name, body FROM events WHERE device = ? AND ts BETWEEN ? AND ?
             ORDER BY ts, session, seq, idx LIMIT ?",
        )
        .bind(device)
        .bind(from)
        .bind(to)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let body: String = r.get(2);
                serde_json::json!({
                    "ts": r.get::<i64, _>(0),
                    "event": r.get::<String, _>(1),
                    "body": serde_json::from_str::<serde_json::Value>(&body).unwrap_or(serde_json::Value::Null),
                })
            })
            .collect())
    }

    /// Points of one series in `[from, to]` (ms), ascending by time. `None`
    /// when the device has no such series.
    pub async fn points(
        &self,
        device: &str,
        key: &SeriesKey,
        from: i64,
        to: i64,
    ) -> Result<Option<Vec<(i64, f64)>>, StoreError> {
        let Some(row) = sqlx::query("SELECT id FROM series WHERE device = ? AND key = ?")
            .bind(device)
            .bind(key.to_string())
            .fetch_optional(&self.reader)
            .await?
        else {
            return Ok(None);
        };
        let series_id: i64 = row.get(0);
        let series_id = u32::try_from(series_id)
            .map_err(|_| StoreError::Corrupt(format!("series id {series_id} exceeds u32")))?;
        let rows = sqlx::query(
            "SELECT payload FROM batches WHERE device = ? AND max_ts >= ? AND min_ts <= ?",
        )
        .bind(device)
        .bind(from)
        .bind(to)
        .fetch_all(&self.reader)
        .await?;
        let mut points = Vec::new();
        for r in &rows {
            let payload: &[u8] = r.get(0);
            let batch =
                pb::Batch::decode(payload).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            for run in batch.points.iter().filter(|p| p.series_id == series_id) {
                let values = widgetry_proto::decode_values(run)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let mut ts = 0i64;
                for (d, v) in run.ts_delta_ms.iter().zip(&values) {
                    ts = ts.wrapping_add(*d);
                    if (from..=to).contains(&ts) {
                        points.push((ts, *v));
                    }
                }
            }
        }
        points.sort_by_key(|p| p.0);
        Ok(Some(points))
    }
}
