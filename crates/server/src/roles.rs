//! The roles and `serve`: each role's tasks run under one [`Supervisor`].
//! `serve` starts the embedded broker, the ingestor, the web service and,
//! with `--statsd`, the statsd listener (a source of the ingestor's writer)
//! and, with `[graphite]`, the Graphite export in one process; `ingest` and `web` run one role against an external broker
//! and database. Roles talk only through MQTT and the database, even in
//! one process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::policy::{Policy, SERVER_USER};
use crate::broker::retained::RetainedSink;
use crate::config::Database;
use crate::config::roles::AuthMode;
use crate::ingest::{self, IngestConfig};
use crate::metrics::{Metrics, Roles};
use crate::store::{self, Store};
use crate::supervisor::Supervisor;
use crate::{broker, web};
use crate::{sinks, sources};

/// How long roles get to drain after a shutdown request.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Longest wait between reconnect attempts to the broker.
pub const RECONNECT_CAP: Duration = Duration::from_secs(10);

/// Errors that stop a role.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error("HTTP listen address {addr}: {source}; choose another with --http-listen")]
    HttpBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("statsd listen address {addr}: {source}; choose another with --statsd")]
    StatsdBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    #[error("a role panicked: {0}")]
    Join(#[from] tokio::task::JoinError),
}

use crate::config::http_tls::HttpTls;
pub use crate::config::roles::{ServeConfig, WebConfig};

/// A running `serve`: the bound addresses and the handle to wait on.
pub struct Running {
    pub http_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    /// The MQTT 5 listener, if broker.toml has one.
    pub mqtt5_addr: Option<SocketAddr>,
    /// The MQTT-over-TLS listeners, if broker.toml has any.
    pub mqtt_tls_addrs: Vec<SocketAddr>,
    /// The statsd listener's UDP address, if `--statsd` is on.
    pub statsd_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    pub store: Store,
    tasks: Supervisor<ServeError>,
}

impl Running {
    /// Asks every role to stop (same as SIGTERM).
    pub fn shutdown(&self) {
        self.tasks.shutdown();
    }

    /// Waits for the roles to finish. The first role to fail stops the
    /// others; after a shutdown request they get [`DRAIN_DEADLINE`].
    pub async fn wait(self) -> Result<(), ServeError> {
        let result = self.tasks.wait().await;
        self.store.close().await;
        result
    }
}

