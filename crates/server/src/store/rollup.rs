//! Per-minute and per-hour rollups (count, sum, min, max, last) of every
//! series, and how a time range is split into buckets that rollups can
//! answer.
//!
//! The ingestor accumulates rollups for the batches of one transaction in
//! memory ([`Rollups`]) and writes them with a few multi-row upserts just
//! before it commits, so rollups and batches can never disagree.

use std::collections::HashMap;

use sqlx::AnyConnection;

/// A rollup resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Minute,
    Hour,
}

impl Resolution {
    pub const ALL: [Resolution; 2] = [Resolution::Minute, Resolution::Hour];

    /// Width in ms.
    pub fn ms(self) -> i64 {
        match self {
            Resolution::Minute => 60_000,
            Resolution::Hour => 3_600_000,
        }
    }

    /// This resolution's bit in a chunk's `rolled` column (migration 0010).
    pub fn bit(self) -> i64 {
        match self {
            Resolution::Minute => 1,
            Resolution::Hour => 2,
        }
    }

    /// The table holding this resolution.
    pub fn table(self) -> &'static str {
        match self {
            Resolution::Minute => "rollup_1m",
            Resolution::Hour => "rollup_1h",
        }
    }

    /// Name used in API answers (`source`).
    pub fn label(self) -> &'static str {
        match self {
            Resolution::Minute => "1m",
            Resolution::Hour => "1h",
        }
    }

    /// Start of the bucket holding `ts`.
    pub fn floor(self, ts: i64) -> i64 {
        ts - ts.rem_euclid(self.ms())
    }
}

/// Summary of the samples of one series in one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agg {
    pub count: i64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub last_ts: i64,
    pub last: f64,
}

impl Agg {
    pub fn one(ts: i64, v: f64) -> Agg {
        Agg {
            count: 1,
            sum: v,
            min: v,
            max: v,
            last_ts: ts,
            last: v,
        }
    }

    /// Folds `other` into `self`.
    pub fn merge(&mut self, other: &Agg) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if other.last_ts >= self.last_ts {
            self.last_ts = other.last_ts;
            self.last = other.last;
        }
    }
}

/// Rollup deltas of one transaction, keyed by (series id, bucket start).
#[derive(Debug, Default)]
pub struct Rollups {
    minute: HashMap<(i64, i64), Agg>,
    hour: HashMap<(i64, i64), Agg>,
}

/// Rows per upsert statement (8 bound values each, far below SQLite's limit).
const ROWS_PER_STATEMENT: usize = 500;

impl Rollups {
    /// Adds one stored sample.
    pub fn add(&mut self, series_id: i64, ts: i64, v: f64) {
        let one = Agg::one(ts, v);
        self.minute
            .entry((series_id, Resolution::Minute.floor(ts)))
            .and_modify(|a| a.merge(&one))
            .or_insert(one);
        self.hour
            .entry((series_id, Resolution::Hour.floor(ts)))
            .and_modify(|a| a.merge(&one))
            .or_insert(one);
    }

    /// Adds one sample to one resolution only (the compactor re-counting a
    /// chunk whose points that table did not count).
    pub fn add_at(&mut self, res: Resolution, series_id: i64, ts: i64, v: f64) {
        let one = Agg::one(ts, v);
        let map = match res {
            Resolution::Minute => &mut self.minute,
            Resolution::Hour => &mut self.hour,
        };
        map.entry((series_id, res.floor(ts)))
            .and_modify(|a| a.merge(&one))
            .or_insert(one);
    }

    pub fn is_empty(&self) -> bool {
        self.minute.is_empty() && self.hour.is_empty()
    }

    /// Merges the deltas into the rollup tables (inside the caller's
    /// transaction) and clears them.
    pub async fn flush(&mut self, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        let backend = super::Backend::of(conn);
        for res in Resolution::ALL {
            let map = match res {
                Resolution::Minute => &mut self.minute,
                Resolution::Hour => &mut self.hour,
            };
            let rows: Vec<((i64, i64), Agg)> = map.drain().collect();
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let t = res.table();
                let values = super::rows(backend, chunk.len(), 8);
                // In an UPDATE every right-hand side sees the old row, so
                // `last` compares against the old last_ts. Written for both
                // SQLite and PostgreSQL (CASE instead of two-argument MIN).
                let sql = format!(
                    "INSERT INTO {t} (series_id, bucket, count, sum, min, max, last_ts, last) VALUES {}
                     ON CONFLICT (series_id, bucket) DO UPDATE SET
                       count = {t}.count + excluded.count,
                       sum = {t}.sum + excluded.sum,
                       min = CASE WHEN excluded.min < {t}.min THEN excluded.min ELSE {t}.min END,
                       max = CASE WHEN excluded.max > {t}.max THEN excluded.max ELSE {t}.max END,
                       last = CASE WHEN excluded.last_ts >= {t}.last_ts THEN excluded.last ELSE {t}.last END,
                       last_ts = CASE WHEN excluded.last_ts > {t}.last_ts THEN excluded.last_ts ELSE {t}.last_ts END",
                    values
                );
                // The table name comes from a closed enum, never from input.
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for ((series, bucket), a) in chunk {
                    q = q
                        .bind(*series)
                        .bind(*bucket)
                        .bind(a.count)
                        .bind(a.sum)
                        .bind(a.min)
                        .bind(a.max)
                        .bind(a.last_ts)
                        .bind(a.last);
                }
                q.execute(&mut *conn).await?;
            }
        }
        Ok(())
    }
}

