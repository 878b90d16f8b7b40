//! The per-flush aggregator: metrics in, one sample per aggregate out at
//! each flush, everything held in between within one byte budget.
//!
//! Each flush emits, for a metric `x`:
//! - counter → `x.count` (sum, scaled by 1/rate) and `x.rate` (per second)
//! - gauge → `x` (kept across flushes, like statsd)
//! - timer → `x.count` (scaled by 1/rate), `x.sum`, `x.min`, `x.max`,
//!   `x.mean` and one `x.pNN` per configured percentile (default p50, p90,
//!   p99; nearest rank)
//! - set → `x.count` (distinct members)
//!
//! **Memory.** Every metric key, timer value and set member is charged to
//! the budget ([`Config::max_bytes`]) when it is admitted: the key's bytes
//! (name and labels, packed) plus a fixed cost per entry, 8 bytes per timer
//! value slot, a set member's bytes plus a fixed cost. The fixed costs are
//! what the hash tables and the allocator spend per entry in the worst case
//! (a table just after it doubled), so [`Aggregator::held_bytes`] bounds the
//! heap actually held (checked against a counting allocator in
//! `tests/heap.rs`), apart from the four tables' first buckets (under
//! 1 KiB). What would exceed the budget is dropped and counted in
//! [`Stats`]. A flush releases everything but the gauges, which stay charged
//! as long as they are kept. This type must never grow past its budget,
//! whatever the input.

use std::collections::{HashMap, HashSet};
use std::mem::{size_of, take};

use widgetry_proto::SeriesKey;

use crate::key::{Key, encoded_len};
use crate::parse::{BadLine, Kind, Metric, parse_packet};

/// The default budget: 1 MiB. It holds, for example, ~8,000 distinct
/// counters with 20-byte names and two short tags (131 bytes charged each),
/// or ~130,000 timer values per flush. The agent's RSS is ~2.5 MB without
/// statsd (docs/BENCHMARKS.md), so this caps what statsd adds to it.
pub const DEFAULT_MAX_BYTES: usize = 1 << 20;

/// How an [`Aggregator`] is bounded and what it emits.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Most bytes held between flushes (see the module doc for what is
    /// charged); default [`DEFAULT_MAX_BYTES`].
    pub max_bytes: usize,
    /// Timer percentiles to emit as `x.pNN`; default p50, p90, p99.
    pub percentiles: Vec<Percentile>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_bytes: DEFAULT_MAX_BYTES,
            percentiles: vec![Percentile(50.0), Percentile(90.0), Percentile(99.0)],
        }
    }
}

/// A timer percentile in (0, 100] with at most 3 decimals.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Percentile(f64);

/// A percentile outside (0, 100] or with more than 3 decimals.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("percentile {0}: use a number in (0, 100] with at most 3 decimals, such as 50, 99 or 99.9")]
pub struct PercentileError(pub f64);

impl Percentile {
    /// Checks `p`: in (0, 100], at most 3 decimals (so its suffix stays
    /// short enough for every name the parser keeps).
    pub fn new(p: f64) -> Result<Percentile, PercentileError> {
        let text = p.to_string();
        let decimals = text.split_once('.').map_or(0, |(_, d)| d.len());
        if p > 0.0 && p <= 100.0 && decimals <= 3 {
            Ok(Percentile(p))
        } else {
            Err(PercentileError(p))
        }
    }

    /// The percentile, in (0, 100].
    pub fn value(self) -> f64 {
        self.0
    }

    /// The series suffix: `p50`, `p99`, `p99_9`.
    pub fn suffix(self) -> String {
        format!("p{}", self.0).replace('.', "_")
    }
}

/// Why a metric or value was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dropped {
    /// A new metric (its key and first value or member) would exceed the budget.
    BudgetMetric,
    /// A timer value of a held metric would exceed the budget (the timer's
    /// `count` still includes it).
    BudgetTimerValue,
    /// A new member of a held set would exceed the budget.
    BudgetSetMember,
    /// The value is not finite, or it would make a counter, a gauge, a
    /// timer's count or sum, or an emitted aggregate non-finite (which the
    /// server would reject with the whole batch).
    NotFinite,
}

