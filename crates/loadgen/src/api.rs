//! `widgetry loadgen --api-clients N`: concurrent dashboard-like HTTP
//! clients and live websocket clients against the web service while the
//! simulated devices publish. Each HTTP client loops over the device list,
//! the fleet overview and series queries (a short raw range and a long
//! bucketed one) of random devices; every fourth client instead follows
//! `GET /api/v1/live` for one device. Bounded by the run's duration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use crate::http::{get_json, host_port, percentile};
use widgetry_common::now_ms;

/// The HTTP requests a client cycles through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Endpoint {
    Devices,
    Fleet,
    /// Last 5 minutes of one series, raw points.
    Series5m,
    /// Last hour of one series in at most 300 buckets.
    Series1h,
}

impl Endpoint {
    const ALL: [Endpoint; 4] = [
        Endpoint::Devices,
        Endpoint::Fleet,
        Endpoint::Series5m,
        Endpoint::Series1h,
    ];

    fn label(self) -> &'static str {
        match self {
            Endpoint::Devices => "GET /api/v1/devices",
            Endpoint::Fleet => "GET /api/v1/fleet",
            Endpoint::Series5m => "GET /api/v1/series (5 min, raw)",
            Endpoint::Series1h => "GET /api/v1/series (1 h, 300 buckets)",
        }
    }

    fn path(self, device: &str, now: i64) -> String {
        match self {
            Endpoint::Devices => "/api/v1/devices".into(),
            Endpoint::Fleet => "/api/v1/fleet".into(),
            Endpoint::Series5m => format!(
                "/api/v1/series?device={device}&series=load.s0&from={}&to={now}",
                now - 300_000
            ),
            Endpoint::Series1h => format!(
                "/api/v1/series?device={device}&series=load.s0&from={}&to={now}&max_points=300",
                now - 3_600_000
            ),
        }
    }
}

/// Latencies (ms) and failures of one endpoint.
#[derive(Debug, Default, Clone)]
pub struct EndpointStats {
    pub latency_ms: Vec<f64>,
    pub errors: u64,
    /// First error seen, to show what went wrong.
    pub first_error: Option<String>,
}

/// What the API clients measured.
#[derive(Debug, Default, Clone)]
pub struct ApiReport {
    pub http_clients: usize,
    pub ws_clients: usize,
    pub elapsed_secs: f64,
    pub endpoints: BTreeMap<Endpoint, EndpointStats>,
    /// Websocket messages received, `lost` notices, and clients that could
    /// not connect or were disconnected.
    pub ws_messages: u64,
    pub ws_lost: u64,
    pub ws_errors: u64,
}

/// Requests finished so far (for progress lines).
pub type Counter = Arc<AtomicU64>;

/// Runs `clients` API clients against `base` (`http://host:port`) from
/// `from` (once every simulated device has published, so a 404 is an
/// error) until `until`; `devices` are the ids the simulated devices use.
pub async fn run(
    base: &str,
    clients: usize,
    devices: Arc<Vec<String>>,
    from: Instant,
    until: Instant,
    done: Counter,
) -> ApiReport {
    tokio::time::sleep_until(from).await;
    let addr = host_port(base).to_string();
    let start = Instant::now();
    let ws_clients = clients / 4;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..clients {
        let addr = addr.clone();
        let devices = devices.clone();
        let done = done.clone();
        if n % 4 == 3 {
            tasks.spawn(async move {
                Outcome::Ws(ws_client(&addr, &devices[n % devices.len()], until).await)
            });
        } else {
            tasks.spawn(async move {
                Outcome::Http(http_client(&addr, n, &devices, until, &done).await)
            });
        }
    }
    let mut report = ApiReport {
        http_clients: clients - ws_clients,
        ws_clients,
        ..ApiReport::default()
    };
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Outcome::Http(stats)) => {
                for (ep, s) in stats {
                    let e = report.endpoints.entry(ep).or_default();
                    e.latency_ms.extend(s.latency_ms);
                    e.errors += s.errors;
                    if e.first_error.is_none() {
                        e.first_error = s.first_error;
                    }
                }
            }
            Ok(Outcome::Ws((messages, lost, failed))) => {
                report.ws_messages += messages;
                report.ws_lost += lost;
                report.ws_errors += u64::from(failed);
            }
            Err(_) => report.ws_errors += 1,
        }
    }
    for s in report.endpoints.values_mut() {
        s.latency_ms.sort_by(f64::total_cmp);
    }
    report.elapsed_secs = start.elapsed().as_secs_f64();
    report
}

