//! Health rules and alerts.
//!
//! A rule watches the series of the devices its glob matches (a threshold:
//! `when = "> 90"`, optionally held `for = "5m"`, cleared by `clear = "< 85"`
//! or by default 5 % of the threshold below it, so a value hovering at the
//! threshold does not flap), or a device's presence (`when = "stale"`:
//! stale or silent; `"silent"`; `"offline"`). Rules come from the server's
//! config file (`[[rules]]`, re-applied at every start) and from the API
//! (`POST/PUT/DELETE /api/v1/rules`), and are kept in the database.
//!
//! [`eval`] is the per-(rule, device, series) state machine, pure; [`run`]
//! feeds it every committed batch from the live hub (not by polling the
//! database per rule) and every presence change, stores each alert's
//! lifecycle (pending → firing → resolved, with timestamps; one open alert
//! per rule, device and series, enforced by a unique index), publishes the
//! device's firing alerts retained on `widgetry/v1/{device}/alerts`, and
//! posts each transition to an optional webhook.

pub mod eval;
pub mod run;
pub mod webhook;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::presence::Presence;

/// Most rules the server keeps (config and API together).
pub const MAX_RULES: usize = 1_000;
/// Longest rule name and pattern, in bytes.
pub const MAX_TEXT: usize = 256;

/// A rule as written in the config file or sent to the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique name: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// Device glob (`*`, `?`); default every device.
    #[serde(default = "every_device")]
    pub devices: String,
    /// The series name the threshold watches (a glob; labels ignored).
    /// Not used by presence rules.
    #[serde(default)]
    pub series: Option<String>,
    /// `> 90`, `>= 90`, `< 5`, `<= 5`, or a presence: `stale`, `silent`,
    /// `offline`.
    pub when: String,
    /// How long the condition must hold before the alert fires (default 0).
    #[serde(default, rename = "for")]
    pub hold: Option<String>,
    /// The threshold condition that resolves a firing alert (default: the
    /// other side of the threshold by 5 % of its size).
    #[serde(default)]
    pub clear: Option<String>,
    /// `info`, `warning` (default) or `critical`.
    #[serde(default = "warning")]
    pub severity: String,
}

fn every_device() -> String {
    "*".into()
}

fn warning() -> String {
    "warning".into()
}

/// A comparison operator of a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Op {
    Gt,
    Ge,
    Lt,
    Le,
}

impl Op {
    pub fn holds(self, v: f64, t: f64) -> bool {
        match self {
            Op::Gt => v > t,
            Op::Ge => v >= t,
            Op::Lt => v < t,
            Op::Le => v <= t,
        }
    }
}

/// What a rule watches.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// `series` `op` `threshold`, resolved when `clear_op` `clear` holds.
    Threshold {
        series: String,
        op: Op,
        threshold: f64,
        clear_op: Op,
        clear: f64,
    },
    /// The device's presence is one of these.
    Presence(Vec<Presence>),
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub spec: RuleSpec,
    pub condition: Condition,
    pub hold_ms: i64,
}

/// Parses `> 90` into its operator and number.
fn comparison(text: &str) -> Result<(Op, f64), String> {
    let t = text.trim();
    let (op, rest) = if let Some(r) = t.strip_prefix(">=") {
        (Op::Ge, r)
    } else if let Some(r) = t.strip_prefix("<=") {
        (Op::Le, r)
    } else if let Some(r) = t.strip_prefix('>') {
        (Op::Gt, r)
    } else if let Some(r) = t.strip_prefix('<') {
        (Op::Lt, r)
    } else {
        return Err(format!(
            "{text:?} is not a condition: use > N, >= N, < N, <= N, or stale, silent, offline"
        ));
    };
    let n: f64 = rest
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: {:?} is not a number", rest.trim()))?;
    if !n.is_finite() {
        return Err(format!("{text:?}: the threshold must be a finite number"));
    }
    Ok((op, n))
}

fn check_text(what: &str, v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > MAX_TEXT {
        return Err(format!("{what}: 1 to {MAX_TEXT} bytes, got {}", v.len()));
    }
    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{what}: {v:?} holds spaces or control characters"));
    }
    Ok(())
}

