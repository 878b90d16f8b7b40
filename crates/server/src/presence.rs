//! Presence for every kind of device, from one definition used by
//! `/api/v1/devices`, `/api/v1/fleet` and the live stream:
//!
//! - `offline`: the device's retained status says so (the agent's last will
//!   or its clean shutdown); wins at once.
//! - otherwise activity decides, against the device's expected interval
//!   (its cadence learned from arrivals, `devices.interval_ms`, see
//!   `store::write::touch_device`; [`PresenceConfig::default_interval_ms`]
//!   until one is learned; never below [`PresenceConfig::min_interval_ms`]):
//!   `active` while it sent data within `stale_after` intervals, `stale`
//!   after that, `silent` after `silent_after` intervals.
//!
//! So a plain MQTT client that never publishes a status is `active` while it
//! publishes, and an agent whose last will was lost still turns `stale`.
//! [`run`] re-evaluates every device once a second from one query and
//! pushes the changes to live subscribers.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::sinks::live::{Hub, HubMsg};
use crate::store::Store;
use crate::store::read::PresenceRow;

/// Arrivals closer than this teach nothing about a device's cadence.
pub const MIN_LEARNED_GAP_MS: i64 = 200;

/// A device's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    Active,
    Stale,
    Silent,
    Offline,
}

impl Presence {
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Active => "active",
            Presence::Stale => "stale",
            Presence::Silent => "silent",
            Presence::Offline => "offline",
        }
    }
}

/// How presence is judged (`[presence]` of the server's config file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceConfig {
    /// Configured intervals by device glob (`[[presence.interval]]`), the
    /// first match wins over the learned cadence.
    pub intervals: Vec<(String, i64)>,
    /// Expected interval of a device whose cadence is not learned yet.
    pub default_interval_ms: i64,
    /// Learned intervals shorter than this count as this (commit timing
    /// jitters by a few hundred ms; a 10 Hz device is not stale after 0.3 s).
    pub min_interval_ms: i64,
    /// Intervals without data before a device is `stale`.
    pub stale_after: u32,
    /// Intervals without data before a device is `silent`.
    pub silent_after: u32,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            intervals: Vec::new(),
            default_interval_ms: 10_000,
            min_interval_ms: 1_000,
            stale_after: 3,
            silent_after: 20,
        }
    }
}

impl PresenceConfig {
    /// The interval `device` is judged by: configured, else learned, else
    /// the default; never under the minimum.
    pub fn interval(&self, device: &str, learned_ms: Option<i64>) -> i64 {
        if let Some((_, ms)) = self
            .intervals
            .iter()
            .find(|(g, _)| widgetry_common::glob::matches(g, device))
        {
            return (*ms).max(self.min_interval_ms);
        }
        learned_ms
            .filter(|i| *i > 0)
            .unwrap_or(self.default_interval_ms)
            .max(self.min_interval_ms)
    }

    /// The presence of `device`, whose retained status is `state`, last
    /// seen at `last_seen_ms`, with learned interval `interval_ms`, at
    /// `now_ms`.
    pub fn of(
        &self,
        device: &str,
        state: &str,
        last_seen_ms: i64,
        interval_ms: Option<i64>,
        now_ms: i64,
    ) -> Presence {
        if state == "offline" {
            return Presence::Offline;
        }
        let interval = self.interval(device, interval_ms);
        let age = now_ms.saturating_sub(last_seen_ms);
        if age > interval.saturating_mul(i64::from(self.silent_after)) {
            Presence::Silent
        } else if age > interval.saturating_mul(i64::from(self.stale_after)) {
            Presence::Stale
        } else {
            Presence::Active
        }
    }
}

/// Every device's learned cadence (`devices.interval_ms`) as the presence
/// tracker last read it, shared with the rule evaluator so its `no data`
/// rules need no query of their own.
#[derive(Clone, Default)]
pub struct Intervals(Arc<RwLock<HashMap<String, i64>>>);

impl Intervals {
    /// The learned interval of `device` (ms), if one is known.
    pub fn get(&self, device: &str) -> Option<i64> {
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        map.get(device).copied()
    }

    /// Takes the intervals of `rows`; a device whose interval did not
    /// change costs a lookup.
    fn update(&self, rows: &[PresenceRow]) {
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        for r in rows {
            if let Some(i) = r.interval_ms
                && map.get(&r.device) != Some(&i)
            {
                map.insert(r.device.clone(), i);
            }
        }
    }
}

/// Re-evaluates every device's presence each `every` and emits each change
/// on `hub` (the first pass only learns the states), keeping `intervals`
/// up to date; stops at `shutdown`.
pub async fn run(
    store: Store,
    hub: Arc<Hub>,
    cfg: PresenceConfig,
    intervals: Intervals,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut known: HashMap<String, Presence> = HashMap::new();
    let mut first = true;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let rows = match store.presence_rows().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "presence: cannot read the devices; trying again");
                continue;
            }
        };
        intervals.update(&rows);
        let now = widgetry_common::now_ms();
        let mut seen: HashMap<String, Presence> = HashMap::with_capacity(rows.len());
        for r in rows {
            let p = cfg.of(&r.device, &r.state, r.last_seen_ms, r.interval_ms, now);
            if !first && known.get(&r.device) != Some(&p) {
                hub.emit(HubMsg::Presence {
                    device: r.device.clone(),
                    presence: p.as_str(),
                    ts: now,
                });
            }
            seen.insert(r.device, p);
        }
        known = seen;
        first = false;
    }
    debug!("presence tracker stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_wins_then_activity_against_the_interval() {
        let c = PresenceConfig::default();
        let now = 1_000_000;
        assert_eq!(
            c.of("d", "offline", now, Some(1000), now),
            Presence::Offline
        );
        assert_eq!(
            c.of("d", "online", now - 2_900, Some(1000), now),
            Presence::Active
        );
        assert_eq!(
            c.of("d", "unknown", now - 3_100, Some(1000), now),
            Presence::Stale
        );
        assert_eq!(
            c.of("d", "online", now - 20_100, Some(1000), now),
            Presence::Silent
        );
        // Unlearned: the default interval (10 s).
        assert_eq!(
            c.of("d", "unknown", now - 29_000, None, now),
            Presence::Active
        );
        assert_eq!(
            c.of("d", "unknown", now - 31_000, None, now),
            Presence::Stale
        );
        // A 100 ms cadence is judged as 1 s.
        assert_eq!(
            c.of("d", "unknown", now - 2_000, Some(100), now),
            Presence::Active
        );
        // A clock far ahead or behind saturates instead of overflowing.
        assert_eq!(
            c.of("d", "unknown", i64::MIN, Some(i64::MAX), i64::MAX),
            Presence::Active
        );
        assert_eq!(
            c.of("d", "unknown", i64::MAX, None, i64::MIN),
            Presence::Active
        );
        // A configured interval wins over the learned one.
        let c = PresenceConfig {
            intervals: vec![("slow-*".into(), 60_000)],
            ..PresenceConfig::default()
        };
        assert_eq!(
            c.of("slow-1", "unknown", now - 100_000, Some(1000), now),
            Presence::Active
        );
        assert_eq!(
            c.of("fast-1", "unknown", now - 100_000, Some(1000), now),
            Presence::Silent
        );
    }
}
