//! The protobuf `Batch`: building it (agent side), decoding and validating
//! it (server side), and the session id that names a run of an agent.
//!
//! Decoding never panics on any input: every problem is a [`Reject`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use prost::Message;

use crate::pb;
use crate::validate::{Limits, Reject, SeriesKey, validate_ts, validate_value};

/// A random 128-bit id chosen when an agent starts.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// A fresh random id. Uses the OS-seeded keys of std's `RandomState`
    /// mixed with the clock and pid, so the agent needs no RNG crate.
    pub fn generate() -> SessionId {
        use std::hash::{BuildHasher, Hasher};
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut out = [0u8; 16];
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(nanos);
            h.write_u32(std::process::id());
            h.write_usize(i);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
        SessionId(out)
    }

    /// Parses 16 raw bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<SessionId, Reject> {
        let arr: [u8; 16] = bytes.try_into().map_err(|_| {
            Reject::Session(format!("session id has {} bytes, expected 16", bytes.len()))
        })?;
        Ok(SessionId(arr))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

impl FromStr for SessionId {
    type Err = Reject;
    fn from_str(s: &str) -> Result<Self, Reject> {
        let bad = || Reject::Session(format!("{s:?} is not 32 hex digits"));
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(SessionId(out))
    }
}

impl serde::Serialize for SessionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The samples of one series within a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub series_id: u32,
    pub ts_ms: Vec<i64>,
    pub values: Vec<f64>,
}

/// Batches a device lost (spool full): a contiguous seq range of one
/// session, with its sample count and time range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub session: SessionId,
    pub from_seq: u64,
    pub to_seq: u64,
    pub samples: u64,
    pub from_ts_ms: i64,
    pub to_ts_ms: i64,
}

/// Most gap reports in one batch, and most seqs one report may span.
pub const MAX_GAPS: usize = 1000;
pub const MAX_GAP_SPAN: u64 = 1_000_000;

/// A decoded and validated batch.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedBatch {
    pub session: SessionId,
    pub seq: u64,
    /// Series definitions carried by this batch (session-local ids).
    pub series: Vec<(u32, SeriesKey)>,
    pub runs: Vec<Run>,
    /// Lost batches reported by the device.
    pub gaps: Vec<Gap>,
    /// Seqs of this session at or below this are settled on the device
    /// (acknowledged earlier or reported lost); 0 says nothing.
    pub settled_through: u64,
    /// App events (validated JSON objects) carried by this batch.
    pub events: Vec<crate::json::Event>,
}

impl DecodedBatch {
    /// Decodes and validates a protobuf payload received at `now_ms`.
    pub fn decode(bytes: &[u8], limits: &Limits, now_ms: i64) -> Result<DecodedBatch, Reject> {
        if bytes.len() > limits.max_payload_bytes {
            return Err(Reject::Oversize {
                size: bytes.len(),
                limit: limits.max_payload_bytes,
            });
        }
        let raw = pb::Batch::decode(bytes).map_err(|e| Reject::Protobuf(e.to_string()))?;
        Self::from_pb(raw, limits, now_ms)
    }