/// Starts broker, ingestor and web service; returns once all listen.
pub async fn start_serve(
    cfg: ServeConfig,
    shutdown: CancellationToken,
) -> Result<Running, ServeError> {
    let store = Store::open(&cfg.database).await?;
    info!(database = %cfg.database, "database open");
    let listener =
        TcpListener::bind(cfg.http_listen)
            .await
            .map_err(|source| ServeError::HttpBind {
                addr: cfg.http_listen,
                source,
            })?;
    let http_addr = listener.local_addr().map_err(ServeError::Http)?;
    let statsd = match &cfg.statsd {
        Some(s) => {
            let bind_err = |source| ServeError::StatsdBind {
                addr: s.listen,
                source,
            };
            let socket = sources::statsd::bind(s).await.map_err(bind_err)?;
            let addr = socket.local_addr().map_err(bind_err)?;
            Some((socket, addr, s.clone()))
        }
        None => None,
    };
    let statsd_addr = statsd.as_ref().map(|(_, addr, _)| *addr);
    let metrics = Arc::new(Metrics::for_roles(Roles::ALL));
    metrics.bridge.enabled.store(
        !cfg.ws_bridges.is_empty(),
        std::sync::atomic::Ordering::Relaxed,
    );
    // Its counters are on /metrics from the start, not from its first packet.
    metrics
        .statsd
        .enabled
        .store(statsd.is_some(), std::sync::atomic::Ordering::Relaxed);
    // The ingestor and the web bridge log in as the server: only it may
    // publish acks, live data and error reports.
    let server_password = cfg
        .server_password
        .clone()
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    let credentials = Some((SERVER_USER.to_string(), server_password.clone()));
    let accounts = broker_accounts(&cfg, &store).await?;
    let policy = Arc::new(Policy::new(
        server_password,
        accounts,
        cfg.broker.observers.clone(),
        metrics.clone(),
    ));
    let follow_policy = policy.clone();
    // Retained messages (every device's last status) survive a restart.
    let retained = Arc::new(RetainedSink::default());
    let mut broker_cfg = cfg.broker.clone();
    broker_cfg.rumqttd.router.initial_retained = broker::retained::load(&store).await?;
    broker_cfg.rumqttd.router.retained_hook = Some(retained.hook());
    broker_cfg.rumqttd.router.dropped_hook = Some(broker::dropped_hook(metrics.clone()));
    let broker::Listening {
        mqtt: mqtt_addr,
        mqtt5: mqtt5_addr,
        tls: mqtt_tls_addrs,
        revalidator,
    } = tokio::task::spawn_blocking(move || broker::start(broker_cfg, policy)).await??;

    let mut tasks = Supervisor::new(shutdown.clone(), DRAIN_DEADLINE);
    let writer = broker::retained::run(retained, store.clone(), shutdown.clone());
    tasks.spawn("retained", async move { Ok(writer.await?) });
    if follow_policy.credentials_on() {
        let follow =
            broker::accounts::follow(follow_policy, store.clone(), revalidator, shutdown.clone());
        tasks.spawn("accounts", async move { Ok(follow.await?) });
    }
    let target = broker::connect_addr(mqtt_addr);
    let mut ingest_cfg = IngestConfig::new(target.ip().to_string(), target.port());
    ingest_cfg.retention = cfg.retention;
    ingest_cfg.limits = cfg.limits;
    ingest_cfg.credentials = credentials.clone();
    let (ready_tx, mut ready) = watch::channel(false);
    // One writer stores what every source sends into its queue.
    let (queue, queued) = ingest::queue(&ingest_cfg);
    let queue_for_bridges = queue.clone();
    if let Some((socket, _, statsd_cfg)) = statsd {
        let listen = sources::statsd::run(
            socket,
            statsd_cfg,
            queue.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        tasks.spawn("statsd", async move {
            listen.await;
            Ok(())
        });
    }
    let ingest = ingest::run_with_queue(
        ingest_cfg,
        store.clone(),
        metrics.clone(),
        shutdown.clone(),
        ready_tx,
        queue,
        queued,
    );
    tasks.spawn("ingest", async move { Ok(ingest.await?) });
    spawn_ws_bridges(&mut tasks, &cfg.ws_bridges, &queue_for_bridges, &metrics);
    drop(queue_for_bridges);
    if let Some(graphite) = cfg.graphite.clone() {
        let export =
            sinks::graphite::run(graphite, store.clone(), metrics.clone(), shutdown.clone());
        tasks.spawn("graphite", async move { Ok(export.await?) });
    }
    let bridge = sinks::live::BridgeConfig {
        broker: Some((target.ip().to_string(), target.port())),
        credentials,
        poll: Duration::from_secs(1),
    };
    let https = cfg.http_tls.is_some();
    tasks.spawn(
        "web",
        serve_http(
            listener,
            cfg.http_tls.clone(),
            store.clone(),
            metrics.clone(),
            bridge,
            WebExtras {
                api_token: cfg.api_token.clone(),
                alerting: cfg.alerting.clone(),
                presence: cfg.presence.clone(),
            },
            shutdown.clone(),
        ),
    );
    // Messages published before the ingestor subscribes are dropped by the
    // broker (devices resend them after their ack timeout); wait for the
    // subscription so "serving" means data is being stored.
    if tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
        .await
        .is_err()
    {
        warn!("the ingestor has not subscribed to the broker after 10 s; continuing");
    }
    info!(http = %http_addr, https, mqtt = %mqtt_addr, mqtt5 = ?mqtt5_addr, mqtt_tls = ?mqtt_tls_addrs, statsd = ?statsd_addr, "widgetry serving");
    Ok(Running {
        http_addr,
        mqtt_addr,
        mqtt5_addr,
        mqtt_tls_addrs,
        statsd_addr,
        metrics,
        store,
        tasks,
    })
}

/// Runs `serve` until `shutdown` is cancelled.
/// The broker's accounts, or None when authentication is off (see
/// [`AuthMode`]); says at start what was decided and, when no account
/// exists yet, how to add one.
async fn broker_accounts(
    cfg: &ServeConfig,
    store: &Store,
) -> Result<Option<broker::accounts::Accounts>, ServeError> {
    let plain = crate::config::device_credentials(&cfg.broker.rumqttd);
    let stored = store.accounts().await?;
    let listeners = crate::config::listen_addrs(&cfg.broker.rumqttd);
    let exposed: Vec<String> = listeners
        .iter()
        .filter(|a| !a.ip().is_loopback())
        .map(|a| a.to_string())
        .collect();
    let have = plain.as_ref().map_or(0, |p| p.len()) + stored.len();
    let on = match cfg.auth {
        AuthMode::Required => true,
        AuthMode::Off => false,
        AuthMode::Auto => !exposed.is_empty() || plain.is_some() || !stored.is_empty(),
    };
    if !on {
        if have > 0 {
            warn!(
                accounts = have,
                "MQTT authentication is off (--auth off): accounts are not checked and anyone may connect"
            );
        } else {
            info!(
                "MQTT authentication is off: every listener is loopback-only and no account exists (--auth required turns it on)"
            );
        }
        return Ok(None);
    }
    let mqtt = cfg.broker.mqtt_listen;
    if have == 0 {
        let why = if exposed.is_empty() {
            "--auth required".to_string()
        } else {
            format!("{} not loopback-only", exposed.join(", "))
        };
        warn!(
            "MQTT authentication is on ({why}) and no device has an account yet, so no device can connect. \
             Add one with `widgetry device add DEVICE --database {db}` (it prints the password once), \
             then start its agent with `WIDGETRY_MQTT_USERNAME=DEVICE WIDGETRY_MQTT_PASSWORD=<password> \
             widgetry-agent --device DEVICE --broker HOST:{port}`; on a trusted network, `serve --auth off` lets anyone in",
            db = cfg.database,
            port = mqtt.port(),
        );
    }
    Ok(Some(broker::accounts::Accounts::new(
        plain.unwrap_or_default(),
        &stored,
    )))
}

pub async fn run_serve(cfg: ServeConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    start_serve(cfg, shutdown).await?.wait().await
}

/// Starts one task per websocket bridge, each sending into a clone of the
/// writer's queue `queue`.
fn spawn_ws_bridges(
    tasks: &mut Supervisor<ServeError>,
    bridges: &[crate::config::roles::WsBridgeConfig],
    queue: &tokio::sync::mpsc::Sender<sources::Item>,
    metrics: &Arc<Metrics>,
) {
    for bridge in bridges {
        let run = sources::ws::run(
            bridge.clone(),
            queue.clone(),
            metrics.clone(),
            tasks.token(),
        );
        tasks.spawn("bridge-ws", async move {
            run.await;
            Ok(())
        });
    }
}

/// Runs `widgetry bridge ws`: the bridge and its own writer on the
/// database (no MQTT: web roles find its commits in the database), with
/// `/metrics` on `metrics_listen` when given.
pub async fn run_bridge(
    role: crate::config::cli::BridgeRole,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let store = Store::open(&role.database).await?;
    info!(database = %role.database, "database open");
    let metrics = Arc::new(Metrics::for_roles(Roles::INGEST));
    metrics
        .bridge
        .enabled
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let mut tasks = Supervisor::new(shutdown.clone(), DRAIN_DEADLINE);
    spawn_metrics_endpoint(&mut tasks, role.metrics_listen, &metrics, &shutdown).await?;
    let (queue, writer) = start_writer(&store, &metrics);
    spawn_ws_bridges(
        &mut tasks,
        std::slice::from_ref(&role.bridge),
        &queue,
        &metrics,
    );
    // The writer stops once every bridge has dropped its sender.
    drop(queue);
    tasks.spawn("ingest", async move { Ok(writer.finish().await?) });
    let res = tasks.wait().await;
    store.close().await;
    res
}

/// Runs `widgetry statsd`: the statsd listener and its own writer on the
/// database (no MQTT, like `bridge ws`), with `/metrics` on
/// `metrics_listen` when given.
pub async fn run_statsd(
    role: crate::config::cli::StatsdRole,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let bind_err = |source| ServeError::StatsdBind {
        addr: role.statsd.listen,
        source,
    };
    let socket = sources::statsd::bind(&role.statsd)
        .await
        .map_err(bind_err)?;
    let store = Store::open(&role.database).await?;
    info!(database = %role.database, "database open");
    let metrics = Arc::new(Metrics::for_roles(Roles::INGEST));
    metrics
        .statsd
        .enabled
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let mut tasks = Supervisor::new(shutdown.clone(), DRAIN_DEADLINE);
    spawn_metrics_endpoint(&mut tasks, role.metrics_listen, &metrics, &shutdown).await?;
    let (queue, writer) = start_writer(&store, &metrics);
    let listen = sources::statsd::run(
        socket,
        role.statsd,
        queue,
        metrics.clone(),
        shutdown.clone(),
    );
    tasks.spawn("statsd", async move {
        listen.await;
        Ok(())
    });
    // The writer stops once the listener has dropped its sender.
    tasks.spawn("ingest", async move { Ok(writer.finish().await?) });
    let res = tasks.wait().await;
    store.close().await;
    res
}

/// The ingest writer of a source role without a broker (`bridge ws`,
/// `statsd`): only its limits, batching and retention (off) apply.
fn start_writer(
    store: &Store,
    metrics: &Arc<Metrics>,
) -> (
    tokio::sync::mpsc::Sender<sources::Item>,
    ingest::WriterTasks,
) {
    let ingest_cfg = IngestConfig::new("127.0.0.1", 1);
    let (queue, queued) = ingest::queue(&ingest_cfg);
    let writer =
        ingest::WriterTasks::start(&ingest_cfg, store.clone(), metrics.clone(), queued, false);
    (queue, writer)
}

/// Serves `metrics` as Prometheus text on `GET /metrics` at `addr`, if
/// given (the source roles' only HTTP).
async fn spawn_metrics_endpoint(
    tasks: &mut Supervisor<ServeError>,
    addr: Option<SocketAddr>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<(), ServeError> {
    let Some(addr) = addr else {
        return Ok(());
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::HttpBind { addr, source })?;
    info!(metrics = %listener.local_addr().map_err(ServeError::Http)?, "metrics listening");
    let m = metrics.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = m.clone();
            async move { m.render() }
        }),
    );
    let stop = shutdown.clone();
    tasks.spawn("metrics", async move {
        web::server::serve(listener, app, None, stop).await;
        Ok(())
    });
    Ok(())
}

