//! JSON payloads: samples from plain MQTT clients (`…/samples/json`) and the
//! status, ack and error messages. Field names here are part of the
//! external contract (DESIGN.md §3).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::batch::SessionId;
use crate::validate::{Limits, Reject, SeriesKey, validate_ts, validate_value};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSample {
    series: String,
    value: f64,
    #[serde(default)]
    ts: Option<i64>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum JsonPayload {
    Many { samples: Vec<JsonSample> },
    One(JsonSample),
}

/// One validated sample from a JSON payload.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyedSample {
    pub series: SeriesKey,
    pub ts_ms: i64,
    pub value: f64,
}

/// Parses `{"series":"temp","value":21.5}` or
/// `{"samples":[{"series":"temp","ts":1700000000000,"value":21.5}]}`.
/// `ts` defaults to `now_ms`; `labels` is an optional string map.
pub fn parse_samples(
    bytes: &[u8],
    limits: &Limits,
    now_ms: i64,
) -> Result<Vec<KeyedSample>, Reject> {
    if bytes.len() > limits.max_payload_bytes {
        return Err(Reject::Oversize {
            size: bytes.len(),
            limit: limits.max_payload_bytes,
        });
    }
    let payload: JsonPayload = serde_json::from_slice(bytes).map_err(|e| {
        Reject::Json(format!(
            "{e}; expected {{\"series\":\"temp\",\"value\":21.5}} or {{\"samples\":[...]}}"
        ))
    })?;
    let list = match payload {
        JsonPayload::Many { samples } => samples,
        JsonPayload::One(s) => vec![s],
    };
    // Nothing to store: an empty message would use up a commit id and a
    // batch-log row (issue 13, found by the fuzz target `json_samples`).
    if list.is_empty() {
        return Err(Reject::Json(
            "no samples: \"samples\" must hold at least one sample".into(),
        ));
    }
    if list.len() > limits.max_samples {
        return Err(Reject::TooMany(format!(
            "{} samples; at most {}",
            list.len(),
            limits.max_samples
        )));
    }
    list.into_iter()
        .map(|s| {
            let series = SeriesKey {
                name: s.series,
                labels: s.labels,
            };
            series.validate()?;
            let ts_ms = s.ts.unwrap_or(now_ms);
            validate_ts(ts_ms, now_ms)?;
            validate_value(s.value)?;
            Ok(KeyedSample {
                series,
                ts_ms,
                value: s.value,
            })
        })
        .collect()
}

/// The session under which samples from plain MQTT clients
/// (`…/samples/json`) are stored: one fixed id (`widgetry-json` in ASCII),
/// since such clients have no session of their own.
pub const JSON_SESSION: SessionId = SessionId(*b"widgetry-json\0\0\0");

/// The seq that names a JSON message's samples in the batch log: a 63-bit
/// hash of its content (each sample's series key, timestamp and value
/// bits, in order), never 0. The same message delivered twice (a QoS 1
/// redelivery, a client that resends after a reconnect, a server restart
/// in between) gets the same seq and is stored once. A sample without an
/// explicit `ts` takes its arrival time, so only messages with explicit
/// timestamps are recognised when they arrive again.
pub fn json_seq(samples: &[KeyedSample]) -> u64 {
    // FNV-1a over the canonical bytes, then a splitmix64 finaliser so
    // that every input bit affects every output bit. Stable across
    // versions and platforms: it names stored data.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for s in samples {
        feed(s.series.to_string().as_bytes());
        feed(&[0]);
        feed(&s.ts_ms.to_le_bytes());
        feed(&s.value.to_bits().to_le_bytes());
    }
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 1).max(1)
}

/// Presence of a device, retained on `…/status`; the agent's last will is
/// the same message with `state = offline`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Online,
    Offline,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Online => "online",
            State::Offline => "offline",
        }
    }
}

/// Parses a status message (unknown extra fields are allowed: devices may
/// report more than the server understands).
pub fn parse_status(bytes: &[u8]) -> Result<Status, Reject> {
    serde_json::from_slice(bytes).map_err(|e| {
        Reject::Json(format!(
            "status: {e}; expected {{\"state\":\"online\"|\"offline\", ...}}"
        ))
    })
}

/// Server → device on `…/ack`: every batch with seq ≤ `through` is
/// committed, and so are the listed `seqs` above it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub session: SessionId,
    pub through: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seqs: Vec<u64>,
}

