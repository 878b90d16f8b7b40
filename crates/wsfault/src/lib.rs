//! A misbehaving websocket upstream, for the tests and the benchmark of
//! Widgetry's websocket source bridge (`widgetry bridge ws`).
//!
//! [`Upstream::start`] listens on `127.0.0.1` (port 0) and serves one
//! connection at a time from one shared schedule: a fault **cycle** holds
//! every fault of [`Fault::ALL`] once, in an order drawn from the seed,
//! with a seeded run of valid messages before each. Connection faults end
//! the connection (or refuse new ones for a while); the next connection
//! resumes the schedule, after replaying the last [`Config::replay`] valid
//! messages (exact duplicates, as feeds that resend recent history on
//! reconnect do). After [`Config::cycles`] cycles the [`Tail`] follows.
//!
//! Everything sent is recorded in the [`Log`] — each valid message
//! (timestamp, value), each exact duplicate, each invalid message with
//! the reason the bridge must count it under — so a test can assert
//! exactly what was stored and what was rejected. It must never send a
//! message it does not record, nor record one it did not hand to the
//! socket.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// One way the upstream misbehaves (or a stretch of good behaviour that
/// stresses the bridge: bursts, out-of-order timestamps, silences).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// A valid message cut in the middle.
    Truncated,
    /// Text that is not JSON.
    NotJson,
    /// JSON that is not an object.
    NotAnObject,
    /// A valid-looking message in a binary frame.
    Binary,
    MissingTimestamp,
    MissingValue,
    /// `"timestamp": "1700000000000"`.
    TimestampAsString,
    /// `"value": true`.
    ValueNotNumber,
    /// `"value": "21.5"`.
    FloatAsString,
    /// The timestamp in seconds instead of milliseconds.
    TimestampInSeconds,
    /// The previous valid message again, byte for byte.
    Duplicate,
    /// A valid message with a timestamp before the latest, never sent before.
    OutOfOrder,
    /// Hundreds of valid messages back to back.
    Burst,
    /// No message for 1.5 idle timeouts, while pings are answered.
    LongSilence,
    /// A text message over the bridge's size limit; the connection ends.
    TooLarge,
    /// The TCP connection dropped without a close frame.
    AbruptClose,
    /// A close frame with code 1011.
    CloseWithError,
    /// Neither reading nor writing (no pongs) for two idle timeouts, then dropped.
    HalfOpen,
    /// The listener closed for a while: connections are refused.
    Refuse,
}

impl Fault {
    pub const ALL: [Fault; 19] = [
        Fault::Truncated,
        Fault::NotJson,
        Fault::NotAnObject,
        Fault::Binary,
        Fault::MissingTimestamp,
        Fault::MissingValue,
        Fault::TimestampAsString,
        Fault::ValueNotNumber,
        Fault::FloatAsString,
        Fault::TimestampInSeconds,
        Fault::Duplicate,
        Fault::OutOfOrder,
        Fault::Burst,
        Fault::LongSilence,
        Fault::TooLarge,
        Fault::AbruptClose,
        Fault::CloseWithError,
        Fault::HalfOpen,
        Fault::Refuse,
    ];

    /// The reason the bridge must count this fault's message under
    /// (`widgetry_bridge_rejects_total{reason}`), if it sends an invalid one.
    pub fn reject_reason(self) -> Option<&'static str> {
        Some(match self {
            Fault::Truncated => "truncated",
            Fault::NotJson => "not_json",
            Fault::NotAnObject => "not_an_object",
            Fault::Binary => "binary_frame",
            Fault::MissingTimestamp => "missing_timestamp",
            Fault::MissingValue => "missing_value",
            Fault::TimestampAsString => "timestamp_not_integer",
            Fault::ValueNotNumber => "value_not_a_number",
            Fault::FloatAsString => "value_is_string",
            Fault::TimestampInSeconds => "timestamp_in_seconds",
            Fault::TooLarge => "too_large",
            _ => return None,
        })
    }

    /// Whether the fault ends the connection.
    pub fn ends_connection(self) -> bool {
        matches!(
            self,
            Fault::TooLarge
                | Fault::AbruptClose
                | Fault::CloseWithError
                | Fault::HalfOpen
                | Fault::Refuse
        )
    }
}