impl Dropped {
    /// Every reason, in the order of their counters.
    pub const ALL: [Dropped; 4] = [
        Dropped::BudgetMetric,
        Dropped::BudgetTimerValue,
        Dropped::BudgetSetMember,
        Dropped::NotFinite,
    ];

    /// Stable, machine-readable reason label.
    pub fn code(self) -> &'static str {
        match self {
            Dropped::BudgetMetric => "budget_metric",
            Dropped::BudgetTimerValue => "budget_timer_value",
            Dropped::BudgetSetMember => "budget_set_member",
            Dropped::NotFinite => "not_finite",
        }
    }
}

/// What went wrong since the aggregator was made (never reset, so they can
/// be exposed as Prometheus counters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    bad_lines: [u64; BadLine::ALL.len()],
    dropped: [u64; Dropped::ALL.len()],
}

impl Stats {
    /// Lines skipped for `reason`.
    pub fn bad_lines(&self, reason: BadLine) -> u64 {
        self.bad_lines[reason as usize]
    }

    /// Metrics, values or members dropped for `reason`.
    pub fn dropped(&self, reason: Dropped) -> u64 {
        self.dropped[reason as usize]
    }

    /// Lines skipped, all reasons.
    pub fn bad_lines_total(&self) -> u64 {
        self.bad_lines.iter().sum()
    }

    /// Drops, all reasons.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }

    fn count_drop(&mut self, reason: Dropped) -> Result<(), Dropped> {
        self.dropped[reason as usize] += 1;
        Err(reason)
    }
}

/// Bytes charged per heap block besides its contents: glibc's malloc keeps
/// an 8-byte header and rounds blocks to 16 bytes.
const BLOCK: usize = 16;

/// The most one entry of a hash table with `slot`-byte slots costs: the
/// slot and its control byte at the lowest load hashbrown leaves (7/16,
/// just after doubling from 7/8 full), rounded up.
const fn table_entry(slot: usize) -> usize {
    (slot + 1) * 16 / 7 + 1
}

/// A set's members; `Box<str>` holds exactly the member's bytes.
type Members = HashSet<Box<str>>;

/// A timer's observations in the current interval.
#[derive(Debug, Default)]
struct Timer {
    /// Kept values; their capacity is charged, 8 bytes a slot.
    values: Vec<f64>,
    /// Observations scaled by 1/rate, dropped values included.
    count: f64,
    /// Sum of the kept values (to refuse a value that would overflow it).
    sum: f64,
}

/// Charged per counter or gauge besides its key's bytes.
const SCALAR_COST: usize = table_entry(size_of::<(Key, f64)>()) + BLOCK;
/// Charged per timer besides its key's bytes and its values' slots.
const TIMER_COST: usize = table_entry(size_of::<(Key, Timer)>()) + 2 * BLOCK;
/// A set's smallest member table: 4 buckets and a 16-byte control group.
const SET_TABLE: usize = 4 * (size_of::<Box<str>>() + 1) + 16 + BLOCK;
/// Charged per set besides its key's and its members' bytes.
const SET_COST: usize = table_entry(size_of::<(Key, Members)>()) + BLOCK + SET_TABLE;
/// Charged per set member besides its bytes.
const MEMBER_COST: usize = table_entry(size_of::<Box<str>>()) + BLOCK;
/// Timer value slots reserved at first, as `Vec` does for 8-byte items.
const FIRST_VALUES: usize = 4;

/// Bytes held against bytes allowed.
#[derive(Debug)]
struct Budget {
    max: usize,
    held: usize,
}

impl Budget {
    fn left(&self) -> usize {
        self.max.saturating_sub(self.held)
    }

