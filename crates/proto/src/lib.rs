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

/// How long a device waits for the ack of a batch it has published
/// `attempts` times (1 = first send) before sending it again: the base ack
/// timeout, doubled for every resend up to 8×. When acks are slow because
/// the server is behind, resending at a fixed period would add a copy of
/// every outstanding batch per period to the load that made it slow; the
/// backoff keeps resends to a trickle while still recovering what a broker
/// dropped. An ack, or a reconnect, starts a batch over.
pub fn resend_after(base: std::time::Duration, attempts: u32) -> std::time::Duration {
    base * (1u32 << attempts.saturating_sub(1).min(3))
}

pub use batch::{BatchBuilder, DecodedBatch, Gap, SessionId, decode_values};
pub use topic::{Topic, TopicKind};
pub use validate::{Limits, Reject, SeriesKey};

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn resend_backoff_doubles_up_to_eight_times() {
        let b = Duration::from_secs(5);
        let got: Vec<u64> = (0..7).map(|a| resend_after(b, a).as_secs()).collect();
        assert_eq!(got, vec![5, 5, 10, 20, 40, 40, 40]);
    }
}
