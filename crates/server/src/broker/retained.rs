//! Retained messages survive a restart of `serve`: the broker reports each
//! change (on its router thread, where nothing may block), this module
//! coalesces them by topic and writes them to the database in the
//! background; at start the broker is given what the database holds. A
//! write that fails is retried with the next one; at shutdown what is
//! pending is written before the database closes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rumqttd::{RetainedChange, RetainedHook};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::retained::RetainedUpdate;
use crate::store::{Store, StoreError};

/// Per topic, the newest change not yet written: (payload, QoS) or cleared.
type Pending = HashMap<String, Option<(Vec<u8>, u8)>>;

/// Changes not yet written, newest per topic.
#[derive(Default)]
pub struct RetainedSink {
    pending: Mutex<Pending>,
    wake: Notify,
}

impl RetainedSink {
    /// The hook to give the broker.
    pub fn hook(self: &Arc<Self>) -> RetainedHook {
        let sink = self.clone();
        RetainedHook(Arc::new(move |change| sink.record(change)))
    }

    fn record(&self, change: RetainedChange) {
        let (topic, message) = match change {
            RetainedChange::Set {
                topic,
                payload,
                qos,
            } => (topic, Some((payload.to_vec(), qos))),
            RetainedChange::Cleared { topic } => (topic, None),
        };
        self.lock().insert(topic, message);
        self.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self) -> Vec<RetainedUpdate> {
        std::mem::take(&mut *self.lock()).into_iter().collect()
    }

    /// Puts back updates that could not be written, unless a newer change
    /// of the same topic arrived meanwhile.
    fn restore(&self, updates: Vec<RetainedUpdate>) {
        let mut pending = self.lock();
        for (topic, message) in updates {
            pending.entry(topic).or_insert(message);
        }
    }
}

/// Writes what the broker reports until `shutdown`, then what is left.
pub async fn run(
    sink: Arc<RetainedSink>,
    store: Store,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    loop {
        let stopping = tokio::select! {
            _ = sink.wake.notified() => false,
            _ = shutdown.cancelled() => true,
        };
        if !stopping {
            // Gather a burst (a fleet reconnecting) into one transaction.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        let updates = sink.take();
        if !updates.is_empty() {
            match store.apply_retained(&updates).await {
                Ok(()) => {}
                Err(e) if stopping => return Err(e),
                Err(e) => {
                    warn!(error = %e, count = updates.len(), "cannot store retained messages; retrying");
                    sink.restore(updates);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    sink.wake.notify_one();
                }
            }
        }
        if stopping {
            return Ok(());
        }
    }
}

/// What the broker starts with: the retained messages in the database.
pub async fn load(store: &Store) -> Result<Vec<rumqttd::InitialRetained>, StoreError> {
    let rows = store.retained().await?;
    if !rows.is_empty() {
        info!(count = rows.len(), "retained messages restored");
    }
    Ok(rows
        .into_iter()
        .map(|(topic, payload, qos)| (topic, payload.into(), qos))
        .collect())
}