/// How `GET /api/v1/series` answers a range: raw points, or buckets of
/// `width` ms starting at `origin`, built from rollups of `resolution`
/// where whole rollup buckets fit and from raw points at the edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub resolution: Option<Resolution>,
    /// First bucket start (a multiple of the resolution).
    pub origin: i64,
    /// Bucket width (a multiple of the resolution).
    pub width: i64,
}

impl Plan {
    /// Chooses buckets for `[from, to]` (inclusive, ms) so that at most
    /// `max_points` of them cover the range. Rollups are used once a bucket
    /// spans at least a whole minute (or hour).
    pub fn new(from: i64, to: i64, max_points: usize) -> Plan {
        let max = max_points.max(1) as i64;
        let span = (to - from).max(0) + 1;
        let raw_width = (span + max - 1) / max;
        let resolution = if raw_width >= Resolution::Hour.ms() {
            Some(Resolution::Hour)
        } else if raw_width >= Resolution::Minute.ms() {
            Some(Resolution::Minute)
        } else {
            None
        };
        match resolution {
            None => Plan {
                resolution,
                origin: from,
                width: raw_width.max(1),
            },
            Some(r) => {
                // Aligning the origin down to the resolution lengthens the
                // range by less than one resolution; round the width up to
                // a multiple of it so the buckets still number ≤ max.
                let origin = r.floor(from);
                let n = to - origin + 1;
                let w = (n + max - 1) / max;
                let width = (w + r.ms() - 1) / r.ms() * r.ms();
                Plan {
                    resolution,
                    origin,
                    width,
                }
            }
        }
    }

    /// Start of the bucket holding `ts`.
    pub fn bucket_of(&self, ts: i64) -> i64 {
        self.origin + (ts - self.origin).div_euclid(self.width) * self.width
    }

    /// The part of `[from, to]` made of whole rollup buckets:
    /// `[lo, hi)`, empty when `lo >= hi`. Outside it, raw points are used.
    pub fn rollup_span(&self, from: i64, to: i64) -> Option<(i64, i64)> {
        let r = self.resolution?;
        let lo = if r.floor(from) == from {
            from
        } else {
            r.floor(from) + r.ms()
        };
        let hi = r.floor(to + 1);
        (lo < hi).then_some((lo, hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_stay_within_max_points_and_align() {
        let day = 86_400_000i64;
        for (from, to, max) in [
            (1_000, 7 * day + 12_345, 1000usize),
            (59_999, 7 * day, 500),
            (1_700_000_012_345, 1_700_000_012_345 + 30 * day, 1),
            (0, 3_600_000 * 24, 24),
            (17, 17 + 600_000, 10),
            (5, 9_999, 100_000),
        ] {
            let p = Plan::new(from, to, max);
            let buckets = (p.bucket_of(to) - p.bucket_of(from)) / p.width + 1;
            assert!(
                buckets as usize <= max,
                "{from}..{to} max {max}: {buckets} buckets with {p:?}"
            );
            assert!(p.bucket_of(from) <= from && p.bucket_of(to) + p.width > to);
            if let Some(r) = p.resolution {
                assert_eq!(p.origin % r.ms(), 0, "{p:?}");
                assert_eq!(p.width % r.ms(), 0, "{p:?}");
            }
        }
        assert_eq!(
            Plan::new(0, 7 * day - 1, 1000).resolution,
            Some(Resolution::Minute)
        );
        assert_eq!(
            Plan::new(0, 365 * day, 1000).resolution,
            Some(Resolution::Hour)
        );
        assert_eq!(Plan::new(0, 3_600_000, 1000).resolution, None);
    }

    #[test]
    fn rollup_span_covers_only_whole_buckets() {
        let p = Plan::new(90_000, 86_400_000, 100);
        assert_eq!(p.resolution, Some(Resolution::Minute));
        assert_eq!(
            p.rollup_span(90_000, 86_400_000),
            Some((120_000, 86_400_000))
        );
        assert_eq!(p.rollup_span(120_000, 179_999), Some((120_000, 180_000)));
        assert_eq!(p.rollup_span(120_001, 179_998), None);
    }

    #[test]
    fn agg_merge_keeps_newest_last() {
        let mut a = Agg::one(10, 1.0);
        a.merge(&Agg::one(5, 7.0));
        a.merge(&Agg::one(20, -2.0));
        assert_eq!(
            a,
            Agg {
                count: 3,
                sum: 6.0,
                min: -2.0,
                max: 7.0,
                last_ts: 20,
                last: -2.0
            }
        );
    }
}
