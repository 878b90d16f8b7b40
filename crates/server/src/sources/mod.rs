//! Where data comes from. A source decodes and validates what arrives
//! (MQTT publishes, statsd packets) into [`Item`]s for the ingest writer, or into a
//! reject with its reason; it never touches the database.
//!
//! Validation happens here, before the writer's queue, so bad input from
//! one device costs only the parse of its own message.

pub mod limit;
pub mod mqtt;
pub mod statsd;

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
            | Item::Status { received_ms, .. }
            | Item::Events { received_ms, .. }
            | Item::Rejected { received_ms, .. } => *received_ms,
        }
    }
}
