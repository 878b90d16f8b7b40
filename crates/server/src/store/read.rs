//! Queries of the web service and the live bridge, on the reader pool.
//! Stored batches are decoded here; nothing in this file writes.

use prost::Message;
use serde::Serialize;
use sqlx::Row;
use widgetry_proto::{SeriesKey, SessionId, pb};

use std::collections::BTreeMap;

use super::params;
use super::rollup::{Agg, Resolution};
use super::{Backend, Store, StoreError};

/// A device as listed by `GET /api/v1/devices`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeviceInfo {
    pub device: String,
    /// The retained status (`online`, `offline`, `unknown` without one).
    pub state: String,
    /// `crate::presence`: filled in by the API from the fields below.
    pub presence: Option<crate::presence::Presence>,
    /// The learned cadence in ms (None until learned).
    pub interval_ms: Option<i64>,
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

/// What presence needs of a device (`crate::presence::run`).
pub struct PresenceRow {
    pub device: String,
    pub state: String,
    pub last_seen_ms: i64,
    pub interval_ms: Option<i64>,
}

impl Store {
    /// Every device's status, last arrival and cadence, in one query.
    pub async fn presence_rows(&self) -> Result<Vec<PresenceRow>, StoreError> {
        let rows = sqlx::query("SELECT device, state, last_seen_ms, interval_ms FROM devices")
            .fetch_all(&self.reader)
            .await?;
        Ok(rows
            .iter()
            .map(|r| PresenceRow {
                device: r.get(0),
                state: r.get(1),
                last_seen_ms: r.get(2),
                interval_ms: r.get(3),
            })
            .collect())
    }

