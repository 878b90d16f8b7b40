//! The local protocol for apps on the device: newline-delimited JSON sent
//! as datagrams to a Unix socket (and optionally to UDP on loopback).
//!
//! A line `{"series":"queue.depth","value":3}` (optional `ts`, `labels`)
//! is a sample and joins the agent's batches; a line
//! `{"event":"upload_started","size":123}` (optional `ts`) is an event and
//! is forwarded on `widgetry/v1/{device}/events`. Events wait in a bounded
//! queue: when it is full the oldest is dropped and the count travels with
//! the next message, so the server sees the loss.

use std::collections::VecDeque;

use serde_json::{Map, Value};
use widgetry_proto::json::{EventBatch, KeyedSample, parse_samples, validate_event};
use widgetry_proto::{Limits, SessionId};

/// One item from an app.
#[derive(Debug, Clone, PartialEq)]
pub enum Local {
    Sample(KeyedSample),
    Event(Map<String, Value>),
}

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
                    .map(|e| Local::Event(e.body))
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

/// Events waiting to be published.
#[derive(Debug)]
pub struct EventQueue {
    queue: VecDeque<Map<String, Value>>,
    max: usize,
    seq: u64,
    /// Dropped since the last published message.
    dropped_unreported: u64,
    /// Dropped in this run.
    pub dropped: u64,
    /// Lines that did not parse.
    pub bad_lines: u64,
}

impl EventQueue {
    /// A queue holding at most `max` events.
    pub fn new(max: usize) -> Self {
        EventQueue {
            queue: VecDeque::new(),
            max: max.max(1),
            seq: 0,
            dropped_unreported: 0,
            dropped: 0,
            bad_lines: 0,
        }
    }

    /// Queues an event, dropping the oldest when full.
    pub fn push(&mut self, event: Map<String, Value>) {
        if self.queue.len() >= self.max {
            self.queue.pop_front();
            self.dropped += 1;
            self.dropped_unreported += 1;
        }
        self.queue.push_back(event);
    }

    /// True when there is nothing to publish.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.dropped_unreported == 0
    }

    /// Builds the next `…/events` message of at most `max` events and
    /// hands it to `publish`; the events leave the queue only if it succeeds.
    pub fn publish(
        &mut self,
        session: SessionId,
        max: usize,
        publish: impl FnOnce(Vec<u8>) -> bool,
    ) {
        let n = self.queue.len().min(max);
        let msg = EventBatch {
            session,
            seq: self.seq + 1,
            events: self.queue.iter().take(n).cloned().collect(),
            dropped: self.dropped_unreported,
        };
        let Ok(payload) = serde_json::to_vec(&msg) else {
            return;
        };
        if publish(payload) {
            self.seq += 1;
            self.queue.drain(..n);
            self.dropped_unreported = 0;
        }
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
                assert_eq!(e["event"], "upload_started");
                assert_eq!(e["ts"], NOW, "ts defaults to now");
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

    #[test]
    fn full_queue_drops_oldest_and_reports_it() {
        let mut q = EventQueue::new(2);
        for i in 0..5 {
            let mut m = Map::new();
            m.insert("event".into(), format!("e{i}").into());
            q.push(m);
        }
        assert_eq!(q.dropped, 3);
        let mut sent = Vec::new();
        q.publish(SessionId([1; 16]), 10, |_| false);
        assert!(!q.is_empty(), "a failed publish keeps the events");
        q.publish(SessionId([1; 16]), 10, |p| {
            sent = p;
            true
        });
        let msg: EventBatch = serde_json::from_slice(&sent).expect("json");
        assert_eq!(msg.dropped, 3);
        assert_eq!(msg.seq, 1);
        assert_eq!(msg.events.len(), 2);
        assert_eq!(msg.events[0]["event"], "e3");
        assert!(q.is_empty());
    }
}
