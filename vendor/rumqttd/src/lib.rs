use std::fmt;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::{collections::HashMap, path::Path};

use serde::{Deserialize, Serialize};
use tracing_subscriber::{
    filter::EnvFilter,
    fmt::{
        format::{Format, Pretty},
        Layer,
    },
    layer::Layered,
    reload::Handle,
    Registry,
};

pub use link::alerts;
pub use link::local;
pub use link::meters;
pub use router::{Alert, Forward, IncomingMeter, Meter, Notification, OutgoingMeter, Router};
use segments::Storage;
pub use server::{Broker, LinkType, Server};

pub use self::router::shared_subs::Strategy;

mod link;
pub mod protocol;
mod router;
mod segments;
mod server;

pub type ConnectionId = usize;
pub type RouterId = usize;
pub type NodeId = usize;
pub type Topic = String;
pub type Filter = String;
pub type TopicId = usize;
pub type Offset = (u64, u64);
pub type Cursor = (u64, u64);

pub type ClientId = String;
pub type AuthUser = String;
pub type AuthPass = String;
pub type AuthHandler = Arc<
    dyn Fn(ClientId, AuthUser, AuthPass) -> Pin<Box<dyn std::future::Future<Output = bool> + Send>>
        + Send
        + Sync,
>;

/// Who a connection is, fixed when its CONNECT is accepted: what an
/// [`Authoriser`] decides on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The client id the connection runs under (assigned by the broker
    /// when the client sent an empty one).
    pub client_id: String,
    /// The username of the CONNECT, if it carried one.
    pub username: Option<String>,
    /// True when the username and password were checked and accepted
    /// (by `auth` or the auth handler); false for an anonymous client.
    pub authenticated: bool,
    /// Serial number of the CONNECT's login, taken before its credentials
    /// were checked (see [`latest_login`]): an authoriser that revokes a
    /// username's credentials at [`latest_login`] can tell the
    /// connections that logged in with the old ones (serial at or below)
    /// from those that logged in afterwards.
    pub login: u64,
}

static LOGINS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The serial number the latest CONNECT's login got (0 before the first).
pub fn latest_login() -> u64 {
    LOGINS.load(std::sync::atomic::Ordering::SeqCst)
}

/// The next login's serial number.
pub(crate) fn next_login() -> u64 {
    LOGINS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
}

