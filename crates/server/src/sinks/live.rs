//! The live bridge behind `GET /api/v1/live`: committed samples, device
//! status and app events from the broker, fanned out to websocket clients.
//!
//! Data flow: the ingestor publishes every committed batch on
//! `widgetry/v1/{device}/live` with its commit id (see migration 0004).
//! The bridge subscribes to those (and to `…/status`, `…/events`, and to
//! `…/errors` and `…/gaps`, which it adds up per device for the rule
//! evaluator), and emits committed batches to the [`Hub`] strictly in
//! commit-id order with no hole: a live message that skips ids, or a quiet second, makes it read
//! the missing batches from the database. Each websocket client reads the
//! hub through its own bounded receiver; a client that falls behind loses
//! messages (and is told so), never the bridge, the ingestor or other
//! clients. With `since`, a client first gets the committed batches after
//! its cursor from the database, then the hub's, skipping what it already
//! got — so a reconnecting client sees every batch exactly once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use widgetry_proto::json::{ErrorReport, GapReport, Live, parse_status};
use widgetry_proto::{Topic, TopicKind};

use crate::mqtt::{Connection, Polled};
use crate::store::read::CommittedBatch;
use crate::store::{Store, StoreError};

/// Messages kept for each websocket client before it starts losing them.
pub const CLIENT_BUFFER: usize = 2048;
/// Committed batches read from the database per query.
const FETCH: i64 = 1000;

/// One message of the live stream.
#[derive(Debug)]
pub enum HubMsg {
    Samples(Arc<Live>),
    Status {
        device: String,
        state: String,
        ts: i64,
    },
    Event {
        device: String,
        ts: i64,
        event: String,
        body: serde_json::Value,
    },
    /// A device's presence changed (`crate::presence`).
    Presence {
        device: String,
        presence: &'static str,
        ts: i64,
    },
    /// Payloads of the device rejected (`…/errors`, without
    /// `unknown_series`) and gap reports stored for it (`…/gaps`) since the
    /// last such message: the bridge adds them up for at most a poll
    /// interval, so a flood of bad input costs one hub message per device
    /// per interval.
    Problems {
        device: String,
        rejects: u64,
        gaps: u64,
        ts: i64,
    },
    /// An alert fired or resolved after firing (`crate::rules::run`).
    Alert(Arc<AlertNote>),
}

/// An alert's transition, for the live stream (`{"type":"alert",…}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertNote {
    pub rule: String,
    pub device: String,
    pub series: String,
    pub severity: String,
    /// `firing` or `resolved`.
    pub state: &'static str,
    pub at: i64,
    pub value: Option<f64>,
}

impl HubMsg {
    pub fn device(&self) -> &str {
        match self {
            HubMsg::Samples(l) => &l.device,
            HubMsg::Status { device, .. }
            | HubMsg::Event { device, .. }
            | HubMsg::Presence { device, .. }
            | HubMsg::Problems { device, .. } => device,
            HubMsg::Alert(a) => &a.device,
        }
    }
}

/// The fan-out point shared by the bridge and the websocket handlers.
pub struct Hub {
    tx: broadcast::Sender<Arc<HubMsg>>,
    /// Highest commit id emitted (every id up to it has been emitted).
    last: AtomicU64,
    /// Series id → (device, key), for batches read from the database.
    keys: Mutex<HashMap<i64, String>>,
}

