//! The Widgetry collector agent: samples the device, batches samples into
//! protobuf `Batch`es, publishes them at QoS 1 and keeps each batch until
//! the server acknowledges it on `widgetry/v1/{device}/ack`.
//!
//! Footprint matters more than anything here: one current-thread runtime,
//! TLS only with `--ca-file` (and only in builds with the `tls` feature,
//! `tls.rs`), no allocation per sample beyond the batch vectors. The agent must
//! never drop a batch silently: a batch leaves the outbox only when it is
//! acknowledged or when the outbox is full, and then it is counted.

pub mod conf;
pub mod disk;
pub mod local;
pub mod outbox;
pub mod procs;
pub mod sampler;
pub mod settings;
pub mod spool;
pub mod system;
pub mod tls;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use widgetry_proto::json::{Ack, ErrorReport, State, Status};
use widgetry_proto::{BatchBuilder, SeriesKey, SessionId, Topic, TopicKind};

use crate::outbox::Outbox;
use crate::sampler::Sampler;
use crate::spool::Spool;

/// Agent settings (validated by `settings::build` before anything connects).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub broker_host: String,
    pub broker_port: u16,
    pub device: String,
    pub credentials: Option<(String, String)>,
    /// MQTT over TLS, verifying the broker against a CA file; None: plain.
    pub tls: Option<tls::ClientTls>,
    /// Sampling interval.
    pub interval: Duration,
    /// A batch is published when it holds this many samples...
    pub batch_max_samples: usize,
    /// ...or when its encoded size may exceed this many bytes (series
    /// definitions not counted)...
    pub batch_max_bytes: usize,
    /// ...or when its oldest sample is this old.
    pub batch_max_wait: Duration,
    /// A sent batch not acknowledged within this time is sent again.
    pub ack_timeout: Duration,
    /// Directory of the disk spool (created if missing).
    pub spool_dir: PathBuf,
    /// Most bytes the spool may hold; beyond it the oldest batches are
    /// dropped and reported as gaps.
    pub spool_max_bytes: u64,
    /// Most batches in flight (sent, not yet acknowledged) at once.
    pub window: usize,
    /// Processes to watch (by name or pid).
    pub watch: Vec<sampler::Target>,
    /// System inputs to collect (`--inputs`).
    pub inputs: Vec<system::Input>,
    /// Unix datagram socket for the local app protocol, if enabled.
    pub events_socket: Option<PathBuf>,
    /// Loopback UDP address for the local app protocol, if enabled.
    pub events_udp: Option<std::net::SocketAddr>,
    /// Most app events queued for publishing; the oldest is dropped beyond it.
    pub events_queue: usize,
    /// UDP address of the statsd listener, if enabled.
    pub statsd: Option<std::net::SocketAddr>,
    /// statsd aggregation interval.
    pub statsd_flush: Duration,
    /// Test hook: added to every spool fsync, standing for a slow disk.
    #[doc(hidden)]
    pub test_fsync_delay: Duration,
}

impl AgentConfig {
    /// Defaults for `device` publishing to `host:port`.
    pub fn new(host: impl Into<String>, port: u16, device: impl Into<String>) -> Self {
        AgentConfig {
            broker_host: host.into(),
            broker_port: port,
            device: device.into(),
            credentials: None,
            tls: None,
            interval: Duration::from_secs(1),
            batch_max_samples: 300,
            batch_max_bytes: 256 * 1024,
            batch_max_wait: Duration::from_secs(4),
            ack_timeout: Duration::from_secs(10),
            spool_dir: PathBuf::from("widgetry-spool"),
            spool_max_bytes: 64 * 1024 * 1024,
            window: 64,
            watch: Vec::new(),
            inputs: system::Input::ALL.to_vec(),
            events_socket: None,
            events_udp: None,
            events_queue: 10_000,
            statsd: None,
            statsd_flush: Duration::from_secs(10),
            test_fsync_delay: Duration::ZERO,
        }
    }
}

