//! The MQTT source: one subscriber connection (a persistent session, or
//! a member of a shared-subscription group) on every device's samples,
//! JSON samples, status and events topics. Each publish is classified
//! into an [`Item`] and queued for the writer; a full queue stops reading
//! from the broker (backpressure), so memory stays bounded.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use widgetry_common::now_ms;
use widgetry_proto::json::{parse_events, parse_samples, parse_status};
use widgetry_proto::{DecodedBatch, Limits, Reject, Topic, TopicKind};

use super::Item;
use super::limit::{RateLimiter, Verdict};
use crate::config::ingest::IngestConfig;
use crate::metrics::Metrics;
use crate::mqtt::{Connection, Polled};

/// MQTT options of the ingestor's connections.
pub fn mqtt_options(cfg: &IngestConfig, client_id: String, clean: bool) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, cfg.broker_host.clone(), cfg.broker_port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(clean);
    let max = cfg.limits.max_payload_bytes + 64 * 1024;
    opts.set_max_packet_size(max, max);
    opts.set_inflight(1000);
    if let Some((user, pass)) = &cfg.credentials {
        opts.set_credentials(user.clone(), pass.clone());
    }
    opts
}

/// Runs the subscriber until `shutdown`; `ready` turns true while the
/// broker has acknowledged the subscriptions.
pub async fn subscribe_loop(
    cfg: &IngestConfig,
    client: AsyncClient,
    ev: EventLoop,
    tx: mpsc::Sender<Item>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    ready: &watch::Sender<bool>,
) {
    let mut conn = Connection::new(ev, "ingest subscriber", Some(&metrics.mqtt_reconnects));
    let mut limiter = RateLimiter::new(cfg.limits.device_messages_per_s, cfg.limits.device_burst);
    loop {
        match conn.next(shutdown).await {
            Polled::Stopped => break,
            Polled::Event(Event::Incoming(Packet::ConnAck(_))) => {
                info!(broker = %format!("{}:{}", cfg.broker_host, cfg.broker_port), "ingestor connected to broker");
                let filters = [
                    TopicKind::Samples,
                    TopicKind::SamplesJson,
                    TopicKind::Status,
                    TopicKind::Events,
                ]
                .map(|k| {
                    let filter = match &cfg.shared_group {
                        Some(g) => format!("$share/{g}/{}", k.filter()),
                        None => k.filter(),
                    };
                    rumqttc::SubscribeFilter::new(filter, QoS::AtLeastOnce)
                });
                if let Err(e) = client.try_subscribe_many(filters) {
                    error!(error = %e, "cannot queue subscription");
                }
            }
            Polled::Event(Event::Incoming(Packet::SubAck(_))) => {
                metrics.ingest_subscribed.store(1, Ordering::Relaxed);
                ready.send_replace(true);
            }
            Polled::Event(Event::Incoming(Packet::Publish(p))) => {
                let item = classify(&p.topic, &p.payload, &cfg.limits, &mut limiter, metrics);
                if let Some(item) = item {
                    // Backpressure: when the writer is behind we stop
                    // reading from the broker.
                    let send = tx.send(item);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        r = send => if r.is_err() { break },
                    }
                }
            }
            Polled::Event(_) => {}
            Polled::Lost => {
                metrics.ingest_subscribed.store(0, Ordering::Relaxed);
                ready.send_replace(false);
                if !conn.wait(shutdown).await {
                    break;
                }
            }
        }
    }
    metrics.ingest_subscribed.store(0, Ordering::Relaxed);
    ready.send_replace(false);
    let _ = client.try_disconnect();
    // Flush the DISCONNECT so a persistent session ends cleanly.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match conn.ev.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Decodes one publish into work for the writer (or a reject). A device
/// over its rate limit costs only the topic parse: its message is dropped
/// unread and counted, and reported once per 10 s.
pub fn classify(
    topic: &str,
    payload: &[u8],
    limits: &Limits,
    limiter: &mut RateLimiter,
    metrics: &Metrics,
) -> Option<Item> {
    let received_ms = now_ms();
    let parsed = match Topic::parse(topic) {
        Ok(t) => t,
        Err(reject) => {
            metrics.messages_other.fetch_add(1, Ordering::Relaxed);
            return Some(Item::Rejected {
                device: None,
                topic: topic.to_string(),
                reject,
                received_ms,
            });
        }
    };
    match limiter.check(parsed.device, std::time::Instant::now()) {
        Verdict::Pass => {}
        Verdict::Drop => {
            metrics.reject(&rate_limited(limits));
            return None;
        }
        // Counted and logged by the writer, and reported to the device.
        Verdict::DropAndReport => {
            return Some(Item::Rejected {
                device: Some(parsed.device.to_string()),
                topic: topic.to_string(),
                reject: rate_limited(limits),
                received_ms,
            });
        }
    }
    let device = parsed.device.to_string();
    let result = match parsed.kind {
        TopicKind::Samples => {
            metrics.messages_samples.fetch_add(1, Ordering::Relaxed);
            DecodedBatch::decode(payload, limits, received_ms).map(|batch| Item::Batch {
                device: device.clone(),
                batch,
                received_ms,
            })
        }
        TopicKind::SamplesJson => {
            metrics
                .messages_samples_json
                .fetch_add(1, Ordering::Relaxed);
            parse_samples(payload, limits, received_ms).map(|samples| Item::Json {
                device: device.clone(),
                samples,
                received_ms,
            })
        }
        TopicKind::Status => {
            metrics.messages_status.fetch_add(1, Ordering::Relaxed);
            if payload.is_empty() {
                // A cleared retained message: nothing to record.
                return None;
            }
            parse_status(payload).map(|status| Item::Status {
                device: device.clone(),
                status,
                received_ms,
            })
        }
        TopicKind::Events => {
            metrics.messages_events.fetch_add(1, Ordering::Relaxed);
            parse_events(payload, limits, received_ms).map(|(batch, events)| Item::Events {
                device: device.clone(),
                batch,
                events,
                received_ms,
            })
        }
        TopicKind::Ack
        | TopicKind::Errors
        | TopicKind::Live
        | TopicKind::Alerts
        | TopicKind::Gaps => {
            metrics.messages_other.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    Some(result.unwrap_or_else(|reject| Item::Rejected {
        device: Some(device),
        topic: topic.to_string(),
        reject,
        received_ms,
    }))
}

/// The reject of a message over the device's rate limit.
fn rate_limited(limits: &Limits) -> Reject {
    Reject::RateLimited {
        per_s: limits.device_messages_per_s,
        burst: limits.device_burst,
    }
}
