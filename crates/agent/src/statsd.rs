//! A statsd-compatible listener: parses statsd and DogStatsD lines and
//! aggregates them per flush interval into Widgetry series.
//!
//! Line format: `name:value|type[|@rate][|#tag:value,tag2]`, several lines
//! per packet separated by `\n`. Types: `c` counter, `g` gauge (`+N`/`-N`
//! adjust the current value), `ms`/`h`/`d` timer/histogram/distribution,
//! `s` set. Each flush emits:
//! - counter `x` → `x.count` (sum, scaled by 1/rate) and `x.rate` (per second)
//! - gauge `x` → `x` (kept across flushes, like statsd)
//! - timer `x` → `x.count`, `x.sum`, `x.min`, `x.max`, `x.mean`, `x.p50`, `x.p90`, `x.p99`
//! - set `x` → `x.count` (distinct members)
//!
//! Parsing never panics; bad lines are counted and skipped. Memory is
//! bounded: at most `max_metrics` distinct metrics and `max_values` timer
//! values per metric per flush, the excess counted as dropped.

use std::collections::{BTreeMap, HashMap, HashSet};

use widgetry_proto::SeriesKey;
use widgetry_proto::validate::{MAX_LABEL_LEN, MAX_LABELS};

/// Longest metric name kept (a suffix such as `.mean` must still fit).
const MAX_NAME: usize = 180;

/// One parsed statsd line.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub key: SeriesKey,
    pub kind: Kind,
    pub rate: f64,
}

/// The metric type and its value.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Counter(f64),
    Gauge(f64),
    GaugeDelta(f64),
    Timer(f64),
    Set(String),
}

/// Why a line was skipped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("statsd line {line:?}: {reason}")]
pub struct ParseError {
    pub line: String,
    pub reason: &'static str,
}

