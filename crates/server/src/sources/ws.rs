//! The websocket source bridge (`widgetry bridge ws`, `[[bridge.ws]]` in
//! `serve`): one task per upstream that connects to a `ws://` URL, reads
//! text frames `{"timestamp": <ms>, "value": <number>}`, validates each
//! ([`parse_message`]) and hands the valid ones to the ingest writer as
//! [`Item::Bridged`] samples of the configured device and series.
//!
//! A message counts as accepted only when the writer says its transaction
//! committed (`synchronous = FULL`), so `kill -9` never loses an accepted
//! message; each sample is its own batch-log entry named by its content,
//! so an exact duplicate — also one resent after a restart — is stored
//! once. At shutdown the bridge stops reading, hands over what it read and
//! waits for those commits (SIGTERM drains).
//!
//! It must never trust the upstream: every message is bounded by
//! `max_message_bytes` (tungstenite's message and frame limits, before
//! anything is buffered), at most [`MAX_IN_FLIGHT`] samples wait for a
//! commit (then reading pauses: backpressure to the upstream), untrusted
//! text reaches the log only through [`excerpt`], once per reason per
//! [`LOG_EVERY`], and a connection without any frame (data or pong) for
//! `idle_timeout` is dropped and made again, with jittered backoff.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use widgetry_common::{backoff, excerpt, now_ms};
use widgetry_proto::json::KeyedSample;
use widgetry_proto::validate::validate_ts;

use super::{Bridged, Item};
use crate::config::roles::{TimestampUnit, WsBridgeConfig};
use crate::metrics::{BRIDGE_REJECTS, Metrics};

/// A reason is logged at most once per this long; the counter counts all.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Most samples waiting for their commit; beyond it the bridge stops
/// reading until commits come back. About 100 bytes each.
pub const MAX_IN_FLIGHT: usize = 8192;

/// Most samples in one item for the writer.
pub const MAX_ITEM_SAMPLES: usize = 256;

/// Longest wait for the TCP connect and websocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for a close frame or a ping to be written.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Timestamps below this read as seconds (it is 1973-03-03 in ms and the
/// year 5138 in seconds), above it as milliseconds.
const SECONDS_BELOW: i64 = 100_000_000_000;

/// Largest integer an `f64` holds exactly.
const MAX_EXACT_INT: f64 = 9_007_199_254_740_992.0;

/// Why a message was not stored; the discriminant indexes
/// [`BRIDGE_REJECTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    BinaryFrame,
    TooLarge,
    Truncated,
    NotJson,
    NotAnObject,
    MissingTimestamp,
    MissingValue,
    TimestampNotInteger,
    TimestampInSeconds,
    TimestampInMilliseconds,
    TimestampOutOfRange,
    ValueIsString,
    ValueNotANumber,
    ValueOutOfRange,
    StoreRejected,
}

impl Reason {
    /// The reason's label on `widgetry_bridge_rejects_total`.
    pub fn code(self) -> &'static str {
        BRIDGE_REJECTS[self as usize]
    }
}