/// What follows the fault cycles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Stay connected and silent (answering pings).
    Quiet,
    /// One valid message every `every` while [`Upstream::set_sending`] is on.
    Stream { every: Duration },
    /// Valid messages as fast as the socket takes them, while sending is on.
    Flood,
}

/// How the upstream behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// Seeds the order of faults, run lengths and values.
    pub seed: u64,
    /// Fault cycles before the tail.
    pub cycles: u32,
    pub tail: Tail,
    /// The bridge's idle timeout: silences last 1.5 of it, half-open
    /// sockets 2 of it.
    pub idle_timeout: Duration,
    /// The bridge's message size limit: the too-large message exceeds it.
    pub max_message_bytes: usize,
    /// Valid messages resent at the start of every connection but the first.
    pub replay: usize,
    /// How long connections are refused by [`Fault::Refuse`].
    pub refuse_for: Duration,
    /// Timestamp of the first valid message (ms); later ones are 10 ms apart.
    pub first_ts: i64,
}

impl Config {
    /// A schedule with `seed` for a bridge whose idle timeout is
    /// `idle_timeout`, timestamps starting a day before `now_ms`.
    pub fn new(seed: u64, cycles: u32, tail: Tail, idle_timeout: Duration, now_ms: i64) -> Self {
        Config {
            seed,
            cycles,
            tail,
            idle_timeout,
            max_message_bytes: 64 * 1024,
            replay: 0,
            refuse_for: Duration::from_millis(600),
            first_ts: (now_ms - 86_400_000) / 10 * 10,
        }
    }
}

/// What the upstream sent, in order.
#[derive(Debug, Default, Clone)]
pub struct Log {
    /// Valid messages: (timestamp ms, value), each sent once as new.
    pub valid: Vec<(i64, i64)>,
    /// Exact resends of valid messages (duplicates and replays).
    pub duplicates: u64,
    /// Invalid messages by the reason the bridge must count.
    pub invalid: BTreeMap<&'static str, u64>,
    /// Faults played, by kind.
    pub faults: BTreeMap<Fault, u64>,
    /// Connections accepted (websocket handshakes completed).
    pub connections: u64,
    /// Fault cycles completed.
    pub cycles_done: u32,
    /// Whether a connection is being served now.
    pub connected: bool,
}

impl Log {
    /// The distinct valid messages.
    pub fn valid_set(&self) -> BTreeSet<(i64, i64)> {
        self.valid.iter().copied().collect()
    }

    /// Invalid messages of every reason.
    pub fn invalid_total(&self) -> u64 {
        self.invalid.values().sum()
    }
}