/// What a finished run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Samples taken by this run.
    pub samples_taken: u64,
    /// Unacknowledged batches of earlier runs found in the spool at start.
    pub batches_recovered: u64,
    pub batches_acked: u64,
    /// Samples in the batches the server acknowledged during this run
    /// (including recovered batches of earlier runs).
    pub samples_acked: u64,
    /// Batches and samples lost because the spool was full (reported to
    /// the server as gaps).
    pub batches_dropped: u64,
    pub samples_dropped: u64,
    /// Batches still in the spool at exit (sent by the next run).
    pub batches_unacked: u64,
    /// App events dropped because the local queue was full, and local
    /// protocol lines that did not parse.
    pub events_dropped: u64,
    pub local_bad_lines: u64,
    /// Acks ignored because they covered seqs this run never published
    /// (forged or misaddressed: a real server never sends one).
    pub acks_ignored: u64,
    /// statsd lines that did not parse, and metrics or values the statsd
    /// aggregator dropped (memory budget full, or not finite).
    pub statsd_bad_lines: u64,
    pub statsd_dropped: u64,
    /// Spool fsyncs done by the disk thread, and the time they took.
    pub spool_syncs: u64,
    pub spool_sync_time: Duration,
    /// The longest time the event loop spent on one wake-up (what a
    /// keep-alive, an ack or a datagram could have waited for it).
    pub longest_stall: Duration,
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read system statistics: {0}")]
    Sampler(String),
    #[error("cannot encode the status message: {0}")]
    Encode(String),
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error("local protocol socket {what}: {source}")]
    LocalBind {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("statsd listener {addr}: {source}; choose another address with --statsd")]
    StatsdBind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The agent's version, reported in its status.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn status(cfg_session: SessionId, state: State) -> Result<Vec<u8>, AgentError> {
    let now = now_ms();
    let st = Status {
        state,
        session: Some(cfg_session),
        agent: Some(format!("widgetry-agent/{VERSION}")),
        host: procs::host_name(),
        boot_time: procs::boot_time().map(|s| s as i64 * 1000),
        ts: Some(now),
    };
    serde_json::to_vec(&st).map_err(|e| AgentError::Encode(e.to_string()))
}

pub use widgetry_common::now_ms;

/// Longest wait between reconnect attempts.
const RECONNECT_CAP: Duration = Duration::from_secs(30);