impl Hub {
    /// A hub whose commit stream continues after `last`.
    pub fn new(last: u64) -> Arc<Hub> {
        let (tx, _) = broadcast::channel(CLIENT_BUFFER);
        Arc::new(Hub {
            tx,
            last: AtomicU64::new(last),
            keys: Mutex::new(HashMap::new()),
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<HubMsg>> {
        self.tx.subscribe()
    }

    pub fn last(&self) -> u64 {
        self.last.load(Ordering::Acquire)
    }

    pub(crate) fn emit(&self, msg: HubMsg) {
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(Arc::new(msg));
    }

    /// Emits a committed batch if it is the next one; returns false when
    /// there is a hole before it (the caller catches up from the database).
    fn emit_commit(&self, live: Live) -> bool {
        let last = self.last();
        if live.commit <= last {
            return true; // already emitted (redelivery or read from the DB)
        }
        if live.commit != last + 1 {
            return false;
        }
        self.last.store(live.commit, Ordering::Release);
        self.emit(HubMsg::Samples(Arc::new(live)));
        true
    }

    /// Converts stored batches to live messages, resolving series keys.
    pub async fn to_live(
        &self,
        store: &Store,
        batches: Vec<CommittedBatch>,
    ) -> Result<Vec<Live>, StoreError> {
        let missing: Vec<i64> = {
            let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            let mut m: Vec<i64> = batches
                .iter()
                .flat_map(|b| b.runs.iter().map(|(id, _)| *id))
                .filter(|id| !keys.contains_key(id))
                .collect();
            m.sort_unstable();
            m.dedup();
            m
        };
        if !missing.is_empty() {
            let found = store.series_names(&missing).await?;
            let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            if keys.len() > 500_000 {
                keys.clear();
            }
            for (id, _device, key) in found {
                keys.insert(id, key);
            }
        }
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        Ok(batches
            .into_iter()
            .map(|b| {
                let mut series: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
                for (id, points) in b.runs {
                    let key = keys
                        .get(&id)
                        .cloned()
                        .unwrap_or_else(|| format!("series#{id}"));
                    series.entry(key).or_default().extend(points);
                }
                Live {
                    commit: b.commit_id,
                    device: b.device,
                    session: b.session,
                    seq: b.seq,
                    series,
                }
            })
            .collect())
    }

    /// Emits every committed batch after `last()` that the database has.
    async fn catch_up(&self, store: &Store) -> Result<u64, StoreError> {
        let mut n = 0;
        loop {
            let batch = store.commits_after(self.last(), FETCH).await?;
            let got = batch.len();
            for live in self.to_live(store, batch).await? {
                let commit = live.commit;
                if !self.emit_commit(live.clone()) {
                    // Ids are contiguous in the database, so this cannot
                    // happen unless rows were deleted by hand; go on.
                    warn!(
                        after = self.last(),
                        next = commit,
                        "hole in commit ids; skipping ahead"
                    );
                    self.last.store(commit - 1, Ordering::Release);
                    self.emit_commit(live);
                }
                n += 1;
            }
            if got < FETCH as usize {
                return Ok(n);
            }
        }
    }
}

pub use crate::config::roles::BridgeConfig;

/// Runs the bridge until `shutdown`.
pub async fn run_bridge(
    cfg: BridgeConfig,
    store: Store,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    let (tx, mut rx) = mpsc::channel::<(String, Vec<u8>)>(4096);
    let mqtt = cfg.broker.clone().map(|(host, port)| {
        tokio::spawn(drive_mqtt(
            host,
            port,
            cfg.credentials.clone(),
            tx,
            shutdown.clone(),
        ))
    });
    let mut tick = tokio::time::interval(cfg.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut problems = Problems::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                if let Err(e) = hub.catch_up(&store).await {
                    warn!(error = %e, "live bridge cannot read committed batches");
                }
                problems.flush(&hub);
            }
            Some((topic, payload)) = rx.recv() => {
                handle(&hub, &store, &mut problems, &topic, &payload).await;
            }
        }
    }
    if let Some(m) = mqtt {
        let _ = m.await;
    }
    debug!("live bridge stopped");
    Ok(())
}

/// Rejects and gaps per device not yet emitted as [`HubMsg::Problems`].
#[derive(Default)]
struct Problems(HashMap<String, (u64, u64)>);

impl Problems {
    /// Devices held before the bridge emits early (a fleet-wide flood).
    const MAX_DEVICES: usize = 10_000;

