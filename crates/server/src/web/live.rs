//! `GET /api/v1/live`: the websocket bridge. A client subscribes (devices,
//! series, status, events, `since`), gets what it missed from the
//! database, then live data from the hub; a client that reads too slowly
//! is told `lost` and never slows anyone else.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast;
use widgetry_proto::validate::validate_device;

use super::state::AppState;
use crate::metrics::Metrics;
use crate::sinks::live::{HubMsg, Subscription};

/// Largest backlog (committed batches) replayed to a client that
/// resubscribes with `since`; past it the client is told it lost data and
/// reloads from history.
const MAX_BACKLOG: u64 = 200_000;
/// A client that cannot take a message for this long is disconnected.
const WS_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest message a client may send (a subscription is a few hundred
/// bytes); a larger one ends the connection with close code 1009.
pub const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

pub async fn live(ws: WebSocketUpgrade, State(state): State<AppState>) -> Response {
    // The codec stops reading at this size, so what one client can make the
    // server buffer stays bounded; messages between the two limits get a
    // 1009 close from `live_client`, larger ones when the codec refuses them.
    ws.max_message_size(4 * MAX_CLIENT_MESSAGE)
        .max_frame_size(4 * MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| live_client(socket, state))
}

/// Ends a connection whose client sent a message over the limit: close
/// code 1009 ("message too big") with the limit.
async fn close_too_big(socket: &mut WebSocket) {
    let frame = axum::extract::ws::CloseFrame {
        code: 1009,
        reason: format!("message too big: the limit is {MAX_CLIENT_MESSAGE} bytes").into(),
    };
    let _ = tokio::time::timeout(WS_SEND_TIMEOUT, socket.send(Message::Close(Some(frame)))).await;
}

/// Whether a receive error is the codec refusing a message over its size
/// limit (axum's error type is opaque; tungstenite's capacity errors say
/// "Space limit exceeded").
fn is_too_big(e: &axum::Error) -> bool {
    let text = e.to_string();
    text.contains("Space limit exceeded") || text.contains("too long") || text.contains("too big")
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

/// Why a client's text message is not a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Not `{"subscribe": {...}}`: the client is told and may try again.
    Malformed(String),
    /// A device id in `subscribe.devices` is invalid: the client is told
    /// and the connection is closed.
    BadDevice(String),
}

impl RequestError {
    /// The `{"type":"error"}` message sent to the client.
    pub fn message(&self) -> String {
        let text = match self {
            RequestError::Malformed(e) => format!(
                "{e}; expected {{\"subscribe\": {{\"devices\": [..] | null, \"series\": [..] | null, \"status\": bool, \"events\": bool, \"since\": N | null}}}}"
            ),
            RequestError::BadDevice(e) => format!("subscribe.devices: {e}"),
        };
        json!({"type": "error", "message": text}).to_string()
    }
}

/// Parses and checks a client's text message (`{"subscribe": {...}}`).
/// Public for the fuzz target `ws_subscribe` (fuzz/).
pub fn parse_request(text: &str) -> Result<Subscription, RequestError> {
    let malformed = |e: serde_json::Error| RequestError::Malformed(e.to_string());
    let value: serde_json::Value = serde_json::from_str(text).map_err(malformed)?;
    // serde would also take a struct from an array (`[[]]` subscribed to
    // everything): only the documented objects are requests.
    if !value.get("subscribe").is_some_and(|s| s.is_object()) {
        return Err(RequestError::Malformed(
            "not an object with a \"subscribe\" object".into(),
        ));
    }
    let req: ClientRequest = serde_json::from_value(value).map_err(malformed)?;
    for d in req.subscribe.devices.iter().flatten() {
        validate_device(d).map_err(|e| RequestError::BadDevice(e.to_string()))?;
    }
    Ok(req.subscribe)
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
                Some(Ok(Message::Text(text))) if text.len() > MAX_CLIENT_MESSAGE => {
                    close_too_big(&mut socket).await;
                    break Ended::Closed;
                }
                Some(Ok(Message::Binary(b))) if b.len() > MAX_CLIENT_MESSAGE => {
                    close_too_big(&mut socket).await;
                    break Ended::Closed;
                }
                Some(Err(e)) if is_too_big(&e) => {
                    close_too_big(&mut socket).await;
                    break Ended::Closed;
                }
                Some(Ok(Message::Text(text))) => match parse_request(text.as_str()) {
                    Ok(sub) => match start_subscription(&mut socket, &state, sub).await {
                        Ok(a) => active = Some(a),
                        Err(e) => break e,
                    },
                    Err(e) => {
                        if let Err(ended) = send_text(&mut socket, e.message()).await {
                            break ended;
                        }
                        if let RequestError::BadDevice(_) = e {
                            break Ended::Closed;
                        }
                    }
                },
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
            let lost = newest.abs_diff(since);
            state
                .metrics
                .ws_lost_commits
                .fetch_add(lost, Ordering::Relaxed);
            let msg = json!({"type": "lost", "commits": lost, "cursor": cursor, "reason": reason});
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_requests_are_parsed_and_their_devices_checked() {
        let sub = parse_request(r#"{"subscribe":{"devices":["d1"],"status":true,"since":5}}"#)
            .expect("valid");
        assert_eq!(sub.devices, Some(vec!["d1".to_string()]));
        assert!(sub.status && !sub.events);
        assert_eq!(sub.since, Some(5));
        let e = parse_request(r#"{"subscribe":{"devices":["bad id"]}}"#).expect_err("bad id");
        assert!(matches!(e, RequestError::BadDevice(_)), "{e:?}");
        // `[[]]` and `{"subscribe":[]}`: found by the fuzz target
        // `ws_subscribe`, taken before as a subscription to everything.
        for bad in [
            "",
            "[]",
            "[[]]",
            r#"[[["d1"], null, true, true, 5]]"#,
            r#"{"subscribe":[]}"#,
            r#"{"subscribe":null}"#,
            r#"{"subscribe":{"bogus":1}}"#,
            r#"{"subscribe":{},"x":1}"#,
        ] {
            let e = parse_request(bad).expect_err(bad);
            assert!(matches!(e, RequestError::Malformed(_)), "{bad}: {e:?}");
            let msg: serde_json::Value = serde_json::from_str(&e.message()).expect("json");
            assert_eq!(msg["type"], "error", "{bad}");
        }
    }
}