/// What a client asks the broker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// Publish on this topic (topic aliases already resolved).
    Publish { topic: &'a str, retain: bool },
    /// Subscribe with this filter (for `$share/{group}/{filter}`, the
    /// filter without the share prefix).
    Subscribe { filter: &'a str },
    /// Register a last will on this topic (decided at CONNECT).
    Will { topic: &'a str, retain: bool },
    /// Connect under this client id (decided at CONNECT, after the login;
    /// a denial refuses the connection, so it cannot take over the
    /// session of the client that has this id).
    Connect { client_id: &'a str },
}

/// Asks the router to put every connection to its authoriser again
/// ([`Action::Connect`] under its identity) and to disconnect those it now
/// denies: for credentials revoked while their clients are connected.
#[derive(Clone)]
pub struct Revalidator(flume::Sender<(ConnectionId, router::Event)>);

impl Revalidator {
    pub(crate) fn new(tx: flume::Sender<(ConnectionId, router::Event)>) -> Self {
        Revalidator(tx)
    }

    /// Queues the check; false when the router's queue is full or the
    /// router has stopped (try again later).
    pub fn revalidate(&self) -> bool {
        self.0.try_send((0, router::Event::Revalidate)).is_ok()
    }
}

impl std::fmt::Debug for Revalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Revalidator")
    }
}

/// Told of every CONNECT the broker refuses, with the CONNACK reason sent.
pub type RefusalHook = Arc<dyn Fn(protocol::ConnectReturnCode) + Send + Sync>;

/// Decides whether a client may do an action. Called on the router thread
/// for every publish and subscribe, so it must be quick and never block.
pub type Authoriser = Arc<dyn Fn(&ClientIdentity, Action<'_>) -> bool + Send + Sync>;

#[derive(Debug, Default, Serialize, Deserialize, Clone)]
pub struct Config {
    pub id: usize,
    pub router: RouterConfig,
    pub v4: Option<HashMap<String, ServerSettings>>,
    pub v5: Option<HashMap<String, ServerSettings>>,
    pub ws: Option<HashMap<String, ServerSettings>>,
    pub cluster: Option<ClusterSettings>,
    pub console: Option<ConsoleSettings>,
    pub bridge: Option<BridgeConfig>,
    pub prometheus: Option<PrometheusSetting>,
    pub metrics: Option<HashMap<MetricType, MetricSettings>>,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct PrometheusSetting {
    #[deprecated(note = "Use listen instead")]
    port: Option<u16>,
    listen: Option<SocketAddr>,
    // How frequently to update metrics
    interval: u64,
}

// TODO: Change names without _ until config-rs issue is resolved
// https://github.com/mehcode/config-rs/issues/369
#[derive(Debug, Serialize, Deserialize, Clone)]
#[serde(untagged)]
pub enum TlsConfig {
    Rustls {
        capath: Option<String>,
        certpath: String,
        keypath: String,
    },
    NativeTls {
        pkcs12path: String,
        pkcs12pass: String,
    },
}

impl TlsConfig {
    // Returns true only if all of the file paths inside `TlsConfig` actually exists on file system.
    // NOTE: This doesn't verify if certificate files are in required format or not.
    pub fn validate_paths(&self) -> bool {
        match self {
            TlsConfig::Rustls {
                capath,
                certpath,
                keypath,
            } => {
                let ca = capath.is_none() || capath.as_ref().is_some_and(|v| Path::new(v).exists());

                ca && [certpath, keypath].iter().all(|v| Path::new(v).exists())
            }
            TlsConfig::NativeTls { pkcs12path, .. } => Path::new(pkcs12path).exists(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct ServerSettings {
    pub name: String,
    pub listen: SocketAddr,
    /// A socket already bound (e.g. on port 0, so that the caller knows the
    /// port before the broker starts); the server listens on it instead of
    /// binding `listen`.
    #[serde(skip)]
    pub prebound: Option<PreboundListener>,
    pub tls: Option<TlsConfig>,
    pub next_connection_delay_ms: u64,
    pub connections: ConnectionSettings,
}

impl ServerSettings {
    pub fn set_auth_handler<F, O>(&mut self, auth_fn: F)
    where
        F: Fn(ClientId, AuthUser, AuthPass) -> O + Send + Sync + 'static,
        O: IntoFuture<Output = bool> + 'static,
        O::IntoFuture: Send,
    {
        self.connections.set_auth_handler(auth_fn)
    }
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct BridgeConfig {
    pub name: String,
    pub addr: String,
    pub qos: u8,
    pub sub_path: Filter,
    pub reconnection_delay: u64,
    pub ping_delay: u64,
    pub connections: ConnectionSettings,
    #[serde(default)]
    pub transport: Transport,
}

#[derive(Serialize, Deserialize, Clone)]
pub struct ConnectionSettings {
    pub connection_timeout_ms: u16,
    pub max_payload_size: usize,
    pub max_inflight_count: usize,
    pub auth: Option<HashMap<String, String>>,
    #[serde(skip)]
    pub external_auth: Option<AuthHandler>,
    /// With `auth` or an auth handler set, still accept clients whose
    /// CONNECT carries no username (they connect unauthenticated, and the
    /// authoriser decides what they may do). A username with a wrong
    /// password is refused either way.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Decides each publish, subscribe and will of this listener's clients;
    /// without one everything is allowed.
    #[serde(skip)]
    pub authoriser: Option<Authoriser>,
    /// Called for every refused CONNECT (bad credentials, denied will,
    /// invalid client id, connection limit), e.g. to count them.
    #[serde(skip)]
    pub on_refusal: Option<RefusalHook>,
    #[serde(default)]
    pub dynamic_filters: bool,
}

impl ConnectionSettings {
    pub fn set_auth_handler<F, O>(&mut self, auth_fn: F)
    where
        F: Fn(ClientId, AuthUser, AuthPass) -> O + Send + Sync + 'static,
        O: IntoFuture<Output = bool> + 'static,
        O::IntoFuture: Send,
    {
        self.external_auth = Some(Arc::new(move |client_id, username, password| {
            let auth = auth_fn(client_id, username, password).into_future();
            Box::pin(auth)
        }));
    }

    pub fn set_authoriser<F>(&mut self, authoriser: F)
    where
        F: Fn(&ClientIdentity, Action<'_>) -> bool + Send + Sync + 'static,
    {
        self.authoriser = Some(Arc::new(authoriser));
    }

    pub fn set_refusal_hook<F>(&mut self, hook: F)
    where
        F: Fn(protocol::ConnectReturnCode) + Send + Sync + 'static,
    {
        self.on_refusal = Some(Arc::new(hook));
    }
}

impl fmt::Debug for ConnectionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionSettings")
            .field("connection_timeout_ms", &self.connection_timeout_ms)
            .field("max_payload_size", &self.max_payload_size)
            .field("max_inflight_count", &self.max_inflight_count)
            .field("auth", &self.auth)
            .field("external_auth", &self.external_auth.is_some())
            .field("allow_anonymous", &self.allow_anonymous)
            .field("authoriser", &self.authoriser.is_some())
            .field("on_refusal", &self.on_refusal.is_some())
            .field("dynamic_filters", &self.dynamic_filters)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Id with which this node connects to other nodes of the mesh
    pub node_id: NodeId,
    /// Address on which this broker is listening for mesh connections
    pub listen: String,
    /// Address of clusters that this node has to initiate connection
    pub seniors: Vec<(ConnectionId, String)>,
}

/// A change to the broker's retained messages, reported so that they can
/// be persisted (rumqttd itself keeps them in memory only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetainedChange {
    /// A retained message was set or replaced.
    Set {
        topic: String,
        payload: bytes::Bytes,
        qos: u8,
    },
    /// A retained message was cleared (empty payload).
    Cleared { topic: String },
}

/// Told of every change to the retained messages, on the router thread:
/// it must be quick and never block.
#[derive(Clone)]
pub struct RetainedHook(pub Arc<dyn Fn(RetainedChange) + Send + Sync>);

impl fmt::Debug for RetainedHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RetainedHook")
    }
}

/// A listening socket handed to a server (`ServerSettings::prebound`).
/// Clones share the socket; the first server to start takes it.
#[derive(Clone, Default)]
pub struct PreboundListener(Arc<std::sync::Mutex<Option<std::net::TcpListener>>>);

impl PreboundListener {
    pub fn new(listener: std::net::TcpListener) -> Self {
        PreboundListener(Arc::new(std::sync::Mutex::new(Some(listener))))
    }

    /// The socket, once; `None` when it was taken already.
    pub fn take(&self) -> Option<std::net::TcpListener> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl fmt::Debug for PreboundListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PreboundListener")
    }
}

/// Told, on the router thread, of messages a subscription missed: the
/// commit log dropped them before the subscriber read them (a slow or
/// offline subscriber behind a flood). It must be quick and never block.
#[derive(Clone)]
pub struct DroppedHook(pub Arc<dyn Fn(u64) + Send + Sync>);

impl fmt::Debug for DroppedHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DroppedHook")
    }
}

/// A retained message the broker starts with: (topic, payload, QoS).
pub type InitialRetained = (String, bytes::Bytes, u8);

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RouterConfig {
    pub max_connections: usize,
    pub max_outgoing_packet_count: u64,
    pub max_segment_size: usize,
    pub max_segment_count: usize,
    pub custom_segment: Option<HashMap<String, SegmentConfig>>,
    pub initialized_filters: Option<Vec<Filter>>,
    // defaults to Round Robin
    #[serde(default)]
    pub shared_subscriptions_strategy: Strategy,
    /// Told of every change to the retained messages.
    #[serde(skip)]
    pub retained_hook: Option<RetainedHook>,
    /// Retained messages to start with (e.g. persisted by `retained_hook`
    /// before a restart).
    #[serde(skip)]
    pub initial_retained: Vec<InitialRetained>,
    /// Told how many messages a subscription missed because the commit
    /// log dropped them (its segments were full) before it read them.
    #[serde(skip)]
    pub dropped_hook: Option<DroppedHook>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SegmentConfig {
    pub max_segment_size: usize,
    pub max_segment_count: usize,
}

type ReloadHandle = Handle<EnvFilter, Layered<Layer<Registry, Pretty, Format<Pretty>>, Registry>>;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ConsoleSettings {
    pub listen: String,
    #[serde(skip)]
    filter_handle: Option<ReloadHandle>,
}

impl ConsoleSettings {
    pub fn set_filter_reload_handle(&mut self, handle: ReloadHandle) {
        self.filter_handle.replace(handle);
    }
}

#[derive(Debug, Serialize, Deserialize, Clone, Default)]
pub enum Transport {
    #[serde(rename = "tcp")]
    #[default]
    Tcp,
    #[serde(rename = "tls")]
    Tls {
        ca: PathBuf,
        client_auth: Option<ClientAuth>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientAuth {
    certs: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Serialize, Deserialize, Clone, Hash, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MetricType {
    Meters,
    Alerts,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct MetricSettings {
    push_interval: u64,
}
