//! MQTT topic names under `widgetry/v1/`: building them and parsing them.
//! Parsing never trusts the device segment: it is validated like any input.

use crate::validate::{Reject, validate_device};

/// Prefix of every Widgetry topic.
pub const PREFIX: &str = "widgetry/v1/";

/// What a topic under `widgetry/v1/{device}/` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// protobuf `Batch`, device → server.
    Samples,
    /// JSON samples from any client → server.
    SamplesJson,
    /// JSON presence, retained; also the device's last will.
    Status,
    /// JSON app events, device → server.
    Events,
    /// JSON acknowledgement, server → device.
    Ack,
    /// JSON reject reasons, server → device.
    Errors,
    /// JSON samples of a committed batch, server → any client (the live
    /// feed the web service bridges to websockets).
    Live,
    /// JSON, retained: the device's firing alerts, server → any client.
    Alerts,
    /// JSON gap report the server stored (batches a device lost), server
    /// → any client (the rule evaluator counts them for `gaps` rules).
    Gaps,
}

impl TopicKind {
    /// The topic suffix after `widgetry/v1/{device}/`.
    pub fn suffix(self) -> &'static str {
        match self {
            TopicKind::Samples => "samples",
            TopicKind::SamplesJson => "samples/json",
            TopicKind::Status => "status",
            TopicKind::Events => "events",
            TopicKind::Ack => "ack",
            TopicKind::Errors => "errors",
            TopicKind::Live => "live",
            TopicKind::Alerts => "alerts",
            TopicKind::Gaps => "gaps",
        }
    }

    /// The subscription filter for this kind across all devices.
    pub fn filter(self) -> String {
        format!("{PREFIX}+/{}", self.suffix())
    }
}

/// A parsed Widgetry topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic<'a> {
    pub device: &'a str,
    pub kind: TopicKind,
}

impl<'a> Topic<'a> {
    /// Builds the topic string for `device` and `kind`.
    pub fn name(device: &str, kind: TopicKind) -> String {
        format!("{PREFIX}{device}/{}", kind.suffix())
    }

    /// Parses `widgetry/v1/{device}/{suffix}`; the device id is validated.
    pub fn parse(topic: &'a str) -> Result<Topic<'a>, Reject> {
        let rest = topic
            .strip_prefix(PREFIX)
            .ok_or_else(|| Reject::Topic(format!("{topic:?} is not under {PREFIX}")))?;
        let (device, suffix) = rest.split_once('/').ok_or_else(|| {
            Reject::Topic(format!("{topic:?} has no kind after the device segment"))
        })?;
        validate_device(device)?;
        let kind = match suffix {
            "samples" => TopicKind::Samples,
            "samples/json" => TopicKind::SamplesJson,
            "status" => TopicKind::Status,
            "events" => TopicKind::Events,
            "ack" => TopicKind::Ack,
            "errors" => TopicKind::Errors,
            "live" => TopicKind::Live,
            "alerts" => TopicKind::Alerts,
            "gaps" => TopicKind::Gaps,
            other => {
                return Err(Reject::Topic(format!(
                    "{topic:?}: unknown kind {other:?} (expected samples, samples/json, status, events, ack, errors, live, alerts or gaps)"
                )));
            }
        };
        Ok(Topic { device, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for kind in [
            TopicKind::Samples,
            TopicKind::SamplesJson,
            TopicKind::Status,
            TopicKind::Events,
            TopicKind::Ack,
            TopicKind::Errors,
            TopicKind::Live,
            TopicKind::Alerts,
            TopicKind::Gaps,
        ] {
            let name = Topic::name("dev-1", kind);
            assert_eq!(
                Topic::parse(&name),
                Ok(Topic {
                    device: "dev-1",
                    kind
                })
            );
        }
    }

    #[test]
    fn rejects_bad_topics() {
        for bad in [
            "other/v1/d/samples",
            "widgetry/v1/d",
            "widgetry/v1/d/nope",
            "widgetry/v1/bad device/samples",
            "widgetry/v1//samples",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
