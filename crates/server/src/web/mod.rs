//! The HTTP API and dashboard (axum): devices, series ranges, health and
//! Prometheus metrics. It reads the database only; it must never write.
//!
//! Errors are JSON `{"error": {"code", "message"}}` with a 4xx/5xx status.

pub mod api;
pub mod assets;
pub mod cache;
pub mod error;
pub mod live;
pub mod rules_api;
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
        .route("/api/v1/alerts", get(rules_api::alerts))
        .route(
            "/api/v1/rules",
            get(rules_api::list)
                .post(rules_api::create)
                .layer(axum::extract::DefaultBodyLimit::max(rules_api::MAX_BODY)),
        )
        .route(
            "/api/v1/rules/{name}",
            get(rules_api::one)
                .put(rules_api::replace)
                .delete(rules_api::remove)
                .layer(axum::extract::DefaultBodyLimit::max(rules_api::MAX_BODY)),
        )
        .route("/login", get(login))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
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

/// Name of the cookie `GET /login?token=…` sets for the dashboard.
const TOKEN_COOKIE: &str = "widgetry_token";

/// Whether `req` carries the API token: `Authorization: Bearer TOKEN` or
/// the dashboard's cookie.
fn has_token(req: &axum::extract::Request, token: &str) -> bool {
    let headers = req.headers();
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(TOKEN_COOKIE)?.strip_prefix('='))
        .find(|v| crate::broker::accounts::same(v, token));
    bearer.is_some_and(|b| crate::broker::accounts::same(b, token)) || cookie.is_some()
}

/// With an API token configured, the data (`/api/…`, `/metrics`) needs it;
/// the dashboard's files, `/healthz` and `/login` do not.
async fn require_token(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = state.api_token.as_deref() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    let protected = path.starts_with("/api/") || path == "/metrics";
    if !protected || has_token(&req, token) {
        return next.run(req).await;
    }
    AppError::unauthorised(
        "this server requires its API token: send `Authorization: Bearer TOKEN`, or open /login?token=TOKEN once in the browser",
    )
    .into_response()
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    token: String,
}

/// `GET /login?token=…`: with the right token, sets the dashboard's cookie
/// (HttpOnly, SameSite=Strict) and goes to the dashboard.
async fn login(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<LoginQuery>,
) -> Response {
    let Some(token) = state.api_token.as_deref() else {
        return axum::response::Redirect::to("/").into_response();
    };
    if !crate::broker::accounts::same(&q.token, token) {
        return AppError::unauthorised("wrong API token").into_response();
    }
    let cookie = format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
    (
        [(axum::http::header::SET_COOKIE, cookie)],
        axum::response::Redirect::to("/"),
    )
        .into_response()
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
        let rules = crate::rules::run::RuleSet::load(&store)
            .await
            .expect("rules");
        let app = app(AppState {
            rules,
            store: store.clone(),
            metrics: metrics.clone(),
            hub: Hub::new(0),
            shutdown: CancellationToken::new(),
            overview: Default::default(),
            api_token: None,
            presence: Default::default(),
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

    #[tokio::test]
    async fn with_an_api_token_the_data_needs_it_and_the_dashboard_gets_a_cookie() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(&Database::Sqlite(dir.path().join("w.db")))
            .await
            .expect("open");
        let token = "tok-0123456789abcdef";
        let rules = crate::rules::run::RuleSet::load(&store)
            .await
            .expect("rules");
        let app = app(AppState {
            rules,
            store: store.clone(),
            metrics: Arc::new(Metrics::for_roles(Roles::WEB)),
            hub: Hub::new(0),
            shutdown: CancellationToken::new(),
            overview: Default::default(),
            api_token: Some(token.into()),
            presence: Default::default(),
        });
        let send = |uri: &str, header: Option<(&str, String)>| {
            let mut req = Request::get(uri);
            if let Some((k, v)) = header {
                req = req.header(k, v);
            }
            let app = app.clone();
            let req = req.body(Body::empty()).expect("request");
            async move { app.oneshot(req).await.expect("infallible") }
        };
        for uri in ["/api/v1/devices", "/metrics", "/api/v1/live"] {
            assert_eq!(
                send(uri, None).await.status(),
                StatusCode::UNAUTHORIZED,
                "{uri}"
            );
            let wrong = Some(("authorization", "Bearer tok-0123456789abcdeX".to_string()));
            assert_eq!(
                send(uri, wrong).await.status(),
                StatusCode::UNAUTHORIZED,
                "{uri}"
            );
        }
        let bearer = Some(("authorization", format!("Bearer {token}")));
        assert_eq!(
            send("/api/v1/devices", bearer).await.status(),
            StatusCode::OK
        );
        assert_eq!(send("/healthz", None).await.status(), StatusCode::OK);
        assert_eq!(
            send("/login?token=nope", None).await.status(),
            StatusCode::UNAUTHORIZED
        );
        let res = send(&format!("/login?token={token}"), None).await;
        assert_eq!(res.status(), StatusCode::SEE_OTHER);
        let cookie = res
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .expect("a cookie")
            .to_string();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        let pair = cookie.split(';').next().expect("name=value").to_string();
        let with_cookie = Some(("cookie", format!("theme=dark; {pair}")));
        assert_eq!(
            send("/api/v1/devices", with_cookie).await.status(),
            StatusCode::OK
        );
        store.close().await;
    }
}
