//! The rule evaluator: every committed batch, presence change and
//! reject/gap count from the live hub goes through the rules that watch
//! its device; transitions are stored, published retained on
//! `widgetry/v1/{device}/alerts`, pushed to the live stream and posted to
//! the webhook.
//!
//! What it keeps in memory besides the open alerts, and only for what a
//! rule watches: the latest sample of each series a rate rule watches, the
//! latest arrival of each series a `no data` rule watches, and a count
//! window per rejects/gaps rule and device — at most [`MAX_TRACKED`]
//! entries. A sample of a series no rule watches costs a cache lookup.
//!
//! `no data` after a restart: a series is tracked from its first sample
//! in this process (the clock starts then), so a restart never fires for
//! series the evaluator has not seen; open `no data` alerts are reloaded
//! with the others and resolve when data comes back. A device that stopped
//! during the restart is caught by its presence rules (`stale`), not here.
//! The silence is measured on this process's clock between arrivals, and
//! `N intervals` uses the device's interval as presence judges it
//! (configured, learned — shared by the presence tracker — or default).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{Event, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use widgetry_proto::topic::{Topic, TopicKind};

use super::eval::Window;
use super::eval::{self, Open, Phase, Transition};
use super::webhook::Webhook;
use super::{Bounds, Condition, Counted, Rule, RuleSpec, Silence};
use crate::metrics::Metrics;
use crate::mqtt::{Connection, Polled};
use crate::presence::{Intervals, Presence, PresenceConfig};
use crate::sinks::live::{AlertNote, Hub, HubMsg};
use crate::store::alerts::StoredRule;
use crate::store::{Store, StoreError};

/// (rule, device, series) of an alert.
type Key = (String, String, String);

/// Most entries the evaluator tracks for rate, `no data` and rejects/gaps
/// rules together; past it new series and devices are not tracked (logged
/// once per rule change).
pub const MAX_TRACKED: usize = 1_000_000;

/// The latest arrival of a series `no data` rules watch.
struct Seen {
    at: i64,
    /// The `no data` rules watching it (indexes into the rules).
    rules: Arc<Vec<usize>>,
    /// Bit i: `rules[i]` has fired since the last arrival (so a silent
    /// series costs no lookup per tick; only the first 64 rules).
    fired: u64,
}

/// The rules in force, shared by the API (which replaces them) and the
/// evaluator (which follows them).
#[derive(Clone)]
pub struct RuleSet {
    tx: Arc<watch::Sender<Arc<Vec<Rule>>>>,
}

impl RuleSet {
    /// Loads the stored rules (a stored rule that no longer validates is
    /// logged and skipped).
    pub async fn load(store: &Store) -> Result<RuleSet, StoreError> {
        let (tx, _) = watch::channel(Arc::new(load_rules(store).await?));
        Ok(RuleSet { tx: Arc::new(tx) })
    }

    /// The rules now.
    pub fn current(&self) -> Arc<Vec<Rule>> {
        self.tx.borrow().clone()
    }

