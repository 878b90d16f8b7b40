//! The ingest writer: one task that groups queued items into
//! transactions (bounded by count and time), resolves series, appends
//! batches to the log with their rollups, settles ack watermarks, commits,
//! and only then hands acks, live messages, gap and error reports to the
//! [`Publisher`].
//!
//! It must never acknowledge a batch before its transaction is durable,
//! and never let one device's bad input stop or slow the others: a reject
//! is reported, the rest of the transaction goes on.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, error, warn};
use widgetry_common::{excerpt, now_ms};
use widgetry_proto::json::{
    Ack, ErrorReport, GapReport, JSON_SESSION, KeyedSample, Live, json_seq,
};
use widgetry_proto::{BatchBuilder, DecodedBatch, Reject, SessionId, Topic, TopicKind};

use super::acks::{MAX_ACK_SEQS, SessionAcks, SessionKey, load_session};
use super::publish::Publisher;
use super::series::{CACHE_LIMIT, Pending, SeriesResolver};
use crate::metrics::Metrics;
use crate::sources::{Bridged, Item};
use crate::store::rollup::Rollups;
use crate::store::write;
use crate::store::{Store, StoreError, WriteTx};

/// The writer task's state; see the module docs.
pub struct Writer {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub publisher: Publisher,
    pub resolver: SeriesResolver,
    /// Ack state of sessions seen recently (committed state only).
    pub sessions: HashMap<SessionKey, SessionAcks>,
    pub max_items: usize,
    pub max_wait: Duration,
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
    /// Gap reports newly stored, for `…/gaps` once durable.
    gaps_live: Vec<(String, GapReport)>,
    events: u64,
    events_dropped: u64,
    /// Committed batches for the live feed.
    live: Vec<Live>,
    /// App events newly stored from agents' batches, republished on
    /// `…/events` once durable (for the live bridge and any MQTT client).
    events_live: Vec<(String, widgetry_proto::json::EventBatch)>,
    /// Rollup deltas of the batches stored in this transaction.
    rollups: Rollups,
    /// Next commit id to assign (read once per transaction).
    next_commit: Option<u64>,
    /// What to tell the websocket bridges once this transaction is durable.
    bridged: Vec<(tokio::sync::oneshot::Sender<Bridged>, Bridged)>,
    /// Batch keys already stored (looked up once for the transaction's
    /// items) and those appended by it: a key in here is a duplicate.
    stored: HashSet<(String, SessionId, u64)>,
    /// New batches, inserted with multi-row statements before the commit.
    rows: Vec<write::NewBatch>,
}

