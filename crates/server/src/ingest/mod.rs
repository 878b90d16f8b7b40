//! The ingestor: MQTT source → writer (series resolution, the write
//! transaction, ack watermarks) → publisher (acks, error reports, live).
//!
//! `series` resolves series ids, `acks` keeps each session's watermark,
//! `writer` runs the transactions, `publish` sends what a commit leads to.
//! Beside the writer, WAL checkpoints and retention run from the store's
//! maintenance connection.
//!
//! It must never acknowledge a batch before its transaction is durable, and
//! never let one device's bad input stop or slow the others.

pub mod acks;
pub mod publish;
pub mod series;
pub mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::AsyncClient;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use widgetry_common::now_ms;

pub use crate::config::ingest::{IngestConfig, Retention};
use crate::metrics::Metrics;
use crate::sources::{Item, mqtt};
use crate::store::{self, Store};
use publish::{Publisher, drive_publisher};
use series::SeriesResolver;
use writer::Writer;

/// Errors that stop the ingestor.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("ingest writer task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Runs the ingestor until `shutdown` is cancelled, then drains what it has
/// received (committing and acknowledging it) and returns.
pub async fn run(
    cfg: IngestConfig,
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    ready: watch::Sender<bool>,
) -> Result<(), IngestError> {
    let (tx, rx) = queue(&cfg);
    run_with_queue(cfg, store, metrics, shutdown, ready, tx, rx).await
}

/// The writer's queue: other sources (the statsd listener) send into a
/// clone of its sender, so that one writer stores everything.
pub fn queue(cfg: &IngestConfig) -> (mpsc::Sender<Item>, mpsc::Receiver<Item>) {
    mpsc::channel(cfg.queue)
}

/// [`run`] on a queue made by [`queue`]. The writer drains and stops once
/// the MQTT source and every other holder of a sender are done, so a
/// source that flushes at shutdown has its last items stored.
pub async fn run_with_queue(
    cfg: IngestConfig,
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    ready: watch::Sender<bool>,
    tx: mpsc::Sender<Item>,
    rx: mpsc::Receiver<Item>,
) -> Result<(), IngestError> {
    let tasks = WriterTasks::start(&cfg, store, metrics.clone(), rx, true);
    let (sub_client, sub_loop) =
        widgetry_common::mqtt_client(mqtt::mqtt_options(&cfg, cfg.client_id.clone(), false), 64);
    mqtt::subscribe_loop(&cfg, sub_client, sub_loop, tx, &metrics, &shutdown, &ready).await;
    // The subscriber dropped its sender: the writer drains and exits.
    let res = tasks.finish().await;
    info!("ingestor stopped");
    res
}

/// The writer and what runs beside it (the publisher's connection, WAL
/// checkpoints, retention), fed by a queue made by [`queue`]. It stops
/// once every sender of that queue is gone.
pub struct WriterTasks {
    writer: tokio::task::JoinHandle<()>,
    publisher: Option<(AsyncClient, tokio::task::JoinHandle<()>)>,
    stop: CancellationToken,
    checkpointer: tokio::task::JoinHandle<()>,
    pruner: tokio::task::JoinHandle<()>,
    compactor: tokio::task::JoinHandle<()>,
}

