//! The statsd source (`serve --statsd`): one task that receives UDP
//! packets of statsd/DogStatsD lines, parses them with `widgetry-statsd`
//! (the agent's parser) into one [`Aggregator`] held within its byte
//! budget, and at each flush hands the aggregates to the ingest writer as
//! [`Item::Json`] samples of the configured device, or of the device a
//! `device:NAME` tag names. One writer stores everything, so statsd
//! samples reach `/api/v1/series`, the rollups and the live feed like any
//! device's.
//!
//! It must never hold more than the aggregator's budget and one 64 KiB
//! packet buffer, never cost the async runtime's threads (receiving,
//! parsing and aggregating run on a thread of their own; the writer's
//! queue is its only link to the runtime), and never lose what it holds
//! at shutdown: the last interval is flushed before the thread ends. Bad lines are counted by reason and logged at
//! most once per reason per [`LOG_EVERY`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use std::time::Instant;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use widgetry_common::{excerpt, now_ms};
use widgetry_proto::SeriesKey;
use widgetry_proto::json::KeyedSample;
use widgetry_proto::validate::validate_device;
use widgetry_statsd::{Aggregator, BadLine, Metric, parse_packet};

use super::Item;
use crate::config::roles::StatsdConfig;
use crate::metrics::{Metrics, STATSD_BAD_LINES};

/// A bad line is logged at most once per reason per this long; the
/// counter counts every one.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Most samples in one item for the writer, so that a flush of many
/// series becomes several transactions of bounded size.
pub const MAX_ITEM_SAMPLES: usize = 1000;

/// The DogStatsD tag that names the device of a metric.
const DEVICE_TAG: &str = "device";

/// Largest UDP payload.
const PACKET_BYTES: usize = 65_536;

/// Index of the reason of a bad `device:` tag in [`STATSD_BAD_LINES`].
const BAD_DEVICE: usize = BadLine::ALL.len();

/// The listener's state between packets.
struct Listener {
    cfg: StatsdConfig,
    aggregator: Aggregator,
    metrics: Arc<Metrics>,
    /// When each reason of [`STATSD_BAD_LINES`] was last logged, and how
    /// many lines of it were not logged since.
    logged: [(Option<Instant>, u64); STATSD_BAD_LINES.len()],
}

/// The receive buffer the listener asks the kernel for: a burst of
/// packets waits there while the thread flushes. Linux grants at most
/// `net.core.rmem_max` (see the README).
pub const RECEIVE_BUFFER_BYTES: usize = 8 << 20;

/// How often the receiving thread looks at the shutdown token and the
/// flush deadline while no packet comes.
const POLL: Duration = Duration::from_millis(100);

/// Binds the listener's socket (before `serve` reports it is serving),
/// with a receive buffer of up to [`RECEIVE_BUFFER_BYTES`].
pub async fn bind(cfg: &StatsdConfig) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(cfg.listen),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(RECEIVE_BUFFER_BYTES);
    socket.bind(&cfg.listen.into())?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// Receives and aggregates until `shutdown`, flushing every `cfg.flush`
/// and once more at the end; then drops its sender of the writer's queue.
///
/// All of it runs on a thread of its own, not on the async runtime: a
/// flood of packets costs that thread's time, never the other sources'.
pub async fn run(
    socket: UdpSocket,
    cfg: StatsdConfig,
    tx: mpsc::Sender<Item>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    metrics.statsd.enabled.store(true, Ordering::Relaxed);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("statsd".into())
        .spawn(move || {
            receive(socket, cfg, tx, metrics, shutdown);
            let _ = done_tx.send(());
        });
    match spawned {
        // An error here means the thread ended without its send: it
        // panicked, and the panic was printed.
        Ok(_) => {
            if done.await.is_err() {
                warn!("the statsd listener's thread ended abnormally");
            }
        }
        Err(e) => warn!(error = %e, "cannot start the statsd listener's thread"),
    }
}

