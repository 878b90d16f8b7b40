//! The HTTP API and dashboard (axum): devices, series ranges, health and
//! Prometheus metrics. It reads the database only; it must never write.
//!
//! Errors are JSON `{"error": {"code", "message"}}` with a 4xx/5xx status.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use widgetry_proto::SeriesKey;
use widgetry_proto::validate::validate_device;

use crate::metrics::Metrics;
use crate::store::{DeviceInfo, Store, StoreError};
use crate::util::now_ms;

/// The dashboard page.
const INDEX_HTML: &str = include_str!("../../../web-ui/index.html");

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub metrics: Arc<Metrics>,
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

async fn not_found(uri: axum::http::Uri) -> AppError {
    AppError::not_found(format!(
        "no route for {uri}; the API is under /api/v1/ (devices, series)"
    ))
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
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

async fn devices(State(state): State<AppState>) -> Result<Json<Vec<DeviceInfo>>, AppError> {
    Ok(Json(state.store.devices().await?))
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
    let points = state
        .store
        .points(&device, &key, from, to)
        .await?
        .ok_or_else(|| {
            AppError::not_found(format!(
                "device {device:?} has no series {series:?}; GET /api/v1/devices lists them"
            ))
        })?;
    let mut resp = SeriesResponse {
        device,
        series: key.to_string(),
        from,
        to,
        points: Vec::new(),
        bucket_ms: None,
        buckets: Vec::new(),
    };
    if points.len() <= max_points {
        resp.points = points;
    } else {
        let (width, buckets) = downsample(&points, from, to, max_points);
        resp.bucket_ms = Some(width);
        resp.buckets = buckets;
    }
    Ok(Json(serde_json::to_value(resp).unwrap_or_default()))
}

/// Splits `[from, to]` into at most `max` equal buckets and summarises the
/// (time-sorted) points in each; empty buckets are omitted.
pub fn downsample(points: &[(i64, f64)], from: i64, to: i64, max: usize) -> (i64, Vec<Bucket>) {
    let span = (to - from).max(1) as u128 + 1;
    let width = span.div_ceil(max as u128).max(1) as i64;
    let mut out: Vec<Bucket> = Vec::new();
    for &(ts, v) in points {
        let start = from + (ts - from) / width * width;
        match out.last_mut() {
            Some(b) if b.ts == start => {
                b.min = b.min.min(v);
                b.max = b.max.max(v);
                b.avg += (v - b.avg) / (b.count + 1) as f64;
                b.count += 1;
            }
            _ => out.push(Bucket {
                ts: start,
                min: v,
                avg: v,
                max: v,
                count: 1,
            }),
        }
    }
    (width, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsample_respects_max_and_summarises() {
        let points: Vec<(i64, f64)> = (0..1000).map(|i| (i, i as f64)).collect();
        let (width, b) = downsample(&points, 0, 999, 10);
        assert_eq!(width, 100);
        assert_eq!(b.len(), 10);
        assert_eq!(
            b[0],
            Bucket {
                ts: 0,
                min: 0.0,
                avg: 49.5,
                max: 99.0,
                count: 100
            }
        );
        assert_eq!(b[9].max, 999.0);
        let (_, b) = downsample(&points, 0, 999, 7);
        assert!(b.len() <= 7, "{} buckets", b.len());
        assert_eq!(b.iter().map(|b| b.count).sum::<u64>(), 1000);
    }
}
