//! The statsd/DogStatsD line parser: bytes in, [`Metric`]s or
//! [`ParseError`]s out, each error with a stable [`BadLine`] reason.
//!
//! Line format: `name:value|type[|@rate][|#tag:value,tag2]`, several lines
//! per packet separated by `\n`. Types: `c` counter, `g` gauge (`+N`/`-N`
//! adjust the current value), `ms`/`h`/`d` timer/histogram/distribution,
//! `s` set. Names and labels are sanitised so that every key is a valid
//! Widgetry series (`SeriesKey::validate`) even with a suffix such as
//! `.mean`; at most 16 tags per line are kept.
//!
//! The parser must never panic and never hold more than the line it is
//! reading: `parse_packet` is lazy, whatever the packet's size.

use std::collections::BTreeMap;

use widgetry_proto::SeriesKey;
use widgetry_proto::validate::{MAX_LABEL_LEN, MAX_LABELS};

/// Longest metric name kept, in bytes (sanitised names are ASCII), so that
/// the longest suffix the aggregator adds still fits the 200 bytes of a
/// series name.
pub const MAX_NAME: usize = 180;

/// Characters of a bad line kept in its [`ParseError`].
const EXCERPT_CHARS: usize = 120;

/// One parsed statsd line.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub key: SeriesKey,
    pub kind: Kind,
    /// Sample rate from `|@rate`, in (0, 1]; 1 when absent.
    pub rate: f64,
}

/// The metric type and its value.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Counter(f64),
    Gauge(f64),
    GaugeDelta(f64),
    /// `ms`, `h` and `d`: one observation of a distribution.
    Timer(f64),
    /// One member of a set (the raw value text).
    Set(String),
}

/// Why a line was skipped. [`BadLine::code`] is a stable label for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum BadLine {
    #[error("missing ':'")]
    MissingColon,
    #[error("empty metric name")]
    EmptyName,
    #[error("missing '|type'")]
    MissingType,
    #[error("bad sample rate")]
    BadRate,
    #[error("sample rate must be in (0, 1]")]
    RateOutOfRange,
    #[error("value is not a number")]
    NotANumber,
    #[error("value is not finite")]
    NotFinite,
    #[error("unknown type (expected c, g, ms, h, d or s)")]
    UnknownType,
}

impl BadLine {
    /// Every reason, in the order of their counters.
    pub const ALL: [BadLine; 8] = [
        BadLine::MissingColon,
        BadLine::EmptyName,
        BadLine::MissingType,
        BadLine::BadRate,
        BadLine::RateOutOfRange,
        BadLine::NotANumber,
        BadLine::NotFinite,
        BadLine::UnknownType,
    ];

    /// Stable, machine-readable reason label.
    pub fn code(self) -> &'static str {
        match self {
            BadLine::MissingColon => "missing_colon",
            BadLine::EmptyName => "empty_name",
            BadLine::MissingType => "missing_type",
            BadLine::BadRate => "bad_rate",
            BadLine::RateOutOfRange => "rate_out_of_range",
            BadLine::NotANumber => "not_a_number",
            BadLine::NotFinite => "not_finite",
            BadLine::UnknownType => "unknown_type",
        }
    }
}

