//! Storage through sqlx: SQLite (the default: one file, WAL,
//! `synchronous = FULL`) or PostgreSQL (`postgres://…`), behind sqlx's
//! `Any` driver so that every statement is written once. Opening runs the
//! backend's migrations; the ingestor's writes happen inside one
//! transaction; the web service reads.
//!
//! This module owns every SQL statement. It must never decide what to
//! acknowledge: callers commit, then ack. Statements use `$1`-style
//! parameters and SQL both backends accept (no `INSERT OR IGNORE`, no
//! two-argument `MAX`; aggregates cast to BIGINT because PostgreSQL's
//! `SUM(bigint)` is `numeric`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use prost::Message;
use serde::Serialize;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Executor, Row, Transaction};
use widgetry_proto::json::Status;
use widgetry_proto::{SeriesKey, SessionId, pb};

use crate::config::Database;
use crate::rollup::{Agg, Resolution};

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

/// Which SQL engine a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Handle on the database: one writer connection, a few readers, and one
/// maintenance connection (WAL checkpoints, retention).
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    writer: AnyPool,
    reader: AnyPool,
    maint: AnyPool,
}

/// A write transaction.
pub type WriteTx = Transaction<'static, sqlx::Any>;

/// Lock key that serialises writers on PostgreSQL (see [`Store::begin`]).
const PG_WRITE_LOCK: i64 = 0x5769_6467_6574; // "Widget"

impl Store {
    /// Opens the database (creating a SQLite file if needed) and runs
    /// migrations.
    pub async fn open(db: &Database) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let label = db.to_string();
        let open_err = |source| StoreError::Open {
            path: label.clone(),
            source,
        };
        let migrate_err = |source| StoreError::Migrate {
            path: label.clone(),
            source,
        };
        let store = match db {
            Database::Sqlite(path) => {
                let url = |read_only: bool| {
                    SqliteConnectOptions::new()
                        .filename(path)
                        .create_if_missing(!read_only)
                        .read_only(read_only)
                        .to_url_lossy()
                };
                let rw = AnyConnectOptions::from_url(&url(false)).map_err(open_err)?;
                let ro = AnyConnectOptions::from_url(&url(true)).map_err(open_err)?;
                // The writer never checkpoints itself: a checkpoint inside a
                // commit stalls ingest for its fsyncs. `checkpoint()` runs
                // them from another connection (the ingestor's checkpoint
                // task).
                let writer = sqlite_pool(
                    1,
                    &rw,
                    "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;",
                )
                .await
                .map_err(open_err)?;
                // sqlx takes no lock around SQLite migrations: processes
                // opening a new file at once (compose starting ingestors and
                // the web service together) would race. A lock file next to
                // the database (like SQLite's -wal and -shm) serialises them.
                let lock = lock_file(path).await.map_err(|e| StoreError::Open {
                    path: label.clone(),
                    source: sqlx::Error::Io(e),
                })?;
                let migrated = sqlx::migrate!("./migrations/sqlite").run(&writer).await;
                drop(lock);
                migrated.map_err(migrate_err)?;
                Store {
                    backend: Backend::Sqlite,
                    writer,
                    maint: sqlite_pool(1, &rw, "").await.map_err(open_err)?,
                    reader: sqlite_pool(4, &ro, "").await.map_err(open_err)?,
                }
            }
            Database::Postgres(url) => {
                let opts: AnyConnectOptions = url.parse().map_err(open_err)?;
                let pool = |n: u32| {
                    AnyPoolOptions::new()
                        .max_connections(n)
                        .acquire_timeout(Duration::from_secs(30))
                        .connect_with(opts.clone())
                };
                let writer = pool(1).await.map_err(open_err)?;
                sqlx::migrate!("./migrations/postgres")
                    .run(&writer)
                    .await
                    .map_err(migrate_err)?;
                Store {
                    backend: Backend::Postgres,
                    writer,
                    maint: pool(1).await.map_err(open_err)?,
                    reader: pool(8).await.map_err(open_err)?,
                }
            }
        };
        Ok(store)
    }

    /// Starts a write transaction that excludes every other writer until
    /// it ends, so what it reads (e.g. the last commit id) cannot change
    /// before it commits, even with several ingestors on one database:
    /// SQLite's `BEGIN IMMEDIATE` takes the write lock; on PostgreSQL a
    /// transaction-scoped advisory lock does the same.
    pub async fn begin(&self) -> Result<WriteTx, StoreError> {
        match self.backend {
            Backend::Sqlite => Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?),
            Backend::Postgres => {
                let mut tx = self.writer.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PG_WRITE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            }
        }
    }

    /// Copies committed WAL frames into the SQLite file (PostgreSQL
    /// manages its own WAL: nothing to do). Normally a PASSIVE checkpoint,
    /// which never blocks the writer or readers; when the WAL has grown past
    /// `max_wal_pages` (the writer never paused long enough for it to be
    /// reset) a TRUNCATE checkpoint briefly waits for the writer and shrinks
    /// the file, so the WAL cannot fill the disk.
    pub async fn checkpoint(&self, max_wal_pages: i64) -> Result<(), StoreError> {
        if self.backend != Backend::Sqlite {
            return Ok(());
        }
        let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&self.maint)
            .await?;
        let log: i64 = row.try_get(1)?;
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
    pub fn reader(&self) -> &AnyPool {
        &self.reader
    }
}

