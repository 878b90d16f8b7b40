//! The compactor (DESIGN.md §4 step 2): moves the samples of logged
//! batches into compressed per-series chunks (migration 0010) and deletes
//! those batches, all in one transaction, so a crash at any moment leaves
//! every sample in exactly one place: the log or a chunk.
//!
//! What it takes: a device's batches whose samples all lie in closed hours
//! (`max_ts` before the current hour, minus a grace period for stragglers),
//! and that every post-commit sink (the Graphite export's cursor) has
//! passed; the highest commit id removed is kept (`store_meta`), so commit
//! ids never restart when the log empties.
//! At most [`RUN_SAMPLES`] samples per transaction, so the write lock is
//! held briefly; the CPU work (decoding, sorting, encoding) happens before
//! the transaction begins.
//!
//! Chunk shape, from the codec benchmark (docs/BENCHMARKS.md): pcodec
//! loses 20–40 % at 300 points and ~3 % at 3,600, so chunks hold up to
//! [`CHUNK_POINTS`] points, cut at hour boundaries (no hour bucket is split
//! between two chunks of one run); a series' newest chunk smaller than
//! [`MERGE_BELOW`] is decoded and merged with the new points that follow
//! it, so a sparse series still ends up in chunks of thousands of points.
//!
//! Rollups: the ingestor counts every sample in `rollup_1m` and `rollup_1h`
//! as it arrives. For a sparse series (fewer than [`DENSE`] samples per
//! bucket on average) those rows cost more than the samples (~50 bytes
//! each), so when the rows of every bucket a chunk touches are made of
//! exactly the chunk's points, the compactor deletes them and clears the
//! chunk's bit in `rolled`; queries then aggregate that chunk's points on
//! the fly (`Store::rollups`), which costs no more than reading the rows
//! would (fewer than DENSE points per bucket). Otherwise the bit stays set,
//! and a merged chunk's points that a table did not count are added to it.
//! So every sample is counted once: by a rollup row or by its chunk.
//!
//! Idempotence: a compacted batch's key is gone from the log, so the
//! session's `compacted` watermark (every seq at or below it is stored or
//! settled) and `batch_keys` (compacted seqs above the watermark, and the
//! content-named batches of plain JSON clients) keep recognising
//! redeliveries (`write::stored_keys`).

use std::collections::{BTreeMap, HashMap};

use sqlx::{AnyConnection, Row};
use widgetry_codec::Codec;
use widgetry_proto::SessionId;

use super::read::{decode_stored, run_points};
use super::rollup::{Resolution, Rollups};
use super::{Store, StoreError, params};

/// Most points in one chunk (a bulk import's series, a fast series' hour).
/// Larger chunks compress better and waste less of SQLite's overflow
/// pages (half a page per chunk on average); decoding 32k points for a
/// query takes ~0.3 ms.
pub const CHUNK_POINTS: usize = 32_768;
/// A series' newest chunk with fewer points is merged with new points
/// that all come after it (decoded and encoded again). pcodec keeps
/// gaining well past an hour of 1 Hz data (agent day: 2.08 B/sample in
/// 3,600-point chunks, 1.91 in 32,768, 1.35 whole), so a 1 Hz series'
/// hourly chunks are merged up to 5 hours: each point is encoded ~3 times
/// in all, at ~14M points/s.
pub const MERGE_BELOW: i64 = 16_384;
/// Rollup rows summarising fewer samples than this on average are
/// replaced by the chunk itself.
pub const DENSE: usize = 16;
/// Most samples moved by one compaction transaction.
pub const RUN_SAMPLES: i64 = 262_144;
/// Most batches read for one transaction.
const RUN_BATCHES: i64 = 4_096;
/// How long after an hour ends its batches become eligible: samples of
/// that hour still in flight (batching, replays) land before it.
pub const GRACE_MS: i64 = 120_000;
const HOUR_MS: i64 = 3_600_000;

/// What compaction did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub batches: u64,
    pub samples: u64,
    pub chunks: u64,
    /// Chunks decoded and merged into a new one.
    pub merged: u64,
    /// Rollup rows replaced by chunks (sparse series).
    pub rollup_rows_dropped: u64,
    /// Transactions given up because the log changed under them
    /// (retention deleted a batch); retried at the next pass.
    pub conflicts: u64,
}