    fn add(&mut self, hub: &Hub, device: &str, rejects: u64, gaps: u64) {
        match self.0.get_mut(device) {
            Some(c) => {
                c.0 = c.0.saturating_add(rejects);
                c.1 = c.1.saturating_add(gaps);
            }
            None => {
                if self.0.len() >= Self::MAX_DEVICES {
                    self.flush(hub);
                }
                self.0.insert(device.to_string(), (rejects, gaps));
            }
        }
    }

    fn flush(&mut self, hub: &Hub) {
        let ts = widgetry_common::now_ms();
        for (device, (rejects, gaps)) in self.0.drain() {
            hub.emit(HubMsg::Problems {
                device,
                rejects,
                gaps,
                ts,
            });
        }
    }
}

async fn handle(hub: &Hub, store: &Store, problems: &mut Problems, topic: &str, payload: &[u8]) {
    let Ok(t) = Topic::parse(topic) else { return };
    match t.kind {
        // `unknown_series` asks for definitions; it is not bad input (the
        // device's `rejects` count leaves it out too).
        TopicKind::Errors => match serde_json::from_slice::<ErrorReport>(payload) {
            Ok(r) if r.code != "unknown_series" => problems.add(hub, t.device, 1, 0),
            Ok(_) => {}
            Err(e) => debug!(topic, error = %e, "ignoring malformed error report"),
        },
        TopicKind::Gaps => match serde_json::from_slice::<GapReport>(payload) {
            Ok(_) => problems.add(hub, t.device, 0, 1),
            Err(e) => debug!(topic, error = %e, "ignoring malformed gap report"),
        },
        TopicKind::Live => match serde_json::from_slice::<Live>(payload) {
            Ok(live) => {
                if !hub.emit_commit(live)
                    && let Err(e) = hub.catch_up(store).await
                {
                    warn!(error = %e, "live bridge cannot read committed batches");
                }
            }
            Err(e) => debug!(topic, error = %e, "ignoring malformed live message"),
        },
        TopicKind::Status if !payload.is_empty() => {
            if let Ok(s) = parse_status(payload) {
                hub.emit(HubMsg::Status {
                    device: t.device.to_string(),
                    state: s.state.as_str().to_string(),
                    ts: widgetry_common::now_ms(),
                });
            }
        }
        TopicKind::Events => {
            let now = widgetry_common::now_ms();
            if let Ok((_, events)) =
                widgetry_proto::json::parse_events(payload, &Default::default(), now)
            {
                for e in events {
                    hub.emit(HubMsg::Event {
                        device: t.device.to_string(),
                        ts: e.ts_ms,
                        event: e.name,
                        body: serde_json::Value::Object(e.body),
                    });
                }
            }
        }
        _ => {}
    }
}

/// Keeps a subscriber connection to the broker and forwards what it
/// receives; when the bridge is busy, messages are dropped here (the
/// bridge recovers committed batches from the database).
async fn drive_mqtt(
    host: String,
    port: u16,
    credentials: Option<(String, String)>,
    tx: mpsc::Sender<(String, Vec<u8>)>,
    shutdown: CancellationToken,
) {
    let id = format!("widgetry-web-{:08x}", rand::random::<u32>());
    let mut opts = MqttOptions::new(id, host.clone(), port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    if let Some((u, p)) = credentials {
        opts.set_credentials(u, p);
    }
    let (client, ev) = widgetry_common::mqtt_client(opts, 64);
    let mut conn = Connection::new(ev, "live bridge", None);
    loop {
        match conn.next(&shutdown).await {
            Polled::Stopped => break,
            Polled::Lost => {
                if !conn.wait(&shutdown).await {
                    break;
                }
            }
            Polled::Event(Event::Incoming(Packet::ConnAck(_))) => {
                info!(broker = %format!("{host}:{port}"), "live bridge connected to broker");
                let filters = [
                    TopicKind::Live,
                    TopicKind::Status,
                    TopicKind::Events,
                    TopicKind::Errors,
                    TopicKind::Gaps,
                ]
                .map(|k| rumqttc::SubscribeFilter::new(k.filter(), QoS::AtMostOnce));
                if let Err(e) = client.try_subscribe_many(filters) {
                    warn!(error = %e, "live bridge cannot queue its subscription");
                }
            }
            Polled::Event(Event::Incoming(Packet::Publish(p))) => {
                let _ = tx.try_send((p.topic, p.payload.to_vec()));
            }
            Polled::Event(_) => {}
        }
    }
    let _ = client.try_disconnect();
}

/// What a websocket client asked for.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// Devices to follow; `None` = all.
    #[serde(default)]
    pub devices: Option<Vec<String>>,
    /// Series keys to follow; `None` = all; empty = no samples.
    #[serde(default)]
    pub series: Option<Vec<String>>,
    #[serde(default)]
    pub status: bool,
    #[serde(default)]
    pub events: bool,
    /// Resume after this commit id.
    #[serde(default)]
    pub since: Option<u64>,
}

impl Subscription {
    fn wants_device(&self, device: &str) -> bool {
        self.devices
            .as_ref()
            .is_none_or(|d| d.iter().any(|x| x == device))
    }

