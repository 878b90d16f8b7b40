//! The HTTP API and dashboard (axum): devices, series ranges, health and
//! Prometheus metrics. It reads the database only; it must never write.
//!
//! Errors are JSON `{"error": {"code", "message"}}` with a 4xx/5xx status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use widgetry_proto::SeriesKey;
use widgetry_proto::validate::validate_device;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::live::{Hub, HubMsg, Subscription};
use crate::metrics::Metrics;
use crate::rollup::{Agg, Plan};
use crate::store::{DeviceInfo, Store, StoreError};
use widgetry_common::now_ms;

// The dashboard: every file of `web-ui/dist/`, embedded by build.rs.
include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
    /// Cancelled at shutdown: websocket clients are closed.
    pub shutdown: CancellationToken,
    /// The fleet-wide answers (`/api/v1/devices`, `/api/v1/fleet`), shared
    /// by every client asking within a second.
    pub overview: Arc<OverviewCache>,
}

/// How long a fleet-wide answer is reused. Live changes reach dashboards
/// over the websocket; this only bounds how often the whole fleet is read.
const OVERVIEW_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// One cached JSON answer per fleet-wide endpoint. Concurrent requests for
/// a stale answer wait for one database read instead of each starting
/// their own (with 2,000 devices each read takes tens of milliseconds of
/// CPU: unshared, forty polling dashboards starved the ingestor).
#[derive(Default)]
pub struct OverviewCache {
    devices: Slot,
    fleet: Slot,
}

/// The last answer of one endpoint and when it was made.
type Slot = tokio::sync::Mutex<Option<(tokio::time::Instant, axum::body::Bytes)>>;