/// Runs the agent until `shutdown` resolves; then publishes what it has,
/// waits up to `drain` for acknowledgements, marks itself offline and
/// disconnects.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> Result<Report, AgentError> {
    let session = SessionId::generate();
    let status_topic = Topic::name(&cfg.device, TopicKind::Status);
    let samples_topic = Topic::name(&cfg.device, TopicKind::Samples);
    let ack_topic = Topic::name(&cfg.device, TopicKind::Ack);
    let errors_topic = Topic::name(&cfg.device, TopicKind::Errors);

    let mut opts = MqttOptions::new(
        format!("widgetry-agent-{}", cfg.device),
        cfg.broker_host.clone(),
        cfg.broker_port,
    );
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
    opts.set_last_will(LastWill::new(
        &status_topic,
        status(session, State::Offline)?,
        QoS::AtLeastOnce,
        true,
    ));
    if let Some((u, p)) = &cfg.credentials {
        opts.set_credentials(u.clone(), p.clone());
    }
    #[cfg(feature = "tls")]
    if let Some(tls) = &cfg.tls {
        opts.set_transport(tls.transport());
    }
    let (client, events) = widgetry_common::mqtt_client(opts, cfg.window * 2 + 16);
    // The event loop runs in its own task: `poll()` must never be cancelled
    // mid-handshake by another select! branch, or the connection is torn
    // down and made again (and rumqttd then loses the new connection's will).
    let (link_tx, mut link) = mpsc::channel(256);
    let topics = Topics {
        status: status_topic.clone(),
        ack: ack_topic,
        errors: errors_topic,
    };
    let target = Target {
        host: cfg.broker_host.clone(),
        port: cfg.broker_port,
        tls: cfg.tls.clone(),
    };
    let conn = tokio::spawn(drive(events, topics.clone(), target, link_tx));

    let segment_bytes = (cfg.spool_max_bytes / 8).clamp(4096, 1 << 20);
    let (mut spool, recovery) = Spool::open_with(
        &cfg.spool_dir,
        cfg.spool_max_bytes,
        segment_bytes,
        cfg.test_fsync_delay,
    )?;
    let mut disk_events = spool.take_events();
    if recovery.batches > 0 || recovery.torn_bytes > 0 {
        eprintln!(
            "widgetry-agent: spool {}: {} unacknowledged batches from earlier runs will be sent first; {} bytes of torn records discarded",
            cfg.spool_dir.display(),
            recovery.batches,
            recovery.torn_bytes
        );
    }
    let statsd_sock = match cfg.statsd {
        Some(addr) => Some(
            tokio::net::UdpSocket::bind(addr)
                .await
                .map_err(|source| AgentError::StatsdBind { addr, source })?,
        ),
        None => None,
    };
    let local_unix = match &cfg.events_socket {
        Some(path) => {
            // A socket file left by an earlier run would make bind fail.
            if std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(path);
            }
            Some(
                tokio::net::UnixDatagram::bind(path).map_err(|source| AgentError::LocalBind {
                    what: path.display().to_string(),
                    source,
                })?,
            )
        }
        None => None,
    };
    let local_udp = match cfg.events_udp {
        Some(addr) => Some(tokio::net::UdpSocket::bind(addr).await.map_err(|source| {
            AgentError::LocalBind {
                what: addr.to_string(),
                source,
            }
        })?),
        None => None,
    };
    let mut events = local::EventQueue::new(cfg.events_queue);
    let mut local_buf = vec![0u8; if local_unix.is_some() { 65_536 } else { 0 }];
    let mut udp_buf = vec![0u8; if local_udp.is_some() { 65_536 } else { 0 }];
    // Bounded by its byte budget (widgetry_statsd::DEFAULT_MAX_BYTES).
    let mut statsd = widgetry_statsd::Aggregator::default();
    let mut statsd_buf = vec![0u8; if statsd_sock.is_some() { 65_536 } else { 0 }];
    // All timers share one start, so on an idle device they fall due
    // together: one wake-up instead of one per timer.
    let start = Instant::now();
    let mut statsd_tick = tokio::time::interval_at(start + cfg.statsd_flush, cfg.statsd_flush);
    statsd_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sampler = Sampler::new(&cfg.watch, &cfg.inputs).map_err(AgentError::Sampler)?;
    let mut outbox = Outbox::new(spool, session);
    let mut samples_taken = 0u64;
    let mut builder = BatchBuilder::default();
    let mut batch_started: Option<Instant> = None;
    let mut connected = false;

    let mut tick = tokio::time::interval_at(start, cfg.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Resend timeouts and due batches need a wake-up now and then: once a
    // second, at the sample tick's phase (each extra wake-up costs about as
    // much CPU as a sample: 250 ms here doubled the agent's CPU). The drain
    // at shutdown has its own faster tick below (with only this one it
    // missed the last ack in `two_shared_ingestors_on_mosquitto_survive_losing_one`).
    let mut housekeeping = tokio::time::interval_at(start, Duration::from_secs(1));
    housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(shutdown);

    let mut longest_stall = Duration::ZERO;
    loop {
        let wake = tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => Wake::Sample,
            _ = housekeeping.tick() => Wake::Housekeeping,
            Some(ev) = link.recv() => Wake::Link(ev),
            Some(ev) = recv_disk(&mut disk_events) => Wake::Disk(ev),
            r = recv_opt(statsd_sock.as_ref(), &mut statsd_buf), if statsd_sock.is_some() => Wake::Statsd(r),
            r = recv_unix(local_unix.as_ref(), &mut local_buf), if local_unix.is_some() => Wake::Local(r, false),
            r = recv_opt(local_udp.as_ref(), &mut udp_buf), if local_udp.is_some() => Wake::Local(r, true),
            _ = statsd_tick.tick(), if statsd_sock.is_some() => Wake::StatsdFlush,
        };
        let woke = Instant::now();
        match wake {
            Wake::Sample => {
                let ts = now_ms();
                sampler.sample(|key, value| {
                    let id = outbox.series_id(key);
                    builder.push(id, ts, value);
                    samples_taken += 1;
                });
                batch_started.get_or_insert_with(Instant::now);
            }
            Wake::Housekeeping => {}
            Wake::Link(ev) => {
                connected = on_link(ev, &client, &topics, session, &mut outbox, connected);
            }
            Wake::Disk(ev) => spool_result(outbox.on_disk(ev)),
            Wake::Statsd(r) => {
                if let Ok(n) = r {
                    statsd.ingest(&statsd_buf[..n]);
                }
            }
            Wake::Local(r, udp) => {
                if let Ok(n) = r {
                    let buf = if udp { &udp_buf[..n] } else { &local_buf[..n] };
                    on_local(buf, &mut events, |key, ts, value| {
                        let id = outbox.series_id(key);
                        builder.push(id, ts, value);
                        samples_taken += 1;
                    });
                    batch_started.get_or_insert_with(Instant::now);
                }
            }
            Wake::StatsdFlush => {
                let ts = now_ms();
                statsd.flush(cfg.statsd_flush.as_secs_f64(), |key, value| {
                    let id = outbox.series_id(&key);
                    builder.push(id, ts, value);
                    samples_taken += 1;
                });
                batch_started.get_or_insert_with(Instant::now);
            }
        }
        let full = builder.len() >= cfg.batch_max_samples
            || builder.max_encoded_len() + events.bytes() >= cfg.batch_max_bytes;
        let due = batch_started.is_some_and(|t| t.elapsed() >= cfg.batch_max_wait);
        if (!builder.is_empty() || !events.is_empty()) && (full || due) {
            seal(&mut outbox, &mut builder, &mut events, cfg.batch_max_bytes);
            // Events beyond one batch's bytes go in the next one, at once.
            batch_started = (!events.is_empty()).then(Instant::now);
        }
        if connected {
            spool_result(outbox.send(&client, &samples_topic, cfg.window, cfg.ack_timeout));
        }
        longest_stall = longest_stall.max(woke.elapsed());
    }

    // Drain: publish the partial batch, and gap reports that no batch has
    // carried yet (spooling a batch can itself drop older ones, hence the
    // loop), then wait for acknowledgements.
    for _ in 0..(3 + cfg.events_queue) {
        if builder.is_empty() && events.is_empty() && !outbox.has_pending_gaps() {
            break;
        }
        seal(&mut outbox, &mut builder, &mut events, cfg.batch_max_bytes);
    }
    let deadline = Instant::now() + drain;
    let mut drain_tick = tokio::time::interval(Duration::from_millis(100));
    drain_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while !outbox.is_empty() && Instant::now() < deadline {
        if connected {
            spool_result(outbox.send(&client, &samples_topic, cfg.window, cfg.ack_timeout));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = drain_tick.tick() => {}
            Some(ev) = recv_disk(&mut disk_events) => spool_result(outbox.on_disk(ev)),
            Some(ev) = link.recv() => {
                connected = on_link(ev, &client, &topics, session, &mut outbox, connected);
            }
        }
    }
    if connected {
        match status(session, State::Offline) {
            Ok(payload) => {
                let _ = client.try_publish(&status_topic, QoS::AtLeastOnce, true, payload);
            }
            Err(e) => eprintln!("widgetry-agent: {e}"),
        }
        let _ = client.try_disconnect();
    }
    drop(link);
    // The connection task ends once the DISCONNECT is written.
    let abort = conn.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), conn)
        .await
        .is_err()
    {
        abort.abort();
    }
    // What is spooled and unacknowledged is on disk before the agent
    // reports and exits, and the report counts every fsync (one under way
    // at the stop included).
    outbox.flush_spool().await;
    let (spool_syncs, spool_sync_time) = outbox.spool_syncs();
    Ok(Report {
        longest_stall,
        spool_syncs,
        spool_sync_time,
        samples_taken,
        batches_recovered: recovery.batches as u64,
        batches_acked: outbox.acked,
        samples_acked: outbox.acked_samples,
        batches_dropped: outbox.dropped_batches,
        samples_dropped: outbox.dropped_samples,
        batches_unacked: outbox.len() as u64,
        events_dropped: events.dropped,
        local_bad_lines: events.bad_lines,
        acks_ignored: outbox.acks_ignored,
        statsd_bad_lines: statsd.stats().bad_lines_total(),
        statsd_dropped: statsd.stats().dropped_total(),
    })
}