    /// The message to send for `msg`, if the client wants it.
    pub fn render(&self, msg: &HubMsg) -> Option<String> {
        if !self.wants_device(msg.device()) {
            return None;
        }
        match msg {
            HubMsg::Samples(live) => self.render_samples(live),
            HubMsg::Status { device, state, ts } if self.status => Some(
                serde_json::json!({"type": "status", "device": device, "state": state, "ts": ts})
                    .to_string(),
            ),
            HubMsg::Presence {
                device,
                presence,
                ts,
            } if self.status => Some(
                serde_json::json!({"type": "presence", "device": device, "presence": presence, "ts": ts})
                    .to_string(),
            ),
            HubMsg::Alert(a) if self.status => {
                #[derive(Serialize)]
                struct Out<'a> {
                    #[serde(rename = "type")]
                    kind: &'static str,
                    #[serde(flatten)]
                    alert: &'a AlertNote,
                }
                to_message(
                    "alert",
                    &Out {
                        kind: "alert",
                        alert: a,
                    },
                )
            }
            HubMsg::Event {
                device,
                ts,
                event,
                body,
            } if self.events => Some(
                serde_json::json!({"type": "event", "device": device, "ts": ts, "event": event, "body": body})
                    .to_string(),
            ),
            _ => None,
        }
    }

    /// A `samples` message with the series the client follows (`None` if
    /// none of them is in the batch).
    pub fn render_samples(&self, live: &Live) -> Option<String> {
        if !self.wants_device(&live.device) {
            return None;
        }
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            commit: u64,
            device: &'a str,
            session: String,
            seq: u64,
            series: BTreeMap<&'a str, &'a [(i64, f64)]>,
        }
        let series: BTreeMap<&str, &[(i64, f64)]> = live
            .series
            .iter()
            .filter(|(k, _)| {
                self.series
                    .as_ref()
                    .is_none_or(|s| s.iter().any(|x| x == *k))
            })
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        if series.is_empty() {
            return None;
        }
        to_message(
            "samples",
            &Out {
                kind: "samples",
                commit: live.commit,
                device: &live.device,
                session: live.session.to_string(),
                seq: live.seq,
                series,
            },
        )
    }
}