/// A line that was skipped: an excerpt of it (at most 120 characters; shown
/// escaped by `Display`) and the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("statsd line {line:?}: {reason}")]
pub struct ParseError {
    pub line: String,
    pub reason: BadLine,
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
        // At most 4 bytes a character: 32 characters fit MAX_LABEL_LEN bytes.
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
        line: line.chars().take(EXCERPT_CHARS).collect(),
        reason,
    };
    let (name, rest) = line
        .split_once(':')
        .ok_or_else(|| err(BadLine::MissingColon))?;
    if name.is_empty() {
        return Err(err(BadLine::EmptyName));
    }
    let mut fields = rest.split('|');
    let value = fields.next().unwrap_or_default();
    let kind = fields.next().ok_or_else(|| err(BadLine::MissingType))?;
    let mut rate = 1.0;
    let mut labels = BTreeMap::new();
    for field in fields {
        if let Some(r) = field.strip_prefix('@') {
            rate = r.parse().map_err(|_| err(BadLine::BadRate))?;
            if !(rate > 0.0 && rate <= 1.0) {
                return Err(err(BadLine::RateOutOfRange));
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
        let n: f64 = v.parse().map_err(|_| err(BadLine::NotANumber))?;
        if n.is_finite() {
            Ok(n)
        } else {
            Err(err(BadLine::NotFinite))
        }
    };
    let kind = match kind {
        "c" => Kind::Counter(number(value)?),
        "g" if value.starts_with(['+', '-']) => Kind::GaugeDelta(number(value)?),
        "g" => Kind::Gauge(number(value)?),
        "ms" | "h" | "d" => Kind::Timer(number(value)?),
        "s" => Kind::Set(value.to_string()),
        _ => return Err(err(BadLine::UnknownType)),
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

/// Parses a packet of newline-separated lines (invalid UTF-8 replaced,
/// surrounding whitespace and blank lines skipped), one line at a time.
pub fn parse_packet(packet: &[u8]) -> impl Iterator<Item = Result<Metric, ParseError>> + '_ {
    packet.split(|&b| b == b'\n').filter_map(|line| {
        let line = String::from_utf8_lossy(line);
        let line = line.trim();
        (!line.is_empty()).then(|| parse_line(line))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
    fn rejects_bad_lines_with_their_reason() {
        use BadLine::*;
        for (bad, reason) in [
            ("", MissingColon),
            ("nocolon", MissingColon),
            (":1|c", EmptyName),
            ("a:1", MissingType),
            ("a:x|c", NotANumber),
            ("a:1|zz", UnknownType),
            ("a:1|c|@2", RateOutOfRange),
            ("a:1|c|@0", RateOutOfRange),
            ("a:1|c|@x", BadRate),
            ("a:NaN|g", NotFinite),
            ("a:inf|ms", NotFinite),
            ("a:1e999|c", NotFinite),
        ] {
            assert_eq!(
                parse_line(bad).map_err(|e| e.reason),
                Err(reason),
                "{bad:?}"
            );
        }
        let codes: std::collections::HashSet<_> = BadLine::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), BadLine::ALL.len(), "codes are distinct");
    }

    #[test]
    fn long_names_tags_and_excerpts_are_cut() {
        let long = "n".repeat(10_000);
        let tags: Vec<String> = (0..1000)
            .map(|i| format!("k{i}:{}", "v".repeat(500)))
            .collect();
        let m = parse_line(&format!("{long}:1|c|#{}", tags.join(","))).expect("valid");
        assert_eq!(m.key.name.len(), MAX_NAME);
        assert_eq!(m.key.labels.len(), MAX_LABELS);
        assert!(m.key.validate().is_ok(), "{}", m.key);
        let e = parse_line(&format!("{long}:x|c")).expect_err("not a number");
        assert_eq!(e.line.chars().count(), EXCERPT_CHARS);
    }

    #[test]
    fn packets_split_on_newlines_and_skip_blank_lines() {
        let got: Vec<_> = parse_packet(b"a:1|c\r\n\n  \nb:2|g\n\xffbad\n")
            .map(|r| r.map(|m| m.key.name).map_err(|e| e.reason))
            .collect();
        assert_eq!(
            got,
            vec![
                Ok("a".to_string()),
                Ok("b".to_string()),
                Err(BadLine::MissingColon)
            ]
        );
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            for m in parse_packet(&bytes).flatten() {
                prop_assert!(m.key.validate().is_ok(), "invalid key {}", m.key);
                prop_assert!(m.rate > 0.0 && m.rate <= 1.0);
            }
        }

        #[test]
        fn statsd_shaped_lines_parse_without_panicking(
            line in "[a-z:|@#,.+-]{0,8}:[0-9a-z.+-]{0,6}\\|(c|g|ms|h|d|s|x)(\\|[@#][a-z0-9:.,]{0,12}){0,3}"
        ) {
            if let Ok(m) = parse_line(&line) {
                prop_assert!(m.key.validate().is_ok(), "invalid key {}", m.key);
            }
        }
    }
}
