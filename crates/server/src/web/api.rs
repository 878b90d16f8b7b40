//! The JSON API: devices, fleet, series (raw or from rollups, downsampled
//! to at most `max_points` buckets), events, health and metrics. Every
//! query parameter is validated and bounded before it reaches the store.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use widgetry_common::now_ms;
use widgetry_proto::SeriesKey;
use widgetry_proto::validate::validate_device;

use super::cache::cached;
use super::error::AppError;
use super::state::AppState;
use crate::store::read::DeviceInfo;
use crate::store::rollup::{Agg, Plan};

/// `GET /api/v1/fleet`: every device with state, counters, latest CPU and
/// memory and 30-minute sparklines, in one answer.
pub async fn fleet(State(state): State<AppState>) -> Result<Response, AppError> {
    cached(&state.overview.fleet, || async {
        let now = now_ms();
        let mut devices = state.store.fleet(now - 30 * 60_000).await?;
        for d in &mut devices {
            d.presence =
                Some(
                    state
                        .presence
                        .of(&d.device, &d.state, d.last_seen, d.interval_ms, now),
                );
        }
        Ok(json!({"now": now, "devices": devices}))
    })
    .await
}

pub async fn healthz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, AppError> {
    state.store.ping().await?;
    Ok(Json(json!({"status": "ok"})))
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

pub async fn devices(State(state): State<AppState>) -> Result<Response, AppError> {
    cached(&state.overview.devices, || async {
        let now = now_ms();
        let mut devices = state.store.devices().await?;
        for d in &mut devices {
            d.presence =
                Some(
                    state
                        .presence
                        .of(&d.device, &d.state, d.last_seen, d.interval_ms, now),
                );
        }
        Ok::<Vec<DeviceInfo>, AppError>(devices)
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
    // Wider than any stored timestamp, narrow enough that no arithmetic on
    // a range (bucket widths, defaults) can overflow.
    const BOUND: i64 = 1 << 53;
    let to = to.unwrap_or_else(now_ms).clamp(-BOUND, BOUND);
    let from = from.map_or(to - default_span, |f| f.clamp(-BOUND, BOUND));
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

pub async fn events(
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

pub async fn series(
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
                return Ok(Json(to_json(&resp)?));
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
                return Ok(Json(to_json(&resp)?));
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
    Ok(Json(to_json(&resp)?))
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

/// An answer as JSON; a failure is an internal error, never an empty body.
fn to_json<T: Serialize>(value: &T) -> Result<serde_json::Value, AppError> {
    serde_json::to_value(value)
        .map_err(|e| AppError::internal(format!("cannot encode the answer: {e}")))
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