/// Spools the samples in `builder` and the queued events that fit the
/// batch's byte budget as the next batch.
fn seal(
    outbox: &mut Outbox,
    builder: &mut BatchBuilder,
    events: &mut local::EventQueue,
    max_bytes: usize,
) {
    let room = max_bytes.saturating_sub(builder.max_encoded_len());
    let evs = events.take(room, now_ms());
    spool_result(outbox.seal(builder, evs));
}

/// What woke the event loop.
enum Wake {
    Sample,
    Housekeeping,
    Link(Link),
    Disk(disk::DiskEvent),
    Statsd(std::io::Result<usize>),
    /// A local-protocol datagram: on the Unix socket, or (true) on UDP.
    Local(std::io::Result<usize>, bool),
    StatsdFlush,
}

/// The next report of the spool's disk thread.
async fn recv_disk(
    rx: &mut Option<mpsc::UnboundedReceiver<disk::DiskEvent>>,
) -> Option<disk::DiskEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Receives a datagram, or waits forever when there is no socket.
async fn recv_opt(sock: Option<&tokio::net::UdpSocket>, buf: &mut [u8]) -> std::io::Result<usize> {
    match sock {
        Some(s) => s.recv(buf).await,
        None => std::future::pending().await,
    }
}

/// Receives a datagram on the Unix socket, or waits forever without one.
async fn recv_unix(
    sock: Option<&tokio::net::UnixDatagram>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match sock {
        Some(s) => s.recv(buf).await,
        None => std::future::pending().await,
    }
}