    /// Validates an already decoded protobuf message.
    pub fn from_pb(raw: pb::Batch, limits: &Limits, now_ms: i64) -> Result<DecodedBatch, Reject> {
        let session = SessionId::from_slice(&raw.session)?;
        if raw.seq == 0 {
            return Err(Reject::Session("seq must start at 1".into()));
        }
        if raw.seq > i64::MAX as u64 {
            return Err(Reject::Session(format!("seq {} is too large", raw.seq)));
        }
        if raw.series.len() > limits.max_series || raw.points.len() > limits.max_series {
            return Err(Reject::TooMany(format!(
                "{} series definitions and {} point groups; at most {} of each",
                raw.series.len(),
                raw.points.len(),
                limits.max_series
            )));
        }
        let mut series = Vec::with_capacity(raw.series.len());
        let mut seen = std::collections::HashSet::with_capacity(raw.series.len());
        for def in raw.series {
            if !seen.insert(def.id) {
                return Err(Reject::Series(format!(
                    "series id {} is defined twice",
                    def.id
                )));
            }
            let key = SeriesKey {
                name: def.name,
                labels: def.labels.into_iter().collect(),
            };
            key.validate()?;
            series.push((def.id, key));
        }
        let mut total = 0usize;
        let mut runs = Vec::with_capacity(raw.points.len());
        for p in raw.points {
            let values = decode_values(&p)?;
            if p.ts_delta_ms.len() != values.len() {
                return Err(Reject::Series(format!(
                    "series id {}: {} timestamps but {} values",
                    p.series_id,
                    p.ts_delta_ms.len(),
                    values.len()
                )));
            }
            total += values.len();
            if total > limits.max_samples {
                return Err(Reject::TooMany(format!(
                    "more than {} samples in one batch",
                    limits.max_samples
                )));
            }
            let mut ts_ms = Vec::with_capacity(p.ts_delta_ms.len());
            let mut ts: i64 = 0;
            for d in p.ts_delta_ms {
                ts = ts.checked_add(d).ok_or_else(|| {
                    Reject::Timestamp(format!("series id {}: timestamp overflow", p.series_id))
                })?;
                validate_ts(ts, now_ms)?;
                ts_ms.push(ts);
            }
            for v in &values {
                validate_value(*v)?;
            }
            runs.push(Run {
                series_id: p.series_id,
                ts_ms,
                values,
            });
        }
        if raw.gaps.len() > MAX_GAPS {
            return Err(Reject::TooMany(format!(
                "{} gap reports; at most {MAX_GAPS}",
                raw.gaps.len()
            )));
        }
        let mut gaps = Vec::with_capacity(raw.gaps.len());
        for g in raw.gaps {
            let gap_session = SessionId::from_slice(&g.session)?;
            if g.from_seq == 0 || g.from_seq > g.to_seq || g.to_seq - g.from_seq >= MAX_GAP_SPAN {
                return Err(Reject::Session(format!(
                    "gap seq range {}..={} is empty, starts at 0 or spans more than {MAX_GAP_SPAN} batches",
                    g.from_seq, g.to_seq
                )));
            }
            // A gap of this batch's own session lies below it: a device
            // cannot have lost batches it has not made yet.
            if gap_session == session && g.to_seq >= raw.seq {
                return Err(Reject::Session(format!(
                    "gap seq range {}..={} is not below the batch's own seq {}",
                    g.from_seq, g.to_seq, raw.seq
                )));
            }
            // At most what such a span of batches can hold.
            let most = (g.to_seq - g.from_seq + 1).saturating_mul(limits.max_samples as u64);
            if g.samples > most {
                return Err(Reject::Session(format!(
                    "gap {}..={} claims {} lost samples; {} batches hold at most {most}",
                    g.from_seq,
                    g.to_seq,
                    g.samples,
                    g.to_seq - g.from_seq + 1
                )));
            }
            gaps.push(Gap {
                session: gap_session,
                from_seq: g.from_seq,
                to_seq: g.to_seq,
                samples: g.samples,
                from_ts_ms: g.from_ts_ms,
                to_ts_ms: g.to_ts_ms,
            });
        }
        if raw.settled_through >= raw.seq {
            return Err(Reject::Session(format!(
                "settled_through {} must be below the batch's own seq {}",
                raw.settled_through, raw.seq
            )));
        }
        if raw.events.len() > crate::json::MAX_EVENTS {
            return Err(Reject::TooMany(format!(
                "{} events in one batch; at most {}",
                raw.events.len(),
                crate::json::MAX_EVENTS
            )));
        }
        let mut events = Vec::with_capacity(raw.events.len());
        for (i, text) in raw.events.iter().enumerate() {
            let body = match serde_json::from_str::<serde_json::Value>(text) {
                Ok(serde_json::Value::Object(body)) => body,
                _ => {
                    return Err(Reject::Json(format!(
                        "event {i} of the batch is not a JSON object"
                    )));
                }
            };
            events.push(crate::json::validate_event(body, now_ms)?);
        }
        let batch = DecodedBatch {
            session,
            seq: raw.seq,
            series,
            runs,
            gaps,
            settled_through: raw.settled_through,
            events,
        };
        // A batch that carries neither samples, events nor news of lost or
        // settled seqs would only use up a commit id.
        if batch.sample_count() == 0
            && batch.events.is_empty()
            && batch.gaps.is_empty()
            && batch.settled_through == 0
        {
            return Err(Reject::TooMany(
                "an empty batch (no samples, events or gap reports): nothing to store".into(),
            ));
        }
        Ok(batch)
    }

    /// Number of samples in the batch.
    pub fn sample_count(&self) -> usize {
        self.runs.iter().map(|r| r.values.len()).sum()
    }