impl Compacted {
    fn add(&mut self, o: &Compacted) {
        self.batches += o.batches;
        self.samples += o.samples;
        self.chunks += o.chunks;
        self.merged += o.merged;
        self.rollup_rows_dropped += o.rollup_rows_dropped;
        self.conflicts += o.conflicts;
    }
}

/// `widgetry compact`: one pass over the whole database, with progress on
/// stderr; returns the summary line.
pub async fn run_command(
    db: &crate::config::Database,
    everything: bool,
) -> Result<String, StoreError> {
    let store = Store::open(db).await?;
    let started = std::time::Instant::now();
    let closed = if everything {
        i64::MAX
    } else {
        closed_before(widgetry_common::now_ms())
    };
    let mut last = std::time::Instant::now();
    let c = store
        .compact(i64::MIN..closed, &|| false, &mut |c| {
            if last.elapsed() >= std::time::Duration::from_secs(1) {
                last = std::time::Instant::now();
                eprintln!(
                    "compact: {} batches, {} samples into {} chunks so far",
                    c.batches, c.samples, c.chunks
                );
            }
        })
        .await?;
    store.close().await;
    Ok(format!(
        "compacted {} batches ({} samples) into {} chunks in {:.1} s; {} small chunks merged, {} rollup rows replaced by chunks{}",
        c.batches,
        c.samples,
        c.chunks,
        started.elapsed().as_secs_f64(),
        c.merged,
        c.rollup_rows_dropped,
        if c.conflicts > 0 {
            format!(
                "; {} steps met concurrent retention and were left for the next pass",
                c.conflicts
            )
        } else {
            String::new()
        }
    ))
}

/// The end of the last hour whose batches may be compacted at `now_ms`.
pub fn closed_before(now_ms: i64) -> i64 {
    let t = now_ms - GRACE_MS;
    t - t.rem_euclid(HOUR_MS)
}

/// One logged batch chosen for compaction.
struct Picked {
    session: SessionId,
    seq: u64,
    commit_id: Option<i64>,
    max_ts: i64,
}

/// The newest chunk of a series, when small enough to merge.
struct Tail {
    end_ts: i64,
    id: i64,
    rolled: i64,
    ts: Vec<i64>,
    values: Vec<f64>,
}

/// A chunk to write: its points ascending by time, each marked with the
/// resolutions that already count it (a bitmask like `rolled`).
struct Piece {
    series_id: i64,
    id: i64,
    ts: Vec<i64>,
    values: Vec<f64>,
    counted: Vec<u8>,
    data: Vec<u8>,
}

/// Everything one transaction will do, prepared outside it.
struct Plan {
    device: String,
    batches: Vec<Picked>,
    samples: u64,
    merged: Vec<(i64, i64, i64)>,
    pieces: Vec<Piece>,
}

