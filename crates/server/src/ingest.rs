//! The ingestor: MQTT → validation → SQLite batch log → acknowledgements.
//!
//! Data flows source → sink: a subscriber connection receives publishes and
//! decodes them into [`Item`]s; one writer task groups items into
//! transactions (bounded by count and time), commits, and only then
//! publishes `…/ack` for the committed batches and `…/errors` for rejects
//! over a second, publish-only connection (so the writer can never deadlock
//! against the subscriber's event loop).
//!
//! It must never acknowledge a batch before its transaction is durable, and
//! never let one device's bad input stop or slow the others.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use widgetry_proto::json::{
    Ack, ErrorReport, Event as AppEvent, EventBatch, JSON_SESSION, KeyedSample, Live, Status,
    json_seq, parse_events, parse_samples, parse_status,
};
use widgetry_proto::{
    BatchBuilder, DecodedBatch, Limits, Reject, SeriesKey, SessionId, Topic, TopicKind,
};

use crate::metrics::Metrics;
use crate::rollup::Rollups;
use crate::store::{self, BatchRow, Store, StoreError};
use widgetry_common::{backoff, now_ms};

/// Settings of the ingest role.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Broker host and port.
    pub broker_host: String,
    pub broker_port: u16,
    /// MQTT client id of the subscriber connection (`-pub` is appended for
    /// the publisher). Persistent session: a broker that keeps sessions
    /// queues messages for it while it is down.
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    /// MQTT shared-subscription group: several ingestors with the same
    /// group (and distinct client ids) split the messages between them.
    pub shared_group: Option<String>,
    /// Most items per transaction.
    pub max_batch_items: usize,
    /// How long the writer waits for more items once its queue is empty.
    /// 0 (the default) is plain group commit: a transaction takes every
    /// item already queued, and items arriving while it commits form the
    /// next one. A 20 ms window measured worse at 2,000 devices (p50 62–67
    /// vs 44 ms, p99 231–259 vs 139–160 ms; docs/BENCHMARKS.md).
    pub max_wait: Duration,
    /// Items queued between the subscriber and the writer.
    pub queue: usize,
    pub limits: Limits,
    pub retention: Retention,
}

/// How long data is kept, by resolution (`None`: forever). Raw batches
/// and events are deleted by sample time once older than `raw`; rollups
/// once older than their own period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub raw: Option<Duration>,
    pub minute: Option<Duration>,
    pub hour: Option<Duration>,
    /// Time between retention passes.
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            raw: Some(Duration::from_secs(30 * 86_400)),
            minute: Some(Duration::from_secs(90 * 86_400)),
            hour: None,
            every: Duration::from_secs(600),
        }
    }
}

impl IngestConfig {
    /// Defaults for a broker at `host:port`.
    pub fn new(broker_host: impl Into<String>, broker_port: u16) -> Self {
        IngestConfig {
            broker_host: broker_host.into(),
            broker_port,
            client_id: "widgetry-ingest".into(),
            credentials: None,
            shared_group: None,
            max_batch_items: 1000,
            max_wait: Duration::from_millis(0),
            queue: 4096,
            limits: Limits::default(),
            retention: Retention::default(),
        }
    }
}

/// Errors that stop the ingestor.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("ingest writer task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// One unit of work for the writer.
#[derive(Debug)]
enum Item {
    Batch {
        device: String,
        batch: DecodedBatch,
        received_ms: i64,
    },
    Json {
        device: String,
        samples: Vec<KeyedSample>,
        received_ms: i64,
    },
    Status {
        device: String,
        status: Status,
        received_ms: i64,
    },
    Events {
        device: String,
        batch: EventBatch,
        events: Vec<AppEvent>,
        received_ms: i64,
    },
    Rejected {
        device: Option<String>,
        topic: String,
        reject: Reject,
        received_ms: i64,
    },
}

impl Item {
    fn received_ms(&self) -> i64 {
        match self {
            Item::Batch { received_ms, .. }
            | Item::Json { received_ms, .. }
            | Item::Status { received_ms, .. }
            | Item::Events { received_ms, .. }
            | Item::Rejected { received_ms, .. } => *received_ms,
        }
    }
}