    fn fits(&self, bytes: usize) -> bool {
        bytes <= self.left()
    }

    fn charge(&mut self, bytes: usize) {
        self.held += bytes;
    }
}

/// Sets a held scalar to `new`, unless `new` is not finite.
fn update(slot: &mut f64, new: f64, stats: &mut Stats) -> Result<(), Dropped> {
    if !new.is_finite() {
        return stats.count_drop(Dropped::NotFinite);
    }
    *slot = new;
    Ok(())
}

/// Admits a new metric whose first value is `finite`: charges its `cost` if
/// `cost + then` bytes fit (`then`: what its first value or member will be
/// charged next), or counts why not.
fn admit(
    budget: &mut Budget,
    stats: &mut Stats,
    finite: bool,
    cost: usize,
    then: usize,
) -> Result<(), Dropped> {
    if !finite {
        return stats.count_drop(Dropped::NotFinite);
    }
    if !budget.fits(cost + then) {
        return stats.count_drop(Dropped::BudgetMetric);
    }
    budget.charge(cost);
    Ok(())
}

/// Records one timer observation; the value is kept if the budget allows.
fn observe(
    t: &mut Timer,
    v: f64,
    rate: f64,
    budget: &mut Budget,
    stats: &mut Stats,
) -> Result<(), Dropped> {
    let (count, sum) = (t.count + 1.0 / rate, t.sum + v);
    if !(count.is_finite() && sum.is_finite()) {
        return stats.count_drop(Dropped::NotFinite);
    }
    t.count = count;
    if t.values.len() == t.values.capacity() {
        // Grow as `Vec` would (doubling), but only as far as the budget
        // allows, and charge what is allocated.
        let more = t.values.capacity().max(FIRST_VALUES).min(budget.left() / 8);
        if more == 0 {
            return stats.count_drop(Dropped::BudgetTimerValue);
        }
        let before = t.values.capacity();
        t.values.reserve_exact(more);
        budget.charge((t.values.capacity() - before) * 8);
    }
    t.values.push(v);
    t.sum = sum;
    Ok(())
}

/// Adds a member to a held set if it is new and the budget allows.
fn add_member(
    s: &mut Members,
    member: String,
    budget: &mut Budget,
    stats: &mut Stats,
) -> Result<(), Dropped> {
    if s.contains(member.as_str()) {
        return Ok(());
    }
    let cost = MEMBER_COST + member.len();
    if !budget.fits(cost) {
        return stats.count_drop(Dropped::BudgetSetMember);
    }
    budget.charge(cost);
    s.insert(member.into_boxed_str());
    Ok(())
}

/// Aggregates metrics between flushes, within one byte budget.
#[derive(Debug)]
pub struct Aggregator {
    counters: HashMap<Key, f64>,
    gauges: HashMap<Key, f64>,
    timers: HashMap<Key, Timer>,
    sets: HashMap<Key, Members>,
    /// Sorted, without duplicates, with their suffixes.
    percentiles: Vec<(f64, String)>,
    budget: Budget,
    /// Part of `budget.held` charged for gauges (kept across flushes).
    gauge_bytes: usize,
    stats: Stats,
}

impl Default for Aggregator {
    fn default() -> Self {
        Aggregator::new(Config::default())
    }
}

impl Aggregator {
    /// An empty aggregator.
    pub fn new(config: Config) -> Self {
        let mut percentiles = config.percentiles;
        percentiles.sort_by(|a, b| a.0.total_cmp(&b.0));
        percentiles.dedup();
        Aggregator {
            counters: HashMap::new(),
            gauges: HashMap::new(),
            timers: HashMap::new(),
            sets: HashMap::new(),
            percentiles: percentiles.iter().map(|p| (p.0, p.suffix())).collect(),
            budget: Budget {
                max: config.max_bytes,
                held: 0,
            },
            gauge_bytes: 0,
            stats: Stats::default(),
        }
    }