    /// Re-reads the stored rules and hands them to the evaluator.
    pub async fn reload(&self, store: &Store) -> Result<(), StoreError> {
        self.tx.send_replace(Arc::new(load_rules(store).await?));
        Ok(())
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Vec<Rule>>> {
        self.tx.subscribe()
    }
}

async fn load_rules(store: &Store) -> Result<Vec<Rule>, StoreError> {
    let mut out = Vec::new();
    for r in store.rules().await? {
        match serde_json::from_str::<RuleSpec>(&r.spec)
            .map_err(|e| e.to_string())
            .and_then(RuleSpec::validate)
        {
            Ok(rule) => out.push(rule),
            Err(e) => warn!(rule = %r.name, error = %e, "stored rule does not validate; skipped"),
        }
    }
    Ok(out)
}

/// Stores the config file's rules as the `config` rules.
pub async fn apply_config_rules(store: &Store, rules: &[RuleSpec]) -> Result<(), StoreError> {
    let stored = rules
        .iter()
        .map(|r| StoredRule::new(r, "config"))
        .collect::<Result<Vec<_>, _>>()?;
    store
        .sync_config_rules(&stored, widgetry_common::now_ms())
        .await
}

/// A broker: host, port and the credentials to log in with.
pub type BrokerTarget = (String, u16, Option<(String, String)>);

/// One observation of a rule's condition.
struct Obs {
    holds: bool,
    clears: bool,
    at: i64,
    value: Option<f64>,
}

/// Where the evaluator publishes and posts.
pub struct Outputs {
    /// The broker for the retained `…/alerts`.
    pub broker: Option<BrokerTarget>,
    pub webhook: Option<Webhook>,
}

struct Evaluator {
    store: Store,
    metrics: Arc<Metrics>,
    rules: Arc<Vec<Rule>>,
    /// Device → indexes of the rules that watch it.
    by_device: HashMap<String, Vec<usize>>,
    open: HashMap<Key, (Open, String)>,
    /// Open alerts per device: a sample that meets no condition of a
    /// device without open alerts costs no allocation.
    open_devices: HashMap<String, u32>,
    /// (device, series key) → the threshold rules that watch it.
    series_rules: HashMap<(String, String), Arc<Vec<usize>>>,
    /// Devices whose retained `…/alerts` must be published again.
    dirty: HashSet<String>,
    webhook: Option<Webhook>,
    hub: Arc<Hub>,
    presence: PresenceConfig,
    intervals: Intervals,
    /// device → series → its latest sample (ts, value), for rate rules.
    last_sample: HashMap<String, HashMap<String, (i64, f64)>>,
    /// device → series → its latest arrival, for `no data` rules.
    last_seen: HashMap<String, HashMap<String, Seen>>,
    /// Per rule (by index; empty for other kinds): device → its count
    /// window, for rejects/gaps rules.
    counts: Vec<HashMap<String, Window>>,
    /// Entries of `last_sample`, `last_seen` and `counts`.
    tracked: usize,
    /// `MAX_TRACKED` was reached (logged once).
    full: bool,
}

/// Whether one more entry may be tracked (counted when it may).
fn room(tracked: &mut usize, full: &mut bool) -> bool {
    if *tracked >= MAX_TRACKED {
        if !*full {
            *full = true;
            warn!(
                limit = MAX_TRACKED,
                "rule evaluator tracks {MAX_TRACKED} series and devices: rate, no-data and rejects/gaps rules ignore new ones until the rules change"
            );
        }
        return false;
    }
    *tracked += 1;
    true
}

/// Inserts `v` at `map[a][b]` if there is [`room`].
fn track<V>(
    map: &mut HashMap<String, HashMap<String, V>>,
    tracked: &mut usize,
    full: &mut bool,
    a: &str,
    b: &str,
    v: V,
) {
    if room(tracked, full) {
        map.entry(a.to_string())
            .or_default()
            .insert(b.to_string(), v);
    }
}

impl Evaluator {
    fn take_open(&mut self, key: &Key) -> Option<(Open, String)> {
        let v = self.open.remove(key)?;
        if let Some(n) = self.open_devices.get_mut(&key.1) {
            *n -= 1;
            if *n == 0 {
                self.open_devices.remove(&key.1);
            }
        }
        Some(v)
    }

    fn put_open(&mut self, key: Key, v: (Open, String)) {
        *self.open_devices.entry(key.1.clone()).or_default() += 1;
        // Replaced, not added: undo the count.
        if self.open.insert(key.clone(), v).is_some()
            && let Some(n) = self.open_devices.get_mut(&key.1)
        {
            *n -= 1;
        }
    }