/// Takes an exclusive lock on `{path}-lock`, held until the file is
/// dropped.
async fn lock_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push("-lock");
    tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&name)?;
        f.lock()?;
        Ok(f)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// A SQLite pool whose connections run the durability settings (and
/// `extra`) when they open.
async fn sqlite_pool(
    max: u32,
    opts: &AnyConnectOptions,
    extra: &'static str,
) -> Result<AnyPool, sqlx::Error> {
    AnyPoolOptions::new()
        .max_connections(max)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                // Acks promise durability (DESIGN.md §4): FULL costs 0-15 % here.
                let sql = format!(
                    "PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; {extra}"
                );
                conn.execute(sqlx::AssertSqlSafe(sql)).await?;
                Ok(())
            })
        })
        .connect_with(opts.clone())
        .await
}

/// A parenthesised list of `n` parameters: `(?, ?, …)` on SQLite, `($first,
/// $first+1, …)` on PostgreSQL. Long statements (the rollup upserts bind
/// thousands of values) must not use `$N` on SQLite: binding looks each
/// named parameter up by walking the list of names, so `$N` costs O(n²)
/// per statement (it took a third of the server's CPU at 500k samples/s).
pub(crate) fn params(backend: Backend, first: usize, n: usize) -> String {
    let mut s = String::with_capacity(n * 4 + 2);
    s.push('(');
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        match backend {
            Backend::Sqlite => s.push('?'),
            Backend::Postgres => {
                let _ = write!(s, "${}", first + i);
            }
        }
    }
    s.push(')');
    s
}

impl Backend {
    /// The backend of a connection taken from a [`Store`]'s pools.
    pub fn of(conn: &AnyConnection) -> Backend {
        if conn.backend_name().eq_ignore_ascii_case("sqlite") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        }
    }
}

// ---- writes (inside the ingestor's transaction) ----

