//! The state every handler shares: the store, the counters, the live hub
//! and the fleet-wide answer cache.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::cache::OverviewCache;
use crate::metrics::Metrics;
use crate::sinks::live::Hub;
use crate::store::Store;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
    /// Cancelled at shutdown: websocket clients are closed.
    pub shutdown: CancellationToken,
    /// The fleet-wide answers (`/api/v1/devices`, `/api/v1/fleet`), shared
    /// by every client asking within a second.
    pub overview: Arc<OverviewCache>,
    /// When set, the API and /metrics require this token.
    pub api_token: Option<Arc<str>>,
    /// How presence is judged (`crate::presence`).
    pub presence: crate::presence::PresenceConfig,
    /// The rules in force (`/api/v1/rules` replaces them).
    pub rules: crate::rules::run::RuleSet,
}
