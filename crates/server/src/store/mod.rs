//! Storage through sqlx: SQLite (the default: one file, WAL,
//! `synchronous = FULL`) or PostgreSQL (`postgres://…`), behind sqlx's
//! `Any` driver so that every statement is written once. Opening runs the
//! backend's migrations; the ingestor's writes happen inside one
//! transaction; the web service reads.
//!
//! `write` holds the statements of the ingestor's transaction, `read`
//! the queries of the web service and the live bridge, `rollup` the
//! per-minute and per-hour aggregates (accumulated per transaction,
//! upserted with it, and the plan that picks a resolution for a range),
//! `retention` the chunked deletes.
//!
//! This module owns every SQL statement. It must never decide what to
//! acknowledge: callers commit, then ack. Statements use `$1`-style
//! parameters and SQL both backends accept (no `INSERT OR IGNORE`, no
//! two-argument `MAX`; aggregates cast to BIGINT because PostgreSQL's
//! `SUM(bigint)` is `numeric`).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Executor, Row, Transaction};

use crate::config::Database;

pub mod accounts;
pub mod alerts;
pub mod compact;
pub mod cursors;
pub mod read;
pub mod retained;
pub mod retention;
pub mod rollup;
pub mod write;

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
    /// Set by [`Store::checkpoint`] when the WAL should restart; the writer
    /// then checkpoints the rest between two transactions
    /// ([`Store::writer_checkpoint`]).
    wal_restart: Arc<AtomicBool>,
}