/// Returns the id of `key` on `device`, creating the series if new.
pub async fn upsert_series(
    conn: &mut AnyConnection,
    device: &str,
    key: &SeriesKey,
) -> Result<i64, StoreError> {
    let text = key.to_string();
    let labels = serde_json::to_string(&key.labels).unwrap_or_else(|_| "{}".into());
    let row = sqlx::query(
        "INSERT INTO series (device, key, name, labels) VALUES ($1, $2, $3, $4)
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
    conn: &mut AnyConnection,
    device: &str,
    session: &SessionId,
    local_id: u32,
) -> Result<Option<i64>, StoreError> {
    let row = sqlx::query(
        "SELECT series_id FROM session_series WHERE device = $1 AND session = $2 AND local_id = $3",
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
    conn: &mut AnyConnection,
    device: &str,
    session: &SessionId,
    local_id: u32,
    series_id: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO session_series (device, session, local_id, series_id) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(device)
    .bind(&session.0[..])
    .bind(local_id as i64)
    .bind(series_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The highest commit id stored so far (0 when none).
pub async fn max_commit_id(conn: &mut AnyConnection) -> Result<u64, StoreError> {
    let (max,): (Option<i64>,) = sqlx::query_as("SELECT MAX(commit_id) FROM batches")
        .fetch_one(&mut *conn)
        .await?;
    Ok(max.unwrap_or(0).max(0) as u64)
}

/// The canonical key of a series id, if it exists.
pub async fn series_key(
    conn: &mut AnyConnection,
    series_id: i64,
) -> Result<Option<String>, StoreError> {
    let row = sqlx::query("SELECT key FROM series WHERE id = $1")
        .bind(series_id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// A batch to append to the batch log.
pub struct BatchRow<'a> {
    /// Position in commit order (see migration 0004).
    pub commit_id: u64,
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
pub async fn insert_batch(conn: &mut AnyConnection, b: &BatchRow<'_>) -> Result<bool, StoreError> {
    let res = sqlx::query(
        // Only the idempotence key may conflict; a clash of commit ids is
        // an error that fails the transaction, never a silent skip.
        "INSERT INTO batches (device, session, seq, received_ms, min_ts, max_ts, samples, payload, commit_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (device, session, seq) DO NOTHING",
    )
    .bind(b.device)
    .bind(&b.session.0[..])
    .bind(b.seq as i64)
    .bind(b.received_ms)
    .bind(b.min_ts)
    .bind(b.max_ts)
    .bind(b.samples)
    .bind(b.payload)
    .bind(b.commit_id as i64)
    .execute(&mut *conn)
    .await?;
    Ok(res.rows_affected() == 1)
}

/// The stored ack watermark of a session, if the session is known.
pub async fn session_through(
    conn: &mut AnyConnection,
    device: &str,
    session: &SessionId,
) -> Result<Option<u64>, StoreError> {
    let row = sqlx::query("SELECT through FROM sessions WHERE device = $1 AND session = $2")
        .bind(device)
        .bind(&session.0[..])
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(|r| r.get::<i64, _>(0) as u64))
}

/// Stored seqs of a session above `through`, ascending.
pub async fn seqs_above(
    conn: &mut AnyConnection,
    device: &str,
    session: &SessionId,
    through: u64,
) -> Result<Vec<u64>, StoreError> {
    let rows = sqlx::query(
        "SELECT seq FROM batches WHERE device = $1 AND session = $2 AND seq > $3 ORDER BY seq",
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
    conn: &mut AnyConnection,
    device: &str,
    session: &SessionId,
    through: u64,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO sessions (device, session, through, started_ms) VALUES ($1, $2, $3, $4)
         ON CONFLICT (device, session) DO UPDATE SET through =
           CASE WHEN excluded.through > sessions.through THEN excluded.through ELSE sessions.through END",
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
    conn: &mut AnyConnection,
    device: &str,
    gap: &widgetry_proto::Gap,
    now_ms: i64,
) -> Result<Option<i64>, StoreError> {
    let (stored_batches, stored_samples): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), CAST(COALESCE(SUM(samples), 0) AS BIGINT) FROM batches
         WHERE device = $1 AND session = $2 AND seq BETWEEN $3 AND $4",
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
        "INSERT INTO gaps (device, session, from_seq, to_seq, batches, samples, from_ts, to_ts, reported_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
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
    conn: &mut AnyConnection,
    device: &str,
    session: &SessionId,
    seq: u64,
    idx: usize,
    event: &widgetry_proto::json::Event,
) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "INSERT INTO events (device, session, seq, idx, ts, name, body) VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT DO NOTHING",
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
    conn: &mut AnyConnection,
    device: &str,
    now_ms: i64,
    rejects: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO devices (device, first_seen_ms, last_seen_ms, rejects) VALUES ($1, $2, $3, $4)
         ON CONFLICT (device) DO UPDATE SET
           last_seen_ms = CASE WHEN excluded.last_seen_ms > devices.last_seen_ms
                          THEN excluded.last_seen_ms ELSE devices.last_seen_ms END,
           rejects = devices.rejects + excluded.rejects",
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
    conn: &mut AnyConnection,
    device: &str,
    status: &Status,
    now_ms: i64,
) -> Result<(), StoreError> {
    touch_device(conn, device, now_ms, 0).await?;
    sqlx::query(
        "UPDATE devices SET state = $1, session = COALESCE($2, session), agent = COALESCE($3, agent),
           host = COALESCE($4, host), status_ms = $5 WHERE device = $6",
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
                    d.rejects, COUNT(g.device), CAST(COALESCE(SUM(g.samples), 0) AS BIGINT)
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
            "SELECT ts, name, body FROM events WHERE device = $1 AND ts BETWEEN $2 AND $3
             ORDER BY ts, session, seq, idx LIMIT $4",
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

    /// The id of a device's series, if it exists.
    pub async fn series_id(
        &self,
        device: &str,
        key: &SeriesKey,
    ) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query("SELECT id FROM series WHERE device = $1 AND key = $2")
            .bind(device)
            .bind(key.to_string())
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Raw points of a device's series by key; `None` when it has no such
    /// series.
    pub async fn series_points(
        &self,
        device: &str,
        key: &SeriesKey,
        from: i64,
        to: i64,
    ) -> Result<Option<Vec<(i64, f64)>>, StoreError> {
        match self.series_id(device, key).await? {
            Some(id) => Ok(Some(self.points(device, id, from, to).await?)),
            None => Ok(None),
        }
    }

    /// Raw points of one series in `[from, to]` (ms), ascending by time,
    /// decoded from the batch log.
    pub async fn points(
        &self,
        device: &str,
        series_id: i64,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, f64)>, StoreError> {
        let series_id = u32::try_from(series_id)
            .map_err(|_| StoreError::Corrupt(format!("series id {series_id} exceeds u32")))?;
        let rows = sqlx::query(
            "SELECT payload FROM batches WHERE device = $1 AND max_ts >= $2 AND min_ts <= $3",
        )
        .bind(device)
        .bind(from)
        .bind(to)
        .fetch_all(&self.reader)
        .await?;
        let mut points = Vec::new();
        for r in &rows {
            let batch = decode_stored(r.get(0))?;
            for run in batch.points.iter().filter(|p| p.series_id == series_id) {
                for (ts, v) in run_points(run)? {
                    if (from..=to).contains(&ts) {
                        points.push((ts, v));
                    }
                }
            }
        }
        points.sort_by_key(|p| p.0);
        Ok(points)
    }

    /// Rollup rows of one series with `lo <= bucket < hi`, ascending.
    pub async fn rollups(
        &self,
        resolution: Resolution,
        series_id: i64,
        lo: i64,
        hi: i64,
    ) -> Result<Vec<(i64, Agg)>, StoreError> {
        // The table name comes from a closed enum, never from input.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT bucket, count, sum, min, max, last_ts, last FROM {}
             WHERE series_id = $1 AND bucket >= $2 AND bucket < $3 ORDER BY bucket",
            resolution.table()
        )))
        .bind(series_id)
        .bind(lo)
        .bind(hi)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    Agg {
                        count: r.get(1),
                        sum: r.get(2),
                        min: r.get(3),
                        max: r.get(4),
                        last_ts: r.get(5),
                        last: r.get(6),
                    },
                )
            })
            .collect())
    }

    /// The newest commit id (0 when nothing was committed).
    pub async fn last_commit_id(&self) -> Result<u64, StoreError> {
        let (max,): (Option<i64>,) = sqlx::query_as("SELECT MAX(commit_id) FROM batches")
            .fetch_one(&self.reader)
            .await?;
        Ok(max.unwrap_or(0).max(0) as u64)
    }

    /// Committed batches with `after < commit_id`, in commit order, at
    /// most `limit`; series ids are the `series` table's.
    pub async fn commits_after(
        &self,
        after: u64,
        limit: i64,
    ) -> Result<Vec<CommittedBatch>, StoreError> {
        let rows = sqlx::query(
            "SELECT commit_id, device, session, seq, payload FROM batches
             WHERE commit_id > $1 ORDER BY commit_id LIMIT $2",
        )
        .bind(after as i64)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let batch = decode_stored(r.get(4))?;
            let session: &[u8] = r.get(2);
            let mut runs = Vec::with_capacity(batch.points.len());
            for run in &batch.points {
                runs.push((run.series_id as i64, run_points(run)?));
            }
            out.push(CommittedBatch {
                commit_id: r.get::<i64, _>(0) as u64,
                device: r.get(1),
                session: SessionId::from_slice(session)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                seq: r.get::<i64, _>(3) as u64,
                runs,
            });
        }
        Ok(out)
    }

    /// Device and key of series ids (unknown ids are left out).
    pub async fn series_names(
        &self,
        ids: &[i64],
    ) -> Result<Vec<(i64, String, String)>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let sql = format!(
                "SELECT id, device, key FROM series WHERE id IN {}",
                params(self.backend, 1, chunk.len())
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(*id);
            }
            for r in q.fetch_all(&self.reader).await? {
                out.push((r.get(0), r.get(1), r.get(2)));
            }
        }
        Ok(out)
    }
}