fn mqtt_options(cfg: &IngestConfig, client_id: String, clean: bool) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, cfg.broker_host.clone(), cfg.broker_port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(clean);
    let max = cfg.limits.max_payload_bytes + 64 * 1024;
    opts.set_max_packet_size(max, max);
    opts.set_inflight(1000);
    if let Some((user, pass)) = &cfg.credentials {
        opts.set_credentials(user.clone(), pass.clone());
    }
    opts
}

/// Runs the ingestor until `shutdown` is cancelled, then drains what it has
/// received (committing and acknowledging it) and returns.
pub async fn run(
    cfg: IngestConfig,
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let (tx, rx) = mpsc::channel(cfg.queue);
    let (pub_client, pub_loop) = AsyncClient::new(
        mqtt_options(&cfg, format!("{}-pub", cfg.client_id), true),
        1024,
    );
    let (sub_client, sub_loop) =
        AsyncClient::new(mqtt_options(&cfg, cfg.client_id.clone(), false), 64);

    // The publisher's event loop must outlive the writer so the last acks go
    // out; it has its own token, cancelled after the writer finishes.
    let pub_stop = CancellationToken::new();
    let publisher = tokio::spawn(drive_publisher(pub_loop, metrics.clone(), pub_stop.clone()));
    let writer = tokio::spawn(
        Writer {
            store: store.clone(),
            metrics: metrics.clone(),
            client: pub_client.clone(),
            series_cache: HashMap::new(),
            series_ids: HashMap::new(),
            keys: HashMap::new(),
            max_packet: cfg.limits.max_payload_bytes + 64 * 1024,
            sessions: HashMap::new(),
            max_items: cfg.max_batch_items,
            max_wait: cfg.max_wait,
        }
        .run(rx),
    );
    // WAL checkpoints run beside the writer, once a second.
    let checkpointer = tokio::spawn({
        let store = store.clone();
        let stop = pub_stop.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        // 16k pages: 64 MiB of WAL with 4 KiB pages.
                        if let Err(e) = store.checkpoint(16_384).await {
                            warn!(error = %e, "WAL checkpoint failed");
                        }
                    }
                }
            }
        }
    });
    let pruner = tokio::spawn(prune_loop(cfg.retention, store.clone(), pub_stop.clone()));
    subscribe_loop(&cfg, sub_client.clone(), sub_loop, tx, &metrics, &shutdown).await;
    // The subscriber dropped its sender: the writer drains and exits.
    let res = writer.await;
    let _ = pub_client.disconnect().await;
    // Give the publisher a moment to flush the disconnect, then stop it.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while !publisher.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    pub_stop.cancel();
    let _ = publisher.await;
    let _ = checkpointer.await;
    let _ = pruner.await;
    info!("ingestor stopped");
    res.map_err(IngestError::from)
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
            Ok(p) if p != store::Pruned::default() => info!(
                batches = p.batches,
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

async fn drive_publisher(mut ev: EventLoop, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            n = ev.poll() => n,
        };
        match next {
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(Event::Incoming(Packet::ConnAck(_))) => failures = 0,
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                metrics.mqtt_reconnects.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "ingest publisher connection lost; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff(failures, crate::RECONNECT_CAP)) => {}
                }
            }
        }
    }
}

