use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::{
    scheduler::{PauseReason, Tracker},
    ConnectionEvents,
};

pub struct Graveyard {
    connections: HashMap<String, SavedState>,
    /// Earliest expiry of a saved session: sweeping waits until then
    next_expiry: Option<Instant>,
}

impl Graveyard {
    pub fn new() -> Graveyard {
        Graveyard {
            connections: HashMap::new(),
            next_expiry: None,
        }
    }

    /// Add a new connection.
    /// Return tracker of previous connection if connection id already exists
    pub fn retrieve(&mut self, id: &str) -> Option<SavedState> {
        self.sweep();
        self.connections.remove(id)
    }

    /// Drops sessions whose expiry has passed; a no-op until the earliest is due
    fn sweep(&mut self) {
        let now = Instant::now();
        if !self.next_expiry.is_some_and(|t| t <= now) {
            return;
        }

        let mut next_expiry = None;
        self.connections.retain(|_, saved| {
            let expiry = saved.session_state.as_ref().and_then(|s| s.expires_at);
            match expiry {
                Some(t) if t <= now => false,
                Some(t) => {
                    next_expiry = Some(next_expiry.map_or(t, |n: Instant| n.min(t)));
                    true
                }
                None => true,
            }
        });
        self.next_expiry = next_expiry;
    }

    /// Save connection tracker. `session_expiry_interval` (seconds, MQTT 5)
    /// is how long the state is kept; None or 0xFFFFFFFF keeps it for ever.
    pub fn save_state(
        &mut self,
        mut tracker: Tracker,
        subscriptions: HashSet<String>,
        metrics: ConnectionEvents,
        unacked_pubrels: VecDeque<u16>,
        session_expiry_interval: Option<u32>,
    ) {
        self.sweep();
        tracker.pause(PauseReason::Busy);
        let id = tracker.id.clone();

        let expires_at = session_expiry_interval
            .filter(|&interval| interval != u32::MAX)
            .and_then(|interval| Instant::now().checked_add(Duration::from_secs(interval.into())));
        if let Some(t) = expires_at {
            self.next_expiry = Some(self.next_expiry.map_or(t, |n| n.min(t)));
        }

        let session_state = SessionState {
            tracker,
            subscriptions,
            unacked_pubrels,
            expires_at,
        };

        self.connections.insert(
            id,
            SavedState {
                session_state: Some(session_state),
                metrics,
            },
        );
    }
}

#[derive(Debug)]
pub struct SavedState {
    pub session_state: Option<SessionState>,
    pub metrics: ConnectionEvents,
}

#[derive(Debug)]
pub struct SessionState {
    pub tracker: Tracker,
    pub subscriptions: HashSet<String>,
    // used for pubrel in qos2
    pub unacked_pubrels: VecDeque<u16>,
    /// When the session ends (MQTT 5 Session Expiry Interval); None: never
    pub expires_at: Option<Instant>,
}