    /// The budget, in bytes.
    pub fn max_bytes(&self) -> usize {
        self.budget.max
    }

    /// Bytes charged for what is held now (at most [`Self::max_bytes`]).
    pub fn held_bytes(&self) -> usize {
        self.budget.held
    }

    /// Bad lines and drops so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Feeds a whole packet; bad lines and drops are counted in [`Stats`].
    pub fn ingest(&mut self, packet: &[u8]) {
        for m in parse_packet(packet) {
            match m {
                // A drop is counted by `add`.
                Ok(m) => {
                    let _ = self.add(m);
                }
                Err(e) => self.stats.bad_lines[e.reason as usize] += 1,
            }
        }
    }

    /// Adds one metric, or drops it (counted in [`Stats`]) and says why.
    pub fn add(&mut self, m: Metric) -> Result<(), Dropped> {
        let key_bytes = encoded_len(&m.key);
        let key = Key::new(&m.key);
        let budget = &mut self.budget;
        let stats = &mut self.stats;
        // Each arm updates a held metric, or checks a new one before it
        // touches the map (`entry` would reserve room even for a drop).
        match m.kind {
            Kind::Counter(v) => {
                let add = v / m.rate;
                if let Some(sum) = self.counters.get_mut(&key) {
                    return update(sum, *sum + add, stats);
                }
                admit(budget, stats, add.is_finite(), SCALAR_COST + key_bytes, 0)?;
                self.counters.insert(key, add);
            }
            Kind::Gauge(v) | Kind::GaugeDelta(v) => {
                if let Some(g) = self.gauges.get_mut(&key) {
                    let new = match m.kind {
                        Kind::GaugeDelta(_) => *g + v,
                        _ => v,
                    };
                    return update(g, new, stats);
                }
                admit(budget, stats, v.is_finite(), SCALAR_COST + key_bytes, 0)?;
                self.gauge_bytes += SCALAR_COST + key_bytes;
                self.gauges.insert(key, v);
            }
            Kind::Timer(v) => {
                if let Some(t) = self.timers.get_mut(&key) {
                    return observe(t, v, m.rate, budget, stats);
                }
                // Room for the key and one value, so `observe` cannot fail
                // and leave an empty timer behind.
                let finite = v.is_finite() && (1.0 / m.rate).is_finite();
                admit(budget, stats, finite, TIMER_COST + key_bytes, 8)?;
                observe(
                    self.timers.entry(key).or_default(),
                    v,
                    m.rate,
                    budget,
                    stats,
                )?;
            }
            Kind::Set(member) => {
                if let Some(s) = self.sets.get_mut(&key) {
                    return add_member(s, member, budget, stats);
                }
                let first = MEMBER_COST + member.len();
                admit(budget, stats, true, SET_COST + key_bytes, first)?;
                add_member(self.sets.entry(key).or_default(), member, budget, stats)?;
            }
        }
        Ok(())
    }