async fn subscribe_loop(
    cfg: &IngestConfig,
    client: AsyncClient,
    mut ev: EventLoop,
    tx: mpsc::Sender<Item>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            n = ev.poll() => n,
        };
        match next {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                info!(broker = %format!("{}:{}", cfg.broker_host, cfg.broker_port), "ingestor connected to broker");
                failures = 0;
                let filters = [
                    TopicKind::Samples,
                    TopicKind::SamplesJson,
                    TopicKind::Status,
                    TopicKind::Events,
                ]
                .map(|k| {
                    let filter = match &cfg.shared_group {
                        Some(g) => format!("$share/{g}/{}", k.filter()),
                        None => k.filter(),
                    };
                    rumqttc::SubscribeFilter::new(filter, QoS::AtLeastOnce)
                });
                if let Err(e) = client.try_subscribe_many(filters) {
                    error!(error = %e, "cannot queue subscription");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                metrics.ingest_subscribed.store(1, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let item = classify(&p.topic, &p.payload, &cfg.limits, metrics);
                if let Some(item) = item {
                    // Backpressure: when the writer is behind we stop
                    // reading from the broker.
                    let send = tx.send(item);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        r = send => if r.is_err() { break },
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                metrics.ingest_subscribed.store(0, Ordering::Relaxed);
                metrics.mqtt_reconnects.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, attempt = failures, "ingestor lost the broker connection; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff(failures, crate::RECONNECT_CAP)) => {}
                }
            }
        }
    }
    metrics.ingest_subscribed.store(0, Ordering::Relaxed);
    let _ = client.try_disconnect();
    // Flush the DISCONNECT so a persistent session ends cleanly.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match ev.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Decodes one publish into work for the writer (or a reject).