/// Device → server on `…/events`: app events from the device's local
/// protocol. `(session, seq)` names the message so a redelivery is stored
/// once; `dropped` counts events the device's bounded queue had to drop
/// since the previous message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBatch {
    pub session: SessionId,
    pub seq: u64,
    pub events: Vec<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub dropped: u64,
}

/// Longest event name.
pub const MAX_EVENT_NAME: usize = 128;
/// Most events in one message.
pub const MAX_EVENTS: usize = 10_000;

/// One validated event: its time, name and the whole JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub ts_ms: i64,
    pub name: String,
    pub body: serde_json::Map<String, serde_json::Value>,
}

/// Validates one event object: `event` is a 1-128 character string, `ts`
/// (ms since the Unix epoch) is optional and defaults to `now_ms`.
pub fn validate_event(
    mut body: serde_json::Map<String, serde_json::Value>,
    now_ms: i64,
) -> Result<Event, Reject> {
    let name = match body.get("event") {
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= MAX_EVENT_NAME => {
            s.clone()
        }
        _ => {
            return Err(Reject::Json(format!(
                "event needs an \"event\" string of 1-{MAX_EVENT_NAME} characters, e.g. {{\"event\":\"upload_started\",\"size\":123}}"
            )));
        }
    };
    let ts_ms = match body.get("ts") {
        None => now_ms,
        Some(v) => v.as_i64().ok_or_else(|| {
            Reject::Timestamp(format!(
                "event ts {v} is not an integer (ms since the Unix epoch)"
            ))
        })?,
    };
    validate_ts(ts_ms, now_ms)?;
    body.insert("ts".into(), ts_ms.into());
    Ok(Event { ts_ms, name, body })
}

/// Parses and validates an `…/events` payload.
pub fn parse_events(
    bytes: &[u8],
    limits: &Limits,
    now_ms: i64,
) -> Result<(EventBatch, Vec<Event>), Reject> {
    if bytes.len() > limits.max_payload_bytes {
        return Err(Reject::Oversize {
            size: bytes.len(),
            limit: limits.max_payload_bytes,
        });
    }
    let batch: EventBatch = serde_json::from_slice(bytes).map_err(|e| {
        Reject::Json(format!(
            "events: {e}; expected {{\"session\":…,\"seq\":N,\"events\":[{{\"event\":…}}]}}"
        ))
    })?;
    if batch.events.len() > MAX_EVENTS {
        return Err(Reject::TooMany(format!(
            "{} events; at most {MAX_EVENTS}",
            batch.events.len()
        )));
    }
    let events = batch
        .events
        .iter()
        .map(|e| validate_event(e.clone(), now_ms))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((batch, events))
}

/// Server → any client on `…/gaps`, after the commit that stored it: a
/// device reported seqs `from_seq..=to_seq` of `session` lost, of which the
/// server held none; `samples` is what it says they held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapReport {
    pub session: SessionId,
    pub from_seq: u64,
    pub to_seq: u64,
    pub samples: i64,
    /// When the server stored it (ms).
    pub ts: i64,
}

/// Server → device on `…/errors`: why a payload was refused. For
/// `unknown_series` it also names the batch and the ids it lacks, so the
/// device can send their definitions again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReport {
    pub topic: String,
    pub code: String,
    pub message: String,
    pub ts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub series_ids: Vec<u32>,
}

impl ErrorReport {
    /// The report of `reject` for a payload received on `topic` at `ts`.
    pub fn new(topic: String, reject: &Reject, ts: i64) -> ErrorReport {
        let (session, seq, series_ids) = match reject {
            Reject::UnknownSeries { session, seq, ids } => {
                (Some(*session), Some(*seq), ids.clone())
            }
            _ => (None, None, Vec::new()),
        };
        ErrorReport {
            topic,
            code: reject.code().to_string(),
            message: reject.to_string(),
            ts,
            session,
            seq,
            series_ids,
        }
    }
}