    /// Smallest and largest timestamp, if the batch has samples.
    pub fn ts_range(&self) -> Option<(i64, i64)> {
        let mut it = self.runs.iter().flat_map(|r| r.ts_ms.iter().copied());
        let first = it.next()?;
        Some(it.fold((first, first), |(lo, hi), t| (lo.min(t), hi.max(t))))
    }

    /// The protobuf form of this batch.
    pub fn to_pb(&self) -> pb::Batch {
        pb::Batch {
            session: self.session.0.to_vec(),
            seq: self.seq,
            series: self
                .series
                .iter()
                .map(|(id, key)| pb::SeriesDef {
                    id: *id,
                    name: key.name.clone(),
                    labels: key
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                })
                .collect(),
            points: self
                .runs
                .iter()
                .map(|r| encode_points(r.series_id, &r.ts_ms, &r.values))
                .collect(),
            gaps: self
                .gaps
                .iter()
                .map(|g| pb::Gap {
                    session: g.session.0.to_vec(),
                    from_seq: g.from_seq,
                    to_seq: g.to_seq,
                    samples: g.samples,
                    from_ts_ms: g.from_ts_ms,
                    to_ts_ms: g.to_ts_ms,
                })
                .collect(),
            settled_through: self.settled_through,
            events: self
                .events
                .iter()
                .map(|e| serde_json::Value::Object(e.body.clone()).to_string())
                .collect(),
        }
    }

    /// Encodes the batch as protobuf bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.to_pb().encode_to_vec()
    }
}

/// Largest magnitude an f64 holds every integer up to.
const EXACT_INT: f64 = 9_007_199_254_740_992.0;

fn is_exact_int(v: f64) -> bool {
    v.fract() == 0.0 && v.abs() < EXACT_INT && !(v == 0.0 && v.is_sign_negative())
}

/// Encodes one series' samples, picking the smallest exact value encoding.
fn encode_points(series_id: u32, ts: &[i64], values: &[f64]) -> pb::Points {
    let mut p = pb::Points {
        series_id,
        ts_delta_ms: delta_encode(ts),
        ..Default::default()
    };
    if values.iter().all(|v| is_exact_int(*v)) {
        let ints: Vec<i64> = values.iter().map(|v| *v as i64).collect();
        p.int_values = delta_encode(&ints);
    } else if values.iter().all(|v| f64::from(*v as f32) == *v) {
        p.f32_values = values.iter().map(|v| *v as f32).collect();
    } else {
        p.values = values.to_vec();
    }
    p
}

/// Decodes whichever value encoding a `Points` uses.
pub fn decode_values(p: &pb::Points) -> Result<Vec<f64>, Reject> {
    let used = [
        !p.values.is_empty(),
        !p.int_values.is_empty(),
        !p.f32_values.is_empty(),
    ]
    .iter()
    .filter(|u| **u)
    .count();
    if used > 1 {
        return Err(Reject::Series(format!(
            "series id {}: values given in more than one encoding",
            p.series_id
        )));
    }
    if !p.int_values.is_empty() {
        let mut acc: i64 = 0;
        p.int_values
            .iter()
            .map(|d| {
                acc = acc.checked_add(*d).ok_or_else(|| {
                    Reject::Value(format!("series id {}: integer value overflow", p.series_id))
                })?;
                Ok(acc as f64)
            })
            .collect()
    } else if !p.f32_values.is_empty() {
        Ok(p.f32_values.iter().map(|v| f64::from(*v)).collect())
    } else {
        Ok(p.values.clone())
    }
}

fn delta_encode(ts: &[i64]) -> Vec<i64> {
    let mut prev = 0i64;
    ts.iter()
        .map(|&t| {
            let d = t.wrapping_sub(prev);
            prev = t;
            d
        })
        .collect()
}

/// Accumulates samples into the next batch (agent side).
#[derive(Debug, Default)]
pub struct BatchBuilder {
    runs: BTreeMap<u32, (Vec<i64>, Vec<f64>)>,
    samples: usize,
}

impl BatchBuilder {
    /// Adds one sample of the session-local series `series_id`.
    pub fn push(&mut self, series_id: u32, ts_ms: i64, value: f64) {
        let run = self.runs.entry(series_id).or_default();
        run.0.push(ts_ms);
        run.1.push(value);
        self.samples += 1;
    }

    /// Samples accumulated so far.
    pub fn len(&self) -> usize {
        self.samples
    }