/// Runs the ingest role alone against an external broker.
pub async fn run_ingest(
    cfg: IngestConfig,
    database: Database,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let store = Store::open(&database).await?;
    // The ingest role alone serves no HTTP: its counters are not exposed.
    let metrics = Arc::new(Metrics::for_roles(Roles::INGEST));
    let (ready, _) = watch::channel(false);
    let mut tasks = Supervisor::new(shutdown.clone(), DRAIN_DEADLINE);
    let ingest = ingest::run(cfg, store.clone(), metrics, shutdown, ready);
    tasks.spawn("ingest", async move { Ok(ingest.await?) });
    let res = tasks.wait().await;
    store.close().await;
    res
}

/// Runs the web role alone; its live bridge follows `cfg.bridge`.
pub async fn run_web(cfg: WebConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    let store = Store::open(&cfg.database).await?;
    let listener =
        TcpListener::bind(cfg.http_listen)
            .await
            .map_err(|source| ServeError::HttpBind {
                addr: cfg.http_listen,
                source,
            })?;
    info!(http = %listener.local_addr().map_err(ServeError::Http)?, https = cfg.http_tls.is_some(), "web service listening");
    let mut tasks = Supervisor::new(shutdown.clone(), DRAIN_DEADLINE);
    tasks.spawn(
        "web",
        serve_http(
            listener,
            cfg.http_tls,
            store.clone(),
            Arc::new(Metrics::for_roles(Roles::WEB)),
            cfg.bridge,
            WebExtras {
                api_token: cfg.api_token,
                alerting: cfg.alerting,
                presence: cfg.presence,
            },
            shutdown,
        ),
    );
    let res = tasks.wait().await;
    store.close().await;
    res
}

