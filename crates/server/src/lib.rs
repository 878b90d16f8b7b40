//! Widgetry server: the embedded broker, the ingestor and the web service,
//! runnable together (`serve`) or one role per process (`ingest`, `web`).
//!
//! Roles talk to each other only through MQTT and the database, even when
//! they share this process. `main.rs` parses arguments and calls into here;
//! tests call the same functions.

pub mod apiload;
pub mod broker;
pub mod config;
pub mod ingest;
pub mod live;
pub mod loadgen;
pub mod metrics;
pub mod rollup;
pub mod store;
pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{BrokerConfig, Database};
use crate::ingest::IngestConfig;
use crate::metrics::Metrics;
use crate::store::Store;

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
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    #[error("a role panicked: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Configuration of `widgetry serve`, already validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub broker: BrokerConfig,
    pub http_listen: SocketAddr,
    pub database: Database,
    pub retention: ingest::Retention,
}

/// A running `serve`: the bound addresses and the handle to wait on.
pub struct Running {
    pub http_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub store: Store,
    shutdown: CancellationToken,
    tasks: JoinSet<Result<(), ServeError>>,
}

impl Running {
    /// Asks every role to stop (same as SIGTERM).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for the roles to finish. The first role to fail stops the
    /// others; after a shutdown request they get [`DRAIN_DEADLINE`].
    pub async fn wait(mut self) -> Result<(), ServeError> {
        let mut result = Ok(());
        loop {
            let next = if self.shutdown.is_cancelled() {
                match tokio::time::timeout(DRAIN_DEADLINE, self.tasks.join_next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        warn!(
                            remaining = self.tasks.len(),
                            "roles did not drain within {DRAIN_DEADLINE:?}; stopping them"
                        );
                        self.tasks.abort_all();
                        break;
                    }
                }
            } else {
                self.tasks.join_next().await
            };
            let Some(joined) = next else { break };
            let outcome = joined.map_err(ServeError::from).and_then(|r| r);
            if let Err(e) = outcome {
                error!(error = %e, "role failed; shutting down");
                self.shutdown.cancel();
                if result.is_ok() {
                    result = Err(e);
                }
            } else if !self.shutdown.is_cancelled() {
                // A role ended on its own: stop the rest too.
                self.shutdown.cancel();
            }
        }
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
    let mqtt_addr = cfg.broker.mqtt_listen;
    let broker_cfg = cfg.broker.clone();
    tokio::task::spawn_blocking(move || broker::start(broker_cfg)).await??;

    let metrics = Arc::new(Metrics::default());
    let mut tasks = JoinSet::new();
    let target = broker::connect_addr(mqtt_addr);
    let mut ingest_cfg = IngestConfig::new(target.ip().to_string(), target.port());
    ingest_cfg.retention = cfg.retention;
    let ingest = ingest::run(ingest_cfg, store.clone(), metrics.clone(), shutdown.clone());
    tasks.spawn(async move { Ok(ingest.await?) });
    let bridge = live::BridgeConfig {
        broker: Some((target.ip().to_string(), target.port())),
        credentials: None,
        poll: Duration::from_secs(1),
    };
    tasks.spawn(serve_http(
        listener,
        store.clone(),
        metrics.clone(),
        bridge,
        shutdown.clone(),
    ));
    // Messages published before the ingestor subscribes are dropped by the
    // broker (devices resend them after their ack timeout); wait for the
    // subscription so "serving" means data is being stored.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metrics
        .ingest_subscribed
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        if tokio::time::Instant::now() > deadline {
            warn!("the ingestor has not subscribed to the broker after 10 s; continuing");
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    info!(http = %http_addr, mqtt = %mqtt_addr, "widgetry serving");
    Ok(Running {
        http_addr,
        mqtt_addr,
        metrics,
        store,
        shutdown,
        tasks,
    })
}

/// Runs `serve` until `shutdown` is cancelled.
pub async fn run_serve(cfg: ServeConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    start_serve(cfg, shutdown).await?.wait().await
}

/// Runs the ingest role alone against an external broker.
pub async fn run_ingest(
    cfg: IngestConfig,
    database: Database,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let store = Store::open(&database).await?;
    let metrics = Arc::new(Metrics::default());
    let res = ingest::run(cfg, store.clone(), metrics, shutdown).await;
    store.close().await;
    Ok(res?)
}

/// Runs the web role alone; its live bridge follows `bridge`.
pub async fn run_web(
    http_listen: SocketAddr,
    database: Database,
    bridge: live::BridgeConfig,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let store = Store::open(&database).await?;
    let listener = TcpListener::bind(http_listen)
        .await
        .map_err(|source| ServeError::HttpBind {
            addr: http_listen,
            source,
        })?;
    info!(http = %listener.local_addr().map_err(ServeError::Http)?, "web service listening");
    let res = serve_http(
        listener,
        store.clone(),
        Arc::new(Metrics::default()),
        bridge,
        shutdown,
    )
    .await;
    store.close().await;
    res
}

async fn serve_http(
    listener: TcpListener,
    store: Store,
    metrics: Arc<Metrics>,
    bridge: live::BridgeConfig,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let hub = live::Hub::new(store.last_commit_id().await?);
    let bridge_task = tokio::spawn(live::run_bridge(
        bridge,
        store.clone(),
        hub.clone(),
        shutdown.clone(),
    ));
    let app = web::router(web::AppState {
        store,
        metrics,
        hub,
        shutdown: shutdown.clone(),
        overview: Default::default(),
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(ServeError::Http);
    bridge_task.await??;
    served?;
    info!("web service stopped");
    Ok(())
}
