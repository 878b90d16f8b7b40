//! Fleet-wide answers shared by every client for a second, with one
//! database read at a time (single flight).

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::error::AppError;

/// How long a fleet-wide answer is reused. Live changes reach dashboards
/// over the websocket; this only bounds how often the whole fleet is read.
const OVERVIEW_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// One cached JSON answer per fleet-wide endpoint. Concurrent requests for
/// a stale answer wait for one database read instead of each starting
/// their own (with 2,000 devices each read takes tens of milliseconds of
/// CPU: unshared, forty polling dashboards starved the ingestor).
#[derive(Default)]
pub struct OverviewCache {
    pub devices: Slot,
    pub fleet: Slot,
}

/// The last answer of one endpoint and when it was made.
pub type Slot = tokio::sync::Mutex<Option<(tokio::time::Instant, axum::body::Bytes)>>;

/// The cached answer in `slot`, or a fresh one from `make`.
pub async fn cached<F, Fut, T>(slot: &Slot, make: F) -> Result<Response, AppError>
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
