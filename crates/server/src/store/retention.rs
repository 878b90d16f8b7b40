//! Retention: deletes raw batches, chunks, events and rollup rows past
//! their periods, in small chunks from the maintenance connection so the
//! ingestor's write lock is never held for long. Retention drops whole
//! chunks (those ending before the cut); a chunk whose points a rollup
//! table does not count (a sparse series, see `compact`) is first counted
//! there, so the rollups keep their own, longer, retention.

use sqlx::Row;

use super::rollup::{Resolution, Rollups};
use super::{Store, StoreError};

/// What a retention pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub batches: u64,
    pub chunks: u64,
    pub events: u64,
    pub rollup_1m: u64,
    pub rollup_1h: u64,
}

/// Rows deleted per statement by retention, so the write lock is held
/// briefly and ingest is not stalled.
const PRUNE_CHUNK: i64 = 2000;

impl Store {
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
            let (floor,): (Option<i64>,) =
                sqlx::query_as("SELECT MAX(commit_id) FROM batches WHERE max_ts < $1")
                    .bind(cut)
                    .fetch_one(&self.maint)
                    .await?;
            if let Some(floor) = floor {
                let mut conn = self.maint.acquire().await?;
                super::compact::raise_commit_floor(&mut conn, floor).await?;
            }
            p.chunks += self.prune_chunks(cut).await?;
            loop {
                let n = sqlx::query(
                    "DELETE FROM batch_keys WHERE (device, session, seq) IN
                       (SELECT device, session, seq FROM batch_keys WHERE max_ts < $1 LIMIT $2)",
                )
                .bind(cut)
                .bind(PRUNE_CHUNK)
                .execute(&self.maint)
                .await?
                .rows_affected();
                if n < PRUNE_CHUNK as u64 {
                    break;
                }
            }
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

    /// Deletes the chunks ending before `cut`, a few per transaction,
    /// counting first in the rollup tables the points they do not count.
    async fn prune_chunks(&self, cut: i64) -> Result<u64, StoreError> {
        let ids: Vec<(i64,)> = sqlx::query_as("SELECT id FROM series")
            .fetch_all(&self.maint)
            .await?;
        let mut total = 0;
        for (series_id,) in ids {
            loop {
                let mut tx = self.begin().await?;
                let rows = sqlx::query(
                    "SELECT end_ts, id, rolled, data FROM chunks
                     WHERE series_id = $1 AND end_ts < $2 ORDER BY end_ts LIMIT 64",
                )
                .bind(series_id)
                .bind(cut)
                .fetch_all(&mut *tx)
                .await?;
                if rows.is_empty() {
                    tx.rollback().await?;
                    break;
                }
                let mut readd = Rollups::default();
                for r in &rows {
                    let rolled: i64 = r.get(2);
                    if rolled != Resolution::Minute.bit() | Resolution::Hour.bit() {
                        let (ts, values) = super::compact::decode_chunk(r.get(3))?;
                        for res in Resolution::ALL {
                            if rolled & res.bit() == 0 {
                                for (t, v) in ts.iter().zip(&values) {
                                    readd.add_at(res, series_id, *t, *v);
                                }
                            }
                        }
                    }
                    sqlx::query(
                        "DELETE FROM chunks WHERE series_id = $1 AND end_ts = $2 AND id = $3",
                    )
                    .bind(series_id)
                    .bind(r.get::<i64, _>(0))
                    .bind(r.get::<i64, _>(1))
                    .execute(&mut *tx)
                    .await?;
                }
                readd.flush(&mut tx).await?;
                tx.commit().await?;
                total += rows.len() as u64;
            }
        }
        Ok(total)
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
