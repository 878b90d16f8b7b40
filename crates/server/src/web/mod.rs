//! The HTTP API and dashboard (axum): devices, series ranges, health and
//! Prometheus metrics. It reads the database only; it must never write.
//!
//! Errors are JSON `{"error": {"code", "message"}}` with a 4xx/5xx status.

pub mod api;
pub mod assets;
pub mod cache;
pub mod error;
pub mod live;
pub mod server;
pub mod state;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::atomic::Ordering;

pub use error::AppError;
pub use state::AppState;

/// The web service: every route, with request counting.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/assets/{*path}", get(assets::asset))
        .route("/api/v1/fleet", get(api::fleet))
        .route("/api/v1/live", get(live::live))
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .route("/api/v1/devices", get(api::devices))
        .route("/api/v1/series", get(api::series))
        .route("/api/v1/events", get(api::events))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(axum::middleware::from_fn(time_limit))
        .with_state(state)
}

/// Answers 503 when a request takes longer than [`server::REQUEST_TIMEOUT`]
/// (a websocket upgrade is answered at once; its stream is not limited).
async fn time_limit(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(server::REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => AppError::unavailable(format!(
            "the request took longer than {} s; ask for a shorter range or fewer points",
            server::REQUEST_TIMEOUT.as_secs()
        ))
        .into_response(),
    }
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
    if !path.starts_with("api/") && assets::ASSETS.iter().any(|(p, _, _)| *p == path) {
        return assets::serve_asset(path);
    }
    AppError::not_found(format!(
        "no route for {uri}; the API is under /api/v1/ (devices, fleet, series, events, live)"
    ))
    .into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;

    use super::*;
    use crate::config::Database;
    use crate::metrics::{Metrics, Roles};
    use crate::sinks::live::Hub;
    use crate::store::Store;

    async fn call(app: &Router, uri: &str) -> (StatusCode, String) {
        let res = app
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn routes_answer_and_errors_are_json_with_a_code() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(&Database::Sqlite(dir.path().join("w.db")))
            .await
            .expect("open");
        let metrics = Arc::new(Metrics::for_roles(Roles::WEB));
        let app = app(AppState {
            store: store.clone(),
            metrics: metrics.clone(),
            hub: Hub::new(0),
            shutdown: CancellationToken::new(),
            overview: Default::default(),
        });
        assert_eq!(
            call(&app, "/healthz").await,
            (StatusCode::OK, r#"{"status":"ok"}"#.into())
        );
        assert_eq!(
            call(&app, "/api/v1/devices").await,
            (StatusCode::OK, "[]".into())
        );
        for (uri, status, code) in [
            (
                "/api/v1/series?series=temp",
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                "/api/v1/series?device=bad%20id&series=t",
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                "/api/v1/series?device=d&series=t&from=10&to=5",
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                "/api/v1/series?device=d&series=t",
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            ("/api/v1/nothing", StatusCode::NOT_FOUND, "not_found"),
        ] {
            let (got, body) = call(&app, uri).await;
            assert_eq!(got, status, "{uri}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).expect("JSON error");
            assert_eq!(v["error"]["code"], code, "{uri}: {body}");
        }
        let (status, text) = call(&app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("widgetry_web_requests_total 8"), "{text}");
        assert!(!text.contains("widgetry_ingest_"), "web alone: {text}");
        store.close().await;
    }
}