    /// The series rules watching `key` of `device` (cached).
    fn rules_for_series(&mut self, device: &str, key: &str) -> Arc<Vec<usize>> {
        if let Some(r) = self
            .series_rules
            .get(&(device.to_string(), key.to_string()))
        {
            return r.clone();
        }
        let r: Arc<Vec<usize>> = Arc::new(
            self.rules_for(device)
                .into_iter()
                .filter(|i| self.rules[*i].watches_series(key))
                .collect(),
        );
        // Bounded by the series the hub has seen; cleared on rule changes.
        if self.series_rules.len() < 1_000_000 {
            self.series_rules
                .insert((device.to_string(), key.to_string()), r.clone());
        }
        r
    }

    fn rules_for(&mut self, device: &str) -> Vec<usize> {
        if let Some(r) = self.by_device.get(device) {
            return r.clone();
        }
        let r: Vec<usize> = (0..self.rules.len())
            .filter(|i| self.rules[*i].watches(device))
            .collect();
        // Bounded by the devices the hub has seen; cleared on rule changes.
        if self.by_device.len() < 100_000 {
            self.by_device.insert(device.to_string(), r.clone());
        }
        r
    }

    /// Feeds one observation of rule `ri` on (device, series).
    async fn observe(&mut self, ri: usize, device: &str, series: &str, o: Obs) {
        let Obs {
            holds,
            clears,
            at,
            value,
        } = o;
        let rule = &self.rules[ri];
        let key: Key = (
            rule.name().to_string(),
            device.to_string(),
            series.to_string(),
        );
        let hold = rule.hold_ms;
        let severity = rule.spec.severity.clone();
        let mut open = self.take_open(&key).map(|(o, _)| o);
        let prev_id = open.as_ref().and_then(|o| o.id);
        let t = eval::step(&mut open, hold, holds, clears, at, value);
        self.settle(key, open, prev_id, t, severity).await;
    }

    /// Stores a transition and announces it.
    async fn settle(
        &mut self,
        key: Key,
        mut open: Option<Open>,
        prev_id: Option<i64>,
        t: Option<Transition>,
        severity: String,
    ) {
        if let Some(t) = t {
            let (rule, device, series) = (&key.0, &key.1, &key.2);
            let res = match (t, open.as_mut()) {
                (Transition::Pending { at } | Transition::Firing { at }, Some(o))
                    if o.id.is_none() =>
                {
                    self.store
                        .insert_alert(
                            rule,
                            device,
                            series,
                            &severity,
                            o.phase.as_str(),
                            o.value,
                            at,
                            o.fired_ms,
                        )
                        .await
                        .map(|id| o.id = Some(id))
                }
                (Transition::Firing { at }, Some(o)) => match o.id {
                    Some(id) => {
                        self.store
                            .update_alert(id, "firing", o.value, Some(at), None)
                            .await
                    }
                    None => Ok(()),
                },
                (Transition::Resolved { at, .. }, _) => match prev_id {
                    Some(id) => {
                        self.store
                            .update_alert(id, "resolved", None, None, Some(at))
                            .await
                    }
                    None => Ok(()),
                },
                _ => Ok(()),
            };
            if let Err(e) = res {
                warn!(rule, device, series, error = %e, "cannot store an alert transition");
            }
            let (state, at) = match t {
                Transition::Pending { at } => ("pending", at),
                Transition::Firing { at } => {
                    self.metrics.alerts.fired.fetch_add(1, Ordering::Relaxed);
                    self.metrics.alerts.firing.fetch_add(1, Ordering::Relaxed);
                    ("firing", at)
                }
                Transition::Resolved { at, fired } => {
                    if fired {
                        self.metrics.alerts.resolved.fetch_add(1, Ordering::Relaxed);
                        self.metrics.alerts.firing.fetch_sub(1, Ordering::Relaxed);
                    }
                    ("resolved", at)
                }
            };
            info!(rule, device, series, state, at, "alert");
            let fired = matches!(
                t,
                Transition::Firing { .. } | Transition::Resolved { fired: true, .. }
            );
            if fired {
                self.dirty.insert(device.clone());
                self.hub.emit(HubMsg::Alert(Arc::new(AlertNote {
                    rule: rule.clone(),
                    device: device.clone(),
                    series: series.clone(),
                    severity: severity.clone(),
                    state,
                    at,
                    value: open.as_ref().and_then(|o| o.value),
                })));
                if let Some(w) = &self.webhook {
                    let value = open.as_ref().and_then(|o| o.value);
                    w.send(
                        json!({"rule": rule, "device": device, "series": series, "severity": severity,
                               "state": state, "at": at, "value": value})
                        .to_string(),
                    );
                }
            }
        }
        if let Some(o) = open {
            self.put_open(key, (o, severity));
        }
    }