fn sanitize_name(name: &str) -> String {
    name.chars()
        .take(MAX_NAME)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':' | '/') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn sanitize_label_key(k: &str) -> String {
    let mut out: String = k
        .chars()
        .take(MAX_LABEL_LEN - 1)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn sanitize_label_value(v: &str) -> String {
    v.chars()
        .filter(|c| !c.is_control())
        .take(MAX_LABEL_LEN / 4)
        .map(|c| {
            if matches!(c, ',' | '{' | '}' | '=' | '"') {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Parses one line (without the newline).
pub fn parse_line(line: &str) -> Result<Metric, ParseError> {
    let err = |reason| ParseError {
        line: line.chars().take(120).collect(),
        reason,
    };
    let (name, rest) = line.split_once(':').ok_or_else(|| err("missing ':'"))?;
    if name.is_empty() {
        return Err(err("empty metric name"));
    }
    let mut fields = rest.split('|');
    let value = fields.next().unwrap_or_default();
    let kind = fields.next().ok_or_else(|| err("missing '|type'"))?;
    let mut rate = 1.0;
    let mut labels = BTreeMap::new();
    for field in fields {
        if let Some(r) = field.strip_prefix('@') {
            rate = r.parse().map_err(|_| err("bad sample rate"))?;
            if !(rate > 0.0 && rate <= 1.0) {
                return Err(err("sample rate must be in (0, 1]"));
            }
        } else if let Some(tags) = field.strip_prefix('#') {
            for tag in tags.split(',').filter(|t| !t.is_empty()) {
                if labels.len() >= MAX_LABELS {
                    break;
                }
                let (k, v) = tag.split_once(':').unwrap_or((tag, "true"));
                let (k, v) = (sanitize_label_key(k), sanitize_label_value(v));
                if !k.is_empty() && !v.is_empty() {
                    labels.insert(k, v);
                }
            }
        }
        // Other extensions (e.g. DogStatsD `|c:` container ids) are ignored.
    }
    let number = |v: &str| -> Result<f64, ParseError> {
        let n: f64 = v.parse().map_err(|_| err("value is not a number"))?;
        if n.is_finite() {
            Ok(n)
        } else {
            Err(err("value is not finite"))
        }
    };
    let kind = match kind {
        "c" => Kind::Counter(number(value)?),
        "g" if value.starts_with(['+', '-']) => Kind::GaugeDelta(number(value)?),
        "g" => Kind::Gauge(number(value)?),
        "ms" | "h" | "d" => Kind::Timer(number(value)?),
        "s" => Kind::Set(value.to_string()),
        _ => return Err(err("unknown type (expected c, g, ms, h, d or s)")),
    };
    Ok(Metric {
        key: SeriesKey {
            name: sanitize_name(name),
            labels,
        },
        kind,
        rate,
    })
}

/// Parses a packet of newline-separated lines.
pub fn parse_packet(packet: &[u8]) -> impl Iterator<Item = Result<Metric, ParseError>> + '_ {
    String::from_utf8_lossy(packet)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(parse_line)
        .collect::<Vec<_>>()
        .into_iter()
}

#[derive(Debug, Default)]
struct Timer {
    values: Vec<f64>,
    count: f64,
}

/// Aggregates metrics between flushes.
#[derive(Debug)]
pub struct Aggregator {
    counters: HashMap<SeriesKey, f64>,
    gauges: HashMap<SeriesKey, f64>,
    timers: HashMap<SeriesKey, Timer>,
    sets: HashMap<SeriesKey, HashSet<String>>,
    max_metrics: usize,
    max_values: usize,
    /// Lines that did not parse.
    pub bad_lines: u64,
    /// Metrics or values dropped because a bound was hit.
    pub dropped: u64,
}

impl Aggregator {
    /// An aggregator with the given bounds.
    pub fn new(max_metrics: usize, max_values: usize) -> Self {
        Aggregator {
            counters: HashMap::new(),
            gauges: HashMap::new(),
            timers: HashMap::new(),
            sets: HashMap::new(),
            max_metrics,
            max_values,
            bad_lines: 0,
            dropped: 0,
        }
    }

    fn metrics(&self) -> usize {
        self.counters.len() + self.gauges.len() + self.timers.len() + self.sets.len()
    }

    /// Feeds a whole packet.
    pub fn ingest(&mut self, packet: &[u8]) {
        for m in parse_packet(packet) {
            match m {
                Ok(m) => self.add(m),
                Err(_) => self.bad_lines += 1,
            }
        }
    }

    /// Adds one metric.
    pub fn add(&mut self, m: Metric) {
        let full = self.metrics() >= self.max_metrics;
        macro_rules! slot {
            ($map:expr, $default:expr) => {
                match $map.get_mut(&m.key) {
                    Some(v) => v,
                    None if full => {
                        self.dropped += 1;
                        return;
                    }
                    None => $map.entry(m.key.clone()).or_insert($default),
                }
            };
        }
        match m.kind {
            Kind::Counter(v) => *slot!(self.counters, 0.0) += v / m.rate,
            Kind::Gauge(v) => *slot!(self.gauges, 0.0) = v,
            Kind::GaugeDelta(d) => *slot!(self.gauges, 0.0) += d,
            Kind::Timer(v) => {
                let max_values = self.max_values;
                let t = slot!(self.timers, Timer::default());
                t.count += 1.0 / m.rate;
                if t.values.len() < max_values {
                    t.values.push(v);
                } else {
                    self.dropped += 1;
                }
            }
            Kind::Set(member) => {
                let max_values = self.max_values;
                let s = slot!(self.sets, HashSet::new());
                if s.len() < max_values {
                    s.insert(member);
                } else if !s.contains(&member) {
                    self.dropped += 1;
                }
            }
        }
    }

    /// Emits the aggregates of the interval that lasted `interval_secs`
    /// and resets everything but gauges.
    pub fn flush(&mut self, interval_secs: f64, mut emit: impl FnMut(SeriesKey, f64)) {
        let suffixed = |key: &SeriesKey, suffix: &str| SeriesKey {
            name: format!("{}.{suffix}", key.name),
            labels: key.labels.clone(),
        };
        for (key, sum) in self.counters.drain() {
            emit(suffixed(&key, "count"), sum);
            emit(suffixed(&key, "rate"), sum / interval_secs.max(1e-9));
        }
        for (key, v) in &self.gauges {
            emit(key.clone(), *v);
        }
        for (key, mut t) in self.timers.drain() {
            if t.values.is_empty() {
                continue;
            }
            t.values.sort_by(f64::total_cmp);
            let n = t.values.len();
            let sum: f64 = t.values.iter().sum();
            // Nearest-rank percentile.
            let pct = |p: f64| t.values[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];
            emit(suffixed(&key, "count"), t.count);
            emit(suffixed(&key, "sum"), sum);
            emit(suffixed(&key, "min"), t.values[0]);
            emit(suffixed(&key, "max"), t.values[n - 1]);
            emit(suffixed(&key, "mean"), sum / n as f64);
            emit(suffixed(&key, "p50"), pct(50.0));
            emit(suffixed(&key, "p90"), pct(90.0));
            emit(suffixed(&key, "p99"), pct(99.0));
        }
        for (key, members) in self.sets.drain() {
            emit(suffixed(&key, "count"), members.len() as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flushed(packets: &[&str], secs: f64) -> BTreeMap<String, f64> {
        let mut a = Aggregator::new(1000, 1000);
        for p in packets {
            a.ingest(p.as_bytes());
        }
        let mut out = BTreeMap::new();
        a.flush(secs, |k, v| {
            out.insert(k.to_string(), v);
        });
        out
    }

    // Packet strings in the style of the statsd and gostatsd test suites.
    #[test]
    fn parses_real_packet_strings() {
        let table: &[(&str, Kind, f64)] = &[
            ("gorets:1|c", Kind::Counter(1.0), 1.0),
            ("gorets:1|c|@0.1", Kind::Counter(1.0), 0.1),
            ("glork:320|ms", Kind::Timer(320.0), 1.0),
            ("glork:320|ms|@0.1", Kind::Timer(320.0), 0.1),
            ("gaugor:333|g", Kind::Gauge(333.0), 1.0),
            ("gaugor:-10|g", Kind::GaugeDelta(-10.0), 1.0),
            ("gaugor:+4|g", Kind::GaugeDelta(4.0), 1.0),
            ("uniques:765|s", Kind::Set("765".into()), 1.0),
            ("hist:1.5|h", Kind::Timer(1.5), 1.0),
            ("dist:2|d", Kind::Timer(2.0), 1.0),
            (
                "page.views:1|c|#env:prod,region:eu-1",
                Kind::Counter(1.0),
                1.0,
            ),
            ("x:1|c|@0.5|#urgent", Kind::Counter(1.0), 0.5),
        ];
        for (line, kind, rate) in table {
            let m = parse_line(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!((&m.kind, m.rate), (kind, *rate), "{line}");
        }
        let tagged = parse_line("page.views:1|c|#env:prod,region:eu-1").expect("valid");
        assert_eq!(tagged.key.to_string(), "page.views{env=prod,region=eu-1}");
        let flag = parse_line("x:1|c|#urgent").expect("valid");
        assert_eq!(flag.key.to_string(), "x{urgent=true}");
        assert_eq!(
            parse_line("my metric/x:1|c").expect("valid").key.name,
            "my_metric/x"
        );
    }

    #[test]
    fn rejects_bad_lines() {
        for bad in [
            "", "nocolon", ":1|c", "a:1", "a:x|c", "a:1|zz", "a:1|c|@2", "a:1|c|@0", "a:1|c|@x",
            "a:NaN|g", "a:inf|ms",
        ] {
            assert!(parse_line(bad).is_err(), "{bad:?} should be rejected");
        }
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
        assert_eq!(out["glork.sum"], 620.0);
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
    fn gauges_persist_and_the_rest_resets() {
        let mut a = Aggregator::new(100, 100);
        a.ingest(b"g:5|g\nc:1|c\nt:1|ms\ns:a|s");
        a.flush(1.0, |_, _| {});
        let mut second = BTreeMap::new();
        a.flush(1.0, |k, v| {
            second.insert(k.to_string(), v);
        });
        assert_eq!(second, BTreeMap::from([("g".to_string(), 5.0)]));
    }

    #[test]
    fn bounds_are_enforced_and_counted() {
        let mut a = Aggregator::new(2, 3);
        a.ingest(b"a:1|c\nb:1|c\nc:1|c");
        assert_eq!(a.dropped, 1);
        let mut a = Aggregator::new(10, 3);
        a.ingest(b"t:1|ms\nt:2|ms\nt:3|ms\nt:4|ms");
        assert_eq!(a.dropped, 1);
    }

    proptest! {
        #[test]
        fn arbitrary_packets_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut a = Aggregator::new(100, 100);
            a.ingest(&bytes);
            a.flush(10.0, |k, v| {
                assert!(k.validate().is_ok(), "emitted an invalid series {k}");
                assert!(v.is_finite());
            });
        }

        #[test]
        fn counters_sum_with_rates(values in proptest::collection::vec((0u32..1000, 1u32..=10), 1..50)) {
            let mut a = Aggregator::new(100, 100);
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