/// What the web service takes besides its listener, store and bridge.
struct WebExtras {
    /// When set, the API and /metrics require it.
    api_token: Option<String>,
    /// `[[rules]]` and `[alerts]`.
    alerting: crate::config::roles::AlertingConfig,
    /// `[presence]`.
    presence: crate::presence::PresenceConfig,
}

async fn serve_http(
    listener: TcpListener,
    tls: Option<HttpTls>,
    store: Store,
    metrics: Arc<Metrics>,
    bridge: sinks::live::BridgeConfig,
    extras: WebExtras,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let WebExtras {
        api_token,
        alerting,
        presence,
    } = extras;
    let hub = sinks::live::Hub::new(store.last_commit_id().await?);
    crate::rules::run::apply_config_rules(&store, &alerting.rules).await?;
    let rules = crate::rules::run::RuleSet::load(&store).await?;
    let alert_broker = bridge
        .broker
        .clone()
        .map(|(host, port)| (host, port, bridge.credentials.clone()));
    let bridge_task = tokio::spawn(sinks::live::run_bridge(
        bridge,
        store.clone(),
        hub.clone(),
        shutdown.clone(),
    ));
    let intervals = crate::presence::Intervals::default();
    let presence_task = tokio::spawn(crate::presence::run(
        store.clone(),
        hub.clone(),
        presence.clone(),
        intervals.clone(),
        Duration::from_secs(1),
        shutdown.clone(),
    ));
    let webhook = alerting
        .webhook
        .map(|u| crate::rules::webhook::Webhook::start(u, metrics.clone(), shutdown.clone()));
    let alerts_task = tokio::spawn(crate::rules::run::run(
        store.clone(),
        hub.clone(),
        rules.clone(),
        (presence.clone(), intervals),
        crate::rules::run::Outputs {
            broker: alert_broker,
            webhook: webhook.as_ref().map(|(w, _)| w.clone()),
        },
        metrics.clone(),
        shutdown.clone(),
    ));
    metrics
        .http_tls
        .enabled
        .store(tls.is_some(), std::sync::atomic::Ordering::Relaxed);
    let app = web::app(web::AppState {
        store,
        metrics: metrics.clone(),
        hub,
        shutdown: shutdown.clone(),
        overview: Default::default(),
        api_token: api_token.map(Arc::from),
        presence,
        rules,
    });
    let tls = tls.map(|t| web::server::Tls {
        acceptor: tokio_rustls::TlsAcceptor::from(t.config),
        metrics,
    });
    web::server::serve(listener, app, tls, shutdown).await;
    bridge_task.await??;
    presence_task.await?;
    alerts_task.await??;
    if let Some((_, task)) = webhook {
        task.await?;
    }
    info!("web service stopped");
    Ok(())
}