    async fn samples(&mut self, live: &widgetry_proto::json::Live, now: i64) {
        if self.rules.is_empty() {
            return;
        }
        let device = live.device.as_str();
        for (key, points) in &live.series {
            let rules = self.rules_for_series(device, key);
            if rules.is_empty() {
                continue;
            }
            let (mut rate, mut no_data) = (false, false);
            for &ri in rules.iter() {
                match self.rules[ri].condition {
                    Condition::Rate { .. } => rate = true,
                    Condition::NoData { .. } => no_data = true,
                    _ => {}
                }
            }
            let rates = if rate {
                self.rates(device, key, points)
            } else {
                Vec::new()
            };
            if no_data {
                self.arrived(device, key, &rules, now);
            }
            for &ri in rules.iter() {
                let (bounds, values): (Bounds, &[(i64, f64)]) = match &self.rules[ri].condition {
                    Condition::Threshold { bounds, .. } => (*bounds, points),
                    Condition::Rate { bounds, .. } => (*bounds, &rates),
                    Condition::NoData { .. } => {
                        // Data is back: an open alert of this rule resolves.
                        if self.open_devices.contains_key(device) {
                            let o = Obs {
                                holds: false,
                                clears: true,
                                at: now,
                                value: None,
                            };
                            self.observe(ri, device, key, o).await;
                        }
                        continue;
                    }
                    _ => continue,
                };
                for (ts, v) in values {
                    let holds = bounds.holds(*v);
                    // Nothing open for this device and nothing new: the
                    // common case costs a comparison.
                    if !holds && !self.open_devices.contains_key(device) {
                        continue;
                    }
                    let o = Obs {
                        holds,
                        clears: bounds.clears(*v),
                        at: *ts,
                        value: Some(*v),
                    };
                    self.observe(ri, device, key, o).await;
                }
            }
        }
    }

    /// The rates per second between consecutive samples of `key` (from the
    /// latest one kept to each of `points`, ascending); samples not newer
    /// than the one before them give none.
    fn rates(&mut self, device: &str, key: &str, points: &[(i64, f64)]) -> Vec<(i64, f64)> {
        let kept = self
            .last_sample
            .get_mut(device)
            .and_then(|m| m.get_mut(key));
        let mut prev = kept.as_deref().copied();
        let mut out = Vec::with_capacity(points.len());
        for &(ts, v) in points {
            if let Some((pts, pv)) = prev {
                if ts <= pts {
                    continue;
                }
                out.push((ts, (v - pv) * 1000.0 / (ts - pts) as f64));
            }
            prev = Some((ts, v));
        }
        match (kept, prev) {
            (Some(k), Some(p)) => *k = p,
            (None, Some(p)) => {
                track(
                    &mut self.last_sample,
                    &mut self.tracked,
                    &mut self.full,
                    device,
                    key,
                    p,
                );
            }
            _ => {}
        }
        out
    }