/// Handles one local-protocol datagram: events are queued, samples handed
/// to `sample`, bad lines counted.
fn on_local(
    bytes: &[u8],
    events: &mut local::EventQueue,
    mut sample: impl FnMut(&SeriesKey, i64, f64),
) {
    for item in local::parse_datagram(bytes, now_ms()) {
        match item {
            Ok(local::Local::Event(e)) => events.push(e),
            Ok(local::Local::Sample(s)) => sample(&s.series, s.ts_ms, s.value),
            Err(_) => events.bad_lines += 1,
        }
    }
}

/// What the connection task reports to the main loop.
#[derive(Debug)]
enum Link {
    Connected,
    Disconnected,
    Ack(Vec<u8>),
    Error(Vec<u8>),
}

/// The device's own topics.
#[derive(Debug, Clone)]
struct Topics {
    status: String,
    ack: String,
    errors: String,
}

/// The broker, as named in messages about the connection.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
struct Target {
    host: String,
    port: u16,
    tls: Option<tls::ClientTls>,
}

impl Target {
    /// A failed connection attempt in words, when the user can act on it:
    /// the broker refused the login, or the TLS handshake failed.
    fn explain(&self, e: &rumqttc::ConnectionError) -> Option<String> {
        if let rumqttc::ConnectionError::ConnectionRefused(code) = e {
            return Some(refusal(*code));
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            return tls::explain(e, &self.host, self.port, tls);
        }
        None
    }
}

