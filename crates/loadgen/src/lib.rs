//! `widgetry loadgen`: simulated devices publishing protobuf batches over
//! real MQTT connections, with the agent's protocol (session, seq, resend
//! until acknowledged). It measures what the server really committed (from
//! its acks, and with `--http` by reading the samples back), not what was
//! sent. Bounded by device count and duration; stops by itself.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{Event, MqttOptions, Packet, QoS};
use tokio::sync::Mutex;
use tokio::time::Instant;
use widgetry_proto::json::Ack;
use widgetry_proto::{BatchBuilder, SeriesKey, SessionId, Topic, TopicKind};

use widgetry_common::{backoff, now_ms};

use crate::http::percentile;

pub mod api;
pub mod broker;
pub mod http;

/// Longest wait between a simulated device's reconnect attempts.
const RECONNECT_CAP: Duration = Duration::from_secs(10);

/// Loadgen settings.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub broker_host: String,
    pub broker_port: u16,
    /// Base URL of the web service, to read samples back (e.g. http://127.0.0.1:8080).
    pub http: Option<String>,
    pub devices: usize,
    /// Batches per second per device.
    pub rate: f64,
    pub samples_per_batch: usize,
    pub duration: Duration,
    pub qos: QoS,
    /// Resend a batch not acknowledged within this time.
    pub ack_timeout: Duration,
    /// After the run, how long to wait for outstanding acknowledgements.
    pub grace: Duration,
    /// Device ids are `{prefix}{n}`.
    pub prefix: String,
    /// Pid of the server, to report its RSS and CPU.
    pub server_pid: Option<u32>,
    /// Batches created during this first part of the run are left out of
    /// the latency percentiles (connections and series are being set up).
    pub warmup: Duration,
    /// Concurrent API clients (HTTP and live websocket) against `http`
    /// while the devices publish; 0 for none.
    pub api_clients: usize,
    /// A burst: from `at` after the start, for `len`, every device
    /// publishes `factor` times faster.
    pub burst: Option<Burst>,
}

/// See [`LoadConfig::burst`].
#[derive(Debug, Clone, Copy)]
pub struct Burst {
    pub at: Duration,
    pub len: Duration,
    pub factor: f64,
}

#[derive(Default)]
struct Totals {
    published: AtomicU64,
    resent: AtomicU64,
    acked: AtomicU64,
    connect_errors: AtomicU64,
}

/// What a run measured.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub devices: usize,
    pub batches_published: u64,
    pub batches_resent: u64,
    pub batches_acked: u64,
    pub batches_lost: u64,
    pub samples_committed: u64,
    pub elapsed_secs: f64,
    pub warmup_secs: f64,
    pub latency_ms: Vec<f64>,
    /// Publish → websocket message latencies (with `--http`), sorted.
    pub ws_latency_ms: Vec<f64>,
    /// Batches the websocket delivered more than once (must be 0).
    pub ws_duplicates: u64,
    pub connect_errors: u64,
    /// From reading back over HTTP: samples found above / below the
    /// acknowledged count (both must be 0).
    pub readback: Option<(u64, u64)>,
    /// Server (with `--server-pid`): RSS at the end in KiB, CPU % of one
    /// core over the run.
    pub server: Option<(u64, f64)>,
    /// With `--api-clients`: what the API clients measured.
    pub api: Option<crate::api::ApiReport>,
}

/// (utime + stime in clock ticks, RSS in KiB) of a process, from /proc.
fn proc_usage(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((ticks, rss))
}

impl LoadReport {
    fn pct(&self, p: f64) -> f64 {
        percentile(&self.latency_ms, p)
    }

    /// True when nothing was lost or duplicated and every API request
    /// succeeded (the command's exit status).
    pub fn clean(&self) -> bool {
        self.batches_lost == 0
            && self.readback.is_none_or(|r| r == (0, 0))
            && self.ws_duplicates == 0
            && self.api.as_ref().is_none_or(|a| a.clean())
    }

