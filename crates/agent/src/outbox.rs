//! Batches waiting for the server's acknowledgement, backed by the disk
//! [`Spool`]: spooled before they are published, forgotten only when an
//! `Ack` covers them.
//!
//! While connected, batches are sent in spool order and sent again when not
//! acknowledged within the ack timeout (the broker may drop messages without
//! telling anyone). When the spool is full its oldest batches are dropped
//! and reported as [`Gap`]s in the next batches until one carrying the
//! report is acknowledged: data is never dropped silently.
//!
//! The outbox also owns the session's series table and heals the protocol
//! when the server has lost state (DESIGN.md §6.9): every batch says up to
//! which seq the device holds nothing more (`settled_through`), so a new or
//! restored database can still acknowledge; an `unknown_series` report on
//! `…/errors` makes the outbox resend that session's batches with their
//! series definitions attached; an ack for seqs this run never published
//! is ignored. It must never forget a batch that no valid ack covers.
//!
//! Payloads to send come from a small in-memory cache (every batch sealed
//! by this run while it fits [`CACHE_BYTES`]) or are read from the spool
//! by its disk thread; the event loop never waits for the disk.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use tokio::time::Instant;
use widgetry_proto::json::{Ack, ErrorReport};
use widgetry_proto::{BatchBuilder, DecodedBatch, Limits, SeriesKey, SessionId};

use crate::disk::DiskEvent;
use crate::now_ms;
use crate::spool::{Entry, Gap, Spool, SpoolError};

/// Most payload bytes kept in memory for sending (beyond it, payloads are
/// read back from the spool when they are due).
pub const CACHE_BYTES: usize = 1 << 20;

type Key = (SessionId, u64);

/// The outbox; see the module docs.
pub struct Outbox {
    spool: Spool,
    /// This run's session, and the highest seq it has spooled.
    session: SessionId,
    last_seq: u64,
    /// This run's series table: session-local id → key, and back (one
    /// allocation per key, shared by both).
    series: Vec<Arc<SeriesKey>>,
    index: HashMap<Arc<SeriesKey>, u32>,
    sent_at: HashMap<Key, Instant>,
    /// Series ids whose definitions a batch of this run carries.
    defs: HashMap<Key, Vec<u32>>,
    /// Per series id: has a batch carrying its definition been acknowledged?
    def_acked: Vec<bool>,
    /// Sessions whose spooled batches go out with their definitions
    /// attached, because the server said it does not know them.
    heal: HashSet<SessionId>,
    /// Series tables of earlier runs, read from their spooled batches when
    /// the server asks for one of their definitions.
    old_tables: HashMap<SessionId, HashMap<u32, SeriesKey>>,
    /// Sessions for which an ack covering unpublished seqs was logged.
    ignored_logged: HashSet<SessionId>,
    /// Acks ignored because they covered seqs this run never published.
    pub acks_ignored: u64,
    /// Error report reasons already printed.
    reported: HashSet<String>,
    /// Gaps not yet put into a batch.
    gaps_pending: Vec<Gap>,
    /// Gaps carried by a batch that is not yet acknowledged.
    gaps_carried: HashMap<Key, Vec<Gap>>,
    /// Batches acknowledged so far, and the samples they held.
    pub acked: u64,
    pub acked_samples: u64,
    /// Batches and samples lost because the spool was full or failed.
    pub dropped_batches: u64,
    pub dropped_samples: u64,
    /// Payloads in memory, until acknowledged (bounded by CACHE_BYTES).
    cache: HashMap<Key, Vec<u8>>,
    cache_bytes: usize,
    /// Payloads asked of the disk thread, not yet delivered.
    reading: HashSet<Key>,
}

impl Outbox {
    /// An outbox for `session` over `spool` (which may hold batches of
    /// earlier runs).
    pub fn new(spool: Spool, session: SessionId) -> Self {
        Outbox {
            spool,
            session,
            last_seq: 0,
            series: Vec::new(),
            index: HashMap::new(),
            sent_at: HashMap::new(),
            defs: HashMap::new(),
            def_acked: Vec::new(),
            heal: HashSet::new(),
            old_tables: HashMap::new(),
            ignored_logged: HashSet::new(),
            acks_ignored: 0,
            reported: HashSet::new(),
            gaps_pending: Vec::new(),
            gaps_carried: HashMap::new(),
            acked: 0,
            acked_samples: 0,
            dropped_batches: 0,
            dropped_samples: 0,
            cache: HashMap::new(),
            cache_bytes: 0,
            reading: HashSet::new(),
        }
    }