/// Server → any client on `…/live`, published after the batch's
/// transaction committed: its samples by series key. `commit` numbers
/// committed batches in commit order across all devices (contiguous), so a
/// reader can tell when it missed one and fetch it from the database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Live {
    pub commit: u64,
    pub device: String,
    pub session: SessionId,
    pub seq: u64,
    /// Series key → `[ts_ms, value]` pairs, ascending by time.
    pub series: BTreeMap<String, Vec<(i64, f64)>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000_000;

    #[test]
    fn single_and_many() {
        let l = Limits::default();
        let one = parse_samples(br#"{"series":"temp","value":21.5}"#, &l, NOW).expect("valid");
        assert_eq!(
            one,
            vec![KeyedSample {
                series: SeriesKey::plain("temp"),
                ts_ms: NOW,
                value: 21.5
            }]
        );
        let many = parse_samples(
            br#"{"samples":[{"series":"temp","ts":1700000000000,"value":1},{"series":"rh","value":2,"labels":{"room":"lab"}}]}"#,
            &l,
            NOW,
        )
        .expect("valid");
        assert_eq!(many.len(), 2);
        assert_eq!(many[0].ts_ms, 1_700_000_000_000);
        assert_eq!(many[1].series.to_string(), "rh{room=lab}");
    }

    #[test]
    fn json_seq_names_the_content() {
        let l = Limits::default();
        let a = br#"{"samples":[{"series":"t","ts":1700000000000,"value":1},{"series":"h","ts":1700000000000,"value":2}]}"#;
        let b = br#"{"samples":[{"series":"h","ts":1700000000000,"value":2},{"series":"t","ts":1700000000000,"value":1}]}"#;
        let seq = |p: &[u8]| json_seq(&parse_samples(p, &l, NOW).expect("valid"));
        assert_eq!(seq(a), seq(a), "the same message, the same seq");
        assert_ne!(seq(a), seq(b), "other content, another seq");
        let c = br#"{"samples":[{"series":"t","ts":1700000000000,"value":1},{"series":"h","ts":1700000000001,"value":2}]}"#;
        assert_ne!(seq(a), seq(c));
        let mut seqs = std::collections::HashSet::new();
        for i in 0..10_000 {
            let s = KeyedSample {
                series: SeriesKey::plain("x"),
                ts_ms: NOW + i,
                value: 0.0,
            };
            let q = json_seq(&[s]);
            assert!(q >= 1 && q <= i64::MAX as u64);
            seqs.insert(q);
        }
        assert_eq!(seqs.len(), 10_000, "no collisions among 10k messages");
    }

    #[test]
    fn an_empty_sample_list_is_rejected() {
        let got = parse_samples(br#"{"samples":[]}"#, &Limits::default(), NOW);
        assert_eq!(got.map_err(|e| e.code()), Err("bad_json"));
    }

    #[test]
    fn rejects() {
        let l = Limits::default();
        for (bad, code) in [
            (&b"not json"[..], "bad_json"),
            (br#"{"series":"temp"}"#, "bad_json"),
            (br#"{"series":"temp","value":"x"}"#, "bad_json"),
            (br#"{"series":"bad name","value":1}"#, "bad_series"),
            (br#"{"series":"t","value":1,"ts":5}"#, "bad_timestamp"),
            (br#"{"samples":[]}"#, "bad_json"),
        ] {
            assert_eq!(
                parse_samples(bad, &l, NOW).map_err(|e| e.code()),
                Err(code),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn events() {
        let l = Limits::default();
        let payload = br#"{"session":"0101010101010101010101010101010a","seq":1,"events":[{"event":"upload_started","size":123},{"event":"done","ts":1700000000000}]}"#;
        let (batch, events) = parse_events(payload, &l, NOW).expect("valid");
        assert_eq!(batch.seq, 1);
        assert_eq!(events[0].name, "upload_started");
        assert_eq!(events[0].ts_ms, NOW);
        assert_eq!(events[0].body["size"], 123);
        assert_eq!(events[1].ts_ms, 1_700_000_000_000);
        for bad in [
            &br#"{"session":"01","seq":1,"events":[]}"#[..],
            br#"{"session":"0101010101010101010101010101010a","seq":1,"events":[{"size":1}]}"#,
            br#"{"session":"0101010101010101010101010101010a","seq":1,"events":[{"event":"x","ts":"soon"}]}"#,
        ] {
            assert!(parse_events(bad, &l, NOW).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn status_and_ack_round_trip() {
        let st = Status {
            state: State::Offline,
            session: Some(SessionId([1; 16])),
            agent: Some("0.1.0".into()),
            host: None,
            boot_time: None,
            ts: Some(NOW),
        };
        let text = serde_json::to_vec(&st).expect("serialize");
        assert_eq!(parse_status(&text), Ok(st));
        let ack = Ack {
            session: SessionId([2; 16]),
            through: 5,
            seqs: vec![7, 9],
        };
        let text = serde_json::to_string(&ack).expect("serialize");
        assert!(text.contains("\"through\":5"));
        assert_eq!(serde_json::from_str::<Ack>(&text).expect("parse"), ack);
    }
}