impl Store {
    /// Compacts every device's batches whose newest sample lies in `span`
    /// (normally from the raw retention cut, since the pruner deletes older
    /// batches outright, to [`closed_before`] now), in transactions of at
    /// most [`RUN_SAMPLES`] samples, until none is left or `stop` says so.
    /// `progress` is called after each transaction.
    pub async fn compact(
        &self,
        span: std::ops::Range<i64>,
        stop: &(dyn Fn() -> bool + Sync),
        progress: &mut (dyn FnMut(&Compacted) + Send),
    ) -> Result<Compacted, StoreError> {
        let mut total = Compacted::default();
        let devices: Vec<(String,)> = sqlx::query_as("SELECT device FROM devices ORDER BY device")
            .fetch_all(&self.reader)
            .await?;
        for (device,) in devices {
            loop {
                if stop() {
                    return Ok(total);
                }
                let run = self.compact_device(&device, &span).await?;
                total.add(&run);
                if run.batches > 0 || run.conflicts > 0 {
                    progress(&total);
                }
                // A conflict is retried at the next pass, not in a loop.
                if run.batches == 0 || run.conflicts > 0 {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// One transaction's worth of one device's eligible batches.
    async fn compact_device(
        &self,
        device: &str,
        span: &std::ops::Range<i64>,
    ) -> Result<Compacted, StoreError> {
        let Some(plan) = self.plan_run(device, span).await? else {
            return Ok(Compacted::default());
        };
        let plan = tokio::task::spawn_blocking(move || encode(plan))
            .await
            .map_err(|e| StoreError::Corrupt(format!("compaction worker: {e}")))??;
        let mut tx = self.begin().await?;
        match apply(&mut tx, &plan).await? {
            Some(stats) => {
                tx.commit().await?;
                Ok(stats)
            }
            None => {
                tx.rollback().await?;
                Ok(Compacted {
                    conflicts: 1,
                    ..Compacted::default()
                })
            }
        }
    }

    /// Reads the batches of one run and the series' small newest chunks.
    /// Batches are immutable until deleted, so reading them outside the
    /// transaction is safe; [`apply`] checks that each is still there.
    async fn plan_run(
        &self,
        device: &str,
        span: &std::ops::Range<i64>,
    ) -> Result<Option<Plan>, StoreError> {
        let rows = sqlx::query(
            "SELECT session, seq, commit_id, samples, max_ts, payload FROM batches
             WHERE device = $1 AND max_ts >= $2 AND max_ts < $3
               AND (commit_id IS NULL
                 OR commit_id <= COALESCE((SELECT MIN(commit_id) FROM sink_cursors), commit_id))
             ORDER BY max_ts LIMIT $4",
        )
        .bind(device)
        .bind(span.start)
        .bind(span.end)
        .bind(RUN_BATCHES)
        .fetch_all(&self.reader)
        .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut batches = Vec::new();
        let mut samples = 0i64;
        let mut by_series: BTreeMap<i64, Vec<(i64, f64)>> = BTreeMap::new();
        for r in &rows {
            let n: i64 = r.get(3);
            if !batches.is_empty() && samples + n > RUN_SAMPLES {
                break;
            }
            samples += n;
            let session: &[u8] = r.get(0);
            batches.push(Picked {
                session: SessionId::from_slice(session)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                seq: r.get::<i64, _>(1) as u64,
                commit_id: r.get(2),
                max_ts: r.get(4),
            });
            let batch = decode_stored(r.get(5))?;
            for run in &batch.points {
                by_series
                    .entry(i64::from(run.series_id))
                    .or_default()
                    .extend(run_points(run)?);
            }
        }
        let run_id = batches
            .iter()
            .filter_map(|b| b.commit_id)
            .max()
            .unwrap_or(0)
            .max(0);
        let mut merged = Vec::new();
        let mut pieces = Vec::new();
        for (series_id, mut points) in by_series {
            if points.is_empty() {
                continue;
            }
            points.sort_by_key(|p| p.0);
            let first = points[0].0;
            let tail = self.small_tail(series_id, first).await?;
            let (mut ts, mut values, mut counted) = (Vec::new(), Vec::new(), Vec::new());
            if let Some(t) = tail {
                merged.push((series_id, t.end_ts, t.id));
                counted.extend(std::iter::repeat_n(t.rolled as u8, t.ts.len()));
                ts = t.ts;
                values = t.values;
            }
            counted.extend(std::iter::repeat_n(3u8, points.len()));
            for (t, v) in points {
                ts.push(t);
                values.push(v);
            }
            for (i, range) in cut(&ts).into_iter().enumerate() {
                let id = run_id
                    .checked_mul(1024)
                    .and_then(|x| x.checked_add(i as i64))
                    .ok_or_else(|| StoreError::Corrupt(format!("commit id {run_id} too large")))?;
                pieces.push(Piece {
                    series_id,
                    id,
                    ts: ts[range.clone()].to_vec(),
                    values: values[range.clone()].to_vec(),
                    counted: counted[range].to_vec(),
                    data: Vec::new(),
                });
            }
        }
        Ok(Some(Plan {
            device: device.to_string(),
            batches,
            samples: samples.max(0) as u64,
            merged,
            pieces,
        }))
    }

    /// The series' newest chunk, if it holds fewer than [`MERGE_BELOW`]
    /// points and ends before `first`.
    async fn small_tail(&self, series_id: i64, first: i64) -> Result<Option<Tail>, StoreError> {
        let row = sqlx::query(
            "SELECT end_ts, id, count, rolled, data FROM chunks WHERE series_id = $1
             ORDER BY end_ts DESC, id DESC LIMIT 1",
        )
        .bind(series_id)
        .fetch_optional(&self.reader)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let (end_ts, count): (i64, i64) = (r.get(0), r.get(2));
        if count >= MERGE_BELOW || end_ts >= first {
            return Ok(None);
        }
        let (ts, values) = decode_chunk(r.get(4))?;
        Ok(Some(Tail {
            end_ts,
            id: r.get(1),
            rolled: r.get(3),
            ts,
            values,
        }))
    }
}

/// Decodes a stored chunk.
pub(crate) fn decode_chunk(data: &[u8]) -> Result<(Vec<i64>, Vec<f64>), StoreError> {
    widgetry_codec::decode(data).map_err(|e| StoreError::Corrupt(format!("chunk: {e}")))
}

/// Splits ascending timestamps into ranges of at most [`CHUNK_POINTS`],
/// each cut moved back to the start of its hour when that leaves a
/// non-empty range (so an hour's points stay in one chunk).
fn cut(ts: &[i64]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while ts.len() - start > CHUNK_POINTS {
        let mut end = start + CHUNK_POINTS;
        let hour = Resolution::Hour.floor(ts[end]);
        let back = ts[start..end].partition_point(|t| *t < hour) + start;
        if back > start {
            end = back;
        }
        out.push(start..end);
        start = end;
    }
    out.push(start..ts.len());
    out
}

/// Encodes the plan's chunks (CPU only).
fn encode(mut plan: Plan) -> Result<Plan, StoreError> {
    for p in &mut plan.pieces {
        p.data = Codec::Pcodec
            .encode(&p.ts, &p.values)
            .map_err(|e| StoreError::Corrupt(format!("encoding a chunk: {e}")))?;
    }
    Ok(plan)
}

/// Writes one run inside `tx`; `None` when the log changed since it was
/// read (the caller rolls back).
async fn apply(conn: &mut AnyConnection, plan: &Plan) -> Result<Option<Compacted>, StoreError> {
    let mut stats = Compacted {
        batches: plan.batches.len() as u64,
        samples: plan.samples,
        chunks: plan.pieces.len() as u64,
        merged: plan.merged.len() as u64,
        ..Compacted::default()
    };
    for b in &plan.batches {
        let n = sqlx::query("DELETE FROM batches WHERE device = $1 AND session = $2 AND seq = $3")
            .bind(&plan.device)
            .bind(&b.session.0[..])
            .bind(b.seq as i64)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        if n != 1 {
            return Ok(None);
        }
    }
    for (series_id, end_ts, id) in &plan.merged {
        let n = sqlx::query("DELETE FROM chunks WHERE series_id = $1 AND end_ts = $2 AND id = $3")
            .bind(series_id)
            .bind(end_ts)
            .bind(id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        if n != 1 {
            return Ok(None);
        }
    }
    let mut readd = Rollups::default();
    for p in &plan.pieces {
        let mut rolled = 0;
        for res in Resolution::ALL {
            if let Some(dropped) = replace_rollups(conn, p, res).await? {
                stats.rollup_rows_dropped += dropped;
            } else {
                rolled |= res.bit();
                let bit = res.bit() as u8;
                for ((t, v), c) in p.ts.iter().zip(&p.values).zip(&p.counted) {
                    if c & bit == 0 {
                        readd.add_at(res, p.series_id, *t, *v);
                    }
                }
            }
        }
        sqlx::query(
            "INSERT INTO chunks (series_id, end_ts, id, start_ts, count, rolled, data)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(p.series_id)
        .bind(p.ts[p.ts.len() - 1])
        .bind(p.id)
        .bind(p.ts[0])
        .bind(p.ts.len() as i64)
        .bind(rolled)
        .bind(&p.data[..])
        .execute(&mut *conn)
        .await?;
    }
    readd.flush(conn).await?;
    // Keys the session watermarks will not cover.
    let mut through: HashMap<SessionId, u64> = HashMap::new();
    for b in &plan.batches {
        let t = match through.get(&b.session) {
            Some(t) => *t,
            None => {
                let t = super::write::session_through(conn, &plan.device, &b.session)
                    .await?
                    .unwrap_or(0);
                through.insert(b.session, t);
                t
            }
        };
        if b.seq > t {
            sqlx::query(
                "INSERT INTO batch_keys (device, session, seq, max_ts) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
            )
            .bind(&plan.device)
            .bind(&b.session.0[..])
            .bind(b.seq as i64)
            .bind(b.max_ts)
            .execute(&mut *conn)
            .await?;
        }
    }
    for (session, t) in &through {
        sqlx::query(
            "UPDATE sessions SET compacted = $1 WHERE device = $2 AND session = $3 AND compacted < $4",
        )
        .bind(*t as i64)
        .bind(&plan.device)
        .bind(&session.0[..])
        .bind(*t as i64)
        .execute(&mut *conn)
        .await?;
    }
    if let Some(max) = plan.batches.iter().filter_map(|b| b.commit_id).max() {
        raise_commit_floor(conn, max).await?;
    }
    Ok(Some(stats))
}

/// Records that commit ids up to `id` were removed from the log.
pub(crate) async fn raise_commit_floor(
    conn: &mut AnyConnection,
    id: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO store_meta (key, value) VALUES ('commit_floor', $1)
         ON CONFLICT (key) DO UPDATE SET value =
           CASE WHEN excluded.value > store_meta.value THEN excluded.value ELSE store_meta.value END",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// For a sparse piece whose every touched `res` bucket is made of exactly
/// its counted points, deletes those rows and returns how many; `None`
/// when the table must keep counting the piece.
async fn replace_rollups(
    conn: &mut AnyConnection,
    p: &Piece,
    res: Resolution,
) -> Result<Option<u64>, StoreError> {
    let bit = res.bit() as u8;
    // bucket → points of the piece the table counts.
    let mut expected: BTreeMap<i64, i64> = BTreeMap::new();
    for (t, c) in p.ts.iter().zip(&p.counted) {
        *expected.entry(res.floor(*t)).or_default() += i64::from(c & bit != 0);
    }
    if p.ts.len() >= DENSE * expected.len() {
        return Ok(None);
    }
    let (lo, hi) = (
        *expected.keys().next().unwrap_or(&0),
        *expected.keys().next_back().unwrap_or(&0),
    );
    // The table name comes from a closed enum, never from input.
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT bucket, count FROM {} WHERE series_id = $1 AND bucket >= $2 AND bucket <= $3",
        res.table()
    )))
    .bind(p.series_id)
    .bind(lo)
    .bind(hi)
    .fetch_all(&mut *conn)
    .await?;
    let mut found: BTreeMap<i64, i64> = BTreeMap::new();
    for r in &rows {
        found.insert(r.get(0), r.get(1));
    }
    for (bucket, n) in &expected {
        if found.get(bucket).copied().unwrap_or(0) != *n {
            return Ok(None);
        }
    }
    let doomed: Vec<i64> = expected
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(b, _)| *b)
        .collect();
    let backend = super::Backend::of(conn);
    let mut dropped = 0;
    for chunk in doomed.chunks(500) {
        // One placeholder style per statement: on SQLite `$1` is a named
        // parameter, and `?`s after it are numbered in a way that left the
        // last bucket of each statement unbound (seen as 1 row in 500 kept).
        let first = match backend {
            super::Backend::Sqlite => "?",
            super::Backend::Postgres => "$1",
        };
        let sql = format!(
            "DELETE FROM {} WHERE series_id = {first} AND bucket IN {}",
            res.table(),
            params(backend, 2, chunk.len())
        );
        // Only the table name (a closed enum) and placeholders are formatted in.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(p.series_id);
        for b in chunk {
            q = q.bind(*b);
        }
        dropped += q.execute(&mut *conn).await?.rows_affected();
    }
    Ok(Some(dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_keep_hours_whole_and_bound_the_size() {
        // 2 Hz for 20 hours: 144,000 points.
        let ts: Vec<i64> = (0..144_000).map(|i| i * 500).collect();
        let ranges = cut(&ts);
        assert!(ranges.iter().all(|r| r.len() <= CHUNK_POINTS));
        assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), ts.len());
        for r in &ranges[1..] {
            assert_eq!(ts[r.start] % HOUR_MS, 0, "cut at an hour: {r:?}");
        }
        // 10 kHz within one hour: cuts inside the hour, still bounded.
        let dense: Vec<i64> = (0..80_000).collect();
        let ranges = cut(&dense);
        assert_eq!(ranges.len(), 3);
        assert!(ranges.iter().all(|r| r.len() <= CHUNK_POINTS));
        assert_eq!(cut(&[5]), vec![0..1]);
    }

    #[test]
    fn closed_hours_leave_a_grace_period() {
        let h = HOUR_MS;
        assert_eq!(closed_before(10 * h + GRACE_MS + 1), 10 * h);
        assert_eq!(closed_before(10 * h + GRACE_MS - 1), 9 * h);
    }
}