    /// A sample of `key` arrived at `now`: its `no data` clock restarts.
    fn arrived(&mut self, device: &str, key: &str, rules: &[usize], now: i64) {
        if let Some(s) = self.last_seen.get_mut(device).and_then(|m| m.get_mut(key)) {
            s.at = now;
            s.fired = 0;
            return;
        }
        let no_data: Vec<usize> = rules
            .iter()
            .copied()
            .filter(|ri| matches!(self.rules[*ri].condition, Condition::NoData { .. }))
            .collect();
        let seen = Seen {
            at: now,
            rules: Arc::new(no_data),
            fired: 0,
        };
        track(
            &mut self.last_seen,
            &mut self.tracked,
            &mut self.full,
            device,
            key,
            seen,
        );
    }

    /// Fires the `no data` rules whose series have been silent too long.
    async fn silences(&mut self, now: i64) {
        let mut due: Vec<(usize, String, String)> = Vec::new();
        for (device, series) in self.last_seen.iter_mut() {
            let mut interval = None;
            for (key, seen) in series.iter_mut() {
                for (bit, &ri) in seen.rules.iter().enumerate() {
                    let mask = if bit < 64 { 1u64 << bit } else { 0 };
                    if seen.fired & mask != 0 {
                        continue;
                    }
                    let Condition::NoData { after, .. } = self.rules[ri].condition else {
                        continue;
                    };
                    let window = match after {
                        Silence::Ms(ms) => ms,
                        Silence::Intervals(n) => interval
                            .get_or_insert_with(|| {
                                self.presence.interval(device, self.intervals.get(device))
                            })
                            .saturating_mul(i64::from(n)),
                    };
                    if now.saturating_sub(seen.at) > window {
                        seen.fired |= mask;
                        due.push((ri, device.clone(), key.clone()));
                    }
                }
            }
        }
        for (ri, device, key) in due {
            let o = Obs {
                holds: true,
                clears: false,
                at: now,
                value: None,
            };
            self.observe(ri, &device, &key, o).await;
        }
    }

    /// Rejects and gaps of `device` since the last report, at `at`.
    async fn problems(&mut self, device: &str, rejects: u64, gaps: u64, at: i64) {
        for ri in self.rules_for(device) {
            let Condition::Count {
                what,
                bounds,
                window_ms,
            } = self.rules[ri].condition
            else {
                continue;
            };
            let n = match what {
                Counted::Rejects => rejects,
                Counted::Gaps => gaps,
            };
            if n == 0 {
                continue;
            }
            let count = match self.counts[ri].get_mut(device) {
                Some(w) => {
                    w.add(at, n);
                    w.count(at)
                }
                None => {
                    if !room(&mut self.tracked, &mut self.full) {
                        continue;
                    }
                    let mut w = Window::new(window_ms);
                    w.add(at, n);
                    let c = w.count(at);
                    self.counts[ri].insert(device.to_string(), w);
                    c
                }
            };
            let c = count as f64;
            let o = Obs {
                holds: bounds.holds(c),
                clears: bounds.clears(c),
                at,
                value: Some(c),
            };
            self.observe(ri, device, "", o).await;
        }
    }

    /// Slides the rejects/gaps windows: a count that falls resolves its
    /// alert, one that holds for `for` fires it; empty windows of devices
    /// without open alerts are dropped.
    async fn slide_counts(&mut self, now: i64) {
        let mut due: Vec<(usize, String, Bounds)> = Vec::new();
        for (ri, windows) in self.counts.iter_mut().enumerate() {
            let Condition::Count { bounds, .. } = self.rules[ri].condition else {
                continue;
            };
            let open_devices = &self.open_devices;
            let before = windows.len();
            windows.retain(|device, w| {
                let c = w.count(now) as f64;
                let open = open_devices.contains_key(device);
                if bounds.holds(c) || open {
                    due.push((ri, device.clone(), bounds));
                }
                c > 0.0 || open
            });
            self.tracked -= before - windows.len();
        }
        for (ri, device, bounds) in due {
            let c = self.counts[ri]
                .get_mut(&device)
                .map_or(0.0, |w| w.count(now) as f64);
            let o = Obs {
                holds: bounds.holds(c),
                clears: bounds.clears(c),
                at: now,
                value: Some(c),
            };
            self.observe(ri, &device, "", o).await;
        }
    }

