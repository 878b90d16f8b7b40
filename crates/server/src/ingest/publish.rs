//! The ingestor's publish-only connection: acks and error reports to
//! devices, committed samples on `…/live`, stored gap reports on `…/gaps`. A second connection, so the
//! writer can never deadlock against the subscriber's event loop. It runs
//! only after a commit, and must never publish an empty or half-made
//! message.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rumqttc::{AsyncClient, Event, EventLoop, QoS};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};
use widgetry_proto::json::{Ack, ErrorReport, EventBatch, GapReport, Live};
use widgetry_proto::{Topic, TopicKind};

use crate::metrics::Metrics;
use crate::mqtt::{Connection, Polled};

/// Publishes what committed transactions lead to.
pub struct Publisher {
    /// None: no MQTT (`widgetry bridge ws` alone); live readers find the
    /// commits in the database, and the bridge's sources take no acks.
    pub client: Option<AsyncClient>,
    pub metrics: Arc<Metrics>,
    /// Largest MQTT packet the publisher may send (live messages above it
    /// are skipped; readers fetch those batches from the database).
    pub max_packet: usize,
}

impl Publisher {
    /// Publishes acks, live messages, app events that came in batches,
    /// error reports and gap reports, in that order.
    pub async fn publish(
        &self,
        acks: Vec<(String, Ack)>,
        live: Vec<Live>,
        events: Vec<(String, EventBatch)>,
        errors: Vec<(String, ErrorReport)>,
        gaps: Vec<(String, GapReport)>,
    ) {
        let Some(client) = &self.client else {
            return;
        };
        for (device, ack) in acks {
            let topic = Topic::name(&device, TopicKind::Ack);
            let Some(payload) = to_json(&ack, &topic) else {
                continue;
            };
            match client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
            {
                Ok(()) => {
                    self.metrics.acks_published.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => warn!(device = %device, error = %e, "cannot publish ack"),
            }
        }
        // The live feed never slows ingest: a message that does not fit the
        // publisher's queue (or a packet) is skipped, and readers that see
        // a hole in the commit ids fetch the batch from the database.
        for live in live {
            let topic = Topic::name(&live.device, TopicKind::Live);
            let Some(payload) = to_json(&live, &topic) else {
                self.metrics.live_skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if payload.len() > self.max_packet {
                self.metrics.live_skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match client.try_publish(topic, QoS::AtMostOnce, false, payload) {
                Ok(()) => {
                    self.metrics.live_published.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.metrics.live_skipped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Like the live feed, best effort (QoS 0, never waiting): the
        // events are stored; this is only their live view.
        for (device, batch) in events {
            let topic = Topic::name(&device, TopicKind::Events);
            if let Some(payload) = to_json(&batch, &topic)
                && payload.len() <= self.max_packet
            {
                let _ = client.try_publish(topic, QoS::AtMostOnce, false, payload);
            }
        }
        for (device, report) in errors {
            let topic = Topic::name(&device, TopicKind::Errors);
            let Some(payload) = to_json(&report, &topic) else {
                continue;
            };
            if let Err(e) = client.publish(topic, QoS::AtMostOnce, false, payload).await {
                warn!(device = %device, error = %e, "cannot publish error report");
            }
        }
        // Best effort like the live feed: the gaps are stored; this is
        // their live view (the rule evaluator counts them).
        for (device, report) in gaps {
            let topic = Topic::name(&device, TopicKind::Gaps);
            if let Some(payload) = to_json(&report, &topic) {
                let _ = client.try_publish(topic, QoS::AtMostOnce, false, payload);
            }
        }
    }
}

/// Drives the publisher's event loop until `stop` (or its DISCONNECT).
pub async fn drive_publisher(ev: EventLoop, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut conn = Connection::new(ev, "ingest publisher", Some(&metrics.mqtt_reconnects));
    loop {
        match conn.next(&stop).await {
            Polled::Stopped | Polled::Event(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                return;
            }
            Polled::Event(_) => {}
            Polled::Lost => {
                if !conn.wait(&stop).await {
                    return;
                }
            }
        }
    }
}

/// Serialises a message for `topic`; a failure is logged as an error and
/// nothing is published (never an empty payload).
fn to_json<T: serde::Serialize>(msg: &T, topic: &str) -> Option<Vec<u8>> {
    match serde_json::to_vec(msg) {
        Ok(p) => Some(p),
        Err(e) => {
            error!(topic = %topic, error = %e, "cannot serialise message; not published");
            None
        }
    }
}
