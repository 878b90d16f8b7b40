//! Validation of everything a device sends: ids, series names, labels,
//! timestamps, values and sizes. Every failure is a [`Reject`] whose
//! [`Reject::code`] is a stable label (used in metrics and on the
//! `…/errors` topic) and whose message names the bad input.

use std::collections::BTreeMap;
use std::fmt;

/// 2000-01-01T00:00:00Z in ms: anything earlier is a clock that was never set.
pub const MIN_TS_MS: i64 = 946_684_800_000;
/// How far into the future a timestamp may lie (clock skew allowance).
pub const MAX_FUTURE_MS: i64 = 24 * 3600 * 1000;
/// Longest device id.
pub const MAX_DEVICE_LEN: usize = 64;
/// Longest series name.
pub const MAX_SERIES_NAME_LEN: usize = 200;
/// Most labels on one series.
pub const MAX_LABELS: usize = 16;
/// Longest label key or value.
pub const MAX_LABEL_LEN: usize = 128;

/// Size limits applied to one payload.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_samples: usize,
    pub max_series: usize,
    /// Series one device may have in all (the server's cardinality limit).
    pub max_series_per_device: usize,
    /// Messages per second one device may send on average (the server's
    /// rate limit), and how many it may send at once above that.
    pub device_messages_per_s: u32,
    pub device_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 1024 * 1024,
            max_samples: 100_000,
            max_series: 10_000,
            max_series_per_device: 10_000,
            device_messages_per_s: 100,
            device_burst: 2_000,
        }
    }
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Reject {
    #[error("bad topic: {0}")]
    Topic(String),
    #[error("bad device id {0:?}: use 1-64 characters from A-Z a-z 0-9 _ . -")]
    Device(String),
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes: send smaller batches")]
    Oversize { size: usize, limit: usize },
    #[error("malformed protobuf Batch: {0}")]
    Protobuf(String),
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("bad session: {0}")]
    Session(String),
    #[error("bad series: {0}")]
    Series(String),
    #[error("bad timestamp: {0}")]
    Timestamp(String),
    #[error("bad value: {0}")]
    Value(String),
    #[error("too many items: {0}")]
    TooMany(String),
    #[error(
        "device {device:?} has reached its limit of {limit} series: {key:?} was not created and the message was not stored; reuse existing series names (put varying parts in values, not names)"
    )]
    SeriesLimit {
        device: String,
        key: String,
        limit: usize,
    },
    #[error(
        "more than {per_s} messages/s (bursts of {burst}) from this device: messages over the limit are dropped unread (this report is sent once per 10 s); unacknowledged batches are sent again later"
    )]
    RateLimited { per_s: u32, burst: u32 },
    /// A batch refers to series ids the server has no definition for in
    /// its session (the server's database is new or restored, or the
    /// batches carrying the definitions were lost). Not the device's
    /// fault: it answers by sending the definitions again (DESIGN.md §6.9).
    #[error(
        "series ids {ids:?} of session {session} are not defined on the server: resend batch {seq} with their SeriesDefs"
    )]
    UnknownSeries {
        session: crate::batch::SessionId,
        seq: u64,
        ids: Vec<u32>,
    },
}

impl Reject {
    /// Stable, machine-readable reason label.
    pub fn code(&self) -> &'static str {
        match self {
            Reject::Topic(_) => "bad_topic",
            Reject::Device(_) => "bad_device",
            Reject::Oversize { .. } => "oversize",
            Reject::Protobuf(_) => "bad_protobuf",
            Reject::Json(_) => "bad_json",
            Reject::Session(_) => "bad_session",
            Reject::Series(_) => "bad_series",
            Reject::Timestamp(_) => "bad_timestamp",
            Reject::Value(_) => "bad_value",
            Reject::TooMany(_) => "too_many",
            Reject::SeriesLimit { .. } => "series_limit",
            Reject::RateLimited { .. } => "rate_limited",
            Reject::UnknownSeries { .. } => "unknown_series",
        }
    }

    /// Every reason code, for pre-registering metrics.
    pub const CODES: [&'static str; 13] = [
        "bad_topic",
        "bad_device",
        "oversize",
        "bad_protobuf",
        "bad_json",
        "bad_session",
        "bad_series",
        "bad_timestamp",
        "bad_value",
        "too_many",
        "series_limit",
        "rate_limited",
        "unknown_series",
    ];
}

/// A device id: `[A-Za-z0-9_.-]{1,64}`.
pub fn validate_device(device: &str) -> Result<(), Reject> {
    let ok = !device.is_empty()
        && device.len() <= MAX_DEVICE_LEN
        && device
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Reject::Device(device.chars().take(80).collect()))
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':' | b'/')
}

