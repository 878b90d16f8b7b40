//! Widgetry's wire format: the protobuf `Batch`, the JSON forms used by
//! plain MQTT clients and by the status/ack/error topics, topic names, and
//! the validation every payload passes before it is stored.
//!
//! This crate is linked by the agent, so it must never pull in an async
//! runtime, a network stack or anything large: prost, serde and thiserror only.

pub mod batch;
pub mod json;
pub mod topic;
pub mod validate;

/// Code generated from `proto/widgetry/v1/samples.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/widgetry.v1.rs"));
}

pub use batch::{BatchBuilder, DecodedBatch, Gap, SessionId, decode_values};
pub use topic::{Topic, TopicKind};
pub use validate::{Limits, Reject, SeriesKey};