/// A running upstream; stopped when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    sending: watch::Sender<bool>,
    cycles: watch::Receiver<u32>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start(cfg: Config) -> std::io::Result<Upstream> {
        Upstream::start_on("127.0.0.1:0".parse().map_err(std::io::Error::other)?, cfg).await
    }

    /// Binds `addr` and starts serving.
    pub async fn start_on(addr: SocketAddr, cfg: Config) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(Log::default()));
        let (sending, sending_rx) = watch::channel(true);
        let (cycles_tx, cycles) = watch::channel(0);
        let feed = Feed::new(cfg, log.clone(), sending_rx, cycles_tx);
        let task = tokio::spawn(feed.serve(listener, addr));
        Ok(Upstream {
            addr,
            log,
            sending,
            cycles,
            task,
        })
    }

    /// `ws://127.0.0.1:PORT/feed`.
    pub fn url(&self) -> String {
        format!("ws://{}/feed", self.addr)
    }

    /// A copy of what was sent so far.
    pub fn log(&self) -> Log {
        lock(&self.log).clone()
    }

    /// Turns the tail's messages on or off (on at start).
    pub fn set_sending(&self, on: bool) {
        self.sending.send_replace(on);
    }

    /// Waits until `n` fault cycles are done.
    pub async fn cycles_done(&self, n: u32) {
        let mut rx = self.cycles.clone();
        // The sender lives in the serving task; if it ended, no more cycles.
        let _ = rx.wait_for(|c| *c >= n).await;
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    // A panic while holding the lock leaves counts that are still valid.
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// One step of the schedule.
#[derive(Debug, Clone, Copy)]
enum Step {
    Valid(usize),
    Fault(Fault),
}

/// How a connection ended.
enum Ended {
    /// Serve the next connection at once.
    Next,
    /// Close the listener for a while first.
    Refuse,
}

type Ws = WebSocketStream<TcpStream>;

/// The schedule's state, shared by every connection.
struct Feed {
    cfg: Config,
    rng: StdRng,
    steps: VecDeque<Step>,
    cycle: u32,
    next_ts: i64,
    recent: VecDeque<String>,
    last: Option<String>,
    log: Arc<Mutex<Log>>,
    sending: watch::Receiver<bool>,
    cycles: watch::Sender<u32>,
}

impl Feed {
    fn new(
        cfg: Config,
        log: Arc<Mutex<Log>>,
        sending: watch::Receiver<bool>,
        cycles: watch::Sender<u32>,
    ) -> Feed {
        Feed {
            rng: StdRng::seed_from_u64(cfg.seed),
            next_ts: cfg.first_ts,
            cfg,
            steps: VecDeque::new(),
            cycle: 0,
            recent: VecDeque::new(),
            last: None,
            log,
            sending,
            cycles,
        }
    }

    async fn serve(mut self, mut listener: TcpListener, addr: SocketAddr) {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                continue;
            };
            let first = {
                let mut log = lock(&self.log);
                log.connections += 1;
                log.connected = true;
                log.connections == 1
            };
            let ended = self.connection(&mut ws, first).await;
            lock(&self.log).connected = false;
            drop(ws);
            if let Ended::Refuse = ended {
                drop(listener);
                tokio::time::sleep(self.cfg.refuse_for).await;
                // The port was ours a moment ago; retry briefly if the
                // kernel has not released it yet.
                let mut bound = None;
                for _ in 0..50 {
                    match TcpListener::bind(addr).await {
                        Ok(l) => {
                            bound = Some(l);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                match bound {
                    Some(l) => listener = l,
                    None => return,
                }
            }
        }
    }

    /// Plays the schedule on one connection until a fault ends it (or,
    /// in the tail, until the bridge goes away).
    async fn connection(&mut self, ws: &mut Ws, first: bool) -> Ended {
        if !first && self.cfg.replay > 0 {
            let replay: Vec<String> = self.recent.iter().cloned().collect();
            for text in replay {
                if ws.feed(Message::text(text)).await.is_err() {
                    return Ended::Next;
                }
                lock(&self.log).duplicates += 1;
            }
            if ws.flush().await.is_err() {
                return Ended::Next;
            }
        }
        loop {
            if self.steps.is_empty() {
                if self.cycle >= self.cfg.cycles {
                    return self.tail(ws).await;
                }
                self.plan_cycle();
            }
            let Some(step) = self.steps.pop_front() else {
                continue;
            };
            match step {
                Step::Valid(n) => {
                    if self.valid(ws, n).await.is_err() {
                        return Ended::Next;
                    }
                }
                Step::Fault(fault) => {
                    *lock(&self.log).faults.entry(fault).or_default() += 1;
                    let ended = self.fault(ws, fault).await;
                    if self.steps.is_empty() {
                        self.cycle += 1;
                        lock(&self.log).cycles_done = self.cycle;
                        self.cycles.send_replace(self.cycle);
                    }
                    match ended {
                        Ok(None) => {}
                        Ok(Some(e)) => return e,
                        Err(()) => return Ended::Next,
                    }
                }
            }
        }
    }

    fn plan_cycle(&mut self) {
        let mut faults = Fault::ALL;
        faults.shuffle(&mut self.rng);
        for f in faults {
            let n = self.rng.random_range(1..=8);
            self.steps.push_back(Step::Valid(n));
            self.steps.push_back(Step::Fault(f));
        }
    }

    /// The next valid message (new timestamp, 10 ms after the last).
    fn next_valid(&mut self) -> (i64, i64) {
        let ts = self.next_ts;
        self.next_ts += 10;
        (ts, self.rng.random_range(40..200))
    }

    /// Records a valid message handed to the socket.
    fn record_valid(&mut self, ts: i64, value: i64, text: &str) {
        lock(&self.log).valid.push((ts, value));
        if self.cfg.replay > 0 {
            if self.recent.len() == self.cfg.replay {
                self.recent.pop_front();
            }
            self.recent.push_back(text.to_string());
        }
        self.last = Some(text.to_string());
    }

    /// Sends `n` valid messages and flushes.
    async fn valid(&mut self, ws: &mut Ws, n: usize) -> Result<(), ()> {
        for _ in 0..n {
            let (ts, value) = self.next_valid();
            let text = valid_text(ts, value);
            ws.feed(Message::text(text.clone())).await.map_err(|_| ())?;
            self.record_valid(ts, value, &text);
        }
        ws.flush().await.map_err(|_| ())
    }

    async fn invalid(&mut self, ws: &mut Ws, msg: Message, reason: &'static str) -> Result<(), ()> {
        ws.send(msg).await.map_err(|_| ())?;
        *lock(&self.log).invalid.entry(reason).or_default() += 1;
        Ok(())
    }

    async fn fault(&mut self, ws: &mut Ws, fault: Fault) -> Result<Option<Ended>, ()> {
        let ts = self.next_ts;
        let reason = fault.reject_reason().unwrap_or("");
        match fault {
            Fault::Truncated => {
                let t = format!("{{\"timestamp\": {ts}, \"val");
                self.invalid(ws, Message::text(t), reason).await?;
            }
            Fault::NotJson => {
                let t = "hello\u{7}\"\n<not json>".to_string();
                self.invalid(ws, Message::text(t), reason).await?;
            }
            Fault::NotAnObject => {
                self.invalid(ws, Message::text(format!("[{ts}, 1]")), reason)
                    .await?;
            }
            Fault::Binary => {
                let b = format!("{{\"timestamp\": {ts}, \"value\": 1}}").into_bytes();
                self.invalid(ws, Message::binary(b), reason).await?;
            }
            Fault::MissingTimestamp => {
                self.invalid(ws, Message::text("{\"value\": 7}"), reason)
                    .await?;
            }
            Fault::MissingValue => {
                let t = format!("{{\"timestamp\": {ts}}}");
                self.invalid(ws, Message::text(t), reason).await?;
            }
            Fault::TimestampAsString => {
                let t = format!("{{\"timestamp\": \"{ts}\", \"value\": 3}}");
                self.invalid(ws, Message::text(t), reason).await?;
            }
            Fault::ValueNotNumber => {
                let t = format!("{{\"timestamp\": {ts}, \"value\": true}}");
                self.invalid(ws, Message::text(t), reason).await?;
            }
            Fault::FloatAsString => {
                let t = format!("{{\"timestamp\": {ts}, \"value\": \"21.5\"}}");
                self.invalid(ws, Message::text(t), reason).await?;
            }
            Fault::TimestampInSeconds => {
                let t = format!("{{\"timestamp\": {}, \"value\": 5}}", ts / 1000);
                self.invalid(ws, Message::text(t), reason).await?;
            }
            Fault::Duplicate => {
                if let Some(text) = self.last.clone() {
                    ws.send(Message::text(text)).await.map_err(|_| ())?;
                    lock(&self.log).duplicates += 1;
                }
            }
            Fault::OutOfOrder => {
                // Between two earlier 10 ms slots: new, but before the latest.
                let (ts, value) = (self.next_ts - 15, self.rng.random_range(40..200));
                let text = valid_text(ts, value);
                ws.send(Message::text(text.clone())).await.map_err(|_| ())?;
                self.record_valid(ts, value, &text);
            }
            Fault::Burst => {
                let n = self.rng.random_range(200..=500);
                self.valid(ws, n).await?;
            }
            Fault::LongSilence => {
                let quiet = self.cfg.idle_timeout * 3 / 2;
                read_for(ws, quiet).await;
            }
            Fault::TooLarge => {
                let pad = "x".repeat(self.cfg.max_message_bytes + 1);
                let t = format!("{{\"timestamp\": {ts}, \"value\": 1, \"pad\": \"{pad}\"}}");
                self.invalid(ws, Message::text(t), reason).await?;
                // The bridge drops the connection; wait for that (bounded).
                read_for(ws, self.cfg.idle_timeout * 2).await;
                return Ok(Some(Ended::Next));
            }
            Fault::AbruptClose => return Ok(Some(Ended::Next)),
            Fault::CloseWithError => {
                let frame = CloseFrame {
                    code: CloseCode::Error,
                    reason: "upstream failure".into(),
                };
                let _ = ws.send(Message::Close(Some(frame))).await;
                read_for(ws, Duration::from_secs(1)).await;
                return Ok(Some(Ended::Next));
            }
            Fault::HalfOpen => {
                // Not reading: pings go unanswered.
                tokio::time::sleep(self.cfg.idle_timeout * 2 + Duration::from_millis(200)).await;
                return Ok(Some(Ended::Next));
            }
            Fault::Refuse => return Ok(Some(Ended::Refuse)),
        }
        Ok(None)
    }

    /// After the cycles: the tail, until the bridge goes away.
    async fn tail(&mut self, ws: &mut Ws) -> Ended {
        let mut sending = self.sending.clone();
        loop {
            if !*sending.borrow_and_update() {
                // Quiet: answer pings until sending is turned on again or
                // the connection ends.
                tokio::select! {
                    r = sending.changed() => if r.is_err() { return Ended::Next },
                    more = ws.next() => match more {
                        Some(Ok(_)) => {}
                        _ => return Ended::Next,
                    },
                }
                continue;
            }
            match self.cfg.tail {
                Tail::Quiet => match ws.next().await {
                    Some(Ok(_)) => {}
                    _ => return Ended::Next,
                },
                Tail::Stream { every } => {
                    if self.valid(ws, 1).await.is_err() {
                        return Ended::Next;
                    }
                    // Answer pings meanwhile.
                    if read_for(ws, every).await {
                        return Ended::Next;
                    }
                }
                Tail::Flood => {
                    if self.valid(ws, 256).await.is_err() {
                        return Ended::Next;
                    }
                    // Take the bridge's pings now and then so the socket
                    // does not fill with them.
                    if read_for(ws, Duration::ZERO).await {
                        return Ended::Next;
                    }
                }
            }
        }
    }
}

/// The text of a valid message.
pub fn valid_text(ts: i64, value: i64) -> String {
    format!("{{\"timestamp\": {ts}, \"value\": {value}}}")
}

/// Reads (answering pings) for `d`; true if the connection ended.
async fn read_for(ws: &mut Ws, d: Duration) -> bool {
    let until = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => return false,
            Ok(Some(Ok(_))) => {}
            Ok(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_is_in_a_cycle_once_and_the_order_follows_the_seed() {
        let order = |seed| {
            let (_, sending) = watch::channel(true);
            let (cycles, _) = watch::channel(0);
            let cfg = Config::new(
                seed,
                1,
                Tail::Quiet,
                Duration::from_secs(1),
                1_800_000_000_000,
            );
            let mut feed = Feed::new(cfg, Arc::default(), sending, cycles);
            feed.plan_cycle();
            feed.steps
                .iter()
                .filter_map(|s| match s {
                    Step::Fault(f) => Some(*f),
                    Step::Valid(n) => {
                        assert!((1..=8).contains(n));
                        None
                    }
                })
                .collect::<Vec<_>>()
        };
        let a = order(7);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, Fault::ALL.to_vec());
        assert_eq!(a, order(7), "same seed, same schedule");
        assert_ne!(a, order(8), "another seed, another order");
    }
}
