//! Batches waiting for the server's acknowledgement, backed by the disk
//! [`Spool`]: spooled before they are published, forgotten only when an
//! `Ack` covers them.
//!
//! While connected, batches are sent in spool order and sent again when not
//! acknowledged within the ack timeout (the broker may drop messages without
//! telling anyone). When the spool is full its oldest batches are dropped
//! and reported as [`Gap`]s in the next batches until one carrying the
//! report is acknowledged: data is never dropped silently.

use std::collections::HashMap;
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use tokio::time::Instant;
use widgetry_proto::json::Ack;
use widgetry_proto::{DecodedBatch, SeriesKey, SessionId};

use crate::spool::{Gap, Spool, SpoolError};

type Key = (SessionId, u64);

/// The outbox; see the module docs.
pub struct Outbox {
    spool: Spool,
    sent_at: HashMap<Key, Instant>,
    /// Series ids whose definitions a batch of this run carries.
    defs: HashMap<Key, Vec<u32>>,
    /// Per series id: has a batch carrying its definition been acknowledged?
    def_acked: Vec<bool>,
    /// Gaps not yet put into a batch.
    gaps_pending: Vec<Gap>,
    /// Gaps carried by a batch that is not yet acknowledged.
    gaps_carried: HashMap<Key, Vec<Gap>>,
    /// Batches acknowledged so far.
    pub acked: u64,
    /// Batches and samples lost because the spool was full or failed.
    pub dropped_batches: u64,
    pub dropped_samples: u64,
}

impl Outbox {
    /// An outbox over `spool` (which may hold batches of earlier runs).
    pub fn new(spool: Spool) -> Self {
        Outbox {
            spool,
            sent_at: HashMap::new(),
            defs: HashMap::new(),
            def_acked: Vec::new(),
            gaps_pending: Vec::new(),
            gaps_carried: HashMap::new(),
            acked: 0,
            dropped_batches: 0,
            dropped_samples: 0,
        }
    }

    /// Registers a new series id (the next index).
    pub fn new_series(&mut self) {
        self.def_acked.push(false);
    }

    /// Definitions to include in the next batch: those not yet acknowledged.
    pub fn unacked_defs(&self, series: &[SeriesKey]) -> Vec<(u32, SeriesKey)> {
        series
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.def_acked.get(*i).copied().unwrap_or(false))
            .map(|(i, k)| (i as u32, k.clone()))
            .collect()
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
            }
            self.gaps_pending.push(g);
        }
    }

    /// Spools a batch, adding the pending gap reports to it. If the spool
    /// cannot take it (e.g. a full disk) the batch itself becomes a gap.
    pub fn push(&mut self, mut batch: DecodedBatch) -> Result<(), SpoolError> {
        batch.gaps = self.gaps_pending.clone();
        let key = (batch.session, batch.seq);
        let samples = batch.sample_count() as u32;
        let range = batch.ts_range().unwrap_or((0, 0));
        match self
            .spool
            .append(batch.session, batch.seq, samples, range, &batch.encode())
        {
            Ok(gaps) => {
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

    /// Removes every spooled batch the ack covers.
    pub fn ack(&mut self, ack: &Ack) -> Result<(), SpoolError> {
        let covered: Vec<u64> = self
            .spool
            .pending()
            .filter(|e| {
                e.session == ack.session
                    && (e.seq <= ack.through || ack.seqs.binary_search(&e.seq).is_ok())
            })
            .map(|e| e.seq)
            .collect();
        for seq in covered {
            let key = (ack.session, seq);
            if self.spool.ack(ack.session, seq)? {
                self.acked += 1;
            }
            self.sent_at.remove(&key);
            self.gaps_carried.remove(&key);
            for id in self.defs.remove(&key).unwrap_or_default() {
                if let Some(flag) = self.def_acked.get_mut(id as usize) {
                    *flag = true;
                }
            }
        }
        Ok(())
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
        for key in due {
            if in_flight >= window {
                break;
            }
            let Some(entry) = self.spool.get(key.0, key.1) else {
                continue;
            };
            let payload = self.spool.read(entry)?;
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
        Outbox::new(Spool::open(dir, max, 512).expect("spool").0)
    }

    #[test]
    fn acks_remove_batches_and_mark_definitions() {
        let dir = tempfile::tempdir().expect("dir");
        let series = vec![SeriesKey::plain("a")];
        let mut o = outbox(dir.path(), 1 << 20);
        o.new_series();
        assert_eq!(o.unacked_defs(&series).len(), 1);
        o.push(batch(1, o.unacked_defs(&series))).expect("push");
        o.push(batch(2, o.unacked_defs(&series))).expect("push");
        o.push(batch(3, vec![])).expect("push");
        o.ack(&Ack {
            session: S,
            through: 0,
            seqs: vec![3],
        })
        .expect("ack");
        assert_eq!((o.len(), o.acked), (2, 1));
        assert_eq!(
            o.unacked_defs(&series).len(),
            1,
            "batch 3 carried no definition"
        );
        o.ack(&Ack {
            session: S,
            through: 2,
            seqs: vec![],
        })
        .expect("ack");
        assert!(o.is_empty());
        assert!(o.unacked_defs(&series).is_empty());
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
