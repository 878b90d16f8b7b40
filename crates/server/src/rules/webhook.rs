//! The alert webhook: each alert transition is POSTed as JSON to one
//! `http://` URL, in order, from a bounded queue (the oldest is dropped and
//! counted when it is full), retried with jittered backoff up to
//! [`MAX_ATTEMPTS`] times. A 2xx answer delivers it; anything else, a
//! refused connection or no answer within [`TIMEOUT`] is a failed attempt.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// Transitions held while the receiver is away.
pub const MAX_QUEUED: usize = 1_000;
/// Attempts per transition before it is dropped (and counted).
pub const MAX_ATTEMPTS: u32 = 8;
/// Connect, send and answer within this, or the attempt failed.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed `http://host:port/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl WebhookUrl {
    /// Parses the URL; only `http://` (put a TLS proxy in front for https).
    pub fn parse(url: &str) -> Result<WebhookUrl, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("{url:?}: the webhook must be an http:// URL (https is not built in; use a local TLS proxy)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{url:?}: the path holds spaces or control characters"
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("{url:?}: {p:?} is not a port"))?,
            ),
            None => (authority, 80),
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '@') {
            return Err(format!("{url:?}: no valid host"));
        }
        Ok(WebhookUrl {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
            path: path.to_string(),
        })
    }
}

/// The sending side of the webhook queue.
#[derive(Clone)]
pub struct Webhook {
    queue: Arc<std::sync::Mutex<VecDeque<String>>>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl Webhook {
    /// Starts the delivery task for `url`; it stops at `shutdown`.
    pub fn start(
        url: WebhookUrl,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> (Webhook, tokio::task::JoinHandle<()>) {
        let hook = Webhook {
            queue: Default::default(),
            wake: Arc::new(Notify::new()),
            metrics,
        };
        let task = tokio::spawn(deliver(hook.clone(), url, shutdown));
        (hook, task)
    }

    /// Queues one JSON body; the oldest is dropped when the queue is full.
    pub fn send(&self, body: String) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= MAX_QUEUED {
            q.pop_front();
            self.metrics
                .alerts
                .webhook_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(body);
        drop(q);
        self.wake.notify_one();
    }

    fn front(&self) -> Option<String> {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .front()
            .cloned()
    }

    fn pop(&self) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
    }
}

/// One POST; Ok(status) when the receiver answered.
async fn post(url: &WebhookUrl, body: &str) -> Result<u16, String> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: widgetry/{}\r\n\r\n",
            url.path,
            url.host,
            url.port,
            body.len(),
            env!("CARGO_PKG_VERSION")
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        s.write_all(body.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        // The status line is all that is needed; read at most 1 KiB.
        let mut buf = vec![0u8; 1024];
        let mut n = 0;
        while n < buf.len() && !buf[..n].contains(&b'\n') {
            let got = s
                .read(&mut buf[n..])
                .await
                .map_err(|e| format!("read: {e}"))?;
            if got == 0 {
                break;
            }
            n += got;
        }
        let line = String::from_utf8_lossy(&buf[..n]);
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| format!("no HTTP status line in the answer ({n} bytes)"))
    };
    tokio::time::timeout(TIMEOUT, attempt)
        .await
        .map_err(|_| format!("no answer within {TIMEOUT:?}"))?
}

async fn deliver(hook: Webhook, url: WebhookUrl, shutdown: CancellationToken) {
    let mut attempts = 0u32;
    loop {
        let Some(body) = hook.front() else {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = hook.wake.notified() => continue,
            }
        };
        attempts += 1;
        let result = post(&url, &body).await;
        match result {
            Ok(status) if (200..300).contains(&status) => {
                hook.pop();
                hook.metrics
                    .alerts
                    .webhook_sent
                    .fetch_add(1, Ordering::Relaxed);
                attempts = 0;
                continue;
            }
            Ok(status) => warn!(
                status,
                attempt = attempts,
                "alert webhook answered with an error status"
            ),
            Err(e) => {
                warn!(error = %e, attempt = attempts, url = %format!("http://{}:{}{}", url.host, url.port, url.path), "alert webhook failed")
            }
        }
        hook.metrics
            .alerts
            .webhook_errors
            .fetch_add(1, Ordering::Relaxed);
        if attempts >= MAX_ATTEMPTS {
            warn!(attempts, "alert webhook: giving up on one transition");
            hook.pop();
            hook.metrics
                .alerts
                .webhook_dropped
                .fetch_add(1, Ordering::Relaxed);
            attempts = 0;
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(widgetry_common::backoff(attempts, Duration::from_secs(30))) => {}
        }
    }
    debug!("alert webhook stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_say_why() {
        assert_eq!(
            WebhookUrl::parse("http://127.0.0.1:9000/hook?x=1").expect("ok"),
            WebhookUrl {
                host: "127.0.0.1".into(),
                port: 9000,
                path: "/hook?x=1".into()
            }
        );
        assert_eq!(
            WebhookUrl::parse("http://alerts.example").expect("ok").port,
            80
        );
        assert!(
            WebhookUrl::parse("https://x/")
                .expect_err("https")
                .contains("http://")
        );
        assert!(
            WebhookUrl::parse("http://x:http/")
                .expect_err("port")
                .contains("not a port")
        );
        assert!(
            WebhookUrl::parse("http:///p")
                .expect_err("host")
                .contains("no valid host")
        );
    }
}