fn classify(topic: &str, payload: &[u8], limits: &Limits, metrics: &Metrics) -> Option<Item> {
    let received_ms = now_ms();
    let parsed = match Topic::parse(topic) {
        Ok(t) => t,
        Err(reject) => {
            metrics.messages_other.fetch_add(1, Ordering::Relaxed);
            return Some(Item::Rejected {
                device: None,
                topic: topic.to_string(),
                reject,
                received_ms,
            });
        }
    };
    let device = parsed.device.to_string();
    let result = match parsed.kind {
        TopicKind::Samples => {
            metrics.messages_samples.fetch_add(1, Ordering::Relaxed);
            DecodedBatch::decode(payload, limits, received_ms).map(|batch| Item::Batch {
                device: device.clone(),
                batch,
                received_ms,
            })
        }
        TopicKind::SamplesJson => {
            metrics
                .messages_samples_json
                .fetch_add(1, Ordering::Relaxed);
            parse_samples(payload, limits, received_ms).map(|samples| Item::Json {
                device: device.clone(),
                samples,
                received_ms,
            })
        }
        TopicKind::Status => {
            metrics.messages_status.fetch_add(1, Ordering::Relaxed);
            if payload.is_empty() {
                // A cleared retained message: nothing to record.
                return None;
            }
            parse_status(payload).map(|status| Item::Status {
                device: device.clone(),
                status,
                received_ms,
            })
        }
        TopicKind::Events => {
            metrics.messages_events.fetch_add(1, Ordering::Relaxed);
            parse_events(payload, limits, received_ms).map(|(batch, events)| Item::Events {
                device: device.clone(),
                batch,
                events,
                received_ms,
            })
        }
        TopicKind::Ack | TopicKind::Errors | TopicKind::Live => {
            metrics.messages_other.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    Some(result.unwrap_or_else(|reject| Item::Rejected {
        device: Some(device),
        topic: topic.to_string(),
        reject,
        received_ms,
    }))
}

/// Acknowledgement state of one session.
#[derive(Debug, Clone, Default)]
struct SessionAcks {
    /// Every seq ≤ through is committed.
    through: u64,
    /// Committed seqs above `through`.
    above: BTreeSet<u64>,
}

impl SessionAcks {
    /// Settles a whole range (batches the device reported as lost).
    fn commit_range(&mut self, from: u64, to: u64) {
        if from <= self.through + 1 {
            self.through = self.through.max(to);
            self.above = self.above.split_off(&(self.through + 1));
            while self.above.remove(&(self.through + 1)) {
                self.through += 1;
            }
        } else {
            for seq in from..=to {
                self.commit(seq);
            }
        }
    }

    fn commit(&mut self, seq: u64) {
        if seq > self.through {
            self.above.insert(seq);
        }
        while self.above.remove(&(self.through + 1)) {
            self.through += 1;
        }
    }
}

/// Bound on cached sessions and series bindings; past it the caches are
/// cleared and reloaded from the database on demand.
const CACHE_LIMIT: usize = 200_000;
/// Most selectively acknowledged seqs listed in one ack message.
const MAX_ACK_SEQS: usize = 256;

type SessionKey = (String, SessionId);
type BindingKey = (String, SessionId, u32);

/// Series rows and session bindings written by the transaction under way:
/// they join the writer's caches only once it has committed.
#[derive(Default)]
struct Pending {
    bindings: HashMap<BindingKey, i64>,
    series: HashMap<(String, String), i64>,
}

struct Writer {
    store: Store,
    metrics: Arc<Metrics>,
    client: AsyncClient,
    /// (device, session, local id) → series id, committed bindings only.
    series_cache: HashMap<BindingKey, i64>,
    /// (device, series key) → series id, committed rows only.
    series_ids: HashMap<(String, String), i64>,
    /// series id → canonical key, for the live feed.
    keys: HashMap<i64, String>,
    /// Largest MQTT packet the publisher may send (live messages above it
    /// are skipped; readers fetch those batches from the database).
    max_packet: usize,
    sessions: HashMap<SessionKey, SessionAcks>,
    max_items: usize,
    max_wait: Duration,
}

/// What a committed transaction leads to.
#[derive(Default)]
struct Outcome {
    acks: Vec<(String, Ack)>,
    errors: Vec<(String, ErrorReport)>,
    batches: u64,
    duplicates: u64,
    samples: u64,
    gaps: u64,
    events: u64,
    events_dropped: u64,
    /// Committed batches for the live feed.
    live: Vec<Live>,
    /// Rollup deltas of the batches stored in this transaction.
    rollups: Rollups,
    /// Next commit id to assign (read once per transaction).
    next_commit: Option<u64>,
    /// series id → key learnt in this transaction.
    new_keys: HashMap<i64, String>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Item>) {
        let mut items = Vec::with_capacity(self.max_items);
        while let Some(first) = rx.recv().await {
            items.push(first);
            let deadline = tokio::time::Instant::now() + self.max_wait;
            while items.len() < self.max_items {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(item)) => items.push(item),
                    Ok(None) | Err(_) => break,
                }
            }
            self.process(std::mem::take(&mut items)).await;
        }
        debug!("ingest writer drained");
    }

    async fn process(&mut self, items: Vec<Item>) {
        let oldest = items
            .iter()
            .map(Item::received_ms)
            .min()
            .unwrap_or_else(now_ms);
        let mut pending = Pending::default();
        let mut sessions = HashMap::new();
        self.metrics
            .ingest_wait
            .observe(Duration::from_millis((now_ms() - oldest).max(0) as u64));
        let started = tokio::time::Instant::now();
        let result = self.transaction(items, &mut pending, &mut sessions).await;
        self.metrics.ingest_commit.observe(started.elapsed());
        match result {
            Ok(outcome) => {
                if self.series_cache.len() + pending.bindings.len() > CACHE_LIMIT {
                    self.series_cache.clear();
                }
                self.series_cache.extend(pending.bindings);
                if self.series_ids.len() + pending.series.len() > CACHE_LIMIT {
                    self.series_ids.clear();
                }
                self.series_ids.extend(pending.series);
                if self.keys.len() + outcome.new_keys.len() > CACHE_LIMIT {
                    self.keys.clear();
                }
                self.keys
                    .extend(outcome.new_keys.iter().map(|(k, v)| (*k, v.clone())));
                if self.sessions.len() > CACHE_LIMIT {
                    self.sessions.clear();
                }
                self.sessions.extend(sessions);
                let m = &self.metrics;
                m.commits.fetch_add(1, Ordering::Relaxed);
                m.batches_stored
                    .fetch_add(outcome.batches, Ordering::Relaxed);
                m.batches_duplicate
                    .fetch_add(outcome.duplicates, Ordering::Relaxed);
                m.samples_stored
                    .fetch_add(outcome.samples, Ordering::Relaxed);
                m.gaps_reported.fetch_add(outcome.gaps, Ordering::Relaxed);
                m.events_stored.fetch_add(outcome.events, Ordering::Relaxed);
                m.events_dropped_by_devices
                    .fetch_add(outcome.events_dropped, Ordering::Relaxed);
                m.ingest_lag_ms.store(now_ms() - oldest, Ordering::Relaxed);
                let published = tokio::time::Instant::now();
                self.publish(outcome).await;
                self.metrics.ingest_publish.observe(published.elapsed());
            }
            Err(e) => {
                // Nothing of this transaction is acknowledged: devices resend.
                self.metrics.db_errors.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, "ingest transaction failed; its batches are not acknowledged and will be resent by devices");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    async fn publish(&self, mut outcome: Outcome) {
        for (device, ack) in outcome.acks {
            let topic = Topic::name(&device, TopicKind::Ack);
            let Some(payload) = to_json(&ack, &topic) else {
                continue;
            };
            match self
                .client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
            {
                Ok(()) => {
                    self.metrics.acks_published.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => warn!(device = %device, error = %e, "cannot publish ack"),
            }
        }
        // The live feed never slows ingest: a message that does not fit the
        // publisher's queue (or a packet) is skipped, and readers that see
        // a hole in the commit ids fetch the batch from the database.
        for live in std::mem::take(&mut outcome.live) {
            let topic = Topic::name(&live.device, TopicKind::Live);
            let Some(payload) = to_json(&live, &topic) else {
                self.metrics.live_skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if payload.len() > self.max_packet {
                self.metrics.live_skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match self
                .client
                .try_publish(topic, QoS::AtMostOnce, false, payload)
            {
                Ok(()) => {
                    self.metrics.live_published.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.metrics.live_skipped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for (device, report) in outcome.errors {
            let topic = Topic::name(&device, TopicKind::Errors);
            let Some(payload) = to_json(&report, &topic) else {
                continue;
            };
            if let Err(e) = self
                .client
                .publish(topic, QoS::AtMostOnce, false, payload)
                .await
            {
                warn!(device = %device, error = %e, "cannot publish error report");
            }
        }
    }

    async fn transaction(
        &mut self,
        items: Vec<Item>,
        pending: &mut Pending,
        sessions: &mut HashMap<SessionKey, SessionAcks>,
    ) -> Result<Outcome, StoreError> {
        let mut tx = self.store.begin().await?;
        let mut out = Outcome::default();
        let mut seen: HashMap<String, (i64, i64)> = HashMap::new();
        let mut touched: Vec<SessionKey> = Vec::new();
        for item in items {
            match item {
                Item::Batch {
                    device,
                    mut batch,
                    received_ms,
                } => {
                    seen.entry(device.clone()).or_insert((received_ms, 0)).0 = received_ms;
                    for gap in std::mem::take(&mut batch.gaps) {
                        if let Some(lost) =
                            store::insert_gap(&mut tx, &device, &gap, received_ms).await?
                        {
                            out.gaps += 1;
                            warn!(device = %device, session = %gap.session, from_seq = gap.from_seq, to_seq = gap.to_seq, samples = lost, "device reports batches lost to a full spool");
                        }
                        let key = (device.clone(), gap.session);
                        self.session_state(&mut tx, &key, sessions, &mut touched)
                            .await?;
                        if let Some(s) = sessions.get_mut(&key) {
                            s.commit_range(gap.from_seq, gap.to_seq);
                        }
                    }
                    if batch.settled_through > 0 {
                        // The device no longer holds these seqs: a server
                        // that lost its state can still move its watermark.
                        let key = (device.clone(), batch.session);
                        self.session_state(&mut tx, &key, sessions, &mut touched)
                            .await?;
                        if let Some(s) = sessions.get_mut(&key) {
                            s.commit_range(1, batch.settled_through);
                        }
                    }
                    match self
                        .store_batch(&mut tx, &device, batch, received_ms, pending, &mut out)
                        .await?
                    {
                        Ok((session, seq)) => {
                            let key = (device.clone(), session);
                            self.session_state(&mut tx, &key, sessions, &mut touched)
                                .await?;
                            if let Some(s) = sessions.get_mut(&key) {
                                s.commit(seq);
                            }
                        }
                        Err(reject) => {
                            // Unknown series is a request to resend the
                            // definitions, not bad input from the device.
                            let counts = !matches!(reject, Reject::UnknownSeries { .. });
                            self.reject(
                                &device,
                                Topic::name(&device, TopicKind::Samples),
                                reject,
                                received_ms,
                                &mut out,
                            );
                            if counts {
                                seen.entry(device).or_insert((received_ms, 0)).1 += 1;
                            }
                        }
                    }
                }
                Item::Json {
                    device,
                    samples,
                    received_ms,
                } => {
                    seen.entry(device.clone()).or_insert((received_ms, 0)).0 = received_ms;
                    self.store_json(&mut tx, &device, samples, received_ms, pending, &mut out)
                        .await?;
                }
                Item::Status {
                    device,
                    status,
                    received_ms,
                } => {
                    store::set_status(&mut tx, &device, &status, received_ms).await?;
                }
                Item::Events {
                    device,
                    batch,
                    events,
                    received_ms,
                } => {
                    seen.entry(device.clone()).or_insert((received_ms, 0)).0 = received_ms;
                    for (idx, event) in events.iter().enumerate() {
                        if store::insert_event(
                            &mut tx,
                            &device,
                            &batch.session,
                            batch.seq,
                            idx,
                            event,
                        )
                        .await?
                        {
                            out.events += 1;
                        }
                    }
                    if batch.dropped > 0 {
                        out.events_dropped += batch.dropped;
                        warn!(device = %device, dropped = batch.dropped, "device dropped app events (its local queue was full)");
                    }
                }
                Item::Rejected {
                    device,
                    topic,
                    reject,
                    received_ms,
                } => match device {
                    Some(device) => {
                        self.reject(&device, topic, reject, received_ms, &mut out);
                        seen.entry(device).or_insert((received_ms, 0)).1 += 1;
                    }
                    None => {
                        self.metrics.reject(reject.code());
                        warn!(topic = %topic, reason = reject.code(), "rejected message: {reject}");
                    }
                },
            }
        }
        for (device, (at, rejects)) in &seen {
            store::touch_device(&mut tx, device, *at, *rejects).await?;
        }
        out.rollups.flush(&mut tx).await?;
        let now = now_ms();
        for key in &touched {
            if let Some(state) = sessions.get(key) {
                store::set_session_through(&mut tx, &key.0, &key.1, state.through, now).await?;
            }
        }
        tx.commit().await?;
        for key in touched {
            if let Some(state) = sessions.get(&key) {
                out.acks.push((
                    key.0.clone(),
                    Ack {
                        session: key.1,
                        through: state.through,
                        seqs: state.above.iter().take(MAX_ACK_SEQS).copied().collect(),
                    },
                ));
            }
        }
        Ok(out)
    }

    /// Brings a session's ack state into this transaction's working set.
    async fn session_state(
        &self,
        tx: &mut store::WriteTx,
        key: &SessionKey,
        sessions: &mut HashMap<SessionKey, SessionAcks>,
        touched: &mut Vec<SessionKey>,
    ) -> Result<(), StoreError> {
        if !sessions.contains_key(key) {
            let state = match self.sessions.get(key) {
                Some(s) => s.clone(),
                None => load_session(tx, &key.0, &key.1).await?,
            };
            sessions.insert(key.clone(), state);
            touched.push(key.clone());
        }
        Ok(())
    }

    fn reject(
        &self,
        device: &str,
        topic: String,
        reject: Reject,
        received_ms: i64,
        out: &mut Outcome,
    ) {
        self.metrics.reject(reject.code());
        warn!(device = %device, topic = %topic, reason = reject.code(), "rejected payload: {reject}");
        out.errors.push((
            device.to_string(),
            ErrorReport::new(topic, &reject, received_ms),
        ));
    }

    /// Resolves a device batch's session-local series ids and appends it
    /// to the log. The inner result is a reject (nothing written), the
    /// outer one a database error.
    async fn store_batch(
        &mut self,
        tx: &mut store::WriteTx,
        device: &str,
        mut batch: DecodedBatch,
        received_ms: i64,
        pending: &mut Pending,
        out: &mut Outcome,
    ) -> Result<Result<(SessionId, u64), Reject>, StoreError> {
        let session = batch.session;
        let seq = batch.seq;
        let mut local: HashMap<u32, i64> = HashMap::with_capacity(batch.series.len());
        for (id, key) in &batch.series {
            let global = self.series_id(tx, device, key, pending, out).await?;
            let binding = (device.to_string(), session, *id);
            match self.bound(tx, &binding, pending).await? {
                Some(g) if g != global => {
                    return Ok(Err(Reject::Series(format!(
                        "series id {id} was already bound to another series in session {session}; ids cannot be reused within a session"
                    ))));
                }
                Some(_) => {}
                None => {
                    store::bind_session_series(tx, device, &session, *id, global).await?;
                    pending.bindings.insert(binding, global);
                }
            }
            local.insert(*id, global);
        }
        let mut missing = Vec::new();
        for run in &batch.runs {
            if local.contains_key(&run.series_id) {
                continue;
            }
            let binding = (device.to_string(), session, run.series_id);
            match self.bound(tx, &binding, pending).await? {
                Some(g) => {
                    local.insert(run.series_id, g);
                }
                None => missing.push(run.series_id),
            }
        }
        if !missing.is_empty() {
            missing.sort_unstable();
            missing.dedup();
            return Ok(Err(Reject::UnknownSeries {
                session,
                seq,
                ids: missing,
            }));
        }
        for run in &mut batch.runs {
            let global = local.get(&run.series_id).copied().unwrap_or_default();
            run.series_id = u32::try_from(global)
                .map_err(|_| StoreError::Corrupt(format!("series id {global} exceeds u32")))?;
        }
        batch.series.clear();
        self.append(tx, device, batch, received_ms, out).await?;
        Ok(Ok((session, seq)))
    }

    /// Appends the samples of one `…/samples/json` message to the log,
    /// named by its content ([`json_seq`]) so a redelivery is stored once.
    /// Plain clients have no session: series are resolved by key, never
    /// through session-local ids, so no message can conflict with another.
    async fn store_json(
        &mut self,
        tx: &mut store::WriteTx,
        device: &str,
        samples: Vec<KeyedSample>,
        received_ms: i64,
        pending: &mut Pending,
        out: &mut Outcome,
    ) -> Result<(), StoreError> {
        let seq = json_seq(&samples);
        let mut builder = BatchBuilder::default();
        for s in samples {
            let global = self.series_id(tx, device, &s.series, pending, out).await?;
            let id = u32::try_from(global)
                .map_err(|_| StoreError::Corrupt(format!("series id {global} exceeds u32")))?;
            builder.push(id, s.ts_ms, s.value);
        }
        let batch = builder.finish(JSON_SESSION, seq, Vec::new());
        self.append(tx, device, batch, received_ms, out).await
    }

    /// The database id of a device's series, created if new.
    async fn series_id(
        &self,
        tx: &mut store::WriteTx,
        device: &str,
        key: &SeriesKey,
        pending: &mut Pending,
        out: &mut Outcome,
    ) -> Result<i64, StoreError> {
        let name = (device.to_string(), key.to_string());
        if let Some(g) = self
            .series_ids
            .get(&name)
            .or_else(|| pending.series.get(&name))
        {
            return Ok(*g);
        }
        let global = store::upsert_series(tx, device, key).await?;
        if !self.keys.contains_key(&global) {
            out.new_keys.insert(global, name.1.clone());
        }
        pending.series.insert(name, global);
        Ok(global)
    }

    /// The series a session-local id is bound to, if any.
    async fn bound(
        &self,
        tx: &mut store::WriteTx,
        binding: &BindingKey,
        pending: &mut Pending,
    ) -> Result<Option<i64>, StoreError> {
        if let Some(g) = self
            .series_cache
            .get(binding)
            .or_else(|| pending.bindings.get(binding))
        {
            return Ok(Some(*g));
        }
        let found = store::session_series(tx, &binding.0, &binding.1, binding.2).await?;
        if let Some(g) = found {
            pending.bindings.insert(binding.clone(), g);
        }
        Ok(found)
    }

    /// Appends a batch whose series ids are database ids to the log, with
    /// its rollups and live message; a batch already stored is skipped.
    async fn append(
        &mut self,
        tx: &mut store::WriteTx,
        device: &str,
        batch: DecodedBatch,
        received_ms: i64,
        out: &mut Outcome,
    ) -> Result<(), StoreError> {
        let session = batch.session;
        let samples = batch.sample_count() as i64;
        let (min_ts, max_ts) = batch.ts_range().unwrap_or((received_ms, received_ms));
        let payload = batch.encode();
        let commit_id = match out.next_commit {
            Some(c) => c,
            None => store::max_commit_id(tx).await? + 1,
        };
        let inserted = store::insert_batch(
            tx,
            &BatchRow {
                commit_id,
                device,
                session: &session,
                seq: batch.seq,
                received_ms,
                min_ts,
                max_ts,
                samples,
                payload: &payload,
            },
        )
        .await?;
        if inserted {
            out.next_commit = Some(commit_id + 1);
            out.batches += 1;
            out.samples += samples as u64;
            let mut live = Live {
                commit: commit_id,
                device: device.to_string(),
                session,
                seq: batch.seq,
                series: Default::default(),
            };
            for run in &batch.runs {
                let id = i64::from(run.series_id);
                for (ts, v) in run.ts_ms.iter().zip(&run.values) {
                    out.rollups.add(id, *ts, *v);
                }
                let key = self.series_key(tx, id, out).await?;
                live.series
                    .entry(key)
                    .or_default()
                    .extend(run.ts_ms.iter().copied().zip(run.values.iter().copied()));
            }
            for points in live.series.values_mut() {
                points.sort_by_key(|p| p.0);
            }
            out.live.push(live);
        } else {
            out.duplicates += 1;
            debug!(device = %device, session = %session, seq = batch.seq, "duplicate batch skipped");
        }
        Ok(())
    }
}

impl Writer {
    /// The key of a series id: from the cache, this transaction, or the database.
    async fn series_key(
        &self,
        tx: &mut store::WriteTx,
        id: i64,
        out: &mut Outcome,
    ) -> Result<String, StoreError> {
        if let Some(k) = self.keys.get(&id) {
            return Ok(k.clone());
        }
        if let Some(k) = out.new_keys.get(&id) {
            return Ok(k.clone());
        }
        let key = store::series_key(tx, id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("series id {id} has no row")))?;
        out.new_keys.insert(id, key.clone());
        Ok(key)
    }
}

/// Serialises a message for `topic`; a failure is logged as an error and
/// nothing is published (never an empty payload).
fn to_json<T: serde::Serialize>(msg: &T, topic: &str) -> Option<Vec<u8>> {
    match serde_json::to_vec(msg) {
        Ok(p) => Some(p),
        Err(e) => {
            error!(topic = %topic, error = %e, "cannot serialise message; not published");
            None
        }
    }
}

async fn load_session(
    tx: &mut store::WriteTx,
    device: &str,
    session: &SessionId,
) -> Result<SessionAcks, StoreError> {
    let through = store::session_through(tx, device, session)
        .await?
        .unwrap_or(0);
    let above = store::seqs_above(tx, device, session, through).await?;
    let mut state = SessionAcks {
        through,
        above: BTreeSet::new(),
    };
    for seq in above {
        state.commit(seq);
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_watermark_advances_over_contiguous_seqs() {
        let mut s = SessionAcks::default();
        s.commit(2);
        assert_eq!((s.through, s.above.len()), (0, 1));
        s.commit(1);
        assert_eq!((s.through, s.above.len()), (2, 0));
        s.commit(5);
        s.commit(3);
        assert_eq!(s.through, 3);
        assert_eq!(s.above.iter().copied().collect::<Vec<_>>(), vec![5]);
        s.commit(2);
        assert_eq!(s.through, 3, "old seqs do not move the watermark");
        s.commit(9);
        s.commit_range(4, 6);
        assert_eq!(
            (s.through, s.above.len()),
            (6, 1),
            "range settles and absorbs nothing past 7"
        );
        s.commit_range(8, 8);
        assert_eq!(s.through, 6);
        s.commit(7);
        assert_eq!((s.through, s.above.len()), (9, 0));
    }
}
