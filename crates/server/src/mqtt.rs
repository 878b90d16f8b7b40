//! One driver for the server's MQTT connections (the ingest subscriber and
//! publisher, the live bridge): poll the event loop until shutdown, and
//! after a lost connection wait a jittered, growing backoff before rumqttc
//! reconnects on the next poll. Callers keep only what is theirs: what to
//! do with an event and what to count when the connection is lost.

use std::sync::atomic::{AtomicU64, Ordering};

use rumqttc::{Event, EventLoop, Packet};
use tokio_util::sync::CancellationToken;
use tracing::warn;
use widgetry_common::backoff;

/// What one poll brought.
pub enum Polled {
    Event(Event),
    /// The connection failed; call [`Connection::wait`] before polling on.
    Lost,
    /// Shutdown was requested.
    Stopped,
}

/// An event loop with its reconnect state.
pub struct Connection<'a> {
    pub ev: EventLoop,
    name: &'static str,
    /// Counted with the log line of every lost connection, if given.
    reconnects: Option<&'a AtomicU64>,
    failures: u32,
}

impl<'a> Connection<'a> {
    /// `name` says which connection it is in log lines; `reconnects`
    /// counts its lost connections.
    pub fn new(ev: EventLoop, name: &'static str, reconnects: Option<&'a AtomicU64>) -> Self {
        Connection {
            ev,
            name,
            reconnects,
            failures: 0,
        }
    }

    /// The next event, a lost connection (logged), or shutdown.
    pub async fn next(&mut self, shutdown: &CancellationToken) -> Polled {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Polled::Stopped,
            n = self.ev.poll() => n,
        };
        match next {
            Ok(event) => {
                if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                    self.failures = 0;
                }
                Polled::Event(event)
            }
            Err(e) => {
                self.failures += 1;
                if let Some(c) = self.reconnects {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                warn!(connection = self.name, error = %e, attempt = self.failures, "lost the broker connection; reconnecting");
                Polled::Lost
            }
        }
    }

    /// Waits the backoff after a lost connection; false on shutdown.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(backoff(self.failures, crate::RECONNECT_CAP)) => true,
        }
    }
}