    /// Upper bound of the encoded size of the accumulated samples (10 bytes
    /// per timestamp, 9 per value, 16 per series), without definitions.
    pub fn max_encoded_len(&self) -> usize {
        self.samples * 19 + self.runs.len() * 16 + 48
    }

    /// True when nothing has been pushed since the last `finish`.
    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }

    /// Takes the accumulated samples as a batch with the given header and
    /// series definitions, leaving the builder empty.
    pub fn finish(
        &mut self,
        session: SessionId,
        seq: u64,
        series: Vec<(u32, SeriesKey)>,
    ) -> DecodedBatch {
        self.samples = 0;
        let runs = std::mem::take(&mut self.runs)
            .into_iter()
            .map(|(series_id, (ts_ms, values))| Run {
                series_id,
                ts_ms,
                values,
            })
            .collect();
        DecodedBatch {
            session,
            seq,
            series,
            runs,
            gaps: Vec::new(),
            settled_through: 0,
            events: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_750_000_000_000;

    fn arb_key() -> impl Strategy<Value = SeriesKey> {
        (
            "[a-z][a-z0-9_.]{0,20}",
            proptest::collection::btree_map("[a-z_][a-z0-9_]{0,8}", "[a-zA-Z0-9 ._-]{1,12}", 0..3),
        )
            .prop_map(|(name, labels)| SeriesKey { name, labels })
    }

    fn arb_batch() -> impl Strategy<Value = DecodedBatch> {
        (
            any::<[u8; 16]>(),
            // From 2: `settled_through` (seq / 2) is then never 0, so even
            // a batch without samples or gaps is a valid one.
            2u64..1_000_000,
            proptest::collection::vec(arb_key(), 0..5),
            proptest::collection::vec(
                (
                    0u32..10,
                    proptest::collection::vec((MIN_TS..NOW, -1e12f64..1e12f64), 0..20),
                ),
                0..5,
            ),
        )
            .prop_flat_map(|(session, seq, keys, runs)| {
                proptest::collection::vec(
                    (
                        any::<[u8; 16]>(),
                        1u64..1000,
                        0u64..100,
                        // At most what one batch holds (any span holds that).
                        0u64..=100_000,
                        any::<i64>(),
                        any::<i64>(),
                    ),
                    0..3,
                )
                .prop_map(move |gaps| (session, seq, keys.clone(), runs.clone(), gaps))
            })
            .prop_map(|(session, seq, keys, runs, gaps)| DecodedBatch {
                session: SessionId(session),
                seq,
                series: keys
                    .into_iter()
                    .enumerate()
                    .map(|(i, k)| (i as u32, k))
                    .collect(),
                runs: runs
                    .into_iter()
                    .map(|(series_id, pts)| Run {
                        series_id,
                        ts_ms: pts.iter().map(|p| p.0).collect(),
                        values: pts.iter().map(|p| p.1).collect(),
                    })
                    .collect(),
                gaps: gaps
                    .into_iter()
                    .map(|(s, from, span, samples, a, b)| Gap {
                        session: SessionId(s),
                        from_seq: from,
                        to_seq: from + span,
                        samples,
                        from_ts_ms: a,
                        to_ts_ms: b,
                    })
                    .collect(),
                settled_through: seq / 2,
                events: Vec::new(),
            })
    }

    const MIN_TS: i64 = crate::validate::MIN_TS_MS;

    #[test]
    fn an_empty_batch_is_refused_but_one_with_only_a_gap_report_is_not() {
        let empty = pb::Batch {
            session: vec![1; 16],
            seq: 5,
            ..Default::default()
        };
        let got = DecodedBatch::decode(&empty.encode_to_vec(), &Limits::default(), NOW);
        assert_eq!(got.map_err(|e| e.code()), Err("too_many"));
        let gap_only = pb::Batch {
            gaps: vec![pb::Gap {
                session: vec![1; 16],
                from_seq: 2,
                to_seq: 3,
                samples: 4,
                ..Default::default()
            }],
            ..empty
        };
        let got = DecodedBatch::decode(&gap_only.encode_to_vec(), &Limits::default(), NOW);
        assert_eq!(got.map(|b| b.gaps.len()), Ok(1));
    }

    #[test]
    fn settled_through_must_lie_below_the_batch_seq() {
        for settled in [5, 6, u64::MAX] {
            let raw = pb::Batch {
                session: vec![1; 16],
                seq: 5,
                settled_through: settled,
                ..Default::default()
            };
            let got = DecodedBatch::decode(&raw.encode_to_vec(), &Limits::default(), NOW);
            assert_eq!(got.map_err(|e| e.code()), Err("bad_session"), "{settled}");
        }
        let raw = pb::Batch {
            session: vec![1; 16],
            seq: 5,
            settled_through: 4,
            ..Default::default()
        };
        let got = DecodedBatch::decode(&raw.encode_to_vec(), &Limits::default(), NOW);
        assert_eq!(got.map(|b| b.settled_through), Ok(4));
    }

    #[test]
    fn gaps_lie_below_the_batch_and_claim_what_their_span_can_hold() {
        let gap = |session: u8, from_seq: u64, to_seq: u64, samples: u64| pb::Gap {
            session: vec![session; 16],
            from_seq,
            to_seq,
            samples,
            ..Default::default()
        };
        let decode = |gaps: Vec<pb::Gap>| {
            let raw = pb::Batch {
                session: vec![1; 16],
                seq: 10,
                gaps,
                ..Default::default()
            };
            DecodedBatch::decode(&raw.encode_to_vec(), &Limits::default(), NOW)
                .map_err(|e| e.code())
        };
        let most = Limits::default().max_samples as u64;
        // The issue's reproduction: one gap claiming 2^63 - 1 samples.
        assert_eq!(
            decode(vec![gap(1, 2, 3, i64::MAX as u64)]),
            Err("bad_session")
        );
        assert_eq!(decode(vec![gap(1, 2, 3, 2 * most + 1)]), Err("bad_session"));
        assert!(decode(vec![gap(1, 2, 3, 2 * most)]).is_ok());
        // Its own session's gaps lie below the batch's seq.
        assert_eq!(decode(vec![gap(1, 5, 10, 1)]), Err("bad_session"));
        assert_eq!(decode(vec![gap(1, 11, 999_999, 1)]), Err("bad_session"));
        assert!(decode(vec![gap(1, 5, 9, 1)]).is_ok());
        // An earlier run's session may have any seqs.
        assert!(decode(vec![gap(2, 11, 999_999, 1)]).is_ok());
    }

    proptest! {
        #[test]
        fn decode_encode_round_trip(batch in arb_batch()) {
            let bytes = batch.encode();
            let back = DecodedBatch::decode(&bytes, &Limits::default(), NOW);
            prop_assert_eq!(back, Ok(batch));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = DecodedBatch::decode(&bytes, &Limits::default(), NOW);
        }

        #[test]
        fn every_value_encoding_round_trips(
            kind in 0u8..3,
            ints in proptest::collection::vec(-(1i64 << 52)..(1i64 << 52), 1..30),
            floats in proptest::collection::vec(any::<f32>().prop_filter("finite", |f| f.is_finite()), 1..30),
            doubles in proptest::collection::vec(-1e300f64..1e300, 1..30),
        ) {
            let values: Vec<f64> = match kind {
                0 => ints.iter().map(|i| *i as f64).collect(),
                1 => floats.iter().map(|f| f64::from(*f)).collect(),
                _ => doubles,
            };
            let ts: Vec<i64> = (0..values.len() as i64).collect();
            let p = encode_points(3, &ts, &values);
            let back = decode_values(&p).expect("decodes");
            prop_assert_eq!(back.len(), values.len());
            for (a, b) in back.iter().zip(&values) {
                prop_assert_eq!(a.to_bits(), b.to_bits());
            }
        }

        #[test]
        fn session_hex_round_trip(raw in any::<[u8; 16]>()) {
            let id = SessionId(raw);
            prop_assert_eq!(id.to_string().parse::<SessionId>(), Ok(id));
        }
    }

    fn valid() -> DecodedBatch {
        let mut b = BatchBuilder::default();
        b.push(1, NOW - 2000, 1.0);
        b.push(1, NOW - 1000, 2.0);
        b.push(2, NOW - 1000, 3.0);
        b.finish(
            SessionId([7; 16]),
            1,
            vec![(1, SeriesKey::plain("a")), (2, SeriesKey::plain("b"))],
        )
    }

    #[test]
    fn events_travel_in_batches_and_are_validated() {
        let mut b = valid();
        let mut body = serde_json::Map::new();
        body.insert("event".into(), "upload_started".into());
        body.insert("size".into(), 3.into());
        b.events = vec![crate::json::validate_event(body, NOW - 5).expect("valid")];
        let got = DecodedBatch::decode(&b.encode(), &Limits::default(), NOW).expect("decode");
        assert_eq!(got.events, b.events);
        assert_eq!(got.events[0].ts_ms, NOW - 5);
        let mut raw = b.to_pb();
        raw.events = vec!["[1]".into()];
        let err = DecodedBatch::from_pb(raw.clone(), &Limits::default(), NOW).expect_err("array");
        assert!(err.to_string().contains("event 0"), "{err}");
        raw.events = vec![r#"{"size":1}"#.into()];
        assert!(
            DecodedBatch::from_pb(raw, &Limits::default(), NOW).is_err(),
            "no name"
        );
        // Events alone make a batch worth storing.
        let mut only = valid();
        only.runs.clear();
        only.series.clear();
        only.events = b.events.clone();
        assert!(DecodedBatch::decode(&only.encode(), &Limits::default(), NOW).is_ok());
    }

    #[test]
    fn picks_the_smallest_exact_encoding() {
        let p = encode_points(1, &[1, 2, 3], &[1e9, 1e9 + 4096.0, 2.0]);
        assert!(!p.int_values.is_empty() && p.values.is_empty() && p.f32_values.is_empty());
        let p = encode_points(1, &[1, 2], &[0.5, 12.25]);
        assert!(!p.f32_values.is_empty(), "{p:?}");
        let p = encode_points(1, &[1, 2], &[0.1, -0.0]);
        assert!(!p.values.is_empty(), "{p:?}");
        for p in [
            encode_points(1, &[1], &[-0.0]),
            encode_points(1, &[1, 2], &[f64::from(0.1f32), 3.0]),
        ] {
            let back = decode_values(&p).expect("decodes");
            assert_eq!(back.len(), 1.max(p.ts_delta_ms.len()));
        }
        let both = pb::Points {
            series_id: 1,
            ts_delta_ms: vec![1],
            values: vec![1.0],
            int_values: vec![1],
            f32_values: vec![],
        };
        assert!(decode_values(&both).is_err());
    }

    #[test]
    fn max_encoded_len_is_an_upper_bound() {
        let mut b = BatchBuilder::default();
        for i in 0..500 {
            b.push(i % 7, NOW - i64::from(i) * 997, f64::from(i) * 1.1e300);
        }
        let bound = b.max_encoded_len();
        let real = b
            .finish(SessionId([1; 16]), u64::MAX >> 1, vec![])
            .encode()
            .len();
        assert!(real <= bound, "{real} > {bound}");
    }

    #[test]
    fn builder_groups_per_series() {
        let b = valid();
        assert_eq!(b.sample_count(), 3);
        assert_eq!(b.ts_range(), Some((NOW - 2000, NOW - 1000)));
        assert_eq!(b.runs[0].ts_ms, vec![NOW - 2000, NOW - 1000]);
    }

    #[test]
    fn rejects_invalid_content() {
        let limits = Limits::default();
        let check = |f: &dyn Fn(&mut pb::Batch), code: &str| {
            let mut raw = valid().to_pb();
            f(&mut raw);
            let got = DecodedBatch::decode(&raw.encode_to_vec(), &limits, NOW);
            assert_eq!(got.map_err(|e| e.code()), Err(code), "expected {code}");
        };
        check(&|b| b.session.truncate(3), "bad_session");
        check(&|b| b.seq = 0, "bad_session");
        check(
            &|b| {
                b.points[0].int_values.clear();
                b.points[0].values = vec![f64::NAN, 1.0];
            },
            "bad_value",
        );
        check(&|b| b.points[0].int_values[1] = i64::MAX, "bad_value");
        check(&|b| b.points[0].ts_delta_ms[0] = 5, "bad_timestamp");
        check(&|b| b.points[0].ts_delta_ms[1] = i64::MAX, "bad_timestamp");
        check(
            &|b| b.points[0].int_values.pop().map(|_| ()).unwrap_or(()),
            "bad_series",
        );
        check(&|b| b.series[0].name = "bad name".into(), "bad_series");
        check(&|b| b.series[1].id = b.series[0].id, "bad_series");
        let big = vec![0u8; limits.max_payload_bytes + 1];
        assert_eq!(
            DecodedBatch::decode(&big, &limits, NOW).map_err(|e| e.code()),
            Err("oversize")
        );
        assert_eq!(
            DecodedBatch::decode(&[0xff, 0xff, 0xff], &limits, NOW).map_err(|e| e.code()),
            Err("bad_protobuf")
        );
    }
}