enum Outcome {
    Http(BTreeMap<Endpoint, EndpointStats>),
    Ws((u64, u64, bool)),
}

async fn http_client(
    addr: &str,
    n: usize,
    devices: &[String],
    until: Instant,
    done: &AtomicU64,
) -> BTreeMap<Endpoint, EndpointStats> {
    let mut stats: BTreeMap<Endpoint, EndpointStats> = BTreeMap::new();
    let mut i = n;
    while Instant::now() < until {
        let ep = Endpoint::ALL[i % Endpoint::ALL.len()];
        let device = &devices[(i * 7919) % devices.len()];
        i += 1;
        let t0 = Instant::now();
        let res = get_json(addr, &ep.path(device, now_ms())).await;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        let s = stats.entry(ep).or_default();
        match res {
            Ok(_) => s.latency_ms.push(ms),
            Err(e) => {
                s.errors += 1;
                s.first_error.get_or_insert(e);
                // Do not spin on a dead server.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    stats
}

/// Follows one device's live feed; returns (messages, lost notices,
/// failed).
async fn ws_client(addr: &str, device: &str, until: Instant) -> (u64, u64, bool) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let url = format!("ws://{addr}/api/v1/live");
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(&url).await else {
        return (0, 0, true);
    };
    let sub = serde_json::json!({"subscribe": {"devices": [device], "series": null}});
    if ws
        .send(Message::Text(sub.to_string().into()))
        .await
        .is_err()
    {
        return (0, 0, true);
    }
    let (mut messages, mut lost) = (0, 0);
    loop {
        let msg = tokio::select! {
            _ = tokio::time::sleep_until(until) => return (messages, lost, false),
            m = ws.next() => m,
        };
        match msg {
            Some(Ok(Message::Text(t))) => {
                messages += 1;
                if t.as_str().contains(r#""type":"lost""#) {
                    lost += 1;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (messages, lost, true),
        }
    }
}

impl ApiReport {
    /// One line per endpoint plus totals.
    pub fn render(&self) -> String {
        let mut out = format!(
            "API load: {} HTTP clients, {} live websocket clients, {:.1} s\n",
            self.http_clients, self.ws_clients, self.elapsed_secs
        );
        let mut total = 0;
        let mut errors = 0;
        for (ep, s) in &self.endpoints {
            let n = s.latency_ms.len() as u64;
            total += n;
            errors += s.errors;
            out.push_str(&format!(
                "  {:<38} {:>7} ok ({:>7.1} req/s)  p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  errors {}{}\n",
                ep.label(),
                n,
                n as f64 / self.elapsed_secs.max(1e-9),
                percentile(&s.latency_ms, 50.0),
                percentile(&s.latency_ms, 99.0),
                s.latency_ms.last().copied().unwrap_or(f64::NAN),
                s.errors,
                s.first_error
                    .as_ref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default(),
            ));
        }
        out.push_str(&format!(
            "  total {} requests ({:.1} req/s), {} errors\n  live websocket: {} messages, {} lost notices, {} failed clients",
            total,
            total as f64 / self.elapsed_secs.max(1e-9),
            errors,
            self.ws_messages,
            self.ws_lost,
            self.ws_errors
        ));
        out
    }

    /// Whether every request and websocket succeeded.
    pub fn clean(&self) -> bool {
        self.ws_errors == 0 && self.endpoints.values().all(|s| s.errors == 0)
    }
}