    /// The spool's disk-thread reports (taken once, by the event loop).
    pub fn take_disk_events(&mut self) -> Option<tokio::sync::mpsc::UnboundedReceiver<DiskEvent>> {
        self.spool.take_events()
    }

    /// Waits until every spool write so far is on disk, and fsynced unless
    /// acknowledged first (the fsync under way included).
    pub async fn flush_spool(&self) {
        self.spool.flushed().await;
    }

    /// Fsyncs done by the spool's disk thread, and their total time.
    pub fn spool_syncs(&self) -> (u64, Duration) {
        self.spool.syncs()
    }

    fn cache_insert(&mut self, key: Key, payload: Vec<u8>) {
        if self.cache_bytes + payload.len() <= CACHE_BYTES {
            self.cache_bytes += payload.len();
            if let Some(old) = self.cache.insert(key, payload) {
                self.cache_bytes -= old.len();
            }
        }
    }

    fn cache_remove(&mut self, key: &Key) -> Option<Vec<u8>> {
        let p = self.cache.remove(key)?;
        self.cache_bytes -= p.len();
        Some(p)
    }

    /// Applies a report of the spool's disk thread: a payload read back,
    /// or a failed write (those batches are not durable: they become
    /// gaps, reported to the server).
    pub fn on_disk(&mut self, ev: DiskEvent) -> Result<(), SpoolError> {
        match ev {
            DiskEvent::Read { key, result } => {
                self.reading.remove(&key);
                match result {
                    Ok(payload) if self.spool.get(key.0, key.1).is_some() => {
                        self.cache_insert(key, payload);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!(
                            "widgetry-agent: cannot read batch {} of session {} back from the spool ({e}); dropping it (reported as a gap)",
                            key.1, key.0
                        );
                        self.forget_as_gap(key)?;
                    }
                }
                Ok(())
            }
            DiskEvent::Failed {
                segment,
                batches,
                error,
            } => {
                eprintln!(
                    "widgetry-agent: spool write failed ({error}); {} batches not on disk are reported as a gap",
                    batches.len()
                );
                let lost = self.spool.on_failed(segment, &batches)?;
                self.lost(lost);
                Ok(())
            }
            DiskEvent::Problem(msg) => {
                eprintln!("widgetry-agent: {msg}");
                Ok(())
            }
        }
    }

    /// Records spool entries that are gone as gaps.
    fn lost(&mut self, entries: Vec<Entry>) {
        let gaps = entries
            .into_iter()
            .map(|e| {
                self.cache_remove(&(e.session, e.seq));
                e.as_gap()
            })
            .collect();
        self.record_gaps(gaps);
    }

    /// Forgets a spooled batch that cannot be sent, reporting it as a gap.
    fn forget_as_gap(&mut self, key: Key) -> Result<(), SpoolError> {
        if let Some(entry) = self.spool.get(key.0, key.1).cloned() {
            self.spool.ack(key.0, key.1)?;
            self.lost(vec![entry]);
        }
        Ok(())
    }

    /// The session-local id of `key`, registered on first use.
    pub fn series_id(&mut self, key: &SeriesKey) -> u32 {
        if let Some(id) = self.index.get(key) {
            return *id;
        }
        let id = self.series.len() as u32;
        let key = Arc::new(key.clone());
        self.series.push(key.clone());
        self.index.insert(key, id);
        self.def_acked.push(false);
        id
    }