/// A series (metric) name: 1-200 characters from `A-Z a-z 0-9 _ . - : /`.
pub fn validate_series_name(name: &str) -> Result<(), Reject> {
    if name.is_empty() || name.len() > MAX_SERIES_NAME_LEN || !name.bytes().all(is_name_byte) {
        return Err(Reject::Series(format!(
            "name {:?}: use 1-{MAX_SERIES_NAME_LEN} characters from A-Z a-z 0-9 _ . - : /",
            name.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

/// Label keys are `[A-Za-z_][A-Za-z0-9_]*`; values are printable, without
/// `,` `{` `}` `=` `"`; both at most 128 bytes; at most 16 labels.
pub fn validate_labels<'a>(
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), Reject> {
    if labels.len() > MAX_LABELS {
        return Err(Reject::Series(format!(
            "{} labels: at most {MAX_LABELS} are allowed",
            labels.len()
        )));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_LABEL_LEN
            && k.bytes().enumerate().all(|(i, b)| {
                b.is_ascii_alphabetic() || b == b'_' || (i > 0 && b.is_ascii_digit())
            });
        if !key_ok {
            return Err(Reject::Series(format!(
                "label key {k:?}: use [A-Za-z_][A-Za-z0-9_]*, at most {MAX_LABEL_LEN} bytes"
            )));
        }
        let value_ok = !v.is_empty()
            && v.len() <= MAX_LABEL_LEN
            && v.chars()
                .all(|c| !c.is_control() && !matches!(c, ',' | '{' | '}' | '=' | '"'));
        if !value_ok {
            return Err(Reject::Series(format!(
                "label {k}={v:?}: values are 1-{MAX_LABEL_LEN} printable bytes without , {{ }} = \""
            )));
        }
    }
    Ok(())
}

/// A timestamp must lie between 2000-01-01 and one day after `now_ms`.
pub fn validate_ts(ts_ms: i64, now_ms: i64) -> Result<(), Reject> {
    if ts_ms < MIN_TS_MS {
        return Err(Reject::Timestamp(format!(
            "{ts_ms} ms is before 2000-01-01: timestamps are milliseconds since the Unix epoch"
        )));
    }
    if ts_ms > now_ms.saturating_add(MAX_FUTURE_MS) {
        return Err(Reject::Timestamp(format!(
            "{ts_ms} ms is more than a day ahead of the server clock ({now_ms} ms): check the device clock"
        )));
    }
    Ok(())
}

/// Values must be finite.
pub fn validate_value(value: f64) -> Result<(), Reject> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(Reject::Value(format!("{value} is not a finite number")))
    }
}

/// A series' identity on one device: its name plus labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesKey {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl SeriesKey {
    /// A series without labels.
    pub fn plain(name: impl Into<String>) -> Self {
        SeriesKey {
            name: name.into(),
            labels: BTreeMap::new(),
        }
    }

    /// Validates name and labels.
    pub fn validate(&self) -> Result<(), Reject> {
        validate_series_name(&self.name)?;
        validate_labels(self.labels.iter())
    }

    /// Parses the canonical text form `name` or `name{k=v,k2=v2}`.
    pub fn parse(text: &str) -> Result<SeriesKey, Reject> {
        let key = match text.split_once('{') {
            None => SeriesKey::plain(text),
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').ok_or_else(|| {
                    Reject::Series(format!("{text:?}: labels must end with '}}'"))
                })?;
                let mut labels = BTreeMap::new();
                for pair in inner.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').ok_or_else(|| {
                        Reject::Series(format!("{text:?}: label {pair:?} is not key=value"))
                    })?;
                    labels.insert(k.to_string(), v.to_string());
                }
                SeriesKey {
                    name: name.to_string(),
                    labels,
                }
            }
        };
        key.validate()?;
        Ok(key)
    }
}

/// The canonical text form: `name` or `name{k=v,k2=v2}` with keys sorted.
impl fmt::Display for SeriesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            f.write_str("{")?;
            for (i, (k, v)) in self.labels.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{k}={v}")?;
            }
            f.write_str("}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reject_code_is_listed_once() {
        let all = [
            Reject::Topic(String::new()),
            Reject::Device(String::new()),
            Reject::Oversize { size: 0, limit: 0 },
            Reject::Protobuf(String::new()),
            Reject::Json(String::new()),
            Reject::Session(String::new()),
            Reject::Series(String::new()),
            Reject::Timestamp(String::new()),
            Reject::Value(String::new()),
            Reject::TooMany(String::new()),
            Reject::SeriesLimit {
                device: String::new(),
                key: String::new(),
                limit: 0,
            },
            Reject::RateLimited { per_s: 0, burst: 0 },
            Reject::UnknownSeries {
                session: crate::SessionId([0; 16]),
                seq: 1,
                ids: vec![],
            },
        ];
        let codes: Vec<&str> = all.iter().map(Reject::code).collect();
        assert_eq!(codes, Reject::CODES.to_vec());
    }

    #[test]
    fn device_ids() {
        assert!(validate_device("sensor-01.line_2").is_ok());
        assert!(validate_device(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "a/b", "+", "#", "é", &"a".repeat(65)] {
            assert_eq!(
                validate_device(bad).map_err(|e| e.code()),
                Err("bad_device"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn series_key_text_form_round_trips() {
        let key = SeriesKey::parse("proc.cpu_pct{process=nginx,pid=12}").expect("valid key");
        assert_eq!(key.name, "proc.cpu_pct");
        assert_eq!(key.labels.len(), 2);
        assert_eq!(key.to_string(), "proc.cpu_pct{pid=12,process=nginx}");
        assert_eq!(SeriesKey::parse(&key.to_string()), Ok(key));
        assert!(SeriesKey::parse("x{a=1").is_err());
        assert!(SeriesKey::parse("x{1a=1}").is_err());
        assert!(SeriesKey::parse("has space").is_err());
    }

    #[test]
    fn timestamps_and_values() {
        let now = 1_700_000_000_000;
        assert!(validate_ts(now, now).is_ok());
        assert!(validate_ts(now + MAX_FUTURE_MS, now).is_ok());
        assert!(validate_ts(now + MAX_FUTURE_MS + 1, now).is_err());
        assert!(validate_ts(1_700_000_000, now).is_err(), "seconds, not ms");
        assert!(validate_value(f64::NAN).is_err());
        assert!(validate_value(f64::INFINITY).is_err());
        assert!(validate_value(-0.5).is_ok());
    }
}