/// Validates one text message into `(timestamp in ms, value)`.
/// `unit` is what `timestamp` counts; a timestamp that reads as the other
/// unit is rejected, never guessed. `now_ms` bounds timestamps in the
/// future (one day, as for every source).
pub fn parse_message(text: &str, unit: TimestampUnit, now_ms: i64) -> Result<(i64, f64), Reason> {
    use serde_json::Value;
    let doc: Value = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Eof => Reason::Truncated,
        _ => Reason::NotJson,
    })?;
    let Value::Object(obj) = doc else {
        return Err(Reason::NotAnObject);
    };
    let ts = match obj.get("timestamp") {
        None => return Err(Reason::MissingTimestamp),
        Some(Value::Number(n)) => n.as_i64().ok_or(Reason::TimestampNotInteger)?,
        Some(_) => return Err(Reason::TimestampNotInteger),
    };
    let ts_ms = match unit {
        TimestampUnit::Ms if (0..SECONDS_BELOW).contains(&ts) => {
            // Seconds since 2000 (within the accepted range) would be a
            // valid timestamp of the other unit: say so.
            return Err(if validate_ts(ts.saturating_mul(1000), now_ms).is_ok() {
                Reason::TimestampInSeconds
            } else {
                Reason::TimestampOutOfRange
            });
        }
        TimestampUnit::Ms => ts,
        TimestampUnit::S if ts >= SECONDS_BELOW => {
            return Err(if validate_ts(ts, now_ms).is_ok() {
                Reason::TimestampInMilliseconds
            } else {
                Reason::TimestampOutOfRange
            });
        }
        TimestampUnit::S => ts.saturating_mul(1000),
    };
    validate_ts(ts_ms, now_ms).map_err(|_| Reason::TimestampOutOfRange)?;
    let value = match obj.get("value") {
        None => return Err(Reason::MissingValue),
        Some(Value::Number(n)) => n.as_f64().ok_or(Reason::ValueNotANumber)?,
        Some(Value::String(_)) => return Err(Reason::ValueIsString),
        Some(_) => return Err(Reason::ValueNotANumber),
    };
    if !value.is_finite() || value.abs() > MAX_EXACT_INT {
        return Err(Reason::ValueOutOfRange);
    }
    Ok((ts_ms, value))
}

/// How a connection ended.
enum Ended {
    /// Shutdown: what was read is handed over; stop.
    Stopped,
    /// Reconnect; `why` is for the log, `got_frames` resets the backoff.
    Lost { why: String, got_frames: bool },
    /// The writer is gone: nothing more can be stored.
    WriterGone,
}

/// Samples handed to the writer, waiting for their commit.
type Pending = std::pin::Pin<Box<dyn Future<Output = (Option<Bridged>, Vec<KeyedSample>)> + Send>>;

/// A bridge's state across connections.
struct Bridge {
    cfg: WsBridgeConfig,
    tx: mpsc::Sender<Item>,
    metrics: Arc<Metrics>,
    /// Valid samples read and not handed over yet.
    batch: Vec<KeyedSample>,
    /// Handed over, waiting for their commit, in order.
    in_flight: FuturesOrdered<Pending>,
    in_flight_samples: usize,
    /// Per reason: when it was last logged and how many since.
    logged: [(Option<Instant>, u64); BRIDGE_REJECTS.len()],
    /// When a failed connect was last logged and how many since.
    connect_logged: (Option<Instant>, u64),
}

/// Runs one bridge until `shutdown`, then drains: every message read is
/// committed (or reported lost if the writer stopped first).
pub async fn run(
    cfg: WsBridgeConfig,
    tx: mpsc::Sender<Item>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    metrics.bridge.enabled.store(true, Ordering::Relaxed);
    info!(url = %excerpt(&cfg.url), device = %cfg.device, series = %cfg.series, idle_timeout = ?cfg.idle_timeout, "websocket bridge started");
    let mut bridge = Bridge {
        cfg,
        tx,
        metrics,
        batch: Vec::new(),
        in_flight: FuturesOrdered::new(),
        in_flight_samples: 0,
        logged: [(None, 0); BRIDGE_REJECTS.len()],
        connect_logged: (None, 0),
    };
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(bridge.cfg.max_message_bytes))
        .max_frame_size(Some(bridge.cfg.max_message_bytes));
    let mut attempt = 0u32;
    loop {
        let connect = tokio_tungstenite::connect_async_with_config(
            bridge.cfg.url.as_str(),
            Some(ws_config),
            true,
        );
        let connected = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect) => r,
        };
        match connected {
            Ok(Ok((ws, _))) => {
                info!(url = %excerpt(&bridge.cfg.url), device = %bridge.cfg.device, "websocket bridge connected");
                bridge.connect_logged = (None, 0);
                bridge
                    .metrics
                    .bridge
                    .connected
                    .fetch_add(1, Ordering::Relaxed);
                let ended = bridge.stream(ws, &shutdown).await;
                bridge
                    .metrics
                    .bridge
                    .connected
                    .fetch_sub(1, Ordering::Relaxed);
                match ended {
                    Ended::Stopped => break,
                    Ended::WriterGone => {
                        warn!(device = %bridge.cfg.device, "the ingest writer stopped; the websocket bridge stops");
                        return;
                    }
                    Ended::Lost { why, got_frames } => {
                        if got_frames {
                            attempt = 0;
                        }
                        warn!(url = %excerpt(&bridge.cfg.url), device = %bridge.cfg.device, "websocket bridge connection lost: {why}; reconnecting");
                    }
                }
            }
            Ok(Err(e)) => bridge.connect_failed(&e.to_string()),
            Err(_) => bridge.connect_failed("no websocket handshake within 10 s"),
        }
        // Whatever was read on the lost connection is still handed over.
        if bridge.flush().await.is_err() {
            return;
        }
        attempt = attempt.saturating_add(1);
        let delay = backoff(attempt, bridge.cfg.reconnect_cap);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = bridge.wait_commits(delay) => {}
        }
        bridge
            .metrics
            .bridge
            .reconnects
            .fetch_add(1, Ordering::Relaxed);
    }
    bridge.drain().await;
}