    /// Definitions to include in the next batch: those not yet acknowledged.
    pub fn unacked_defs(&self) -> Vec<(u32, SeriesKey)> {
        self.series
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.def_acked.get(*i).copied().unwrap_or(false))
            .map(|(i, k)| (i as u32, SeriesKey::clone(k)))
            .collect()
    }

    /// Spools the samples accumulated in `builder`, and `events`, as this
    /// session's next batch, with the definitions the server has not
    /// acknowledged yet.
    pub fn seal(
        &mut self,
        builder: &mut BatchBuilder,
        events: Vec<widgetry_proto::json::Event>,
    ) -> Result<(), SpoolError> {
        let defs = self.unacked_defs();
        let mut batch = builder.finish(self.session, self.last_seq + 1, defs);
        batch.events = events;
        self.push(batch)
    }

    fn record_gaps(&mut self, gaps: Vec<Gap>) {
        for g in gaps {
            self.dropped_batches += g.to_seq - g.from_seq + 1;
            self.dropped_samples += g.samples;
            // A dropped batch that carried gap reports hands them back.
            for seq in g.from_seq..=g.to_seq {
                if let Some(carried) = self.gaps_carried.remove(&(g.session, seq)) {
                    self.gaps_pending.extend(carried);
                }
                self.defs.remove(&(g.session, seq));
                self.sent_at.remove(&(g.session, seq));
                self.cache_remove(&(g.session, seq));
            }
            self.gaps_pending.push(g);
        }
    }

    /// Spools a batch, adding the pending gap reports to it. If the spool
    /// cannot take it (e.g. a full disk) the batch itself becomes a gap.
    pub fn push(&mut self, mut batch: DecodedBatch) -> Result<(), SpoolError> {
        batch.gaps = self.gaps_pending.clone();
        // Everything of this session below its oldest spooled batch has
        // been acknowledged or dropped (and reported).
        let oldest = self
            .spool
            .pending()
            .find(|e| e.session == batch.session)
            .map_or(batch.seq, |e| e.seq);
        batch.settled_through = oldest.min(batch.seq) - 1;
        if batch.session == self.session {
            self.last_seq = self.last_seq.max(batch.seq);
        }
        let key = (batch.session, batch.seq);
        let samples = batch.sample_count() as u32;
        let range = batch.ts_range().unwrap_or((0, 0));
        let payload = batch.encode();
        match self
            .spool
            .append(batch.session, batch.seq, samples, range, &payload)
        {
            Ok(gaps) => {
                self.cache_insert(key, payload);
                if !batch.gaps.is_empty() {
                    self.gaps_carried
                        .insert(key, std::mem::take(&mut self.gaps_pending));
                }
                if !batch.series.is_empty() {
                    self.defs
                        .insert(key, batch.series.iter().map(|(id, _)| *id).collect());
                }
                self.record_gaps(gaps);
                Ok(())
            }
            Err(e) => {
                self.record_gaps(vec![Gap {
                    session: batch.session,
                    from_seq: batch.seq,
                    to_seq: batch.seq,
                    samples: u64::from(samples),
                    from_ts_ms: range.0,
                    to_ts_ms: range.1,
                }]);
                Err(e)
            }
        }
    }

    /// Removes every spooled batch the ack covers. An ack of this session
    /// that covers seqs it never published cannot come from the server: it
    /// is ignored (and logged once), so it cannot delete data.
    pub fn ack(&mut self, ack: &Ack) -> Result<(), SpoolError> {
        if ack.session == self.session {
            let beyond = ack.through > self.last_seq || ack.seqs.iter().any(|s| *s > self.last_seq);
            if beyond {
                self.acks_ignored += 1;
                if self.ignored_logged.insert(ack.session) {
                    eprintln!(
                        "widgetry-agent: ignoring an ack of session {} through seq {} (this run has published up to seq {}): it did not come from the server",
                        ack.session, ack.through, self.last_seq
                    );
                }
                return Ok(());
            }
        } else if !self.has_session(ack.session) {
            return Ok(());
        }
        let covered: Vec<(u64, u32)> = self
            .spool
            .pending()
            .filter(|e| {
                e.session == ack.session
                    && (e.seq <= ack.through || ack.seqs.binary_search(&e.seq).is_ok())
            })
            .map(|e| (e.seq, e.samples))
            .collect();
        for (seq, samples) in covered {
            let key = (ack.session, seq);
            if self.spool.ack(ack.session, seq)? {
                self.acked += 1;
                self.acked_samples += u64::from(samples);
            }
            self.sent_at.remove(&key);
            self.cache_remove(&key);
            self.gaps_carried.remove(&key);
            if let Some(ids) = self.defs.remove(&key) {
                if ack.session == self.session {
                    for id in ids {
                        if let Some(flag) = self.def_acked.get_mut(id as usize) {
                            *flag = true;
                        }
                    }
                } else {
                    // A batch with its definitions attached is committed:
                    // the server knows this earlier session's series again.
                    self.heal.remove(&ack.session);
                }
            }
        }
        if ack.session == self.session && self.def_acked.iter().all(|a| *a) {
            self.heal.remove(&ack.session);
        }
        if !self.has_session(ack.session) {
            self.heal.remove(&ack.session);
            self.old_tables.remove(&ack.session);
        }
        Ok(())
    }

    /// Handles a report from `…/errors`. For `unknown_series` (the server
    /// lost the session's definitions: a new or restored database), the
    /// session's batches are sent again at once with their definitions.
    /// Returns true if the report concerned this device's data.
    pub fn on_error(&mut self, report: &ErrorReport) -> Result<bool, SpoolError> {
        if report.code != "unknown_series" {
            return Ok(false);
        }
        let Some(session) = report.session else {
            return Ok(false);
        };
        if session == self.session {
            // The server knows none of them: define them all again.
            self.def_acked.iter_mut().for_each(|a| *a = false);
        } else if !self.has_session(session) {
            return Ok(false);
        } else if !self.old_tables.contains_key(&session) {
            let table = self.read_old_table(session)?;
            self.old_tables.insert(session, table);
        }
        self.heal.insert(session);
        if let Some(seq) = report.seq {
            self.sent_at.remove(&(session, seq));
        }
        Ok(true)
    }

    /// True the first time a report with `code` arrives (bounded: the
    /// server's reason codes are a short fixed list).
    pub fn first_report_of(&mut self, code: &str) -> bool {
        self.reported.len() < 64 && self.reported.insert(code.to_string())
    }

    /// The series definitions found in an earlier session's spooled
    /// batches (read only when the server asks for them: rare).
    fn read_old_table(&self, session: SessionId) -> Result<HashMap<u32, SeriesKey>, SpoolError> {
        let mut table = HashMap::new();
        let entries: Vec<Entry> = self
            .spool
            .pending()
            .filter(|e| e.session == session)
            .cloned()
            .collect();
        for e in entries {
            if let Ok(b) = DecodedBatch::decode(&self.spool.read(&e)?, &Limits::default(), now_ms())
            {
                table.extend(b.series);
            }
        }
        Ok(table)
    }

    /// The payload to send for a spooled batch of a session being healed:
    /// the batch with definitions for every series it refers to. `None`
    /// when a definition is unknown (an earlier run's, no longer spooled):
    /// the batch cannot be stored by this server and is dropped as a gap.
    fn with_defs(&mut self, key: Key, payload: &[u8]) -> Option<Vec<u8>> {
        let mut b = DecodedBatch::decode(payload, &Limits::default(), now_ms()).ok()?;
        let have: HashSet<u32> = b.series.iter().map(|(id, _)| *id).collect();
        let mut need: Vec<u32> = b
            .runs
            .iter()
            .map(|r| r.series_id)
            .filter(|id| !have.contains(id))
            .collect();
        need.sort_unstable();
        need.dedup();
        for id in need {
            let def = if key.0 == self.session {
                self.series.get(id as usize).map(|k| SeriesKey::clone(k))
            } else {
                self.old_tables
                    .get(&key.0)
                    .and_then(|t| t.get(&id).cloned())
            };
            b.series.push((id, def?));
        }
        self.defs
            .insert(key, b.series.iter().map(|(id, _)| *id).collect());
        Some(b.encode())
    }

    /// True if `session` has spooled batches (so its acks matter).
    pub fn has_session(&self, session: SessionId) -> bool {
        self.spool.pending().any(|e| e.session == session)
    }

    /// True when gap reports wait for a batch to carry them.
    pub fn has_pending_gaps(&self) -> bool {
        !self.gaps_pending.is_empty()
    }

    /// After a reconnect everything must be sent again.
    pub fn mark_all_unsent(&mut self) {
        self.sent_at.clear();
    }

    /// Publishes, in spool order, batches never sent or not acknowledged
    /// within `timeout`, keeping at most `window` in flight.
    pub fn send(
        &mut self,
        client: &AsyncClient,
        topic: &str,
        window: usize,
        timeout: Duration,
    ) -> Result<(), SpoolError> {
        let now = Instant::now();
        let mut in_flight = self
            .sent_at
            .values()
            .filter(|t| now - **t < timeout)
            .count();
        let due: Vec<Key> = self
            .spool
            .pending()
            .map(|e| (e.session, e.seq))
            .filter(|k| self.sent_at.get(k).is_none_or(|t| now - *t >= timeout))
            .take(window.saturating_sub(in_flight))
            .collect();
        // Payloads not in memory are asked of the disk thread; sending
        // stops at the first of them, so batches go out in spool order.
        let mut waiting = false;
        for key in due {
            if in_flight >= window {
                break;
            }
            let Some(entry) = self.spool.get(key.0, key.1).cloned() else {
                continue;
            };
            let cached = if waiting {
                None
            } else {
                self.cache.get(&key).cloned()
            };
            let Some(mut payload) = cached else {
                waiting = true;
                let budget = self.cache_bytes + self.reading.len() * entry.len as usize;
                if !self.reading.contains(&key) && (self.reading.is_empty() || budget < CACHE_BYTES)
                {
                    self.spool.request_read(&entry)?;
                    self.reading.insert(key);
                }
                continue;
            };
            if self.heal.contains(&key.0) {
                match self.with_defs(key, &payload) {
                    Some(p) => payload = p,
                    None => {
                        eprintln!(
                            "widgetry-agent: batch {} of session {} refers to series the server has lost and this agent no longer knows; dropping it (reported as a gap)",
                            key.1, key.0
                        );
                        self.forget_as_gap(key)?;
                        continue;
                    }
                }
            }
            match client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
                Ok(()) => {
                    self.sent_at.insert(key, now);
                    in_flight += 1;
                }
                // The client's queue is full: try again on the next round.
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Batches waiting for acknowledgement.
    pub fn len(&self) -> usize {
        self.spool.len()
    }

    /// True when every batch has been acknowledged (or dropped).
    pub fn is_empty(&self) -> bool {
        self.spool.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use widgetry_proto::BatchBuilder;

    const S: SessionId = SessionId([1; 16]);

    fn batch(seq: u64, defs: Vec<(u32, SeriesKey)>) -> DecodedBatch {
        let mut b = BatchBuilder::default();
        b.push(0, 1_700_000_000_000 + seq as i64, 1.0);
        b.finish(S, seq, defs)
    }

    fn outbox(dir: &std::path::Path, max: u64) -> Outbox {
        Outbox::new(Spool::open(dir, max, 512).expect("spool").0, S)
    }

    #[test]
    fn acks_remove_batches_and_mark_definitions() {
        let dir = tempfile::tempdir().expect("dir");
        let mut o = outbox(dir.path(), 1 << 20);
        assert_eq!(o.series_id(&SeriesKey::plain("a")), 0);
        assert_eq!(o.series_id(&SeriesKey::plain("a")), 0, "ids are stable");
        assert_eq!(o.unacked_defs().len(), 1);
        o.push(batch(1, o.unacked_defs())).expect("push");
        o.push(batch(2, o.unacked_defs())).expect("push");
        o.push(batch(3, vec![])).expect("push");
        o.ack(&Ack {
            session: S,
            through: 0,
            seqs: vec![3],
        })
        .expect("ack");
        assert_eq!((o.len(), o.acked), (2, 1));
        assert_eq!(o.unacked_defs().len(), 1, "batch 3 carried no definition");
        o.ack(&Ack {
            session: S,
            through: 2,
            seqs: vec![],
        })
        .expect("ack");
        assert!(o.is_empty());
        assert!(o.unacked_defs().is_empty());
    }

    /// The payloads `send` publishes, decoded, in order.
    fn published(o: &mut Outbox) -> Vec<DecodedBatch> {
        let (client, mut ev) = AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 9), 64);
        o.mark_all_unsent();
        o.send(&client, "t", 100, Duration::from_secs(60))
            .expect("send");
        drop(client);
        // `clean` moves the queued requests into `pending`.
        ev.clean();
        ev.pending
            .drain(..)
            .filter_map(|r| match r {
                rumqttc::Request::Publish(p) => Some(
                    DecodedBatch::decode(&p.payload, &Limits::default(), now_ms())
                        .expect("valid batch"),
                ),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn batches_say_what_is_settled() {
        let dir = tempfile::tempdir().expect("dir");
        let mut o = outbox(dir.path(), 1 << 20);
        let mut b = BatchBuilder::default();
        for _ in 0..3 {
            b.push(o.series_id(&SeriesKey::plain("a")), 1_700_000_000_000, 1.0);
            o.seal(&mut b, vec![]).expect("seal");
        }
        let settled: Vec<u64> = published(&mut o)
            .iter()
            .map(|b| b.settled_through)
            .collect();
        assert_eq!(settled, vec![0, 0, 0], "nothing acknowledged yet");
        o.ack(&Ack {
            session: S,
            through: 2,
            seqs: vec![],
        })
        .expect("ack");
        b.push(0, 1_700_000_000_001, 2.0);
        o.seal(&mut b, vec![]).expect("seal");
        let sent = published(&mut o);
        assert_eq!(
            sent.iter()
                .map(|b| (b.seq, b.settled_through))
                .collect::<Vec<_>>(),
            vec![(3, 0), (4, 2)],
            "batch 4 says seqs up to 2 are settled (3 is still spooled)"
        );
    }

    #[test]
    fn an_ack_beyond_what_was_published_is_ignored() {
        let dir = tempfile::tempdir().expect("dir");
        let mut o = outbox(dir.path(), 1 << 20);
        o.push(batch(1, vec![(0, SeriesKey::plain("a"))]))
            .expect("push");
        o.push(batch(2, vec![])).expect("push");
        for forged in [
            Ack {
                session: S,
                through: 1_000_000,
                seqs: vec![],
            },
            Ack {
                session: S,
                through: 0,
                seqs: vec![1, 3],
            },
        ] {
            o.ack(&forged).expect("ack");
            assert_eq!(o.len(), 2, "{forged:?} must not delete data");
        }
        assert_eq!(o.acks_ignored, 2);
        o.ack(&Ack {
            session: S,
            through: 2,
            seqs: vec![],
        })
        .expect("ack");
        assert!(o.is_empty(), "a real ack still works");
    }

    #[test]
    fn unknown_series_report_resends_with_definitions() {
        let dir = tempfile::tempdir().expect("dir");
        let mut o = outbox(dir.path(), 1 << 20);
        let mut b = BatchBuilder::default();
        let a = o.series_id(&SeriesKey::plain("a"));
        b.push(a, 1_700_000_000_000, 1.0);
        o.seal(&mut b, vec![]).expect("seal");
        o.ack(&Ack {
            session: S,
            through: 1,
            seqs: vec![],
        })
        .expect("ack");
        // Batch 2 refers to `a` by id only; `b` is new and defined in it.
        b.push(a, 1_700_000_000_001, 2.0);
        b.push(o.series_id(&SeriesKey::plain("b")), 1_700_000_000_001, 3.0);
        o.seal(&mut b, vec![]).expect("seal");
        let first = published(&mut o);
        assert_eq!(
            first[0].series.iter().map(|d| d.0).collect::<Vec<_>>(),
            vec![1]
        );
        // The server's database is new: it knows neither.
        let report = ErrorReport::new(
            "widgetry/v1/d/samples".into(),
            &widgetry_proto::Reject::UnknownSeries {
                session: S,
                seq: 2,
                ids: vec![0],
            },
            now_ms(),
        );
        assert!(o.on_error(&report).expect("on_error"));
        let again = published(&mut o);
        let mut ids: Vec<u32> = again[0].series.iter().map(|d| d.0).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![0, 1], "the resend defines every series it uses");
        assert_eq!(
            o.unacked_defs().len(),
            2,
            "new batches define them again too"
        );
        o.ack(&Ack {
            session: S,
            through: 2,
            seqs: vec![],
        })
        .expect("ack");
        assert!(o.unacked_defs().is_empty());
        b.push(a, 1_700_000_000_002, 4.0);
        o.seal(&mut b, vec![]).expect("seal");
        assert!(
            published(&mut o)[0].series.is_empty(),
            "healed: ids alone again"
        );
    }

    #[test]
    fn full_spool_reports_gaps_in_the_next_batch_until_acked() {
        let dir = tempfile::tempdir().expect("dir");
        let mut o = outbox(dir.path(), 1500);
        for seq in 1..=30 {
            o.push(batch(seq, vec![])).expect("push");
        }
        assert!(o.dropped_batches > 0);
        assert_eq!(o.dropped_batches as usize + o.len(), 30);
        assert_eq!(o.dropped_samples, o.dropped_batches);
        // Each gap is carried by exactly one spooled batch, or is pending
        // for the next one.
        let mut carried = Vec::new();
        o.spool.flush();
        for e in o.spool.pending() {
            let bytes = o.spool.read(e).expect("read");
            let decoded = DecodedBatch::decode(&bytes, &Default::default(), 1_800_000_000_000)
                .expect("valid batch");
            carried.extend(decoded.gaps);
        }
        assert!(!carried.is_empty(), "gap reports travel in later batches");
        carried.extend(o.gaps_pending.iter().cloned());
        // Reported gaps plus spooled batches account for every seq once.
        let mut seqs: Vec<u64> = carried.iter().flat_map(|g| g.from_seq..=g.to_seq).collect();
        assert_eq!(seqs.len() as u64, o.dropped_batches);
        seqs.extend(o.spool.pending().map(|e| e.seq));
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    }
}