    async fn presence(&mut self, device: &str, p: Presence, at: i64) {
        for ri in self.rules_for(device) {
            let Condition::Presence(states) = &self.rules[ri].condition else {
                continue;
            };
            let holds = states.contains(&p);
            let o = Obs {
                holds,
                clears: !holds,
                at,
                value: None,
            };
            self.observe(ri, device, "", o).await;
        }
    }

    async fn tick(&mut self, now: i64) {
        let pending: Vec<Key> = self
            .open
            .iter()
            .filter(|(_, (o, _))| o.phase == Phase::Pending)
            .map(|(k, _)| k.clone())
            .collect();
        for key in pending {
            let Some(hold) = self
                .rules
                .iter()
                .find(|r| r.name() == key.0)
                .map(|r| r.hold_ms)
            else {
                continue;
            };
            if let Some((o, severity)) = self.take_open(&key) {
                let prev = o.id;
                let mut open = Some(o);
                let t = eval::tick(&mut open, hold, now);
                self.settle(key, open, prev, t, severity).await;
            }
        }
        self.silences(now).await;
        self.slide_counts(now).await;
    }

    /// Rules changed: alerts of rules that are gone are resolved now.
    async fn replace_rules(&mut self, rules: Arc<Vec<Rule>>, now: i64) {
        // The alert counters are on /metrics once there is a rule.
        if !rules.is_empty() {
            self.metrics.alerts.enabled.store(true, Ordering::Relaxed);
        }
        let old = std::mem::replace(&mut self.rules, rules);
        self.by_device.clear();
        self.series_rules.clear();
        // Count windows carry over for rules that keep their name and
        // window; the series state is re-matched against the new rules.
        let mut old_counts = std::mem::take(&mut self.counts);
        self.counts = self
            .rules
            .iter()
            .map(|r| {
                let Condition::Count { window_ms, .. } = r.condition else {
                    return HashMap::new();
                };
                old.iter()
                    .position(|o| o.name() == r.name())
                    .filter(|&i| {
                        matches!(old[i].condition, Condition::Count { window_ms: w, .. } if w == window_ms)
                    })
                    .and_then(|i| old_counts.get_mut(i).map(std::mem::take))
                    .unwrap_or_default()
            })
            .collect();
        let mut last_sample = std::mem::take(&mut self.last_sample);
        let mut last_seen = std::mem::take(&mut self.last_seen);
        for (device, series) in last_sample.iter_mut() {
            series.retain(|key, _| {
                self.rules.iter().any(|r| {
                    matches!(r.condition, Condition::Rate { .. })
                        && r.watches(device)
                        && r.watches_series(key)
                })
            });
        }
        last_sample.retain(|_, m| !m.is_empty());
        for (device, series) in last_seen.iter_mut() {
            series.retain(|key, seen| {
                let rules: Vec<usize> = (0..self.rules.len())
                    .filter(|&i| {
                        let r = &self.rules[i];
                        matches!(r.condition, Condition::NoData { .. })
                            && r.watches(device)
                            && r.watches_series(key)
                    })
                    .collect();
                seen.rules = Arc::new(rules);
                seen.fired = 0;
                !seen.rules.is_empty()
            });
        }
        last_seen.retain(|_, m| !m.is_empty());
        self.last_sample = last_sample;
        self.last_seen = last_seen;
        self.tracked = self.last_sample.values().map(HashMap::len).sum::<usize>()
            + self.last_seen.values().map(HashMap::len).sum::<usize>()
            + self.counts.iter().map(HashMap::len).sum::<usize>();
        self.full = false;
        let gone: Vec<Key> = self
            .open
            .keys()
            .filter(|k| !self.rules.iter().any(|r| r.name() == k.0))
            .cloned()
            .collect();
        for key in gone {
            if let Some((o, severity)) = self.take_open(&key) {
                let fired = o.phase == Phase::Firing;
                self.settle(
                    key,
                    None,
                    o.id,
                    Some(Transition::Resolved { at: now, fired }),
                    severity,
                )
                .await;
            }
        }
    }

