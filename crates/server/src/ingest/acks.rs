//! Acknowledgement state per session: the watermark `through` (every seq
//! at or below it is committed, reported lost, or settled by the device)
//! and the committed seqs above it (selective acks). Loaded from the
//! database on first use, persisted in the same transaction as the
//! batches, published only after the commit.

use std::collections::BTreeSet;

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
    /// Committed seqs above `through`.
    pub above: BTreeSet<u64>,
}

impl SessionAcks {
    /// Settles a whole range (batches the device reported as lost).
    pub fn commit_range(&mut self, from: u64, to: u64) {
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

    pub fn commit(&mut self, seq: u64) {
        if seq > self.through {
            self.above.insert(seq);
        }
        while self.above.remove(&(self.through + 1)) {
            self.through += 1;
        }
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