impl WriterTasks {
    /// Starts the writer on `rx`; with `mqtt`, it publishes acks, error
    /// reports and live messages to `cfg`'s broker.
    pub fn start(
        cfg: &IngestConfig,
        store: Store,
        metrics: Arc<Metrics>,
        rx: mpsc::Receiver<Item>,
        mqtt: bool,
    ) -> WriterTasks {
        // The publisher's event loop must outlive the writer so the last
        // acks go out; it has its own token, cancelled after the writer
        // finishes.
        let stop = CancellationToken::new();
        let publisher = mqtt.then(|| {
            let (pub_client, pub_loop) = widgetry_common::mqtt_client(
                mqtt::mqtt_options(cfg, format!("{}-pub", cfg.client_id), true),
                1024,
            );
            let driver = tokio::spawn(drive_publisher(pub_loop, metrics.clone(), stop.clone()));
            (pub_client, driver)
        });
        let writer = tokio::spawn(
            Writer {
                store: store.clone(),
                metrics: metrics.clone(),
                publisher: Publisher {
                    client: publisher.as_ref().map(|(c, _)| c.clone()),
                    metrics: metrics.clone(),
                    max_packet: cfg.limits.max_payload_bytes + 64 * 1024,
                },
                resolver: SeriesResolver::new(cfg.limits.max_series_per_device),
                sessions: HashMap::new(),
                max_items: cfg.max_batch_items,
                max_wait: cfg.max_wait,
            }
            .run(rx),
        );
        // WAL checkpoints run beside the writer, once a second.
        let checkpointer = tokio::spawn({
            let store = store.clone();
            let stop = stop.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {
                            if let Err(e) = store.checkpoint(false).await {
                                warn!(error = %e, "WAL checkpoint failed");
                            }
                        }
                    }
                }
            }
        });
        let pruner = tokio::spawn(prune_loop(cfg.retention, store.clone(), stop.clone()));
        let compactor = tokio::spawn(compact_loop(
            cfg.retention,
            store,
            metrics.clone(),
            stop.clone(),
        ));
        WriterTasks {
            writer,
            publisher,
            stop,
            checkpointer,
            pruner,
            compactor,
        }
    }

    /// Waits for the writer to drain (every sender gone), lets the
    /// publisher flush, and stops the helpers.
    pub async fn finish(self) -> Result<(), IngestError> {
        let res = self.writer.await;
        if let Some((client, mut driver)) = self.publisher {
            let _ = client.disconnect().await;
            // Give the publisher a moment to flush the disconnect, then stop it.
            if tokio::time::timeout(Duration::from_secs(2), &mut driver)
                .await
                .is_err()
            {
                self.stop.cancel();
                let _ = driver.await;
            }
        }
        self.stop.cancel();
        let _ = self.checkpointer.await;
        let _ = self.pruner.await;
        let _ = self.compactor.await;
        res.map_err(IngestError::from)
    }
}

/// Moves closed hours of the batch log into chunks every `every`
/// (`store::compact`); a pass stops between transactions at shutdown.
async fn compact_loop(
    retention: Retention,
    store: Store,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let Some(every) = retention.compact_every else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let started = std::time::Instant::now();
        let halt = || stop.is_cancelled();
        match store
            .compact(span(&retention, now_ms()), &halt, &mut |_| {})
            .await
        {
            Ok(c) => {
                metrics.compacted(&c);
                if c.batches > 0 {
                    info!(
                        batches = c.batches,
                        samples = c.samples,
                        chunks = c.chunks,
                        merged = c.merged,
                        rollup_rows_dropped = c.rollup_rows_dropped,
                        ms = started.elapsed().as_millis() as u64,
                        "compacted the batch log into chunks"
                    );
                }
            }
            Err(e) => {
                metrics.compaction_failed();
                warn!(error = %e, "compaction pass failed; retrying at the next one")
            }
        }
    }
}

/// What the compactor takes at `now`: batches past raw retention are left
/// to the pruner (compacting them would only make chunks it deletes, and a
/// redelivery racing the two could be stored beside such a chunk).
fn span(retention: &Retention, now: i64) -> std::ops::Range<i64> {
    let expired = retention
        .raw
        .map_or(i64::MIN, |d| now.saturating_sub(d.as_millis() as i64));
    expired..store::compact::closed_before(now)
}

/// Applies the retention settings now and then, from the maintenance
/// connection in small chunks (so ingest keeps going).
async fn prune_loop(retention: Retention, store: Store, stop: CancellationToken) {
    if retention.raw.is_none() && retention.minute.is_none() && retention.hour.is_none() {
        return;
    }
    let mut tick = tokio::time::interval(retention.every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let cut = |d: Option<Duration>| d.map(|d| now - d.as_millis() as i64);
        let pass = store.prune(
            cut(retention.raw),
            cut(retention.minute),
            cut(retention.hour),
        );
        let res = tokio::select! {
            _ = stop.cancelled() => return,
            r = pass => r,
        };
        match res {
            Ok(p) if p != store::retention::Pruned::default() => info!(
                batches = p.batches,
                chunks = p.chunks,
                events = p.events,
                rollup_1m = p.rollup_1m,
                rollup_1h = p.rollup_1h,
                "retention removed old data"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "retention pass failed; retrying at the next one"),
        }
    }
}