    /// The retained `…/alerts` message of `device`: its firing alerts.
    fn retained(&self, device: &str, now: i64) -> String {
        let firing: Vec<serde_json::Value> = self
            .open
            .iter()
            .filter(|((_, d, _), (o, _))| d == device && o.phase == Phase::Firing)
            .map(|((rule, _, series), (o, severity))| {
                json!({"rule": rule, "series": series, "severity": severity,
                       "since": o.fired_ms, "value": o.value})
            })
            .collect();
        json!({"device": device, "firing": firing, "ts": now}).to_string()
    }
}

/// Runs the evaluator until `shutdown`; `presence` judges devices, with
/// the learned `intervals` the presence tracker keeps.
pub async fn run(
    store: Store,
    hub: Arc<Hub>,
    rules: RuleSet,
    (presence, intervals): (PresenceConfig, Intervals),
    outputs: Outputs,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    let mut hub_rx = hub.subscribe();
    let mut rules_rx = rules.subscribe();
    let mut ev = Evaluator {
        store: store.clone(),
        metrics: metrics.clone(),
        // Set by `replace_rules` below, which also sizes `counts`.
        rules: Arc::new(Vec::new()),
        by_device: HashMap::new(),
        open: HashMap::new(),
        open_devices: HashMap::new(),
        series_rules: HashMap::new(),
        dirty: HashSet::new(),
        webhook: outputs.webhook,
        hub: hub.clone(),
        presence: presence.clone(),
        intervals,
        last_sample: HashMap::new(),
        last_seen: HashMap::new(),
        counts: Vec::new(),
        tracked: 0,
        full: false,
    };
    // Open alerts survive restarts: they are picked up where they were.
    for a in store.open_alerts().await? {
        let phase = if a.state == "firing" {
            metrics.alerts.firing.fetch_add(1, Ordering::Relaxed);
            Phase::Firing
        } else {
            Phase::Pending
        };
        ev.put_open(
            (a.rule, a.device, a.series),
            (
                Open {
                    id: Some(a.id),
                    phase,
                    since_ms: a.pending_ms,
                    fired_ms: a.firing_ms,
                    value: a.value,
                },
                a.severity,
            ),
        );
    }
    let now = widgetry_common::now_ms();
    ev.replace_rules(rules.current(), now).await;
    // Presence now, for presence rules (later changes come from the hub).
    for r in store.presence_rows().await? {
        let p = presence.of(&r.device, &r.state, r.last_seen_ms, r.interval_ms, now);
        ev.presence(&r.device, p, now).await;
    }
    // Publisher of the retained `…/alerts` messages: connected on the first
    // alert, so a server without alerts holds no extra broker connection.
    let (pub_tx, pub_rx) = tokio::sync::mpsc::channel::<(String, String)>(1024);
    let mut pub_rx = Some(pub_rx);
    let mut broker = outputs.broker;
    let mut publisher: Option<tokio::task::JoinHandle<()>> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = rules_rx.changed() => {
                if changed.is_err() { break; }
                let r = rules_rx.borrow_and_update().clone();
                ev.replace_rules(r, widgetry_common::now_ms()).await;
            }
            msg = hub_rx.recv() => match msg {
                Ok(m) => match m.as_ref() {
                    HubMsg::Samples(live) => ev.samples(live, widgetry_common::now_ms()).await,
                    HubMsg::Problems { device, rejects, gaps, ts } => {
                        ev.problems(device, *rejects, *gaps, *ts).await;
                    }
                    HubMsg::Presence { device, presence, ts } => {
                        let p = match *presence {
                            "active" => Presence::Active,
                            "stale" => Presence::Stale,
                            "silent" => Presence::Silent,
                            _ => Presence::Offline,
                        };
                        ev.presence(device, p, *ts).await;
                    }
                    _ => {}
                },
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    metrics.alerts.lagged.fetch_add(n, Ordering::Relaxed);
                    warn!(missed = n, "rule evaluator fell behind the live hub; those batches were not evaluated");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = tick.tick() => {
                let now = widgetry_common::now_ms();
                ev.tick(now).await;
                let dirty: Vec<String> = ev.dirty.iter().cloned().collect();
                for d in dirty {
                    if publisher.is_none() {
                        match (broker.take(), pub_rx.take()) {
                            (Some(b), Some(rx)) => {
                                publisher = Some(tokio::spawn(publish_retained(b, rx, shutdown.clone())));
                            }
                            _ => {
                                ev.dirty.clear();
                                break;
                            }
                        }
                    }
                    let msg = (Topic::name(&d, TopicKind::Alerts), ev.retained(&d, now));
                    if pub_tx.try_send(msg).is_ok() {
                        ev.dirty.remove(&d);
                    }
                }
            }
        }
    }
    drop(pub_tx);
    if let Some(p) = publisher {
        let _ = p.await;
    }
    debug!("rule evaluator stopped");
    Ok(())
}

