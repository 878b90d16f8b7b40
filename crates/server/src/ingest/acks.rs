//! Acknowledgement state per session: the watermark `through` (every seq
//! at or below it is committed, reported lost, or settled by the device)
//! and the committed seqs above it (selective acks). Loaded from the
//! database on first use, persisted in the same transaction as the
//! batches, published only after the commit.

use std::collections::BTreeMap;

use widgetry_proto::SessionId;

use crate::store::write;
use crate::store::{StoreError, WriteTx};

/// `(device, session)`.
pub type SessionKey = (String, SessionId);

/// Most selectively acknowledged seqs listed in one ack message.
pub const MAX_ACK_SEQS: usize = 256;

/// Acknowledgement state of one session.
#[derive(Debug, Clone, Default)]
pub struct SessionAcks {
    /// Every seq ≤ through is committed.
    pub through: u64,
    /// Committed seqs above `through`, as disjoint, non-adjacent ranges
    /// (start → end, inclusive): a gap report of a million seqs is one
    /// entry, and settling it costs O(log n), never one step per seq.
    above: BTreeMap<u64, u64>,
}

impl SessionAcks {
    /// Settles a whole range (committed batches, or batches the device
    /// reported as lost).
    pub fn commit_range(&mut self, from: u64, to: u64) {
        if to <= self.through || from > to {
            return;
        }
        let (mut from, mut to) = (from.max(self.through + 1), to);
        // Absorb every range that overlaps or touches [from, to].
        let touching: Vec<(u64, u64)> = self
            .above
            .range(..=to.saturating_add(1))
            .rev()
            .take_while(|(_, end)| end.saturating_add(1) >= from)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.above.remove(&s);
            from = from.min(s);
            to = to.max(e);
        }
        if from == self.through + 1 {
            self.through = to;
        } else {
            self.above.insert(from, to);
        }
    }

    pub fn commit(&mut self, seq: u64) {
        self.commit_range(seq, seq);
    }

    /// The first `n` committed seqs above `through` (the ack's selective part).
    pub fn above(&self, n: usize) -> Vec<u64> {
        self.above
            .iter()
            .flat_map(|(s, e)| *s..=*e)
            .take(n)
            .collect()
    }

    /// How many committed seqs lie above `through`.
    pub fn above_count(&self) -> u64 {
        self.above.iter().map(|(s, e)| e - s + 1).sum()
    }
}

/// A session's state as the database has it.
pub async fn load_session(
    tx: &mut WriteTx,
    device: &str,
    session: &SessionId,
) -> Result<SessionAcks, StoreError> {
    let through = write::session_through(tx, device, session)
        .await?
        .unwrap_or(0);
    let above = write::seqs_above(tx, device, session, through).await?;
    let mut state = SessionAcks {
        through,
        above: BTreeMap::new(),
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
        assert_eq!((s.through, s.above_count()), (0, 1));
        s.commit(1);
        assert_eq!((s.through, s.above_count()), (2, 0));
        s.commit(5);
        s.commit(3);
        assert_eq!(s.through, 3);
        assert_eq!(s.above(10), vec![5]);
        s.commit(2);
        assert_eq!(s.through, 3, "old seqs do not move the watermark");
        s.commit(9);
        s.commit_range(4, 6);
        assert_eq!(
            (s.through, s.above_count()),
            (6, 1),
            "range settles and absorbs nothing past 7"
        );
        s.commit_range(8, 8);
        assert_eq!(s.through, 6);
        assert_eq!(s.above(10), vec![8, 9]);
        s.commit(7);
        assert_eq!((s.through, s.above_count()), (9, 0));
    }

    #[test]
    fn wide_gaps_above_the_watermark_cost_one_entry_each() {
        // The reproduction: 50 gaps of 999,999 seqs above the
        // watermark (1 GB of memory with one entry per seq).
        let mut s = SessionAcks::default();
        for i in 0..50u64 {
            let from = 10 + i * 2_000_000;
            s.commit_range(from, from + 999_998);
        }
        assert_eq!(s.above.len(), 50);
        assert_eq!(s.above_count(), 50 * 999_999);
        assert_eq!(s.above(3), vec![10, 11, 12]);
        // Filling the holes joins everything into the watermark.
        s.commit_range(1, 9);
        for i in 0..49u64 {
            let end = 10 + i * 2_000_000 + 999_998;
            s.commit_range(end + 1, end + 1_000_001);
        }
        assert_eq!(
            (s.through, s.above.len()),
            (10 + 49 * 2_000_000 + 999_998, 0)
        );
    }

    #[test]
    fn overlapping_and_touching_ranges_merge() {
        let mut s = SessionAcks::default();
        s.commit_range(10, 20);
        s.commit_range(30, 40);
        s.commit_range(21, 29);
        assert_eq!((s.above.len(), s.above_count()), (1, 31));
        s.commit_range(5, 12);
        s.commit_range(35, 50);
        assert_eq!(
            s.above.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
            vec![(5, 50)]
        );
        s.commit_range(1, 4);
        assert_eq!((s.through, s.above_count()), (50, 0));
        s.commit_range(40, 45);
        assert_eq!(
            (s.through, s.above_count()),
            (50, 0),
            "below the watermark: nothing"
        );
    }
}