    /// Answers when the database does (`GET /healthz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    /// Every device with its series, ordered by id.
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>, StoreError> {
        let sql = format!(
            "SELECT d.device, d.state, d.session, d.agent, d.host, d.first_seen_ms, d.last_seen_ms,
                    d.rejects, COUNT(g.device), {}, d.interval_ms
             FROM devices d LEFT JOIN gaps g ON g.device = d.device
             GROUP BY d.device ORDER BY d.device",
            saturating_sum(self.backend, "g.samples")
        );
        // Only `saturating_sum`'s fixed text is formatted in.
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
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
                interval_ms: r.get(10),
                presence: None,
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
        let mut conn = self.reader.acquire().await?;
        super::write::find_series(&mut conn, device, key).await
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

    /// A read transaction: every statement in it sees one snapshot, so a
    /// compaction committing meanwhile (which moves samples from the log
    /// into chunks and rollup rows into chunks) is seen whole or not at all.
    async fn snapshot(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        let begin = match self.backend {
            Backend::Sqlite => "BEGIN",
            Backend::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        };
        Ok(self.reader.begin_with(begin).await?)
    }

    /// Raw points of one series in `[from, to]` (ms), ascending by time,
    /// decoded from its chunks and the not yet compacted batch log.
    pub async fn points(
        &self,
        device: &str,
        series_id: i64,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, f64)>, StoreError> {
        let mut tx = self.snapshot().await?;
        let mut points = Vec::new();
        let chunks = sqlx::query(
            "SELECT data FROM chunks WHERE series_id = $1 AND end_ts >= $2 AND start_ts <= $3",
        )
        .bind(series_id)
        .bind(from)
        .bind(to)
        .fetch_all(&mut *tx)
        .await?;
        for r in &chunks {
            let (ts, values) = super::compact::decode_chunk(r.get(0))?;
            for (t, v) in ts.into_iter().zip(values) {
                if (from..=to).contains(&t) {
                    points.push((t, v));
                }
            }
        }
        points.extend(
            self.log_points(&mut tx, device, series_id, from, to)
                .await?,
        );
        tx.commit().await?;
        points.sort_by_key(|p| p.0);
        Ok(points)
    }

    /// Points of one series in `[from, to]` from the batch log.
    async fn log_points(
        &self,
        conn: &mut sqlx::AnyConnection,
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
        .fetch_all(&mut *conn)
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
        Ok(points)
    }

    /// Rollup buckets of one series with `lo <= bucket < hi`, ascending:
    /// the rollup table's rows, with the points of chunks that table does
    /// not count (sparse series, see `compact`) aggregated on the fly.
    pub async fn rollups(
        &self,
        resolution: Resolution,
        series_id: i64,
        lo: i64,
        hi: i64,
    ) -> Result<Vec<(i64, Agg)>, StoreError> {
        let mut tx = self.snapshot().await?;
        // The table name comes from a closed enum, never from input.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT bucket, count, sum, min, max, last_ts, last FROM {}
             WHERE series_id = $1 AND bucket >= $2 AND bucket < $3 ORDER BY bucket",
            resolution.table()
        )))
        .bind(series_id)
        .bind(lo)
        .bind(hi)
        .fetch_all(&mut *tx)
        .await?;
        let mut out: BTreeMap<i64, Agg> = rows
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
            .collect();
        let chunks = sqlx::query(
            "SELECT data FROM chunks WHERE series_id = $1 AND end_ts >= $2 AND start_ts < $3
               AND (rolled & $4) = 0",
        )
        .bind(series_id)
        .bind(lo)
        .bind(hi)
        .bind(resolution.bit())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        for r in &chunks {
            let (ts, values) = super::compact::decode_chunk(r.get(0))?;
            for (t, v) in ts.into_iter().zip(values) {
                if (lo..hi).contains(&t) {
                    let one = Agg::one(t, v);
                    out.entry(resolution.floor(t))
                        .and_modify(|a| a.merge(&one))
                        .or_insert(one);
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    /// The newest commit id (0 when nothing was committed).
    pub async fn last_commit_id(&self) -> Result<u64, StoreError> {
        let (max,): (Option<i64>,) = sqlx::query_as(super::write::MAX_COMMIT_SQL)
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

pub(crate) fn decode_stored(payload: &[u8]) -> Result<pb::Batch, StoreError> {
    pb::Batch::decode(payload).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The `(ts, value)` pairs of one stored run.
pub(crate) fn run_points(run: &pb::Points) -> Result<Vec<(i64, f64)>, StoreError> {
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
    /// The retained status (`online`, `offline`, `unknown` without one).
    pub state: String,
    /// `crate::presence`: filled in by the API.
    pub presence: Option<crate::presence::Presence>,
    /// The learned cadence in ms (None until learned).
    pub interval_ms: Option<i64>,
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

impl Store {
    /// The whole fleet with sparklines built from minute rollups since
    /// `spark_from` (ms).
    pub async fn fleet(&self, spark_from: i64) -> Result<Vec<FleetDevice>, StoreError> {
        let sql = format!(
            "SELECT d.device, d.state, d.last_seen_ms, d.agent, d.host, d.rejects,
                    (SELECT COUNT(*) FROM gaps g WHERE g.device = d.device),
                    (SELECT {} FROM gaps g WHERE g.device = d.device),
                    (SELECT COUNT(*) FROM series s WHERE s.device = d.device),
                    d.interval_ms
             FROM devices d ORDER BY d.device",
            saturating_sum(self.backend, "g.samples")
        );
        // Only `saturating_sum`'s fixed text is formatted in.
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
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
                interval_ms: r.get(9),
                presence: None,
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
}

/// SQL for the sum of a count column that saturates near `i64::MAX`
/// instead of failing the query with an integer overflow (a device's
/// claims cannot break a fleet-wide answer); 0 over no rows.
fn saturating_sum(backend: Backend, column: &str) -> String {
    match backend {
        // TOTAL is a float: it never overflows, and is 0.0 over no rows.
        Backend::Sqlite => format!("CAST(MIN(TOTAL({column}), 9.0e18) AS INTEGER)"),
        // SUM of BIGINT is NUMERIC: exact, no overflow.
        Backend::Postgres => {
            format!("CAST(LEAST(COALESCE(SUM({column}), 0), 9000000000000000000) AS BIGINT)")
        }
    }
}