/// The cached answer in `slot`, or a fresh one from `make`.
async fn cached<F, Fut, T>(slot: &Slot, make: F) -> Result<Response, AppError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T, AppError>>,
    T: Serialize,
{
    let mut guard = slot.lock().await;
    let body = match &*guard {
        Some((at, body)) if at.elapsed() < OVERVIEW_TTL => body.clone(),
        _ => {
            let value = make().await?;
            let body = axum::body::Bytes::from(
                serde_json::to_vec(&value)
                    .map_err(|e| AppError::internal(format!("cannot encode the answer: {e}")))?,
            );
            *guard = Some((tokio::time::Instant::now(), body.clone()));
            body
        }
    };
    drop(guard);
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// An error answered as JSON.
#[derive(Debug)]
pub struct AppError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl AppError {
    fn bad_request(message: impl Into<String>) -> Self {
        AppError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        AppError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!(%message, "internal error while serving a request");
        AppError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message,
        }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "database error while serving a request");
        AppError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: "database error; see the server log".into(),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

/// Builds the router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/{*path}", get(asset))
        .route("/api/v1/fleet", get(fleet))
        .route("/api/v1/live", get(live))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/series", get(series))
        .route("/api/v1/events", get(events))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

async fn count_requests(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    state.metrics.http_requests.fetch_add(1, Ordering::Relaxed);
    next.run(req).await
}

async fn not_found(uri: axum::http::Uri) -> Response {
    // Other files of the dashboard (icons etc.) live at the root.
    let path = uri.path().trim_start_matches('/');
    if !path.starts_with("api/") && ASSETS.iter().any(|(p, _, _)| *p == path) {
        return serve_asset(path);
    }
    AppError::not_found(format!(
        "no route for {uri}; the API is under /api/v1/ (devices, fleet, series, events, live)"
    ))
    .into_response()
}

async fn index() -> Response {
    serve_asset("index.html")
}

async fn asset(axum::extract::Path(path): axum::extract::Path<String>) -> Response {
    serve_asset(&format!("assets/{path}"))
}

fn serve_asset(path: &str) -> Response {
    match ASSETS.iter().find(|(p, _, _)| *p == path) {
        Some((_, mime, body)) => {
            // Hashed asset names never change content; index.html may.
            let cache = if path == "index.html" {
                "no-cache"
            } else {
                "public, max-age=31536000, immutable"
            };
            (
                [
                    (header::CONTENT_TYPE, *mime),
                    (header::CACHE_CONTROL, cache),
                ],
                *body,
            )
                .into_response()
        }
        None => AppError::not_found(format!("no dashboard file {path}")).into_response(),
    }
}

/// `GET /api/v1/fleet`: every device with state, counters, latest CPU and
/// memory and 30-minute sparklines, in one answer.
async fn fleet(State(state): State<AppState>) -> Result<Response, AppError> {
    cached(&state.overview.fleet, || async {
        let now = now_ms();
        let devices = state.store.fleet(now - 30 * 60_000).await?;
        Ok(json!({"now": now, "devices": devices}))
    })
    .await
}

/// Largest backlog (committed batches) replayed to a client that
/// resubscribes with `since`; past it the client is told it lost data and
/// reloads from history.
const MAX_BACKLOG: u64 = 200_000;
/// A client that cannot take a message for this long is disconnected.
const WS_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn live(ws: WebSocketUpgrade, State(state): State<AppState>) -> Response {
    ws.max_message_size(64 * 1024)
        .on_upgrade(move |socket| live_client(socket, state))
}

/// Counts a connected websocket client while alive.
struct ClientGuard(Arc<Metrics>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.ws_clients.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientRequest {
    subscribe: Subscription,
}

/// Why a live client's session ended.
enum Ended {
    Closed,
    SendFailed,
}

async fn send_text(socket: &mut WebSocket, text: String) -> Result<(), Ended> {
    match tokio::time::timeout(WS_SEND_TIMEOUT, socket.send(Message::Text(text.into()))).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(Ended::SendFailed),
    }
}

async fn live_client(mut socket: WebSocket, state: AppState) {
    state.metrics.ws_clients.fetch_add(1, Ordering::Relaxed);
    let _guard = ClientGuard(state.metrics.clone());
    let mut active: Option<(Subscription, broadcast::Receiver<Arc<HubMsg>>, u64)> = None;
    let ended = loop {
        let hub_msg = async {
            match active.as_mut() {
                Some((_, rx, _)) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = state.shutdown.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                break Ended::Closed;
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    match serde_json::from_str::<ClientRequest>(text.as_str()) {
                        Ok(req) => match start_subscription(&mut socket, &state, req.subscribe).await {
                            Ok(a) => active = Some(a),
                            Err(e) => break e,
                        },
                        Err(e) => {
                            let msg = json!({"type": "error", "message": format!(
                                "{e}; expected {{\"subscribe\": {{\"devices\": [..] | null, \"series\": [..] | null, \"status\": bool, \"events\": bool, \"since\": N | null}}}}"
                            )});
                            if let Err(e) = send_text(&mut socket, msg.to_string()).await {
                                break e;
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break Ended::Closed,
                Some(Ok(_)) => {}
            },
            msg = hub_msg => {
                let Some((sub, _, cursor)) = active.as_mut() else { continue };
                match msg {
                    Ok(m) => {
                        if let HubMsg::Samples(l) = &*m {
                            if l.commit <= *cursor {
                                continue;
                            }
                            *cursor = l.commit;
                        }
                        if let Some(text) = sub.render(&m)
                            && let Err(e) = send_text(&mut socket, text).await
                        {
                            break e;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        // This client read too slowly; tell it, and go on
                        // from what the hub has now.
                        state.metrics.ws_lost_commits.fetch_add(n, Ordering::Relaxed);
                        *cursor = state.hub.last();
                        let text = json!({"type": "lost", "commits": n, "cursor": *cursor,
                            "reason": "the client read too slowly; reload the range from /api/v1/series"}).to_string();
                        if let Err(e) = send_text(&mut socket, text).await {
                            break e;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break Ended::Closed,
                }
            }
        }
    };
    if let Ended::SendFailed = ended {
        tracing::debug!(
            "live client dropped: it did not take a message within {WS_SEND_TIMEOUT:?}"
        );
    }
}

/// Applies a subscription: replays what the client missed after `since`
/// from the database, then answers `hello` with the cursor live data
/// continues from.
async fn start_subscription(
    socket: &mut WebSocket,
    state: &AppState,
    sub: Subscription,
) -> Result<(Subscription, broadcast::Receiver<Arc<HubMsg>>, u64), Ended> {
    for d in sub.devices.iter().flatten() {
        if let Err(e) = validate_device(d) {
            let msg = json!({"type": "error", "message": format!("subscribe.devices: {e}")});
            send_text(socket, msg.to_string()).await?;
            return Err(Ended::Closed);
        }
    }
    // Subscribe before reading the database, so nothing committed in
    // between can fall through.
    let rx = state.hub.subscribe();
    let mut cursor = state.hub.last();
    if let Some(since) = sub.since {
        let newest = match state.store.last_commit_id().await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the commit log for a live client");
                cursor
            }
        };
        if since > newest || newest - since > MAX_BACKLOG {
            let reason = if since > newest {
                "cursor is newer than this server's data (was the database replaced?); reload from /api/v1/series"
            } else {
                "too much to replay; reload from /api/v1/series"
            };
            let msg = json!({"type": "lost", "commits": newest.abs_diff(since), "cursor": cursor, "reason": reason});
            send_text(socket, msg.to_string()).await?;
        } else {
            cursor = since;
            loop {
                let batches = match state.store.commits_after(cursor, 1000).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot replay the commit log to a live client");
                        break;
                    }
                };
                let n = batches.len();
                let lives = match state.hub.to_live(&state.store, batches).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot replay the commit log to a live client");
                        break;
                    }
                };
                for l in lives {
                    cursor = l.commit;
                    if let Some(text) = sub.render_samples(&l) {
                        send_text(socket, text).await?;
                    }
                }
                if n < 1000 {
                    break;
                }
            }
        }
    }
    send_text(
        socket,
        json!({"type": "hello", "cursor": cursor}).to_string(),
    )
    .await?;
    Ok((sub, rx, cursor))
}

async fn healthz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, AppError> {
    sqlx::query("SELECT 1")
        .execute(state.store.reader())
        .await
        .map_err(StoreError::from)?;
    Ok(Json(json!({"status": "ok"})))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn devices(State(state): State<AppState>) -> Result<Response, AppError> {
    cached(&state.overview.devices, || async {
        Ok::<Vec<DeviceInfo>, AppError>(state.store.devices().await?)
    })
    .await
}

/// Query of `GET /api/v1/series`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesQuery {
    device: Option<String>,
    series: Option<String>,
    /// ms since the Unix epoch; default: one hour before `to`.
    from: Option<i64>,
    /// ms since the Unix epoch; default: now.
    to: Option<i64>,
    /// Most points or buckets returned; default 1000, at most 100000.
    max_points: Option<usize>,
}

/// Maps a query-string error to a 400 naming the expected parameters.
fn query_or_400<T>(
    query: Result<Query<T>, axum::extract::rejection::QueryRejection>,
    expected: &str,
) -> Result<T, AppError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| AppError::bad_request(format!("{}; expected {expected}", e.body_text())))
}

