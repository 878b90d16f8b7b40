//! Retention: deletes raw batches, events and rollup rows past their
//! periods, in small chunks from the maintenance connection so the
//! ingestor's write lock is never held for long.

use super::rollup::Resolution;
use super::{Store, StoreError};

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
