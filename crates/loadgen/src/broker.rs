//! Plain MQTT load for comparing brokers (any broker: the embedded one,
//! Mosquitto): many publishers into one subscriber, counting every message,
//! and many idle connections held open. Nothing here knows Widgetry's
//! topics; every run is bounded in messages, connections and time.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;

/// `fanin`: `publishers` clients each publish `messages` QoS 1 messages of
/// `payload` bytes to their own topic; one subscriber takes them all.
#[derive(Debug, Clone)]
pub struct FaninConfig {
    pub host: String,
    pub port: u16,
    pub publishers: usize,
    pub messages: u32,
    pub payload: usize,
    /// Unacknowledged publishes per publisher.
    pub inflight: u16,
    /// Give up after this long (the result then shows what was lost).
    pub timeout: Duration,
}

/// What a fan-in run delivered.
#[derive(Debug, Clone, Default)]
pub struct FaninReport {
    pub sent: u64,
    pub received_unique: u64,
    pub duplicates: u64,
    pub seconds: f64,
}

impl FaninReport {
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received_unique)
    }

    pub fn per_second(&self) -> f64 {
        self.received_unique as f64 / self.seconds.max(1e-9)
    }
}

fn options(id: String, host: &str, port: u16, inflight: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(inflight.max(1));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// Runs a fan-in; `progress` gets a line every second.
pub async fn fanin(cfg: FaninConfig, mut progress: impl FnMut(String)) -> FaninReport {
    let run_id = widgetry_common::now_ms() as u32;
    let run = format!("{run_id:08x}");
    // One filter for every run (a broker can size its log for it, e.g.
    // `[router.custom_segment."bench/+/+"]`); other runs' messages are told
    // apart by the run id in the payload.
    let filter = "bench/+/+".to_string();
    let total = cfg.publishers as u64 * cfg.messages as u64;
    let received = Arc::new(AtomicU64::new(0));
    let (done_tx, mut done_rx) = watch::channel(None::<(u64, u64)>);

    // The subscriber: counts unique (publisher, seq) pairs.
    let (sub, mut ev) = widgetry_common::mqtt_client(
        options(
            format!("bench-sub-{run}"),
            &cfg.host,
            cfg.port,
            cfg.inflight,
        ),
        1024,
    );
    let (ready_tx, mut ready_rx) = watch::channel(false);
    let count = received.clone();
    let sub_task = tokio::spawn(async move {
        let mut seen: HashSet<u64> = HashSet::with_capacity(total as usize);
        let mut dups = 0u64;
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(true);
                }
                Ok(Event::Incoming(Packet::Publish(p)))
                    if p.payload.get(8..12) != Some(&run_id.to_be_bytes()[..]) => {}
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let key = p
                        .payload
                        .get(..8)
                        .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()));
                    match key {
                        Some(k) if seen.insert(k) => {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => dups += 1,
                    }
                    if seen.len() as u64 >= total {
                        let _ = done_tx.send(Some((seen.len() as u64, dups)));
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    let _ = sub.subscribe(&filter, QoS::AtLeastOnce).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx.wait_for(|r| *r)).await;

    let start = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let mut pubs = Vec::new();
    for i in 0..cfg.publishers {
        let (client, mut ev) = widgetry_common::mqtt_client(
            options(
                format!("bench-pub-{run}-{i}"),
                &cfg.host,
                cfg.port,
                cfg.inflight,
            ),
            cfg.inflight as usize,
        );
        let poll = tokio::spawn(async move {
            loop {
                if ev.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let (topic, messages, size, sent) = (
            format!("bench/{run}/{i}"),
            cfg.messages,
            cfg.payload.max(8),
            sent.clone(),
        );
        let publish = tokio::spawn(async move {
            for seq in 0..messages {
                let mut payload = vec![0u8; size];
                let key = ((i as u64) << 32) | seq as u64;
                payload[..8].copy_from_slice(&key.to_be_bytes());
                payload[8..12].copy_from_slice(&run_id.to_be_bytes());
                if client
                    .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        });
        pubs.push((poll, publish));
    }

    let deadline = start + cfg.timeout;
    let mut last = 0;
    let result = loop {
        let tick = tokio::time::timeout(Duration::from_secs(1), done_rx.wait_for(|d| d.is_some()));
        if let Ok(Ok(d)) = tick.await {
            break *d;
        }
        let now = received.load(Ordering::Relaxed);
        progress(format!(
            "{:>5.1} s: {now} of {total} received ({}/s)",
            start.elapsed().as_secs_f64(),
            now - last
        ));
        last = now;
        if Instant::now() > deadline {
            break None;
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    for (poll, publish) in pubs {
        publish.abort();
        poll.abort();
    }
    sub_task.abort();
    let (unique, dups) = result.unwrap_or((received.load(Ordering::Relaxed), 0));
    FaninReport {
        // A message can arrive before its publisher counted it as sent.
        sent: sent.load(Ordering::Relaxed).max(unique),
        received_unique: unique,
        duplicates: dups,
        seconds,
    }
}

/// Opens `connections` idle MQTT connections (keep-alive `keep_alive`),
/// returns how many got a CONNACK, and holds them until `hold` has passed.
pub async fn idle(
    host: &str,
    port: u16,
    connections: usize,
    keep_alive: Duration,
    hold: Duration,
    mut progress: impl FnMut(String),
) -> usize {
    let connected = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(connections);
    let run = format!("{:08x}", widgetry_common::now_ms() as u32);
    for i in 0..connections {
        let mut o = MqttOptions::new(format!("idle-{run}-{i}"), host, port);
        o.set_keep_alive(keep_alive);
        let (client, mut ev) = widgetry_common::mqtt_client(o, 4);
        let connected = connected.clone();
        tasks.push(tokio::spawn(async move {
            let _client = client;
            let mut counted = false;
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) if !counted => {
                        counted = true;
                        connected.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
        }));
        // Pace the connects a little: a burst of thousands of SYNs at once
        // overflows the listener's backlog on any broker.
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let start = Instant::now();
    while (connected.load(Ordering::Relaxed) as usize) < connections
        && start.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        progress(format!(
            "{} of {connections} connected",
            connected.load(Ordering::Relaxed)
        ));
    }
    let n = connected.load(Ordering::Relaxed) as usize;
    progress(format!("{n} connected; holding them for {hold:?}"));
    tokio::time::sleep(hold).await;
    for t in tasks {
        t.abort();
    }
    n
}