/// The required, valid `device` parameter.
fn device_param(device: Option<String>) -> Result<String, AppError> {
    let device = device.ok_or_else(|| AppError::bad_request("missing parameter device"))?;
    validate_device(&device).map_err(|e| AppError::bad_request(e.to_string()))?;
    Ok(device)
}

/// `[from, to]` in ms: `to` defaults to now, `from` to `default_span` before it.
fn time_range(
    from: Option<i64>,
    to: Option<i64>,
    default_span: i64,
) -> Result<(i64, i64), AppError> {
    let to = to.unwrap_or_else(now_ms);
    let from = from.unwrap_or(to - default_span);
    if from > to {
        return Err(AppError::bad_request(format!(
            "from ({from}) is after to ({to})"
        )));
    }
    Ok((from, to))
}

/// Query of `GET /api/v1/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    device: Option<String>,
    /// ms since the Unix epoch; default: one day before `to`.
    from: Option<i64>,
    /// ms since the Unix epoch; default: now.
    to: Option<i64>,
    /// Most events returned, oldest first; default 1000, at most 100000.
    limit: Option<i64>,
}

async fn events(
    State(state): State<AppState>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, AppError> {
    let q = query_or_400(query, "device, from, to (ms since epoch), limit")?;
    let device = device_param(q.device)?;
    let (from, to) = time_range(q.from, q.to, 86_400_000)?;
    let limit = q.limit.unwrap_or(1000);
    if !(1..=MAX_POINTS_LIMIT as i64).contains(&limit) {
        return Err(AppError::bad_request(format!(
            "limit {limit} is out of range (1-{MAX_POINTS_LIMIT})"
        )));
    }
    let events = state.store.events(&device, from, to, limit).await?;
    Ok(Json(
        json!({"device": device, "from": from, "to": to, "events": events}),
    ))
}

/// One min/avg/max bucket of a downsampled range.
#[derive(Debug, Serialize, PartialEq)]
pub struct Bucket {
    pub ts: i64,
    pub min: f64,
    pub avg: f64,
    pub max: f64,
    pub count: u64,
}

#[derive(Debug, Serialize)]
struct SeriesResponse {
    device: String,
    series: String,
    from: i64,
    to: i64,
    /// `raw` (decoded from the batch log) or the rollup resolution used
    /// (`1m`, `1h`) for the whole buckets of the range.
    source: &'static str,
    /// Raw `[ts, value]` pairs when they fit within `max_points`.
    points: Vec<(i64, f64)>,
    /// Width of each bucket when the range was downsampled.
    #[serde(skip_serializing_if = "Option::is_none")]
    bucket_ms: Option<i64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    buckets: Vec<Bucket>,
}

const MAX_POINTS_LIMIT: usize = 100_000;

async fn series(
    State(state): State<AppState>,
    query: Result<Query<SeriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, AppError> {
    let q = query_or_400(
        query,
        "device, series, from, to (ms since epoch), max_points",
    )?;
    let device = device_param(q.device)?;
    let series = q
        .series
        .ok_or_else(|| AppError::bad_request("missing parameter series"))?;
    let key = SeriesKey::parse(&series).map_err(|e| AppError::bad_request(e.to_string()))?;
    let (from, to) = time_range(q.from, q.to, 3_600_000)?;
    let max_points = q.max_points.unwrap_or(1000);
    if max_points == 0 || max_points > MAX_POINTS_LIMIT {
        return Err(AppError::bad_request(format!(
            "max_points {max_points} is out of range (1-{MAX_POINTS_LIMIT})"
        )));
    }
    let series_id = state.store.series_id(&device, &key).await?.ok_or_else(|| {
        AppError::not_found(format!(
            "device {device:?} has no series {series:?}; GET /api/v1/devices lists them"
        ))
    })?;
    let mut resp = SeriesResponse {
        device,
        series: key.to_string(),
        from,
        to,
        source: "raw",
        points: Vec::new(),
        bucket_ms: None,
        buckets: Vec::new(),
    };
    let plan = Plan::new(from, to, max_points);
    let store = &state.store;
    let mut sums: BTreeMap<i64, Agg> = BTreeMap::new();
    match plan.resolution {
        None => {
            let points = store.points(&resp.device, series_id, from, to).await?;
            if points.len() <= max_points {
                resp.points = points;
                return Ok(Json(serde_json::to_value(resp).unwrap_or_default()));
            }
            fold_points(&plan, &points, &mut sums);
        }
        Some(res) => {
            // Whole rollup buckets inside the range come from the rollup
            // table; the partial ones at the edges from raw points.
            let (lo, hi) = plan.rollup_span(from, to).unwrap_or((to + 1, to + 1));
            let rows = store.rollups(res, series_id, lo, hi).await?;
            let mut edges = Vec::new();
            if from < lo {
                edges.extend(
                    store
                        .points(&resp.device, series_id, from, lo.min(to + 1) - 1)
                        .await?,
                );
            }
            if hi <= to && hi > lo {
                edges.extend(store.points(&resp.device, series_id, hi, to).await?);
            }
            let total: i64 = rows.iter().map(|(_, a)| a.count).sum::<i64>() + edges.len() as i64;
            if total as usize <= max_points {
                // Sparse enough to send every point.
                resp.points = store.points(&resp.device, series_id, from, to).await?;
                return Ok(Json(serde_json::to_value(resp).unwrap_or_default()));
            }
            resp.source = res.label();
            for (bucket, agg) in &rows {
                merge_into(&mut sums, plan.bucket_of(*bucket), agg);
            }
            fold_points(&plan, &edges, &mut sums);
        }
    }
    resp.bucket_ms = Some(plan.width);
    resp.buckets = sums
        .into_iter()
        .map(|(ts, a)| Bucket {
            ts,
            min: a.min,
            avg: a.sum / a.count as f64,
            max: a.max,
            count: a.count as u64,
        })
        .collect();
    Ok(Json(serde_json::to_value(resp).unwrap_or_default()))
}

fn merge_into(sums: &mut BTreeMap<i64, Agg>, bucket: i64, agg: &Agg) {
    sums.entry(bucket)
        .and_modify(|a| a.merge(agg))
        .or_insert(*agg);
}

/// Adds raw points to the buckets of `plan`.
fn fold_points(plan: &Plan, points: &[(i64, f64)], sums: &mut BTreeMap<i64, Agg>) {
    for &(ts, v) in points {
        merge_into(sums, plan.bucket_of(ts), &Agg::one(ts, v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_points_fold_into_at_most_max_buckets() {
        let points: Vec<(i64, f64)> = (0..1000).map(|i| (i, i as f64)).collect();
        let plan = Plan::new(0, 999, 10);
        assert_eq!((plan.origin, plan.width), (0, 100));
        let mut sums = BTreeMap::new();
        fold_points(&plan, &points, &mut sums);
        assert_eq!(sums.len(), 10);
        let first = sums[&0];
        assert_eq!((first.count, first.min, first.max), (100, 0.0, 99.0));
        assert_eq!(first.sum / first.count as f64, 49.5);
        assert_eq!(sums[&900].max, 999.0);
        let plan = Plan::new(0, 999, 7);
        let mut sums = BTreeMap::new();
        fold_points(&plan, &points, &mut sums);
        assert!(sums.len() <= 7, "{} buckets", sums.len());
        assert_eq!(sums.values().map(|a| a.count).sum::<i64>(), 1000);
    }
}
