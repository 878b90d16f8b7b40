//! `/api/v1/rules` (list, create, read, replace, delete) and
//! `/api/v1/alerts` (filtered, newest first). A rule is validated before it
//! is stored, with the same messages as the config file's; rules from the
//! config file are read-only here (they come back at every start).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::error::AppError;
use super::state::AppState;
use crate::rules::{MAX_RULES, RuleSpec};
use crate::store::alerts::{AlertFilter, StoredRule};

/// Largest request body of the rules endpoints.
pub const MAX_BODY: usize = 64 * 1024;
/// Most alerts one answer holds.
pub const MAX_ALERTS: i64 = 10_000;

fn rule_json(r: &StoredRule) -> serde_json::Value {
    let mut v = serde_json::from_str::<serde_json::Value>(&r.spec).unwrap_or(json!({}));
    if let Some(o) = v.as_object_mut() {
        o.insert("source".into(), json!(r.source));
    }
    v
}

fn body(spec: Result<Json<RuleSpec>, JsonRejection>) -> Result<RuleSpec, AppError> {
    spec.map(|Json(s)| s).map_err(|e| {
        AppError::bad_request(format!(
            "not a rule: {}; expected {{\"name\", \"devices\", \"series\", \"when\", \"for\", \"clear\", \"severity\"}}",
            e.body_text()
        ))
    })
}

/// Validates `spec` and stores it as an API rule, then applies the rules.
async fn store_rule(state: &AppState, spec: RuleSpec) -> Result<serde_json::Value, AppError> {
    let rule = spec
        .clone()
        .validate()
        .map_err(|e| AppError::bad_request(format!("rule {:?}: {e}", spec.name)))?;
    let stored = StoredRule::new(&rule.spec, "api")?;
    state
        .store
        .put_rule(&stored, widgetry_common::now_ms())
        .await?;
    state.rules.reload(&state.store).await?;
    Ok(rule_json(&stored))
}

async fn find(state: &AppState, name: &str) -> Result<Option<StoredRule>, AppError> {
    Ok(state
        .store
        .rules()
        .await?
        .into_iter()
        .find(|r| r.name == name))
}

fn read_only(name: &str) -> AppError {
    AppError::conflict(format!(
        "rule {name:?} is defined in the server's config file; change it there (it is re-applied at every start)"
    ))
}

pub async fn list(State(state): State<AppState>) -> Result<Json<serde_json::Value>, AppError> {
    let rules: Vec<_> = state.store.rules().await?.iter().map(rule_json).collect();
    Ok(Json(json!({"rules": rules})))
}

pub async fn one(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    match find(&state, &name).await? {
        Some(r) => Ok(Json(rule_json(&r))),
        None => Err(AppError::not_found(format!("no rule named {name:?}"))),
    }
}

pub async fn create(
    State(state): State<AppState>,
    spec: Result<Json<RuleSpec>, JsonRejection>,
) -> Result<Response, AppError> {
    let spec = body(spec)?;
    let existing = state.store.rules().await?;
    if existing.iter().any(|r| r.name == spec.name) {
        return Err(AppError::conflict(format!(
            "a rule named {:?} exists: PUT /api/v1/rules/{} replaces it",
            spec.name, spec.name
        )));
    }
    if existing.len() >= MAX_RULES {
        return Err(AppError::conflict(format!(
            "{MAX_RULES} rules exist, the most the server keeps: delete one first"
        )));
    }
    let v = store_rule(&state, spec).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

pub async fn replace(
    State(state): State<AppState>,
    Path(name): Path<String>,
    spec: Result<Json<RuleSpec>, JsonRejection>,
) -> Result<Json<serde_json::Value>, AppError> {
    let spec = body(spec)?;
    if spec.name != name {
        return Err(AppError::bad_request(format!(
            "the body names rule {:?} but the path {name:?}; they must agree",
            spec.name
        )));
    }
    match find(&state, &name).await? {
        Some(r) if r.source == "config" => return Err(read_only(&name)),
        Some(_) => {}
        None if state.store.rules().await?.len() >= MAX_RULES => {
            return Err(AppError::conflict(format!(
                "{MAX_RULES} rules exist, the most the server keeps: delete one first"
            )));
        }
        None => {}
    }
    Ok(Json(store_rule(&state, spec).await?))
}

pub async fn remove(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, AppError> {
    match find(&state, &name).await? {
        None => Err(AppError::not_found(format!("no rule named {name:?}"))),
        Some(r) if r.source == "config" => Err(read_only(&name)),
        Some(_) => {
            state.store.delete_rule(&name).await?;
            state.rules.reload(&state.store).await?;
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

/// Query of `GET /api/v1/alerts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    device: Option<String>,
    rule: Option<String>,
    /// `pending`, `firing`, `resolved`, or `open` (pending or firing).
    state: Option<String>,
    from: Option<i64>,
    to: Option<i64>,
    limit: Option<i64>,
}

pub async fn alerts(
    State(state): State<AppState>,
    q: Result<Query<AlertsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, AppError> {
    let Query(q) = q.map_err(|e| {
        AppError::bad_request(format!(
            "{}; parameters: device, rule, state (pending|firing|resolved|open), from, to (ms), limit",
            e.body_text()
        ))
    })?;
    let limit = q.limit.unwrap_or(1000);
    if !(1..=MAX_ALERTS).contains(&limit) {
        return Err(AppError::bad_request(format!(
            "limit must be 1 to {MAX_ALERTS}, not {limit}"
        )));
    }
    let state_filter = match q.state.as_deref() {
        None => None,
        Some(s @ ("pending" | "firing" | "resolved" | "open")) => Some(s.to_string()),
        Some(other) => {
            return Err(AppError::bad_request(format!(
                "state {other:?}: use pending, firing, resolved or open"
            )));
        }
    };
    let f = AlertFilter {
        device: q.device,
        rule: q.rule,
        state: state_filter,
        from: q.from,
        to: q.to,
        limit,
    };
    let rows = state.store.alerts(&f).await?;
    Ok(Json(json!({"alerts": rows})))
}