    /// Emits the aggregates of the interval that lasted `interval_secs`,
    /// then releases everything but the gauges. An aggregate that is not
    /// finite is skipped and counted as [`Dropped::NotFinite`].
    pub fn flush(&mut self, interval_secs: f64, mut emit: impl FnMut(SeriesKey, f64)) {
        let stats = &mut self.stats;
        let mut emit = |key: SeriesKey, value: f64| {
            if value.is_finite() {
                emit(key, value);
            } else {
                let _ = stats.count_drop(Dropped::NotFinite);
            }
        };
        let suffixed = |key: &SeriesKey, suffix: &str| SeriesKey {
            name: format!("{}.{suffix}", key.name),
            labels: key.labels.clone(),
        };
        // `take` rather than `drain`: a drained table keeps its capacity,
        // which the budget no longer covers.
        for (key, sum) in take(&mut self.counters) {
            let key = key.to_series_key();
            emit(suffixed(&key, "count"), sum);
            emit(suffixed(&key, "rate"), sum / interval_secs.max(1e-9));
        }
        for (key, v) in &self.gauges {
            emit(key.to_series_key(), *v);
        }
        for (key, mut t) in take(&mut self.timers) {
            if t.values.is_empty() {
                continue;
            }
            let key = key.to_series_key();
            t.values.sort_by(f64::total_cmp);
            let n = t.values.len();
            let sum: f64 = t.values.iter().sum();
            // Nearest-rank percentile. `p * n / 100` rather than
            // `p / 100 * n`: 99.9 / 100 * 1000 is 999.0000000000001, rank 1000.
            let pct = |p: f64| t.values[((p * n as f64 / 100.0).ceil() as usize).clamp(1, n) - 1];
            emit(suffixed(&key, "count"), t.count);
            emit(suffixed(&key, "sum"), sum);
            emit(suffixed(&key, "min"), t.values[0]);
            emit(suffixed(&key, "max"), t.values[n - 1]);
            emit(suffixed(&key, "mean"), sum / n as f64);
            for (p, suffix) in &self.percentiles {
                emit(suffixed(&key, suffix), pct(*p));
            }
        }
        for (key, members) in take(&mut self.sets) {
            emit(
                suffixed(&key.to_series_key(), "count"),
                members.len() as f64,
            );
        }
        self.budget.held = self.gauge_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn with_budget(max_bytes: usize) -> Aggregator {
        Aggregator::new(Config {
            max_bytes,
            ..Config::default()
        })
    }

    fn flush_all(a: &mut Aggregator, secs: f64) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        a.flush(secs, |k, v| {
            assert!(out.insert(k.to_string(), v).is_none(), "{k} emitted twice");
        });
        out
    }

    fn flushed(packets: &[&str], secs: f64) -> BTreeMap<String, f64> {
        let mut a = Aggregator::default();
        for p in packets {
            a.ingest(p.as_bytes());
        }
        flush_all(&mut a, secs)
    }

    fn key_bytes(text: &str) -> usize {
        encoded_len(&SeriesKey::parse(text).expect("valid key"))
    }

    #[test]
    fn aggregates_one_flush() {
        let out = flushed(
            &[
                "gorets:1|c\ngorets:1|c|@0.1\ngorets:3|c",
                "gaugor:333|g\ngaugor:-10|g\ngaugor:+4|g",
                "uniques:765|s\nuniques:765|s\nuniques:766|s",
                "glork:320|ms\nglork:100|ms\nglork:200|ms|@0.5",
                "not a metric\nalso:bad",
            ],
            10.0,
        );
        assert_eq!(out["gorets.count"], 14.0, "1 + 1/0.1 + 3");
        assert_eq!(out["gorets.rate"], 1.4);
        assert_eq!(out["gaugor"], 327.0);
        assert_eq!(out["uniques.count"], 2.0);
        assert_eq!(out["glork.count"], 4.0, "1 + 1 + 1/0.5");
        assert_eq!(out["glork.min"], 100.0);
        assert_eq!(out["glork.max"], 320.0);
        assert_eq!(out["glork.mean"], 620.0 / 3.0);
        assert_eq!(out["glork.p50"], 200.0);
        assert_eq!(out["glork.p90"], 320.0);
        assert_eq!(out["glork.p99"], 320.0);
        assert_eq!(out["glork.sum"], 620.0);
        assert_eq!(out.len(), 12, "exactly these series: {out:?}");
    }

    #[test]
    fn tags_become_labels_of_every_aggregate() {
        let out = flushed(&["t:5|ms|#env:prod\nt:7|ms|#env:prod\nt:1|ms"], 1.0);
        assert_eq!(out["t.max{env=prod}"], 7.0);
        assert_eq!(out["t.count{env=prod}"], 2.0);
        assert_eq!(out["t.max"], 1.0, "untagged is another series");
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let packets: Vec<String> = (1..=100).map(|i| format!("t:{i}|ms")).collect();
        let refs: Vec<&str> = packets.iter().map(String::as_str).collect();
        let out = flushed(&refs, 1.0);
        assert_eq!(
            (out["t.p50"], out["t.p90"], out["t.p99"]),
            (50.0, 90.0, 99.0)
        );
    }