    /// The final report, one figure per line.
    pub fn render(&self) -> String {
        let (dup, missing) = self.readback.unwrap_or((0, 0));
        let readback = match self.readback {
            Some(_) => format!(
                "duplicated {dup}\nmissing on read-back {missing}\n\
                 publish->websocket latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} batches seen live, {} twice)",
                percentile(&self.ws_latency_ms, 50.0),
                percentile(&self.ws_latency_ms, 99.0),
                self.ws_latency_ms.last().copied().unwrap_or(f64::NAN),
                self.ws_latency_ms.len(),
                self.ws_duplicates,
            ),
            None => "duplicated: not checked (give --http to read samples back)".into(),
        };
        format!(
            "devices {}\nbatches published {} (resent {})\nbatches acknowledged {}\nlost {}\n{}\n\
             samples committed {} ({:.0} samples/s over {:.1} s)\n\
             publish->commit latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (batches created after a {:.0} s warm-up)\nconnect errors {}\n{}",
            self.devices,
            self.batches_published,
            self.batches_resent,
            self.batches_acked,
            self.batches_lost,
            readback,
            self.samples_committed,
            self.samples_committed as f64 / self.elapsed_secs.max(1e-9),
            self.elapsed_secs,
            self.pct(50.0),
            self.pct(99.0),
            self.latency_ms.last().copied().unwrap_or(f64::NAN),
            self.warmup_secs,
            self.connect_errors,
            match self.server {
                Some((rss, cpu)) => format!("server RSS {rss} KiB, CPU {cpu:.1} % of one core"),
                None => "server RSS/CPU: not measured (give --server-pid)".into(),
            },
        ) + &self
            .api
            .as_ref()
            .map(|a| format!("\n{}", a.render()))
            .unwrap_or_default()
    }
}

struct Pending {
    payload: Vec<u8>,
    first_sent: Instant,
    last_sent: Instant,
}