impl Bridge {
    /// Reads one connection until it ends.
    async fn stream(
        &mut self,
        mut ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
        shutdown: &CancellationToken,
    ) -> Ended {
        let idle_timeout = self.cfg.idle_timeout;
        let mut idle = Instant::now() + idle_timeout;
        let mut ping =
            tokio::time::interval_at(Instant::now() + idle_timeout / 3, idle_timeout / 3);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut got_frames = false;
        let lost = |why: String, got_frames: bool| Ended::Lost { why, got_frames };
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    let _ = tokio::time::timeout(WRITE_TIMEOUT, ws.close(None)).await;
                    return Ended::Stopped;
                }
                Some(done) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    if self.committed(done).await.is_err() {
                        return Ended::WriterGone;
                    }
                }
                frame = ws.next(), if self.in_flight_samples < MAX_IN_FLIGHT => {
                    idle = Instant::now() + idle_timeout;
                    got_frames = true;
                    match frame {
                        None => return lost("the connection ended".into(), got_frames),
                        Some(Err(tungstenite::Error::Capacity(e))) => {
                            self.metrics.bridge.messages.fetch_add(1, Ordering::Relaxed);
                            self.reject(Reason::TooLarge, &e.to_string());
                            return lost(format!("message over {} bytes", self.cfg.max_message_bytes), got_frames);
                        }
                        Some(Err(e)) => return lost(e.to_string(), got_frames),
                        Some(Ok(Message::Text(text))) => {
                            self.metrics.bridge.messages.fetch_add(1, Ordering::Relaxed);
                            self.text(text.as_str());
                            if self.batch.len() >= MAX_ITEM_SAMPLES && self.flush().await.is_err() {
                                return Ended::WriterGone;
                            }
                        }
                        Some(Ok(Message::Binary(bytes))) => {
                            self.metrics.bridge.messages.fetch_add(1, Ordering::Relaxed);
                            self.reject(Reason::BinaryFrame, &String::from_utf8_lossy(&bytes));
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let why = match frame {
                                Some(f) => format!("close frame {} {:?}", u16::from(f.code), excerpt(f.reason.as_str())),
                                None => "close frame without a code".into(),
                            };
                            // Answer the close (bounded), then reconnect.
                            let _ = tokio::time::timeout(WRITE_TIMEOUT, ws.close(None)).await;
                            return lost(why, got_frames);
                        }
                        // Pongs (and pings, answered by tungstenite) only
                        // prove the connection is alive.
                        Some(Ok(_)) => {}
                    }
                }
                // Nothing more to read right now: hand over what was read.
                _ = std::future::ready(()), if !self.batch.is_empty() => {
                    if self.flush().await.is_err() {
                        return Ended::WriterGone;
                    }
                }
                _ = tokio::time::sleep_until(idle), if self.in_flight_samples < MAX_IN_FLIGHT => {
                    self.metrics.bridge.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                    return lost(format!("no frame or pong for {idle_timeout:?} (half-open connection)"), got_frames);
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(WRITE_TIMEOUT, ws.send(Message::Ping(Default::default()))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return lost(format!("ping failed: {e}"), got_frames),
                        Err(_) => return lost("ping not written within 2 s".into(), got_frames),
                    }
                }
            }
            if self.in_flight_samples >= MAX_IN_FLIGHT {
                // Reading resumes when commits come back; that pause is
                // not the upstream's silence.
                idle = Instant::now() + idle_timeout;
            }
        }
    }

    /// Validates one text message into the batch, or counts its reject.
    fn text(&mut self, text: &str) {
        match parse_message(text, self.cfg.timestamp_unit, now_ms()) {
            Ok((ts_ms, value)) => self.batch.push(KeyedSample {
                series: self.cfg.series.clone(),
                ts_ms,
                value,
            }),
            Err(reason) => self.reject(reason, text),
        }
    }

    /// Counts a reject and logs it unless its reason was logged less than
    /// [`LOG_EVERY`] ago.
    fn reject(&mut self, reason: Reason, example: &str) {
        let code = reason.code();
        self.metrics.bridge.reject(code);
        let (last, quiet) = &mut self.logged[reason as usize];
        if last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            *quiet += 1;
            return;
        }
        warn!(
            device = %self.cfg.device,
            reason = code,
            example = %excerpt(example),
            not_logged = *quiet,
            "websocket bridge message not stored (logged once per reason per {}s; widgetry_bridge_rejects_total counts them all)",
            LOG_EVERY.as_secs()
        );
        *last = Some(Instant::now());
        *quiet = 0;
    }

    fn connect_failed(&mut self, why: &str) {
        let (last, quiet) = &mut self.connect_logged;
        if last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            *quiet += 1;
            return;
        }
        warn!(url = %excerpt(&self.cfg.url), device = %self.cfg.device, error = %excerpt(why), failed_since_logged = *quiet, "websocket bridge cannot connect; retrying with backoff");
        *last = Some(Instant::now());
        *quiet = 0;
    }

    /// Hands the batch to the writer. Err: the writer is gone.
    async fn flush(&mut self) -> Result<(), ()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let samples = std::mem::take(&mut self.batch);
        self.send(samples).await
    }

    async fn send(&mut self, samples: Vec<KeyedSample>) -> Result<(), ()> {
        let (done, committed) = oneshot::channel();
        let copy = samples.clone();
        let n = samples.len();
        let item = Item::Bridged {
            device: self.cfg.device.clone(),
            samples,
            received_ms: now_ms(),
            done,
        };
        if self.tx.send(item).await.is_err() {
            warn!(device = %self.cfg.device, samples = n, "the ingest writer stopped; samples read by the websocket bridge are lost");
            return Err(());
        }
        self.in_flight_samples += n;
        self.in_flight
            .push_back(Box::pin(async move { (committed.await.ok(), copy) }));
        Ok(())
    }

    /// Counts a commit; samples of a failed transaction are handed over
    /// again. Err: the writer is gone.
    async fn committed(&mut self, done: (Option<Bridged>, Vec<KeyedSample>)) -> Result<(), ()> {
        let (stored, samples) = done;
        self.in_flight_samples -= samples.len();
        match stored {
            Some(s) => {
                let m = &self.metrics.bridge;
                m.accepted.fetch_add(s.new, Ordering::Relaxed);
                m.duplicates.fetch_add(s.duplicates, Ordering::Relaxed);
                for _ in 0..s.rejected {
                    self.reject(Reason::StoreRejected, &self.cfg.series.to_string());
                }
                Ok(())
            }
            None => {
                // The writer logged the failed transaction; it retries
                // what it is given, so give these again.
                warn!(device = %self.cfg.device, samples = samples.len(), "a transaction with websocket bridge samples failed; handing them over again");
                self.send(samples).await
            }
        }
    }

    /// Waits `delay` while counting commits that come back meanwhile.
    async fn wait_commits(&mut self, delay: Duration) {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return,
                Some(done) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    if self.committed(done).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// At shutdown: hands over the batch and waits for every commit (the
    /// writer drains until every source has dropped its sender).
    async fn drain(mut self) {
        if self.flush().await.is_err() {
            return;
        }
        let mut samples = 0;
        while let Some(done) = self.in_flight.next().await {
            samples += done.1.len();
            if self.committed(done).await.is_err() {
                return;
            }
        }
        info!(device = %self.cfg.device, samples, "websocket bridge stopped after the commits it waited for");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn ms(text: &str) -> Result<(i64, f64), Reason> {
        parse_message(text, TimestampUnit::Ms, NOW)
    }

    #[test]
    fn reasons_follow_the_metric_labels() {
        assert_eq!(Reason::BinaryFrame.code(), "binary_frame");
        assert_eq!(Reason::StoreRejected.code(), "store_rejected");
        assert_eq!(Reason::StoreRejected as usize + 1, BRIDGE_REJECTS.len());
    }

    #[test]
    fn valid_messages_parse() {
        assert_eq!(
            ms(r#"{"timestamp": 1700000000000, "value": 72}"#),
            Ok((1_700_000_000_000, 72.0))
        );
        assert_eq!(
            ms(r#"{"value": -3, "timestamp": 1700000000001, "extra": "ignored"}"#),
            Ok((1_700_000_000_001, -3.0))
        );
        assert_eq!(
            ms(r#"{"timestamp": 1700000000000, "value": 21.5}"#),
            Ok((1_700_000_000_000, 21.5))
        );
        assert_eq!(
            parse_message(
                r#"{"timestamp": 1700000000, "value": 1}"#,
                TimestampUnit::S,
                NOW
            ),
            Ok((1_700_000_000_000, 1.0))
        );
    }

    #[test]
    fn each_kind_of_bad_message_has_its_reason() {
        let cases = [
            (r#"{"timestamp": 1700000000000, "val"#, Reason::Truncated),
            ("", Reason::Truncated),
            ("hello", Reason::NotJson),
            (
                "{\"timestamp\": 1700000000000, \"value\": 1}}",
                Reason::NotJson,
            ),
            ("[1, 2]", Reason::NotAnObject),
            ("42", Reason::NotAnObject),
            (r#"{"value": 1}"#, Reason::MissingTimestamp),
            (r#"{"timestamp": 1700000000000}"#, Reason::MissingValue),
            (
                r#"{"timestamp": "1700000000000", "value": 1}"#,
                Reason::TimestampNotInteger,
            ),
            (
                r#"{"timestamp": 1700000000000.5, "value": 1}"#,
                Reason::TimestampNotInteger,
            ),
            (
                r#"{"timestamp": 1700000000, "value": 1}"#,
                Reason::TimestampInSeconds,
            ),
            (
                r#"{"timestamp": 5, "value": 1}"#,
                Reason::TimestampOutOfRange,
            ),
            (
                r#"{"timestamp": -1, "value": 1}"#,
                Reason::TimestampOutOfRange,
            ),
            (
                r#"{"timestamp": 9999999999999, "value": 1}"#,
                Reason::TimestampOutOfRange,
            ),
            (
                r#"{"timestamp": 1700000000000, "value": "21.5"}"#,
                Reason::ValueIsString,
            ),
            (
                r#"{"timestamp": 1700000000000, "value": true}"#,
                Reason::ValueNotANumber,
            ),
            (
                r#"{"timestamp": 1700000000000, "value": null}"#,
                Reason::ValueNotANumber,
            ),
            (
                r#"{"timestamp": 1700000000000, "value": 1e300}"#,
                Reason::ValueOutOfRange,
            ),
            (
                r#"{"timestamp": 1700000000000, "value": 18014398509481984}"#,
                Reason::ValueOutOfRange,
            ),
        ];
        for (text, reason) in cases {
            assert_eq!(ms(text), Err(reason), "{text}");
        }
        assert_eq!(
            parse_message(
                r#"{"timestamp": 1700000000000, "value": 1}"#,
                TimestampUnit::S,
                NOW
            ),
            Err(Reason::TimestampInMilliseconds)
        );
    }

    #[test]
    fn no_input_panics() {
        for text in [
            "{",
            "{\"timestamp\":",
            "\u{0}",
            "{\"timestamp\": 1e999, \"value\": 1}",
            "{\"timestamp\": 99999999999999999999999, \"value\": 1}",
        ] {
            assert!(ms(text).is_err(), "{text:?}");
        }
    }
}
