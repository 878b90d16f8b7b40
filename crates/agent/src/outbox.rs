//! Batches waiting for the server's acknowledgement, in seq order.
//!
//! A batch stays here until an `Ack` covers it; while connected it is sent,
//! and sent again when not acknowledged within the ack timeout (the broker
//! may drop messages without telling anyone). When the outbox is full the
//! oldest batch is dropped and counted, never silently.

use std::collections::VecDeque;
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use tokio::time::Instant;
use widgetry_proto::json::Ack;
use widgetry_proto::{DecodedBatch, SeriesKey};

struct Pending {
    seq: u64,
    bytes: Vec<u8>,
    /// Series ids whose definitions this batch carries.
    defs: Vec<u32>,
    sent_at: Option<Instant>,
}

/// The outbox; see the module docs.
pub struct Outbox {
    pending: VecDeque<Pending>,
    max: usize,
    /// Per series id: has a batch carrying its definition been acknowledged?
    def_acked: Vec<bool>,
    /// Batches acknowledged so far.
    pub acked: u64,
    /// Batches dropped because the outbox was full.
    pub dropped: u64,
}

impl Outbox {
    /// An outbox holding at most `max` batches.
    pub fn new(max: usize) -> Self {
        Outbox {
            pending: VecDeque::new(),
            max: max.max(1),
            def_acked: Vec::new(),
            acked: 0,
            dropped: 0,
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

    /// Queues a batch, dropping the oldest when full.
    pub fn push(&mut self, batch: &DecodedBatch) {
        if self.pending.len() >= self.max {
            self.pending.pop_front();
            self.dropped += 1;
        }
        self.pending.push_back(Pending {
            seq: batch.seq,
            bytes: batch.encode(),
            defs: batch.series.iter().map(|(id, _)| *id).collect(),
            sent_at: None,
        });
    }

    /// Removes every batch the ack covers.
    pub fn ack(&mut self, ack: &Ack) {
        let def_acked = &mut self.def_acked;
        let mut removed = 0;
        self.pending.retain(|p| {
            let covered = p.seq <= ack.through || ack.seqs.binary_search(&p.seq).is_ok();
            if covered {
                removed += 1;
                for id in &p.defs {
                    if let Some(flag) = def_acked.get_mut(*id as usize) {
                        *flag = true;
                    }
                }
            }
            !covered
        });
        self.acked += removed;
    }

    /// After a reconnect everything must be sent again.
    pub fn mark_all_unsent(&mut self) {
        for p in &mut self.pending {
            p.sent_at = None;
        }
    }

    /// Publishes, in order, batches never sent or not acknowledged within
    /// `timeout`, keeping at most `window` in flight.
    pub fn send(&mut self, client: &AsyncClient, topic: &str, window: usize, timeout: Duration) {
        let now = Instant::now();
        let mut in_flight = self
            .pending
            .iter()
            .filter(|p| p.sent_at.is_some_and(|t| now - t < timeout))
            .count();
        for p in &mut self.pending {
            if in_flight >= window {
                break;
            }
            let due = p.sent_at.is_none_or(|t| now - t >= timeout);
            if !due {
                continue;
            }
            match client.try_publish(topic, QoS::AtLeastOnce, false, p.bytes.clone()) {
                Ok(()) => {
                    p.sent_at = Some(now);
                    in_flight += 1;
                }
                // The client's queue is full: try again on the next round.
                Err(_) => break,
            }
        }
    }

    /// Batches waiting for acknowledgement.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when every batch has been acknowledged (or dropped).
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use widgetry_proto::{BatchBuilder, SessionId};

    fn batch(seq: u64, defs: Vec<(u32, SeriesKey)>) -> DecodedBatch {
        let mut b = BatchBuilder::default();
        b.push(0, 1_700_000_000_000, 1.0);
        b.finish(SessionId([1; 16]), seq, defs)
    }

    #[test]
    fn acks_remove_batches_and_mark_definitions() {
        let series = vec![SeriesKey::plain("a")];
        let mut o = Outbox::new(10);
        o.new_series();
        assert_eq!(o.unacked_defs(&series).len(), 1);
        o.push(&batch(1, o.unacked_defs(&series)));
        o.push(&batch(2, o.unacked_defs(&series)));
        o.push(&batch(3, vec![]));
        let session = SessionId([1; 16]);
        o.ack(&Ack {
            session,
            through: 0,
            seqs: vec![3],
        });
        assert_eq!((o.len(), o.acked), (2, 1));
        assert_eq!(
            o.unacked_defs(&series).len(),
            1,
            "batch 3 carried no definition"
        );
        o.ack(&Ack {
            session,
            through: 2,
            seqs: vec![],
        });
        assert!(o.is_empty());
        assert!(o.unacked_defs(&series).is_empty());
    }

    #[test]
    fn full_outbox_drops_oldest_and_counts() {
        let mut o = Outbox::new(2);
        for seq in 1..=5 {
            o.push(&batch(seq, vec![]));
        }
        assert_eq!((o.len(), o.dropped), (2, 3));
        assert_eq!(o.pending.front().map(|p| p.seq), Some(4));
    }
}