/// Runs the load; progress lines go to `progress` once a second.
pub async fn run(cfg: LoadConfig, mut progress: impl FnMut(String)) -> LoadReport {
    let server_before = cfg.server_pid.and_then(proc_usage);
    let totals = Arc::new(Totals::default());
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let acked_per_device = Arc::new(Mutex::new(BTreeMap::new()));
    let sent_at: SentAt = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let watch_stop = tokio_util::sync::CancellationToken::new();
    let watcher = cfg
        .http
        .clone()
        .map(|base| tokio::spawn(watch_live(base, sent_at.clone(), watch_stop.clone())));
    let start = Instant::now();
    let run_until = start + cfg.duration;
    let give_up = run_until + cfg.grace;
    let api_done = crate::api::Counter::default();
    let api = match (&cfg.http, cfg.api_clients) {
        (Some(base), n) if n > 0 => {
            let devices = Arc::new(
                (0..cfg.devices.max(1))
                    .map(|n| format!("{}{n}", cfg.prefix))
                    .collect(),
            );
            let (base, done) = (base.clone(), api_done.clone());
            // Devices start spread over one interval; their first batches
            // are committed within about a second more.
            let from = (start + Duration::from_secs_f64(1.0 / cfg.rate.max(0.01) + 2.0))
                .max(start + cfg.warmup)
                .min(run_until);
            Some(tokio::spawn(async move {
                crate::api::run(&base, n, devices, from, run_until, done).await
            }))
        }
        _ => None,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..cfg.devices {
        let device = format!("{}{n}", cfg.prefix);
        let cfg = cfg.clone();
        let totals = totals.clone();
        let latencies = latencies.clone();
        let acked_per_device = acked_per_device.clone();
        let sent_at = cfg.http.is_some().then(|| sent_at.clone());
        // Spread connects and first publishes over one interval.
        let offset = Duration::from_secs_f64(n as f64 / cfg.devices as f64 / cfg.rate.max(0.01));
        let measure_from = start + cfg.warmup;
        let burst = cfg
            .burst
            .map(|b| (start + b.at, start + b.at + b.len, b.factor.max(1.0)));
        tasks.spawn(async move {
            let when = Schedule {
                offset,
                run_until,
                give_up,
                measure_from,
                burst,
            };
            let (acked, lost) =
                device_loop(&cfg, &device, when, &totals, &latencies, sent_at).await;
            acked_per_device.lock().await.insert(device, (acked, lost));
        });
    }
    let mut last = (0u64, 0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            joined = tasks.join_next() => if joined.is_none() { break },
            _ = tick.tick() => {
                let p = totals.published.load(Ordering::Relaxed);
                let a = totals.acked.load(Ordering::Relaxed);
                let r = api_done.load(Ordering::Relaxed);
                progress(format!(
                    "{:>5.0}s  published {:>8} batches ({:>7} /s)  acknowledged {:>8} ({:>7} /s = {:>9} samples/s)  outstanding {:>6}  resent {}{}",
                    start.elapsed().as_secs_f64(),
                    p, p - last.0, a, a - last.1,
                    (a - last.1) * cfg.samples_per_batch as u64,
                    p.saturating_sub(a),
                    totals.resent.load(Ordering::Relaxed),
                    if api.is_some() { format!("  API requests {:>7} /s", r - last.2) } else { String::new() },
                ));
                last = (p, a, r);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Give the websocket a moment for the last commits, then stop it.
    let mut ws = (Vec::new(), 0);
    if let Some(w) = watcher {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while sent_at.lock().map(|m| !m.is_empty()).unwrap_or(false) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        watch_stop.cancel();
        if let Ok(r) = w.await {
            ws = r;
        }
    }
    let (mut ws_latency_ms, ws_duplicates) = ws;
    ws_latency_ms.sort_by(f64::total_cmp);
    let mut latency_ms = std::mem::take(&mut *latencies.lock().await);
    latency_ms.sort_by(f64::total_cmp);
    let per_device = std::mem::take(&mut *acked_per_device.lock().await);
    let acked: u64 = per_device.values().map(|v| v.0).sum();
    let lost: u64 = per_device.values().map(|v| v.1).sum();
    let mut report = LoadReport {
        devices: cfg.devices,
        batches_published: totals.published.load(Ordering::Relaxed),
        batches_resent: totals.resent.load(Ordering::Relaxed),
        batches_acked: acked,
        batches_lost: lost,
        samples_committed: acked * cfg.samples_per_batch as u64,
        elapsed_secs: elapsed,
        warmup_secs: cfg.warmup.as_secs_f64(),
        latency_ms,
        ws_latency_ms,
        ws_duplicates,
        connect_errors: totals.connect_errors.load(Ordering::Relaxed),
        readback: None,
        server: None,
        api: None,
    };
    if let Some(task) = api {
        report.api = task.await.ok();
    }
    if let (Some(pid), Some((t0, _))) = (cfg.server_pid, server_before)
        && let Some((t1, rss)) = proc_usage(pid)
    {
        // Linux reports CPU time in USER_HZ = 100 ticks per second.
        report.server = Some((rss, (t1 - t0) as f64 / 100.0 / elapsed * 100.0));
    }
    if let Some(base) = &cfg.http {
        progress(format!("reading samples back from {base} ..."));
        let per_series = cfg
            .samples_per_batch
            .div_ceil(cfg.samples_per_batch.clamp(1, 10)) as u64;
        report.readback = Some(read_back(base, &per_device, per_series, start_ms(elapsed)).await);
    }
    report
}

fn start_ms(elapsed_secs: f64) -> i64 {
    now_ms() - (elapsed_secs * 1000.0) as i64 - 60_000
}

/// When one simulated device starts, stops publishing, gives up waiting
/// for acks, and starts measuring latency.
struct Schedule {
    offset: Duration,
    run_until: Instant,
    give_up: Instant,
    measure_from: Instant,
    /// (from, until, rate factor).
    burst: Option<(Instant, Instant, f64)>,
}

/// One simulated device; returns (batches acknowledged, batches lost).
async fn device_loop(
    cfg: &LoadConfig,
    device: &str,
    when: Schedule,
    totals: &Totals,
    latencies: &Mutex<Vec<f64>>,
    sent_at: Option<SentAt>,
) -> (u64, u64) {
    let Schedule {
        offset,
        run_until,
        give_up,
        measure_from,
        burst,
    } = when;
    let session = SessionId::generate();
    let samples_topic = Topic::name(device, TopicKind::Samples);
    let ack_topic = Topic::name(device, TopicKind::Ack);
    let mut opts = MqttOptions::new(
        format!("loadgen-{device}"),
        cfg.broker_host.clone(),
        cfg.broker_port,
    );
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(2 << 20, 2 << 20);
    let (client, mut events) = widgetry_common::mqtt_client(opts, 256);
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(256);
    // The event loop in its own task: poll() must never be cancelled.
    let ack_filter = ack_topic.clone();
    let driver = tokio::spawn(async move {
        let mut failures = 0;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    if ev_tx.send(None).await.is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_filter => {
                    if ev_tx.send(Some(p.payload.to_vec())).await.is_err() {
                        return;
                    }
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(_) => {
                    failures += 1;
                    if ev_tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(backoff(failures, RECONNECT_CAP)).await;
                }
            }
        }
    });
    let series: Vec<SeriesKey> = (0..cfg.samples_per_batch.clamp(1, 10))
        .map(|i| SeriesKey::plain(format!("load.s{i}")))
        .collect();
    let per_series = cfg.samples_per_batch.div_ceil(series.len());
    let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
    let mut seq = 0u64;
    let mut acked = 0u64;
    let mut connected = false;
    let period = Duration::from_secs_f64(1.0 / cfg.rate.max(0.001));
    let mut next_batch = Instant::now() + offset;
    let mut resend_check = tokio::time::interval(Duration::from_millis(500));
    let mut builder = BatchBuilder::default();
    let mut value = 0.0f64;
    loop {
        let now = Instant::now();
        if now >= give_up || (now >= run_until && pending.is_empty()) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next_batch), if next_batch < run_until => {
                seq += 1;
                let ts = now_ms();
                let mut left = cfg.samples_per_batch;
                for (id, _) in series.iter().enumerate() {
                    for k in 0..per_series.min(left) {
                        value += 0.5;
                        builder.push(id as u32, ts - (per_series - 1 - k) as i64, value);
                    }
                    left = left.saturating_sub(per_series);
                }
                // Definitions travel until one batch carrying them is acked.
                let defs = if acked == 0 {
                    series.iter().enumerate().map(|(i, k)| (i as u32, k.clone())).collect()
                } else {
                    Vec::new()
                };
                let payload = builder.finish(session, seq, defs).encode();
                let sent = Instant::now();
                // Counted when created: one not sent now goes out on (re)connect.
                totals.published.fetch_add(1, Ordering::Relaxed);
                if connected {
                    let _ = client.try_publish(&samples_topic, cfg.qos, false, payload.clone());
                }
                if let Some(m) = sent_at.as_ref().filter(|_| sent >= measure_from)
                    && let Ok(mut m) = m.lock()
                {
                    m.insert((device.to_string(), seq), sent);
                }
                pending.insert(seq, Pending { payload, first_sent: sent, last_sent: sent });
                next_batch += match burst {
                    Some((from, until, factor)) if (from..until).contains(&next_batch) => {
                        period.div_f64(factor)
                    }
                    _ => period,
                };
            }
            _ = resend_check.tick() => {
                if connected {
                    let now = Instant::now();
                    for p in pending.values_mut().filter(|p| now - p.last_sent >= cfg.ack_timeout).take(64) {
                        if client.try_publish(&samples_topic, cfg.qos, false, p.payload.clone()).is_ok() {
                            p.last_sent = now;
                            totals.resent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            ev = ev_rx.recv() => match ev {
                Some(None) => {
                    connected = true;
                    let _ = client.try_subscribe(&ack_topic, QoS::AtLeastOnce);
                    // Unsent or unacknowledged batches go out again.
                    let now = Instant::now();
                    for p in pending.values_mut() {
                        if client.try_publish(&samples_topic, cfg.qos, false, p.payload.clone()).is_ok() {
                            p.last_sent = now;
                        }
                    }
                }
                Some(Some(payload)) => {
                    if let Ok(ack) = serde_json::from_slice::<Ack>(&payload) {
                        if ack.session != session {
                            continue;
                        }
                        let now = Instant::now();
                        let done: Vec<u64> = pending
                            .keys()
                            .copied()
                            .filter(|s| *s <= ack.through || ack.seqs.binary_search(s).is_ok())
                            .collect();
                        let mut lat = Vec::with_capacity(done.len());
                        let mut newly = 0u64;
                        for s in done {
                            if let Some(p) = pending.remove(&s) {
                                if p.first_sent >= measure_from {
                                    lat.push((now - p.first_sent).as_secs_f64() * 1000.0);
                                }
                                acked += 1;
                                newly += 1;
                            }
                        }
                        totals.acked.fetch_add(newly, Ordering::Relaxed);
                        latencies.lock().await.extend(lat);
                    }
                }
                None => {
                    totals.connect_errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            },
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
    (acked, pending.len() as u64)
}

/// When each measured batch was first published, until the websocket
/// delivers it.
type SentAt = Arc<std::sync::Mutex<HashMap<(String, u64), Instant>>>;

/// Follows `GET /api/v1/live` (series `load.s0` of every device) and
/// measures publish → websocket latency; returns (latencies, batches
/// delivered twice).
async fn watch_live(
    base: String,
    sent_at: SentAt,
    stop: tokio_util::sync::CancellationToken,
) -> (Vec<f64>, u64) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let url = format!("ws://{}/api/v1/live", crate::http::host_port(&base));
    let mut lat = Vec::new();
    let mut seen: std::collections::HashSet<(String, u64)> = Default::default();
    let mut dup = 0;
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(&url).await else {
        eprintln!("loadgen: cannot open {url}; publish->websocket latency not measured");
        return (lat, dup);
    };
    let sub = r#"{"subscribe":{"devices":null,"series":["load.s0"]}}"#;
    if ws.send(Message::Text(sub.into())).await.is_err() {
        return (lat, dup);
    }
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = ws.next() => m,
        };
        let Some(Ok(Message::Text(text))) = msg else {
            if msg.is_none() {
                break;
            }
            continue;
        };
        let now = Instant::now();
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text.as_str()) else {
            continue;
        };
        if v["type"] == "lost" {
            eprintln!("loadgen: the live websocket reports lost data: {v}");
        }
        let (Some(device), Some(seq)) = (v["device"].as_str(), v["seq"].as_u64()) else {
            continue;
        };
        let key = (device.to_string(), seq);
        if let Some(t) = sent_at.lock().ok().and_then(|mut m| m.remove(&key)) {
            lat.push((now - t).as_secs_f64() * 1000.0);
        }
        if !seen.insert(key) {
            dup += 1;
        }
    }
    (lat, dup)
}

/// Reads `load.s0` of every device back over HTTP and compares the count
/// with what was acknowledged (`per_series` s0 samples per batch): returns
/// (duplicated, missing).
async fn read_back(
    base: &str,
    per_device: &BTreeMap<String, (u64, u64)>,
    per_series: u64,
    from: i64,
) -> (u64, u64) {
    let addr = crate::http::host_port(base);
    let mut dup = 0;
    let mut missing = 0;
    for (device, (acked, _)) in per_device {
        let path =
            format!("/api/v1/series?device={device}&series=load.s0&from={from}&max_points=100000");
        let count = match http_points(addr, &path).await {
            Some(c) => c,
            None => {
                missing += acked;
                continue;
            }
        };
        let expected = acked * per_series;
        if count > expected {
            dup += count - expected;
        } else {
            missing += expected - count;
        }
    }
    (dup, missing)
}

/// Number of points a series query returns.
async fn http_points(addr: &str, path: &str) -> Option<u64> {
    let v = crate::http::get_json(addr, path).await.ok()?;
    Some(v["points"].as_array()?.len() as u64)
}