impl RuleSpec {
    /// Validates the rule; the error names the field and what to write.
    pub fn validate(self) -> Result<Rule, String> {
        check_text("name", &self.name)?;
        if !self
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "name: {:?} may hold only letters, digits, '-', '_' and '.'",
                self.name
            ));
        }
        check_text("devices", &self.devices)?;
        if !matches!(self.severity.as_str(), "info" | "warning" | "critical") {
            return Err(format!(
                "severity: {:?} is not info, warning or critical",
                self.severity
            ));
        }
        let hold_ms = match &self.hold {
            None => 0,
            Some(h) => {
                let d = widgetry_common::parse_duration(h).map_err(|e| format!("for: {e}"))?;
                if d > Duration::from_secs(7 * 86_400) {
                    return Err(format!("for: {h:?} is longer than 7 days"));
                }
                d.as_millis() as i64
            }
        };
        let presence = match self.when.trim() {
            "stale" => Some(vec![Presence::Stale, Presence::Silent]),
            "silent" => Some(vec![Presence::Silent]),
            "offline" => Some(vec![Presence::Offline]),
            _ => None,
        };
        let condition = match presence {
            Some(p) => {
                if self.series.is_some() || self.clear.is_some() {
                    return Err(format!(
                        "when: {:?} is about the device's presence: leave out series and clear",
                        self.when
                    ));
                }
                Condition::Presence(p)
            }
            None => {
                let (op, threshold) = comparison(&self.when).map_err(|e| format!("when: {e}"))?;
                let series = self.series.clone().ok_or_else(|| {
                    "series: a threshold rule needs the series it watches, e.g. \"cpu.usage_pct\""
                        .to_string()
                })?;
                check_text("series", &series)?;
                let margin = threshold.abs() * 0.05;
                let (clear_op, clear) = match &self.clear {
                    Some(c) => comparison(c).map_err(|e| format!("clear: {e}"))?,
                    None => match op {
                        Op::Gt | Op::Ge => (Op::Lt, threshold - margin),
                        Op::Lt | Op::Le => (Op::Gt, threshold + margin),
                    },
                };
                // The clear condition must exclude the firing one, or the
                // alert would fire and resolve on the same value.
                let overlaps = match (op, clear_op) {
                    (Op::Gt | Op::Ge, Op::Lt | Op::Le) => clear > threshold,
                    (Op::Lt | Op::Le, Op::Gt | Op::Ge) => clear < threshold,
                    _ => true,
                };
                if overlaps {
                    return Err(format!(
                        "clear: {:?} overlaps when {:?}; clear on the other side of the threshold, e.g. when \"> 90\" clear \"< 85\"",
                        self.clear.as_deref().unwrap_or(""),
                        self.when
                    ));
                }
                Condition::Threshold {
                    series,
                    op,
                    threshold,
                    clear_op,
                    clear,
                }
            }
        };
        Ok(Rule {
            spec: self,
            condition,
            hold_ms,
        })
    }
}

impl Rule {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Whether the rule watches `device`.
    pub fn watches(&self, device: &str) -> bool {
        widgetry_common::glob::matches(&self.spec.devices, device)
    }

    /// Whether a threshold rule watches the series `key` (`name{labels}`).
    pub fn watches_series(&self, key: &str) -> bool {
        match &self.condition {
            Condition::Threshold { series, .. } => {
                let name = key.split_once('{').map_or(key, |(n, _)| n);
                widgetry_common::glob::matches(series, name)
            }
            Condition::Presence(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(when: &str) -> RuleSpec {
        RuleSpec {
            name: "r".into(),
            devices: "*".into(),
            series: Some("cpu.usage_pct".into()),
            when: when.into(),
            hold: None,
            clear: None,
            severity: "warning".into(),
        }
    }

    #[test]
    fn thresholds_parse_with_a_default_hysteresis() {
        let r = spec("> 90").validate().expect("valid");
        assert_eq!(
            r.condition,
            Condition::Threshold {
                series: "cpu.usage_pct".into(),
                op: Op::Gt,
                threshold: 90.0,
                clear_op: Op::Lt,
                clear: 85.5
            }
        );
        let r = RuleSpec {
            clear: Some("< 80".into()),
            hold: Some("5m".into()),
            ..spec(">=90")
        }
        .validate()
        .expect("valid");
        assert_eq!(r.hold_ms, 300_000);
        assert!(matches!(r.condition, Condition::Threshold { clear, .. } if clear == 80.0));
    }

    #[test]
    fn bad_rules_name_the_field() {
        let e = |s: RuleSpec| s.validate().expect_err("invalid");
        assert!(e(spec("above 90")).starts_with("when:"));
        assert!(e(spec("> ninety")).contains("is not a number"));
        assert!(e(spec("> NaN")).contains("finite"));
        assert!(
            e(RuleSpec {
                series: None,
                ..spec("> 1")
            })
            .starts_with("series:")
        );
        assert!(
            e(RuleSpec {
                clear: Some("< 95".into()),
                ..spec("> 90")
            })
            .contains("overlaps")
        );
        assert!(
            e(RuleSpec {
                severity: "loud".into(),
                ..spec("> 1")
            })
            .starts_with("severity:")
        );
        assert!(
            e(RuleSpec {
                name: "a b".into(),
                ..spec("> 1")
            })
            .starts_with("name:")
        );
        assert!(
            e(RuleSpec {
                hold: Some("5 parsecs".into()),
                ..spec("> 1")
            })
            .starts_with("for:")
        );
        assert!(
            e(RuleSpec {
                hold: Some("8d".into()),
                ..spec("> 1")
            })
            .contains("7 days")
        );
        assert!(e(spec("stale")).contains("leave out series"));
        let ok = RuleSpec {
            series: None,
            ..spec("stale")
        }
        .validate()
        .expect("presence");
        assert_eq!(
            ok.condition,
            Condition::Presence(vec![Presence::Stale, Presence::Silent])
        );
    }

    #[test]
    fn globs_pick_devices_and_series_names() {
        let r = RuleSpec {
            devices: "line1-*".into(),
            series: Some("temp*".into()),
            ..spec("> 1")
        }
        .validate()
        .expect("valid");
        assert!(r.watches("line1-7") && !r.watches("line2-7"));
        assert!(r.watches_series("temp_c{zone=a}") && !r.watches_series("cpu.usage_pct"));
    }
}