/// The receiving thread's loop.
fn receive(
    socket: UdpSocket,
    cfg: StatsdConfig,
    tx: mpsc::Sender<Item>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let socket = match socket.into_std().and_then(|s| {
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(POLL))?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "statsd socket cannot be made blocking; the listener stops");
            return;
        }
    };
    let listen = socket.local_addr().unwrap_or(cfg.listen);
    let granted = socket2::SockRef::from(&socket)
        .recv_buffer_size()
        .unwrap_or(0);
    info!(listen = %listen, flush = ?cfg.flush, device = %cfg.device, receive_buffer = granted, "statsd listener started");
    let mut listener = Listener {
        aggregator: Aggregator::new(widgetry_statsd::Config {
            percentiles: cfg.percentiles.clone(),
            ..Default::default()
        }),
        metrics,
        logged: [(None, 0); STATSD_BAD_LINES.len()],
        cfg,
    };
    let mut buf = vec![0u8; PACKET_BYTES];
    let mut last_flush = Instant::now();
    let mut next_flush = last_flush + listener.cfg.flush;
    while !shutdown.is_cancelled() {
        match socket.recv(&mut buf) {
            Ok(n) => listener.packet(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // ICMP errors and the like: the next packet may be fine.
            Err(e) => warn!(error = %e, "statsd receive failed"),
        }
        let now = Instant::now();
        if now >= next_flush {
            let items = listener.flush(listener.cfg.flush.as_secs_f64());
            last_flush = now;
            // Missed intervals are skipped, not caught up on.
            while next_flush <= now {
                next_flush += listener.cfg.flush;
            }
            // Backpressure: while the writer is behind, this thread waits
            // and packets wait in the socket's buffer (the kernel drops
            // beyond it). The writer drains its queue even at shutdown, so
            // these sends complete.
            if !send(&tx, items) {
                return;
            }
        }
    }
    let items = listener.flush(last_flush.elapsed().as_secs_f64());
    let samples: usize = items.iter().map(item_samples).sum();
    if send(&tx, items) {
        info!(
            samples,
            "statsd listener stopped after flushing what it held"
        );
    }
}

/// Sends `items` to the writer, waiting while its queue is full; false if
/// it has stopped.
fn send(tx: &mpsc::Sender<Item>, items: Vec<Item>) -> bool {
    for item in items {
        if tx.blocking_send(item).is_err() {
            warn!(
                "the ingest writer stopped before the statsd listener's flush; its samples are lost"
            );
            return false;
        }
    }
    true
}

fn item_samples(item: &Item) -> usize {
    match item {
        Item::Json { samples, .. } => samples.len(),
        _ => 0,
    }
}

impl Listener {
    /// Parses one packet (any number of lines) into the aggregator.
    fn packet(&mut self, packet: &[u8]) {
        let m = &self.metrics.statsd;
        m.packets.fetch_add(1, Ordering::Relaxed);
        let mut lines = 0u64;
        for parsed in parse_packet(packet) {
            lines += 1;
            match parsed {
                Ok(metric) => self.metric(metric),
                Err(e) => self.bad_line(e.reason as usize, &e.line),
            }
        }
        self.metrics
            .statsd
            .lines
            .fetch_add(lines, Ordering::Relaxed);
        self.metrics.statsd.set_dropped(self.aggregator.stats());
    }

    fn metric(&mut self, metric: Metric) {
        if let Some(device) = metric.key.labels.get(DEVICE_TAG)
            && validate_device(device).is_err()
        {
            let line = format!("{}|#{DEVICE_TAG}:{device}", metric.key.name);
            self.bad_line(BAD_DEVICE, &line);
            return;
        }
        // A drop is counted in the aggregator's stats.
        let _ = self.aggregator.add(metric);
    }

    /// Counts a bad line and logs it unless its reason was logged less
    /// than [`LOG_EVERY`] ago.
    fn bad_line(&mut self, reason: usize, line: &str) {
        let code = STATSD_BAD_LINES[reason];
        self.metrics.statsd.bad_line(code);
        let (last, quiet) = &mut self.logged[reason];
        if last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            *quiet += 1;
            return;
        }
        warn!(
            reason = code,
            line = %excerpt(line),
            not_logged = *quiet,
            "statsd line skipped (logged once per reason per {}s; widgetry_statsd_bad_lines_total counts them all)",
            LOG_EVERY.as_secs()
        );
        *last = Some(Instant::now());
        *quiet = 0;
    }

    /// The aggregates of the interval that lasted `interval_secs`, as
    /// items for the writer: samples at the flush time, grouped by device
    /// (the `device` tag, taken off the series' labels, or the configured
    /// device), at most [`MAX_ITEM_SAMPLES`] per item.
    fn flush(&mut self, interval_secs: f64) -> Vec<Item> {
        let ts_ms = now_ms();
        let mut by_device: HashMap<String, Vec<KeyedSample>> = HashMap::new();
        let default = &self.cfg.device;
        self.aggregator
            .flush(interval_secs, |mut series: SeriesKey, value| {
                let device = series
                    .labels
                    .remove(DEVICE_TAG)
                    .unwrap_or_else(|| default.clone());
                by_device.entry(device).or_default().push(KeyedSample {
                    series,
                    ts_ms,
                    value,
                });
            });
        self.metrics.statsd.set_dropped(self.aggregator.stats());
        let mut items = Vec::new();
        let mut total = 0;
        for (device, samples) in by_device {
            total += samples.len();
            for chunk in samples.chunks(MAX_ITEM_SAMPLES) {
                items.push(Item::Json {
                    device: device.clone(),
                    samples: chunk.to_vec(),
                    received_ms: ts_ms,
                });
            }
        }
        self.metrics
            .statsd
            .samples
            .fetch_add(total as u64, Ordering::Relaxed);
        items
    }
}
