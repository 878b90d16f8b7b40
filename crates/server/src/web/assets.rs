//! The dashboard's files, embedded in the binary by build.rs.

use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::error::AppError;

// The dashboard: every file of `web-ui/dist/`, embedded by build.rs.
include!(concat!(env!("OUT_DIR"), "/assets.rs"));

pub async fn index() -> Response {
    serve_asset("index.html")
}

pub async fn asset(axum::extract::Path(path): axum::extract::Path<String>) -> Response {
    serve_asset(&format!("assets/{path}"))
}

pub fn serve_asset(path: &str) -> Response {
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