/// A committed batch as read back for the live bridge.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedBatch {
    pub commit_id: u64,
    pub device: String,
    pub session: SessionId,
    pub seq: u64,
    /// (series id, points ascending by time).
    pub runs: Vec<(i64, Vec<(i64, f64)>)>,
}

fn decode_stored(payload: &[u8]) -> Result<pb::Batch, StoreError> {
    pb::Batch::decode(payload).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The `(ts, value)` pairs of one stored run.
fn run_points(run: &pb::Points) -> Result<Vec<(i64, f64)>, StoreError> {
    let values =
        widgetry_proto::decode_values(run).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let mut ts = 0i64;
    Ok(run
        .ts_delta_ms
        .iter()
        .zip(values)
        .map(|(d, v)| {
            ts = ts.wrapping_add(*d);
            (ts, v)
        })
        .collect())
}

/// One device of `GET /api/v1/fleet`: state, counters and the latest CPU
/// and memory with per-minute sparklines, all from one query each.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FleetDevice {
    pub device: String,
    pub state: String,
    pub last_seen: i64,
    pub agent: Option<String>,
    pub host: Option<String>,
    pub rejects: i64,
    pub gaps: i64,
    pub lost_samples: i64,
    pub series_count: i64,
    /// Latest `cpu.usage_pct`.
    pub cpu: Option<f64>,
    /// Latest `mem.used_bytes` / `mem.total_bytes` in percent.
    pub mem_pct: Option<f64>,
    /// Per-minute averages since `spark_from`.
    pub cpu_spark: Vec<(i64, f64)>,
    pub mem_spark: Vec<(i64, f64)>,
}