/// Keeps a connection to the broker and publishes each device's retained
/// `…/alerts` (the latest per device wins while disconnected).
async fn publish_retained(
    (host, port, credentials): BrokerTarget,
    mut rx: tokio::sync::mpsc::Receiver<(String, String)>,
    shutdown: CancellationToken,
) {
    let id = format!("widgetry-alerts-{:08x}", rand::random::<u32>());
    let mut opts = MqttOptions::new(id, host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    if let Some((u, p)) = credentials {
        opts.set_credentials(u, p);
    }
    let (client, evl) = widgetry_common::mqtt_client(opts, 256);
    let mut conn = Connection::new(evl, "alerts publisher", None);
    // Latest message per topic not yet handed to the client.
    let mut waiting: BTreeMap<String, String> = BTreeMap::new();
    // Publishes handed to the client and not yet acknowledged.
    let mut unacked = 0usize;
    let mut connected = false;
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some((topic, body)) => { waiting.insert(topic, body); }
                None => break,
            },
            p = conn.next(&shutdown) => match p {
                Polled::Stopped => break,
                Polled::Lost => {
                    connected = false;
                    if !conn.wait(&shutdown).await { break; }
                }
                Polled::Event(Event::Incoming(Packet::ConnAck(_))) => connected = true,
                Polled::Event(Event::Incoming(Packet::PubAck(_))) => unacked = unacked.saturating_sub(1),
                Polled::Event(_) => {}
            },
        }
        if connected {
            while let Some((topic, body)) = waiting.pop_first() {
                if client
                    .try_publish(
                        topic.clone(),
                        QoS::AtLeastOnce,
                        true,
                        body.clone().into_bytes(),
                    )
                    .is_err()
                {
                    waiting.insert(topic, body);
                    break;
                }
                unacked += 1;
            }
        }
    }
    // Hand over what is left, then let the event loop send it until it is
    // acknowledged (at most 2 s; nothing to wait for at a quiet shutdown).
    for (topic, body) in waiting {
        if client
            .try_publish(topic, QoS::AtLeastOnce, true, body.into_bytes())
            .is_ok()
        {
            unacked += 1;
        }
    }
    if unacked == 0 {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let never = CancellationToken::new();
        while unacked > 0 {
            match conn.next(&never).await {
                Polled::Event(Event::Incoming(Packet::PubAck(_))) => unacked -= 1,
                Polled::Event(_) => {}
                _ => break,
            }
        }
    })
    .await;
}