impl Writer {
    /// Takes items until the source closes the queue; each group becomes
    /// one transaction.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Item>) {
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
            if let Err(e) = self.store.writer_checkpoint().await {
                warn!(error = %e, "WAL checkpoint from the writer failed; the checkpoint task goes on");
            }
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
            Ok(mut outcome) => {
                // Durable now: a bridge may count these as accepted.
                for (done, stored) in outcome.bridged.drain(..) {
                    let _ = done.send(stored);
                }
                self.resolver.commit(pending);
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
                self.publisher
                    .publish(
                        outcome.acks,
                        outcome.live,
                        outcome.events_live,
                        outcome.errors,
                        outcome.gaps_live,
                    )
                    .await;
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

    async fn transaction(
        &mut self,
        items: Vec<Item>,
        pending: &mut Pending,
        sessions: &mut HashMap<SessionKey, SessionAcks>,
    ) -> Result<Outcome, StoreError> {
        let mut tx = self.store.begin().await?;
        let mut out = Outcome::default();
        // Every batch key the items name, looked up in a few statements.
        let mut keys = Vec::new();
        for item in &items {
            match item {
                Item::Batch { device, batch, .. } if batch.sample_count() > 0 => {
                    keys.push((device.clone(), batch.session, batch.seq));
                }
                Item::Json {
                    device, samples, ..
                } => keys.push((device.clone(), JSON_SESSION, json_seq(samples))),
                Item::Bridged {
                    device, samples, ..
                } => {
                    for sample in samples {
                        keys.push((
                            device.clone(),
                            JSON_SESSION,
                            json_seq(std::slice::from_ref(sample)),
                        ));
                    }
                }
                _ => {}
            }
        }
        if !keys.is_empty() {
            out.stored = write::stored_keys(&mut tx, &keys).await?;
        }
        // Every series definition and session-local id the items use,
        // resolved in a few statements.
        let mut defs = Vec::new();
        let mut bindings = Vec::new();
        for item in &items {
            match item {
                Item::Batch { device, batch, .. } => {
                    for (id, key) in &batch.series {
                        defs.push((device.as_str(), key));
                        bindings.push((device.as_str(), &batch.session, *id));
                    }
                    for run in &batch.runs {
                        bindings.push((device.as_str(), &batch.session, run.series_id));
                    }
                }
                Item::Json {
                    device, samples, ..
                }
                | Item::Bridged {
                    device, samples, ..
                } => defs.extend(samples.iter().map(|s| (device.as_str(), &s.series))),
                _ => {}
            }
        }
        bindings.sort_unstable();
        bindings.dedup();
        self.resolver
            .prefetch(&mut tx, &defs, &bindings, pending)
            .await?;
        drop((defs, bindings));
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
                    if !batch.gaps.is_empty() && !out.rows.is_empty() {
                        // A gap counts the batches of its range already
                        // stored, this transaction's among them.
                        write::insert_batches(&mut tx, &out.rows).await?;
                        out.rows.clear();
                    }
                    for gap in std::mem::take(&mut batch.gaps) {
                        if let Some(lost) =
                            write::insert_gap(&mut tx, &device, &gap, received_ms).await?
                        {
                            out.gaps += 1;
                            out.gaps_live.push((
                                device.clone(),
                                GapReport {
                                    session: gap.session,
                                    from_seq: gap.from_seq,
                                    to_seq: gap.to_seq,
                                    samples: lost,
                                    ts: received_ms,
                                },
                            ));
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
                    if let Err(reject) = self
                        .store_json(&mut tx, &device, samples, received_ms, pending, &mut out)
                        .await?
                    {
                        self.reject(
                            &device,
                            Topic::name(&device, TopicKind::SamplesJson),
                            reject,
                            received_ms,
                            &mut out,
                        );
                        seen.entry(device).or_insert((received_ms, 0)).1 += 1;
                    }
                }
                Item::Bridged {
                    device,
                    samples,
                    received_ms,
                    done,
                } => {
                    seen.entry(device.clone()).or_insert((received_ms, 0)).0 = received_ms;
                    let mut stored = Bridged::default();
                    for sample in samples {
                        let before = out.batches;
                        match self
                            .store_json(
                                &mut tx,
                                &device,
                                vec![sample],
                                received_ms,
                                pending,
                                &mut out,
                            )
                            .await?
                        {
                            Ok(()) if out.batches > before => stored.new += 1,
                            Ok(()) => stored.duplicates += 1,
                            Err(reject) => {
                                stored.rejected += 1;
                                self.reject(
                                    &device,
                                    Topic::name(&device, TopicKind::SamplesJson),
                                    reject,
                                    received_ms,
                                    &mut out,
                                );
                                seen.entry(device.clone()).or_insert((received_ms, 0)).1 += 1;
                            }
                        }
                    }
                    out.bridged.push((done, stored));
                }
                Item::Status {
                    device,
                    status,
                    received_ms,
                } => {
                    write::set_status(&mut tx, &device, &status, received_ms).await?;
                }
                Item::Events {
                    device,
                    batch,
                    events,
                    received_ms,
                } => {
                    seen.entry(device.clone()).or_insert((received_ms, 0)).0 = received_ms;
                    for (idx, event) in events.iter().enumerate() {
                        if write::insert_event(
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
                        self.metrics.reject(&reject);
                        warn!(topic = %excerpt(&topic), reason = reject.code(), "rejected message: {}", excerpt(&reject.to_string()));
                    }
                },
            }
        }
        write::insert_batches(&mut tx, &out.rows).await?;
        out.rows.clear();
        write::bind_session_series_many(&mut tx, &std::mem::take(&mut pending.new_bindings))
            .await?;
        let devices: Vec<(&str, i64, i64)> = seen
            .iter()
            .map(|(device, (at, rejects))| (device.as_str(), *at, *rejects))
            .collect();
        write::touch_devices(&mut tx, &devices).await?;
        out.rollups.flush(&mut tx).await?;
        let now = now_ms();
        let watermarks: Vec<(&str, &SessionId, u64)> = touched
            .iter()
            .filter_map(|key| {
                let state = sessions.get(key)?;
                Some((key.0.as_str(), &key.1, state.through))
            })
            .collect();
        write::set_sessions_through(&mut tx, &watermarks, now).await?;
        tx.commit().await?;
        for key in touched {
            if let Some(state) = sessions.get(&key) {
                out.acks.push((
                    key.0.clone(),
                    Ack {
                        session: key.1,
                        through: state.through,
                        seqs: state.above(MAX_ACK_SEQS),
                    },
                ));
            }
        }
        Ok(out)
    }

    /// Brings a session's ack state into this transaction's working set.
    async fn session_state(
        &self,
        tx: &mut WriteTx,
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
        self.metrics.reject(&reject);
        warn!(device = %excerpt(device), topic = %excerpt(&topic), reason = reject.code(), "rejected payload: {}", excerpt(&reject.to_string()));
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
        tx: &mut WriteTx,
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
            let global = match self.resolver.series_id(tx, device, key, pending).await? {
                Ok(g) => g,
                Err(reject) => return Ok(Err(reject)),
            };
            let binding = (device.to_string(), session, *id);
            match self.resolver.bound(tx, &binding, pending).await? {
                Some(g) if g != global => {
                    return Ok(Err(Reject::Series(format!(
                        "series id {id} was already bound to another series in session {session}; ids cannot be reused within a session"
                    ))));
                }
                Some(_) => {}
                None => {
                    // Inserted with the transaction's other bindings.
                    pending
                        .new_bindings
                        .push((device.to_string(), session, *id, global));
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
            match self.resolver.bound(tx, &binding, pending).await? {
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
        // Events ride in batches (from the agent's local protocol): stored
        // with the batch, once, named by (session, seq, index).
        let events = std::mem::take(&mut batch.events);
        let mut new_events = false;
        for (idx, event) in events.iter().enumerate() {
            if write::insert_event(tx, device, &session, seq, idx, event).await? {
                out.events += 1;
                new_events = true;
            }
        }
        if new_events {
            // All of them, in their places: the ingestor that reads this
            // back stores nothing twice, since (session, seq, idx) match.
            out.events_live.push((
                device.to_string(),
                widgetry_proto::json::EventBatch {
                    session,
                    seq,
                    events: events.into_iter().map(|e| e.body).collect(),
                    dropped: 0,
                },
            ));
        }
        self.append(tx, device, batch, received_ms, pending, out)
            .await?;
        Ok(Ok((session, seq)))
    }

    /// Appends the samples of one `…/samples/json` message to the log,
    /// named by its content ([`json_seq`]) so a redelivery is stored once.
    /// Plain clients have no session: series are resolved by key, never
    /// through session-local ids, so no message can conflict with another.
    async fn store_json(
        &mut self,
        tx: &mut WriteTx,
        device: &str,
        samples: Vec<KeyedSample>,
        received_ms: i64,
        pending: &mut Pending,
        out: &mut Outcome,
    ) -> Result<Result<(), Reject>, StoreError> {
        let seq = json_seq(&samples);
        let mut builder = BatchBuilder::default();
        for s in samples {
            let global = match self
                .resolver
                .series_id(tx, device, &s.series, pending)
                .await?
            {
                Ok(g) => g,
                Err(reject) => return Ok(Err(reject)),
            };
            let id = u32::try_from(global)
                .map_err(|_| StoreError::Corrupt(format!("series id {global} exceeds u32")))?;
            builder.push(id, s.ts_ms, s.value);
        }
        let batch = builder.finish(JSON_SESSION, seq, Vec::new());
        self.append(tx, device, batch, received_ms, pending, out)
            .await?;
        Ok(Ok(()))
    }

    /// Appends a batch whose series ids are database ids to the log, with
    /// its rollups and live message; a batch already stored is skipped.
    async fn append(
        &mut self,
        tx: &mut WriteTx,
        device: &str,
        batch: DecodedBatch,
        received_ms: i64,
        pending: &mut Pending,
        out: &mut Outcome,
    ) -> Result<(), StoreError> {
        let session = batch.session;
        if batch.sample_count() == 0 {
            // Only gap reports or a settled watermark (handled by the
            // caller): acknowledged, but nothing for the log, the rollups
            // or the live feed, and no commit id used up.
            return Ok(());
        }
        let key = (device.to_string(), session, batch.seq);
        let appended = if out.stored.contains(&key) {
            None
        } else {
            let commit_id = match out.next_commit {
                Some(c) => c,
                None => write::max_commit_id(tx).await? + 1,
            };
            out.next_commit = Some(commit_id + 1);
            let (min_ts, max_ts) = batch.ts_range().unwrap_or((received_ms, received_ms));
            out.rows.push(write::NewBatch {
                commit_id,
                device: device.to_string(),
                session,
                seq: batch.seq,
                received_ms,
                min_ts,
                max_ts,
                samples: batch.sample_count() as i64,
                payload: batch.encode(),
            });
            out.stored.insert(key);
            for run in &batch.runs {
                let id = i64::from(run.series_id);
                for (ts, v) in run.ts_ms.iter().zip(&run.values) {
                    out.rollups.add(id, *ts, *v);
                }
            }
            Some(commit_id)
        };
        if let Some(commit_id) = appended {
            out.batches += 1;
            out.samples += batch.sample_count() as u64;
            let mut live = Live {
                commit: commit_id,
                device: device.to_string(),
                session,
                seq: batch.seq,
                series: Default::default(),
            };
            for run in &batch.runs {
                let key = self
                    .resolver
                    .series_key(tx, i64::from(run.series_id), pending)
                    .await?;
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