    #[test]
    fn percentiles_are_configurable() {
        let percentiles = [99.9, 25.0, 100.0, 25.0]
            .into_iter()
            .map(Percentile::new)
            .collect::<Result<Vec<_>, _>>()
            .expect("valid percentiles");
        let mut a = Aggregator::new(Config {
            percentiles,
            ..Config::default()
        });
        for i in 1..=1000 {
            a.ingest(format!("t:{i}|ms").as_bytes());
        }
        let out = flush_all(&mut a, 1.0);
        let pcts: BTreeMap<_, _> = out.iter().filter(|(k, _)| k.starts_with("t.p")).collect();
        assert_eq!(
            pcts,
            BTreeMap::from([
                (&"t.p100".to_string(), &1000.0),
                (&"t.p25".to_string(), &250.0),
                (&"t.p99_9".to_string(), &999.0),
            ])
        );
        for bad in [0.0, -1.0, 100.5, f64::NAN, f64::INFINITY, 99.9999, 1e-7] {
            let err = Percentile::new(bad).expect_err("out of range or too precise");
            assert_eq!(err.0.to_bits(), bad.to_bits(), "{bad}");
        }
        assert_eq!(
            Percentile::new(99.999).map(Percentile::suffix),
            Ok("p99_999".into())
        );
    }

    #[test]
    fn gauges_persist_and_the_rest_resets() {
        let mut a = Aggregator::default();
        a.ingest(b"g:5|g\nc:1|c\nt:1|ms\ns:a|s");
        flush_all(&mut a, 1.0);
        let second = flush_all(&mut a, 1.0);
        assert_eq!(second, BTreeMap::from([("g".to_string(), 5.0)]));
    }