/// A websocket message's text; a failure to serialise is logged and the
/// message is not sent (never an empty message).
fn to_message<T: Serialize>(kind: &str, msg: &T) -> Option<String> {
    match serde_json::to_string(msg) {
        Ok(text) => Some(text),
        Err(e) => {
            tracing::error!(kind, error = %e, "cannot serialise a live message; not sent");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use widgetry_proto::SessionId;

    fn live(commit: u64, device: &str) -> Live {
        Live {
            commit,
            device: device.into(),
            session: SessionId([1; 16]),
            seq: commit,
            series: [("cpu".to_string(), vec![(1, 2.0)])].into(),
        }
    }

    #[test]
    fn hub_emits_commits_in_order_only() {
        let hub = Hub::new(5);
        let mut rx = hub.subscribe();
        assert!(hub.emit_commit(live(4, "a")), "old commit is a no-op");
        assert!(!hub.emit_commit(live(7, "a")), "a hole is reported");
        assert!(hub.emit_commit(live(6, "a")));
        assert!(hub.emit_commit(live(6, "a")), "redelivery is a no-op");
        assert_eq!(hub.last(), 6);
        match &*rx.try_recv().expect("one message") {
            HubMsg::Samples(l) => assert_eq!(l.commit, 6),
            m => panic!("unexpected {m:?}"),
        }
        assert!(rx.try_recv().is_err(), "exactly one message");
    }

    #[test]
    fn subscription_filters_devices_and_series() {
        let sub = Subscription {
            devices: Some(vec!["a".into()]),
            series: Some(vec!["mem".into()]),
            ..Default::default()
        };
        assert_eq!(sub.render_samples(&live(1, "a")), None, "no wanted series");
        let mut l = live(2, "a");
        l.series.insert("mem".into(), vec![(5, 1.5)]);
        let text = sub.render_samples(&l).expect("mem wanted");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["type"], "samples");
        assert_eq!(v["commit"], 2);
        assert_eq!(v["series"]["mem"][0], serde_json::json!([5, 1.5]));
        assert!(v["series"].get("cpu").is_none());
        assert_eq!(sub.render_samples(&live(3, "b")), None, "other device");
        let status = HubMsg::Status {
            device: "a".into(),
            state: "offline".into(),
            ts: 9,
        };
        assert_eq!(sub.render(&status), None, "status not asked for");
        let all = Subscription {
            status: true,
            ..Default::default()
        };
        assert!(all.render(&status).expect("status").contains("offline"));
    }

    #[test]
    fn alerts_render_for_status_subscribers_and_problems_are_added_up() {
        let alert = HubMsg::Alert(Arc::new(AlertNote {
            rule: "hot".into(),
            device: "a".into(),
            series: "temp".into(),
            severity: "critical".into(),
            state: "firing",
            at: 7,
            value: Some(61.5),
        }));
        assert_eq!(
            Subscription::default().render(&alert),
            None,
            "status not asked for"
        );
        let sub = Subscription {
            status: true,
            ..Default::default()
        };
        let v: serde_json::Value =
            serde_json::from_str(&sub.render(&alert).expect("rendered")).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"type": "alert", "rule": "hot", "device": "a", "series": "temp",
                "severity": "critical", "state": "firing", "at": 7, "value": 61.5})
        );
        let other = Subscription {
            status: true,
            devices: Some(vec!["b".into()]),
            ..Default::default()
        };
        assert_eq!(other.render(&alert), None, "another device's alert");

        let hub = Hub::new(0);
        let mut rx = hub.subscribe();
        let mut p = Problems::default();
        p.add(&hub, "a", 1, 0);
        p.add(&hub, "a", 1, 0);
        p.add(&hub, "a", 0, 1);
        assert!(rx.try_recv().is_err(), "held until the flush");
        p.flush(&hub);
        match &*rx.try_recv().expect("one message") {
            HubMsg::Problems {
                device,
                rejects,
                gaps,
                ..
            } => assert_eq!((device.as_str(), *rejects, *gaps), ("a", 2, 1)),
            m => panic!("unexpected {m:?}"),
        }
        assert!(rx.try_recv().is_err(), "one message per device");
    }
}