/// What a retention pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub batches: u64,
    pub events: u64,
    pub rollup_1m: u64,
    pub rollup_1h: u64,
}

/// Rows deleted per statement by retention, so the write lock is held
/// briefly and ingest is not stalled.
const PRUNE_CHUNK: i64 = 2000;

impl Store {
    /// The whole fleet with sparklines built from minute rollups since
    /// `spark_from` (ms).
    pub async fn fleet(&self, spark_from: i64) -> Result<Vec<FleetDevice>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.device, d.state, d.last_seen_ms, d.agent, d.host, d.rejects,
                    (SELECT COUNT(*) FROM gaps g WHERE g.device = d.device),
                    (SELECT CAST(COALESCE(SUM(g.samples), 0) AS BIGINT) FROM gaps g WHERE g.device = d.device),
                    (SELECT COUNT(*) FROM series s WHERE s.device = d.device)
             FROM devices d ORDER BY d.device",
        )
        .fetch_all(&self.reader)
        .await?;
        let mut out: Vec<FleetDevice> = rows
            .iter()
            .map(|r| FleetDevice {
                device: r.get(0),
                state: r.get(1),
                last_seen: r.get(2),
                agent: r.get(3),
                host: r.get(4),
                rejects: r.get(5),
                gaps: r.get(6),
                lost_samples: r.get(7),
                series_count: r.get(8),
                cpu: None,
                mem_pct: None,
                cpu_spark: Vec::new(),
                mem_spark: Vec::new(),
            })
            .collect();
        let rollups = sqlx::query(
            "SELECT s.device, s.key, r.bucket, r.sum / r.count, r.last
             FROM series s JOIN rollup_1m r ON r.series_id = s.id AND r.bucket >= $1
             WHERE s.key IN ('cpu.usage_pct', 'mem.used_bytes', 'mem.total_bytes')
             ORDER BY s.device, r.bucket",
        )
        .bind(spark_from)
        .fetch_all(&self.reader)
        .await?;
        // device → bucket → (cpu avg, used avg, total avg) and latest values.
        #[derive(Default)]
        struct Acc {
            cpu: Vec<(i64, f64)>,
            used: BTreeMap<i64, f64>,
            total: BTreeMap<i64, f64>,
            last_cpu: Option<f64>,
            last_used: Option<f64>,
            last_total: Option<f64>,
        }
        let mut acc: BTreeMap<String, Acc> = BTreeMap::new();
        for r in &rollups {
            let a = acc.entry(r.get(0)).or_default();
            let key: &str = r.get(1);
            let (bucket, avg, last): (i64, f64, f64) = (r.get(2), r.get(3), r.get(4));
            match key {
                "cpu.usage_pct" => {
                    a.cpu.push((bucket, avg));
                    a.last_cpu = Some(last);
                }
                "mem.used_bytes" => {
                    a.used.insert(bucket, avg);
                    a.last_used = Some(last);
                }
                _ => {
                    a.total.insert(bucket, avg);
                    a.last_total = Some(last);
                }
            }
        }
        let pct = |used: f64, total: f64| (total > 0.0).then(|| used / total * 100.0);
        for d in &mut out {
            if let Some(a) = acc.remove(&d.device) {
                d.cpu = a.last_cpu;
                d.mem_pct = a.last_used.zip(a.last_total).and_then(|(u, t)| pct(u, t));
                d.mem_spark = a
                    .used
                    .iter()
                    .filter_map(|(b, u)| a.total.get(b).and_then(|t| pct(*u, *t)).map(|p| (*b, p)))
                    .collect();
                d.cpu_spark = a.cpu;
            }
        }
        Ok(out)
    }

    /// Deletes raw batches and events older than `raw_before`, and rollup
    /// rows older than their cut-offs (ms; `None` keeps everything), in
    /// small chunks from the maintenance connection.
    pub async fn prune(
        &self,
        raw_before: Option<i64>,
        minute_before: Option<i64>,
        hour_before: Option<i64>,
    ) -> Result<Pruned, StoreError> {
        let mut p = Pruned::default();
        if let Some(cut) = raw_before {
            let devices: Vec<(String,)> = sqlx::query_as("SELECT device FROM devices")
                .fetch_all(&self.maint)
                .await?;
            for (device,) in &devices {
                p.batches += self
                    .delete_chunked(
                        "DELETE FROM batches WHERE (device, session, seq) IN
                           (SELECT device, session, seq FROM batches WHERE device = $1 AND max_ts < $2 LIMIT $3)",
                        device,
                        cut,
                    )
                    .await?;
                p.events += self
                    .delete_chunked(
                        "DELETE FROM events WHERE (device, session, seq, idx) IN
                           (SELECT device, session, seq, idx FROM events WHERE device = $1 AND ts < $2 LIMIT $3)",
                        device,
                        cut,
                    )
                    .await?;
            }
        }
        for (res, cut) in [
            (Resolution::Minute, minute_before),
            (Resolution::Hour, hour_before),
        ] {
            let Some(cut) = cut else { continue };
            let ids: Vec<(i64,)> = sqlx::query_as("SELECT id FROM series")
                .fetch_all(&self.maint)
                .await?;
            let sql = format!(
                "DELETE FROM {t} WHERE (series_id, bucket) IN
                   (SELECT series_id, bucket FROM {t} WHERE series_id = $1 AND bucket < $2 LIMIT $3)",
                t = res.table()
            );
            let mut n = 0;
            for (id,) in &ids {
                n += self.delete_chunked(&sql, id, cut).await?;
            }
            match res {
                Resolution::Minute => p.rollup_1m = n,
                Resolution::Hour => p.rollup_1h = n,
            }
        }
        Ok(p)
    }

    async fn delete_chunked<K>(&self, sql: &str, key: &K, cut: i64) -> Result<u64, StoreError>
    where
        K: Clone,
        K: for<'q> sqlx::Encode<'q, sqlx::Any> + sqlx::Type<sqlx::Any> + Send + 'static,
    {
        let mut total = 0;
        loop {
            // Callers pass fixed statements (table names from an enum).
            let n = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                .bind(key.clone())
                .bind(cut)
                .bind(PRUNE_CHUNK)
                .execute(&self.maint)
                .await?
                .rows_affected();
            total += n;
            if n < PRUNE_CHUNK as u64 {
                return Ok(total);
            }
        }
    }
}