    #[test]
    fn reason_codes_are_distinct_and_indexed_in_order() {
        for (i, r) in Dropped::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, r) in BadLine::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        let codes: HashSet<_> = Dropped::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), Dropped::ALL.len());
    }

    #[test]
    fn bad_lines_are_counted_by_reason() {
        let mut a = Aggregator::default();
        a.ingest(b"nocolon\nalso-none\n:1|c\na:x|c\na:1|zz\na:1|c|@2\nok:1|c");
        let s = a.stats();
        assert_eq!(s.bad_lines(BadLine::MissingColon), 2);
        assert_eq!(s.bad_lines(BadLine::EmptyName), 1);
        assert_eq!(s.bad_lines(BadLine::NotANumber), 1);
        assert_eq!(s.bad_lines(BadLine::UnknownType), 1);
        assert_eq!(s.bad_lines(BadLine::RateOutOfRange), 1);
        assert_eq!((s.bad_lines_total(), s.dropped_total()), (6, 0));
    }

    #[test]
    fn overflowing_values_are_dropped_not_emitted() {
        let mut a = Aggregator::default();
        // Counter sum, gauge delta, a rate that makes 1/rate infinite, timer sum.
        a.ingest(b"c:1e308|c\nc:1e308|c\ng:1e308|g\ng:+1e308|g\nr:1|c|@5e-324\n");
        a.ingest(b"t:1e308|ms\nt:1e308|ms\nt:1|ms|@5e-324");
        let huge = Metric {
            key: SeriesKey::plain("n"),
            kind: Kind::Timer(f64::NAN),
            rate: 1.0,
        };
        assert_eq!(a.add(huge), Err(Dropped::NotFinite));
        assert_eq!(a.stats().dropped(Dropped::NotFinite), 6);
        // A rate of 1e308 over 0.5 s would be infinite: skipped and counted.
        let out = flush_all(&mut a, 0.5);
        assert_eq!(out["c.count"], 1e308);
        assert!(!out.contains_key("c.rate"), "{out:?}");
        assert_eq!(out["g"], 1e308);
        assert_eq!((out["t.count"], out["t.sum"]), (1.0, 1e308));
        assert!(out.values().all(|v| v.is_finite()));
        assert_eq!(a.stats().dropped(Dropped::NotFinite), 7);
    }

    /// Greedy admission, as the budget is meant to work: each item in
    /// turn is kept if it fits in what is left. Returns (kept, bytes).
    fn greedy(max: usize, costs: impl IntoIterator<Item = usize>) -> (usize, usize) {
        let (mut kept, mut used) = (0, 0);
        for c in costs {
            if used + c <= max {
                used += c;
                kept += 1;
            }
        }
        (kept, used)
    }

    #[test]
    fn a_flood_of_distinct_names_stays_within_the_budget() {
        let max = 64 * 1024;
        let mut a = with_budget(max);
        let sent = 20_000;
        // Long names and a long tag list (the parser keeps 16 tags).
        let line = |i: usize| {
            let tags: Vec<String> = (0..40).map(|t| format!("tag{t}:{i}")).collect();
            format!("{}{i}:1|c|#{}", "n".repeat(150), tags.join(","))
        };
        let cost = |i| SCALAR_COST + encoded_len(&crate::parse_line(&line(i)).expect("valid").key);
        for i in 0..sent {
            a.ingest(line(i).as_bytes());
            assert!(a.held_bytes() <= max, "held {} > {max}", a.held_bytes());
        }
        let (kept, bytes) = greedy(max, (0..sent).map(cost));
        assert!(kept > 10 && kept < sent, "{kept} admitted");
        assert_eq!(a.held_bytes(), bytes, "charged = keys + fixed costs");
        assert_eq!(
            a.stats().dropped(Dropped::BudgetMetric),
            (sent - kept) as u64
        );
        let out = flush_all(&mut a, 1.0);
        assert_eq!(out.len(), 2 * kept, "a count and a rate per kept counter");
        assert_eq!(a.held_bytes(), 0, "a flush releases the budget");
        a.ingest(b"after:1|c");
        assert_eq!(a.held_bytes(), SCALAR_COST + key_bytes("after"));
    }

    #[test]
    fn a_flood_of_timer_values_stays_within_the_budget() {
        let max = 64 * 1024;
        let mut a = with_budget(max);
        let sent = 50_000;
        let packet = "lat:1|ms\n".repeat(500);
        for _ in 0..sent / 500 {
            a.ingest(packet.as_bytes());
            assert!(a.held_bytes() <= max);
        }
        let held = a.held_bytes();
        let out = flush_all(&mut a, 1.0);
        let kept = out["lat.sum"] as usize;
        assert_eq!(
            out["lat.count"], sent as f64,
            "count includes dropped values"
        );
        assert_eq!(held, TIMER_COST + key_bytes("lat") + 8 * kept);
        assert!(max - held < 8, "filled before dropping: {held} of {max}");
        assert_eq!(
            a.stats().dropped(Dropped::BudgetTimerValue),
            (sent - kept) as u64
        );
        assert_eq!(a.stats().dropped_total(), (sent - kept) as u64);
        assert_eq!(a.held_bytes(), 0);
    }

    #[test]
    fn a_flood_of_set_members_stays_within_the_budget() {
        let max = 256 * 1024;
        let mut a = with_budget(max);
        // 40 members of 10 KB (more than the budget), then small ones.
        let members: Vec<String> = (0..40)
            .map(|i| format!("{}{i}", "m".repeat(10_000)))
            .chain((0..20_000).map(|i| i.to_string()))
            .collect();
        for m in &members {
            a.ingest(format!("users:{m}|s").as_bytes());
            assert!(a.held_bytes() <= max);
        }
        // A new set whose first member is larger than the whole budget.
        a.ingest(format!("other:{}|s", "x".repeat(max)).as_bytes());
        let set = SET_COST + key_bytes("users");
        let (kept, bytes) = greedy(max - set, members.iter().map(|m| MEMBER_COST + m.len()));
        assert_eq!(a.held_bytes(), set + bytes);
        let s = a.stats();
        assert_eq!(
            s.dropped(Dropped::BudgetSetMember),
            (members.len() - kept) as u64
        );
        assert_eq!(s.dropped(Dropped::BudgetMetric), 1);
        let out = flush_all(&mut a, 1.0);
        assert_eq!(out["users.count"], kept as f64);
        assert!(kept > 20, "big members and then small ones: {kept}");
        assert!(!out.contains_key("other.count"));
        assert_eq!(a.held_bytes(), 0);
    }

    #[test]
    fn set_members_are_charged_by_their_bytes() {
        let mut a = Aggregator::default();
        a.ingest(b"s:abc|s\ns:abc|s\ns:de|s");
        assert_eq!(
            a.held_bytes(),
            SET_COST + key_bytes("s") + 2 * MEMBER_COST + 3 + 2
        );
    }

    #[test]
    fn kept_gauges_stay_charged_and_fill_the_budget_for_good() {
        let cost = SCALAR_COST + key_bytes("g0000");
        let mut a = with_budget(10 * cost);
        for i in 0..20 {
            a.ingest(format!("g{i:04}:1|g").as_bytes());
        }
        assert_eq!(a.held_bytes(), 10 * cost);
        assert_eq!(a.stats().dropped(Dropped::BudgetMetric), 10);
        assert_eq!(flush_all(&mut a, 1.0).len(), 10);
        assert_eq!(a.held_bytes(), 10 * cost, "kept gauges are still charged");
        a.ingest(b"c:1|c\ng0001:+1|g");
        assert_eq!(a.stats().dropped(Dropped::BudgetMetric), 11);
        assert_eq!(
            flush_all(&mut a, 1.0)["g0001"],
            2.0,
            "held gauges still update"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_packets_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut a = with_budget(4096);
            a.ingest(&bytes);
            prop_assert!(a.held_bytes() <= 4096);
            a.flush(10.0, |k, v| {
                assert!(k.validate().is_ok(), "emitted an invalid series {k}");
                assert!(v.is_finite());
            });
        }

        #[test]
        fn statsd_shaped_packets_stay_within_the_budget(
            lines in proptest::collection::vec(
                "[a-c]{1,3}:(-|\\+)?[0-9]{1,3}(e30[0-5])?\\|(c|g|ms|s)(\\|@0\\.[1-9])?(\\|#[a-c]{1,2}:[a-c0-9]{1,3})?",
                0..200,
            ),
            max in 0usize..4096,
        ) {
            let mut a = with_budget(max);
            a.ingest(lines.join("\n").as_bytes());
            prop_assert!(a.held_bytes() <= max, "{} > {max}", a.held_bytes());
            prop_assert_eq!(a.stats().bad_lines_total(), 0);
            a.flush(10.0, |k, v| {
                assert!(k.validate().is_ok(), "emitted an invalid series {k}");
                assert!(v.is_finite(), "{k} = {v}");
            });
            prop_assert!(a.held_bytes() <= max);
        }

        #[test]
        fn counters_sum_with_rates(values in proptest::collection::vec((0u32..1000, 1u32..=10), 1..50)) {
            let mut a = Aggregator::default();
            let mut expected = 0.0;
            for (v, r) in &values {
                let rate = f64::from(*r) / 10.0;
                a.ingest(format!("c:{v}|c|@{rate}").as_bytes());
                expected += f64::from(*v) / rate;
            }
            let mut got = None;
            a.flush(1.0, |k, v| if k.name == "c.count" { got = Some(v) });
            let got = got.expect("flushed");
            prop_assert!((got - expected).abs() < 1e-6 * expected.max(1.0), "{got} vs {expected}");
        }
    }
}