/// Drives the MQTT event loop, reconnecting with jittered backoff.
async fn drive(mut events: EventLoop, topics: Topics, target: Target, tx: mpsc::Sender<Link>) {
    let mut failures = 0u32;
    let mut last_problem: Option<String> = None;
    loop {
        let report = match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                failures = 0;
                Some(Link::Connected)
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topics.ack => {
                Some(Link::Ack(p.payload.to_vec()))
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topics.errors => {
                Some(Link::Error(p.payload.to_vec()))
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                // Flush the DISCONNECT before the socket is dropped.
                let _ = tokio::time::timeout(Duration::from_millis(500), events.poll()).await;
                return;
            }
            Ok(_) => None,
            Err(e) => {
                if let Some(problem) = target.explain(&e) {
                    // Said when the reason is new, then every 20th time.
                    if last_problem.as_ref() != Some(&problem) || failures.is_multiple_of(20) {
                        eprintln!("widgetry-agent: {problem}; retrying with backoff");
                    }
                    last_problem = Some(problem);
                }
                if tx.is_closed() {
                    // The main loop has finished: nobody to reconnect for.
                    return;
                }
                failures += 1;
                let _ = tx.send(Link::Disconnected).await;
                tokio::time::sleep(widgetry_common::backoff(failures, RECONNECT_CAP)).await;
                None
            }
        };
        if let Some(r) = report {
            // After the main loop has finished, keep polling until the
            // DISCONNECT is written.
            let _ = tx.send(r).await;
        }
    }
}

/// What a refused CONNECT means for this agent's user.
fn refusal(code: rumqttc::ConnectReturnCode) -> String {
    use rumqttc::ConnectReturnCode as C;
    match code {
        C::BadUserNamePassword => "the broker refused the login: bad username or password \
            (--username/--password or WIDGETRY_MQTT_USERNAME/WIDGETRY_MQTT_PASSWORD; \
            on the server, `widgetry device add DEVICE` makes an account and \
            `widgetry device rotate DEVICE` a new password)"
            .into(),
        C::NotAuthorized => "the broker refused the connection as not authorised: \
            it needs an account (--username, the device id, and --password), \
            or the client id belongs to another account"
            .into(),
        other => format!("the broker refused the connection ({other:?})"),
    }
}

/// Applies one connection event; returns the new connected state.
fn on_link(
    ev: Link,
    client: &AsyncClient,
    topics: &Topics,
    session: SessionId,
    outbox: &mut Outbox,
    connected: bool,
) -> bool {
    match ev {
        Link::Connected => {
            let _ = client.try_subscribe_many([
                rumqttc::SubscribeFilter::new(topics.ack.clone(), QoS::AtLeastOnce),
                rumqttc::SubscribeFilter::new(topics.errors.clone(), QoS::AtMostOnce),
            ]);
            match status(session, State::Online) {
                Ok(payload) => {
                    let _ = client.try_publish(&topics.status, QoS::AtLeastOnce, true, payload);
                }
                Err(e) => eprintln!("widgetry-agent: {e}"),
            }
            // Everything unacknowledged goes out again, in order.
            outbox.mark_all_unsent();
            true
        }
        Link::Disconnected => false,
        Link::Ack(payload) => {
            if let Ok(ack) = serde_json::from_slice::<Ack>(&payload) {
                spool_result(outbox.ack(&ack));
            }
            connected
        }
        Link::Error(payload) => {
            on_error_report(&payload, outbox);
            connected
        }
    }
}

/// Handles a report on `…/errors`: `unknown_series` heals the session
/// (the outbox resends with definitions); other reasons are printed once
/// per reason, since they mean this agent sent something the server
/// refuses.
fn on_error_report(payload: &[u8], outbox: &mut Outbox) {
    let Ok(report) = serde_json::from_slice::<ErrorReport>(payload) else {
        return;
    };
    match outbox.on_error(&report) {
        Ok(true) => {}
        Ok(false) => {
            if outbox.first_report_of(&report.code) {
                eprintln!(
                    "widgetry-agent: the server rejected a payload on {}: {} ({}); further reports with this reason are not printed",
                    report.topic.escape_debug(),
                    report
                        .message
                        .chars()
                        .take(300)
                        .collect::<String>()
                        .escape_debug(),
                    report.code.escape_debug()
                );
            }
        }
        Err(e) => eprintln!("widgetry-agent: {e}"),
    }
}

/// Spool failures (e.g. a full disk) do not stop sampling: the affected
/// batch is reported as a gap. Say so on stderr.
fn spool_result(r: Result<(), spool::SpoolError>) {
    if let Err(e) = r {
        eprintln!("widgetry-agent: {e}");
    }
}
