//! Where data comes from. A source decodes and validates what arrives
//! (MQTT publishes, statsd packets, websocket frames) into [`Item`]s for the ingest writer, or into a
//! reject with its reason; it never touches the database.
//!
//! Validation happens here, before the writer's queue, so bad input from
//! one device costs only the parse of its own message.

pub mod limit;
pub mod mqtt;
pub mod statsd;
pub mod ws;

use widgetry_proto::json::{Event as AppEvent, EventBatch, KeyedSample, Status};
use widgetry_proto::{DecodedBatch, Reject};

/// One unit of work for the writer.
#[derive(Debug)]
pub enum Item {
    Batch {
        device: String,
        batch: DecodedBatch,
        received_ms: i64,
    },
    Json {
        device: String,
        samples: Vec<KeyedSample>,
        received_ms: i64,
    },
    /// Samples of a websocket source bridge: each one is stored as its own
    /// entry of the batch log, named by its content, so an exact
    /// duplicate (also one seen before a restart) is stored once. `done`
    /// says, after the commit, what became of them; it is dropped unsent
    /// when the transaction fails.
    Bridged {
        device: String,
        samples: Vec<KeyedSample>,
        received_ms: i64,
        done: tokio::sync::oneshot::Sender<Bridged>,
    },
    Status {
        device: String,
        status: Status,
        received_ms: i64,
    },
    Events {
        device: String,
        batch: EventBatch,
        events: Vec<AppEvent>,
        received_ms: i64,
    },
    Rejected {
        device: Option<String>,
        topic: String,
        reject: Reject,
        received_ms: i64,
    },
}

impl Item {
    pub fn received_ms(&self) -> i64 {
        match self {
            Item::Batch { received_ms, .. }
            | Item::Json { received_ms, .. }
            | Item::Bridged { received_ms, .. }
            | Item::Status { received_ms, .. }
            | Item::Events { received_ms, .. }
            | Item::Rejected { received_ms, .. } => *received_ms,
        }
    }
}

/// What the writer did with the samples of an [`Item::Bridged`], sent
/// only once the transaction holding them is durable.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Bridged {
    /// Stored for the first time.
    pub new: u64,
    /// Already stored (same device, series, timestamp and value).
    pub duplicates: u64,
    /// Refused by the writer (e.g. the device's series limit).
    pub rejected: u64,
}
