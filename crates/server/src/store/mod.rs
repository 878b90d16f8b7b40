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
                // A 64 MiB page cache for the writer: with SQLite's default
                // 2 MiB, the profile at 660k samples/s showed the writer
                // thread mostly in the kernel copying pages it had to read
                // again (`_copy_to_iter`, `filemap_get_read_batch`).
                let writer = sqlite_pool(
                    1,
                    &rw,
                    "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; PRAGMA cache_size = -65536;",
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