/// WAL size (bytes) past which the writer is asked to finish the
/// checkpoint itself so that the WAL restarts from its beginning.
const WAL_RESTART_BYTES: i64 = 64 << 20;
/// WAL size (bytes) past which the checkpoint task stops waiting for the
/// writer and runs a TRUNCATE checkpoint (a reader that holds an old
/// snapshot can keep the WAL from restarting).
const WAL_MAX_BYTES: i64 = 256 << 20;

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
                // No automatic checkpoints: one inside a commit stalls
                // ingest for its fsyncs. `checkpoint()` copies the WAL from
                // another connection (the ingestor's checkpoint task); the
                // writer only finishes what is left of it, between two
                // transactions, when the WAL should restart
                // (`writer_checkpoint()`).
                // A 64 MiB page cache for the writer: with SQLite's default
                // 2 MiB, the profile at 660k samples/s showed the writer
                // thread mostly in the kernel copying pages it had to read
                // again (`_copy_to_iter`, `filemap_get_read_batch`).
                let writer = sqlite_pool(
                    1,
                    &rw,
                    "PRAGMA page_size = 2048; PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; PRAGMA cache_size = -65536;",
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
                    wal_restart: Arc::default(),
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
                    wal_restart: Arc::default(),
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
    ///
    /// A failed begin closes the writer's connection and tries once more
    /// on a fresh one (see [`Store::reset_writer`]), so one bad transaction
    /// never wedges every later write.
    pub async fn begin(&self) -> Result<WriteTx, StoreError> {
        match self.begin_once().await {
            Ok(tx) => Ok(tx),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a write transaction; reopening the writer's connection");
                self.reset_writer().await;
                self.begin_once().await
            }
        }
    }

    async fn begin_once(&self) -> Result<WriteTx, StoreError> {
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

    /// Closes the writer's pooled connection, so the next begin opens a
    /// fresh one. When SQLite rolls a
    /// transaction back by itself (a full disk fails the COMMIT with
    /// SQLITE_FULL), sqlx's rollback at drop fails too and leaves the
    /// connection thinking it is still inside a transaction: every later
    /// `begin` would fail with "non-zero transaction depth", for good.
    async fn reset_writer(&self) {
        match self.writer.acquire().await {
            Ok(conn) => {
                if let Err(e) = conn.close().await {
                    tracing::debug!(error = %e, "closing the writer's connection");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the writer's connection to reset it")
            }
        }
    }

    /// Copies committed WAL frames into the SQLite file (PostgreSQL
    /// manages its own WAL: nothing to do), with a PASSIVE checkpoint,
    /// which never blocks the writer or readers.
    ///
    /// SQLite restarts the WAL from its beginning only when a write
    /// transaction starts while every frame has been copied. A writer that
    /// never pauses never sees that moment (it appends while this runs), so
    /// the WAL would grow without end. Once the WAL passes
    /// [`WAL_RESTART_BYTES`] this asks the writer to copy the few frames
    /// appended since ([`Store::writer_checkpoint`]), after which its next
    /// transaction restarts the WAL. Past [`WAL_MAX_BYTES`] (a reader
    /// holding an old snapshot kept it from restarting) a TRUNCATE
    /// checkpoint waits for the writer and shrinks the file, so the WAL
    /// cannot fill the disk. `force` always truncates (closing).
    pub async fn checkpoint(&self, force: bool) -> Result<(), StoreError> {
        if self.backend != Backend::Sqlite {
            return Ok(());
        }
        let passive = || async {
            let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&self.maint)
                .await?;
            row.try_get::<i64, _>(1)
        };
        let log = passive().await?;
        let page: i64 = sqlx::query_scalar("PRAGMA page_size")
            .fetch_one(&self.maint)
            .await?;
        let wal_bytes = log.saturating_mul(page);
        if wal_bytes > WAL_RESTART_BYTES && !self.wal_restart.load(Ordering::Relaxed) {
            // Once more for what the writer appended during that copy, so
            // that little is left for the writer.
            passive().await?;
            self.wal_restart.store(true, Ordering::Relaxed);
        }
        if force || wal_bytes > WAL_MAX_BYTES {
            if !force {
                tracing::warn!(
                    wal_bytes,
                    "the WAL has not restarted (a long-running reader?); truncating it, which pauses the writer"
                );
            }
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.maint)
                .await?;
        }
        Ok(())
    }

    /// Run by the writer between two transactions: when
    /// [`Store::checkpoint`] asked for it, copies the WAL frames it has not
    /// copied yet (about a second of writes) from the writer's own
    /// connection, so nothing is appended meanwhile and the next write
    /// transaction restarts the WAL. Tries again after the next
    /// transaction if the checkpoint task or a reader was in the way.
    pub async fn writer_checkpoint(&self) -> Result<(), StoreError> {
        if self.backend != Backend::Sqlite || !self.wal_restart.load(Ordering::Relaxed) {
            return Ok(());
        }
        let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&self.writer)
            .await?;
        let (busy, log, copied): (i64, i64, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        if busy == 0 && copied == log {
            self.wal_restart.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Closes the pools, waiting for in-flight statements, after a final
    /// checkpoint.
    pub async fn close(&self) {
        let _ = self.checkpoint(true).await;
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

/// `n` rows of `width` parameters each, comma-separated, for a multi-row
/// `VALUES` list (numbered from 1 on PostgreSQL; see [`params`]).
pub(crate) fn rows(backend: Backend, n: usize, width: usize) -> String {
    (0..n)
        .map(|i| params(backend, i * width + 1, width))
        .collect::<Vec<_>>()
        .join(", ")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages the WAL holds (the `log` column of a PASSIVE checkpoint).
    async fn wal_pages(store: &Store) -> i64 {
        let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&store.maint)
            .await
            .expect("checkpoint");
        row.try_get(1).expect("log")
    }

    async fn write_mib(store: &Store, mib: usize) {
        for _ in 0..mib {
            let mut tx = store.begin().await.expect("begin");
            sqlx::query("INSERT INTO scratch (b) VALUES (randomblob(1048576))")
                .execute(&mut *tx)
                .await
                .expect("insert");
            tx.commit().await.expect("commit");
        }
    }

    /// A writer that never pauses never lets SQLite restart the WAL by
    /// itself (frames it appends while the checkpoint task copies are left
    /// over; a reader's snapshot stands in for that race here): the
    /// checkpoint task's request plus the writer's own catch-up checkpoint
    /// must restart it, without a TRUNCATE.
    #[tokio::test]
    async fn a_busy_writer_restarts_the_wal_when_asked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&Database::Sqlite(dir.path().join("w.db")))
            .await
            .expect("open");
        sqlx::query("CREATE TABLE scratch (b BLOB)")
            .execute(&store.writer)
            .await
            .expect("table");
        write_mib(&store, (WAL_RESTART_BYTES >> 20) as usize + 4).await;
        store.writer_checkpoint().await.expect("not asked yet");
        let mut snapshot = store.reader.begin().await.expect("reader");
        sqlx::query("SELECT count(*) FROM scratch")
            .fetch_one(&mut *snapshot)
            .await
            .expect("read");
        write_mib(&store, 1).await;
        // Copies up to the reader's snapshot only, and asks the writer.
        store.checkpoint(false).await.expect("checkpoint");
        assert!(
            store.wal_restart.load(Ordering::Relaxed),
            "restart not requested"
        );
        snapshot.rollback().await.expect("end read");
        // Frames are left to copy: these writes cannot restart the WAL.
        write_mib(&store, 1).await;
        store.writer_checkpoint().await.expect("writer checkpoint");
        assert!(
            !store.wal_restart.load(Ordering::Relaxed),
            "request not cleared"
        );
        write_mib(&store, 1).await;
        let pages = wal_pages(&store).await;
        assert!(pages < 1_000, "the WAL did not restart: {pages} pages");
        store.close().await;
    }
}
