//! The local protocol for apps on the device: newline-delimited JSON sent
//! as datagrams to a Unix socket (and optionally to UDP on loopback).
//!
//! A line `{"series":"queue.depth","value":3}` (optional `ts`, `labels`)
//! is a sample and joins the agent's batches; a line
//! `{"event":"upload_started","size":123}` (optional `ts`) is an event. It
//! travels in the next batch too, so it shares the batches' disk spool and
//! end-to-end acknowledgement: once sealed (within `--batch-max-wait`) it
//! survives a broker outage, an agent `kill -9` and a power cut like a
//! sample. Until then events wait in a bounded queue: when it is full the
//! oldest is dropped, and the next batch carries a
//! `{"event":"widgetry.events_dropped","dropped":N}` event, so the server
//! sees the loss.

use std::collections::VecDeque;

use serde_json::{Map, Value};
use widgetry_proto::Limits;
use widgetry_proto::json::{Event, KeyedSample, parse_samples, validate_event};

/// One item from an app.
#[derive(Debug, Clone, PartialEq)]
pub enum Local {
    Sample(KeyedSample),
    Event(Event),
}

/// Name of the event that reports events dropped by a full queue.
pub const DROPPED_EVENT: &str = "widgetry.events_dropped";

/// Parses one datagram of newline-delimited JSON; bad lines are errors.
pub fn parse_datagram(bytes: &[u8], now_ms: i64) -> Vec<Result<Local, String>> {
    let limits = Limits::default();
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let value: Value =
                serde_json::from_str(line).map_err(|e| format!("{e}: {line:.80}"))?;
            let Value::Object(obj) = value else {
                return Err(format!("not a JSON object: {line:.80}"));
            };
            if obj.contains_key("event") {
                validate_event(obj, now_ms)
                    .map(Local::Event)
                    .map_err(|e| e.to_string())
            } else {
                let mut samples =
                    parse_samples(line.as_bytes(), &limits, now_ms).map_err(|e| e.to_string())?;
                match (samples.pop(), samples.is_empty()) {
                    (Some(s), true) => Ok(Local::Sample(s)),
                    _ => Err(format!("one sample per line: {line:.80}")),
                }
            }
        })
        .collect()
}

/// Events waiting for the next batch.
#[derive(Debug)]
pub struct EventQueue {
    /// Events and the size of their JSON text.
    queue: VecDeque<(Event, usize)>,
    bytes: usize,
    max: usize,
    /// Dropped since the last batch.
    dropped_unreported: u64,
    /// Dropped in this run.
    pub dropped: u64,
    /// Lines that did not parse.
    pub bad_lines: u64,
}

fn json_len(e: &Event) -> usize {
    serde_json::to_vec(&e.body).map_or(0, |v| v.len())
}

impl EventQueue {
    /// A queue holding at most `max` events.
    pub fn new(max: usize) -> Self {
        EventQueue {
            queue: VecDeque::new(),
            bytes: 0,
            max: max.max(1),
            dropped_unreported: 0,
            dropped: 0,
            bad_lines: 0,
        }
    }

    /// Queues an event, dropping the oldest when full.
    pub fn push(&mut self, event: Event) {
        if self.queue.len() >= self.max {
            if let Some((_, len)) = self.queue.pop_front() {
                self.bytes -= len;
            }
            self.dropped += 1;
            self.dropped_unreported += 1;
        }
        let len = json_len(&event);
        self.bytes += len;
        self.queue.push_back((event, len));
    }

    /// True when nothing waits for a batch.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.dropped_unreported == 0
    }

    /// JSON bytes waiting (what they add to a batch, roughly).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes the events for the next batch: oldest first, at most
    /// `max_bytes` of JSON (but at least one), led by a report of the
    /// events dropped since the last batch, if any.
    pub fn take(&mut self, max_bytes: usize, now_ms: i64) -> Vec<Event> {
        let mut out = Vec::new();
        if self.dropped_unreported > 0 {
            let mut body = Map::new();
            body.insert("event".into(), DROPPED_EVENT.into());
            body.insert("dropped".into(), self.dropped_unreported.into());
            body.insert("ts".into(), now_ms.into());
            out.push(Event {
                ts_ms: now_ms,
                name: DROPPED_EVENT.into(),
                body,
            });
            self.dropped_unreported = 0;
        }
        let mut taken = 0usize;
        while let Some((_, len)) = self.queue.front() {
            if taken > 0 && taken + len > max_bytes {
                break;
            }
            taken += len;
            if let Some((e, len)) = self.queue.pop_front() {
                self.bytes -= len;
                out.push(e);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000_000;

    #[test]
    fn parses_samples_and_events() {
        let got = parse_datagram(
            b"{\"event\":\"upload_started\",\"size\":123}\n{\"series\":\"queue.depth\",\"value\":3}\nnot json\n{\"size\":1}\n[1]",
            NOW,
        );
        assert_eq!(got.len(), 5);
        match &got[0] {
            Ok(Local::Event(e)) => {
                assert_eq!(e.body["event"], "upload_started");
                assert_eq!(e.body["ts"], NOW, "ts defaults to now");
            }
            other => panic!("{other:?}"),
        }
        match &got[1] {
            Ok(Local::Sample(s)) => {
                assert_eq!((s.series.name.as_str(), s.value), ("queue.depth", 3.0))
            }
            other => panic!("{other:?}"),
        }
        assert!(got[2..].iter().all(Result::is_err));
    }

    fn event(name: &str) -> Event {
        let mut m = Map::new();
        m.insert("event".into(), name.into());
        validate_event(m, NOW).expect("valid")
    }

    #[test]
    fn full_queue_drops_oldest_and_reports_it() {
        let mut q = EventQueue::new(2);
        for i in 0..5 {
            q.push(event(&format!("e{i}")));
        }
        assert_eq!(q.dropped, 3);
        let got = q.take(1 << 20, NOW);
        let names: Vec<&str> = got.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, vec![DROPPED_EVENT, "e3", "e4"]);
        assert_eq!(got[0].body["dropped"], 3);
        assert!(q.is_empty());
        assert!(q.take(1 << 20, NOW).is_empty(), "reported once");
    }

    #[test]
    fn take_keeps_to_the_byte_budget_but_moves_on() {
        let mut q = EventQueue::new(100);
        for i in 0..10 {
            q.push(event(&format!("e{i}")));
        }
        let one = json_len(&event("e0"));
        let first = q.take(3 * one, NOW);
        assert_eq!(first.len(), 3);
        assert_eq!(q.take(0, NOW).len(), 1, "at least one, even over budget");
        assert_eq!(q.take(1 << 20, NOW).len(), 6);
        assert!(q.is_empty() && q.bytes() == 0);
    }
}
