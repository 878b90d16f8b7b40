//! Health rules and alerts.
//!
//! A rule watches the devices its glob matches, in one of these ways (the
//! `when` text; README "Health rules" has the full syntax):
//!
//! - a **threshold** on a series: `when = "> 90"`, optionally held
//!   `for = "5m"`, cleared by `clear = "< 85"` or by default 5 % of the
//!   threshold on the other side, so a value hovering at the threshold does
//!   not flap;
//! - a **rate of change** of a series: `when = "rate > 5/s"` (also `/m`,
//!   `/h`), computed between consecutive samples of the series, held and
//!   cleared like a threshold (`clear = "rate < 2/s"`);
//! - **no data** on a series: `when = "no data"`, `for = "3 intervals"` (of
//!   the device's learned cadence, the default) or a duration (`for = "5m"`),
//!   resolved by the next sample;
//! - **rejects or gaps rising** on a device: `when = "rejects > 10 in 5m"`,
//!   `when = "gaps >= 1 in 1h"`: the count over a sliding window, held and
//!   cleared like a threshold (by default when the count is at most 95 % of
//!   the threshold);
//! - a device's **presence**: `when = "stale"` (stale or silent),
//!   `"silent"`, `"offline"`.
//!
//! Rules come from the server's config file (`[[rules]]`, re-applied at
//! every start) and from the API (`POST/PUT/DELETE /api/v1/rules`), and are
//! kept in the database.
//!
//! [`eval`] is the per-(rule, device, series) state machine, pure; [`run`]
//! feeds it every committed batch, presence change and reject/gap report
//! from the live hub (not by polling the database per rule), stores each
//! alert's lifecycle (pending → firing → resolved, with timestamps; one
//! open alert per rule, device and series, enforced by a unique index),
//! publishes the device's firing alerts retained on
//! `widgetry/v1/{device}/alerts`, pushes each transition to the live
//! stream and posts it to an optional webhook.

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
/// Longest `for` of a rule (and `no data` window).
pub const MAX_HOLD: Duration = Duration::from_secs(7 * 86_400);
/// Longest `in` window of a rejects/gaps rule (its counts are kept in
/// [`COUNT_STEPS`] steps of it).
pub const MAX_COUNT_WINDOW: Duration = Duration::from_secs(86_400);
/// Most learned intervals a `no data` rule may wait.
pub const MAX_INTERVALS: u32 = 1_000;
/// Steps a rejects/gaps window is counted in (the window slides by one
/// step: 5 s of a 5-minute window).
pub const COUNT_STEPS: usize = 60;

/// A rule as written in the config file or sent to the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique name: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// Device glob (`*`, `?`); default every device.
    #[serde(default = "every_device")]
    pub devices: String,
    /// The series name a threshold, rate or no-data rule watches (a glob;
    /// labels ignored). Not used by presence and rejects/gaps rules.
    #[serde(default)]
    pub series: Option<String>,
    /// `> 90`, `>= 90`, `< 5`, `<= 5`; `rate > 5/s` (`/s`, `/m`, `/h`);
    /// `no data`; `rejects > 10 in 5m`, `gaps > 0 in 1h`; or a presence:
    /// `stale`, `silent`, `offline`.
    pub when: String,
    /// How long the condition must hold before the alert fires (default 0).
    /// For `no data`: how long the series must be silent, `N intervals` of
    /// the device's cadence (default `3 intervals`) or a duration.
    #[serde(default, rename = "for")]
    pub hold: Option<String>,
    /// The condition that resolves a firing alert (default: the other side
    /// of the threshold by 5 % of its size). Not used by `no data` and
    /// presence rules.
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

/// A condition and the condition that clears it, on one number (a value,
/// a rate per second, a count).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub op: Op,
    pub threshold: f64,
    pub clear_op: Op,
    pub clear: f64,
}

impl Bounds {
    pub fn holds(&self, v: f64) -> bool {
        self.op.holds(v, self.threshold)
    }

    pub fn clears(&self, v: f64) -> bool {
        self.clear_op.holds(v, self.clear)
    }
}

/// What a rejects/gaps rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Payloads rejected (the device's `rejects`; not `unknown_series`).
    Rejects,
    /// Gap reports stored (rows of `gaps`: batches a device lost).
    Gaps,
}

/// How long a series must be silent for a `no data` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// This many of the device's intervals (`PresenceConfig::interval`).
    Intervals(u32),
    /// A fixed time, ms.
    Ms(i64),
}

/// What a rule watches.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The values of `series`.
    Threshold { series: String, bounds: Bounds },
    /// The change per second of `series` between consecutive samples.
    Rate { series: String, bounds: Bounds },
    /// No sample of `series` for this long.
    NoData { series: String, after: Silence },
    /// Rejects or gaps of the device within the last `window_ms`.
    Count {
        what: Counted,
        bounds: Bounds,
        window_ms: i64,
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

const CONDITIONS: &str = "use > N, >= N, < N, <= N, rate > N/s, no data, rejects > N in 5m, gaps > N in 1h, or stale, silent, offline";

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
        return Err(format!("{text:?} is not a condition: {CONDITIONS}"));
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

/// Parses `> 5/s` (the `rate` word already taken off) into its operator
/// and a rate per second.
fn rate_comparison(text: &str, whole: &str) -> Result<(Op, f64), String> {
    let Some((cmp, unit)) = text.rsplit_once('/') else {
        return Err(format!(
            "{whole:?}: give the rate's unit, e.g. \"rate > 5/s\" (per second), \"/m\" or \"/h\""
        ));
    };
    let per_s = match unit.trim() {
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3_600.0,
        u => {
            return Err(format!(
                "{whole:?}: unknown rate unit {u:?} (use /s, /m or /h)"
            ));
        }
    };
    let (op, n) = comparison(cmp).map_err(|e| format!("{whole:?}: {e}"))?;
    Ok((op, n / per_s))
}

/// Whether no number satisfies both `op threshold` and `clear_op clear`.
fn disjoint(b: &Bounds) -> bool {
    let (t, c) = (b.threshold, b.clear);
    match (b.op, b.clear_op) {
        (Op::Gt, Op::Lt | Op::Le) | (Op::Ge, Op::Lt) => c <= t,
        (Op::Ge, Op::Le) => c < t,
        (Op::Lt, Op::Gt | Op::Ge) | (Op::Le, Op::Gt) => c >= t,
        (Op::Le, Op::Ge) => c > t,
        _ => false,
    }
}

/// The bounds of `op threshold` with its `clear` text (parsed by
/// `parse_clear`), or by default the other side of the threshold by 5 % of
/// it (`at_most`: the default clear is `<=`, for counts, so `> 0` clears at
/// 0).
fn bounds(
    spec: &RuleSpec,
    op: Op,
    threshold: f64,
    parse_clear: impl Fn(&str) -> Result<(Op, f64), String>,
    at_most: bool,
) -> Result<Bounds, String> {
    let margin = threshold.abs() * 0.05;
    let (clear_op, clear) = match &spec.clear {
        Some(c) => parse_clear(c).map_err(|e| format!("clear: {e}"))?,
        None => match op {
            Op::Gt | Op::Ge if at_most => (Op::Le, threshold - margin),
            Op::Gt | Op::Ge => (Op::Lt, threshold - margin),
            Op::Lt | Op::Le => (Op::Gt, threshold + margin),
        },
    };
    let b = Bounds {
        op,
        threshold,
        clear_op,
        clear,
    };
    // The clear condition must exclude the firing one, or the alert would
    // fire and resolve on the same value.
    if !disjoint(&b) {
        return Err(format!(
            "clear: {:?} overlaps when {:?}; clear on the other side of the threshold, e.g. when \"> 90\" clear \"< 85\"",
            spec.clear.as_deref().unwrap_or(""),
            spec.when
        ));
    }
    Ok(b)
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

/// A duration of at most `max`, for the field `what`.
fn duration_ms(what: &str, text: &str, max: Duration) -> Result<i64, String> {
    let d = widgetry_common::parse_duration(text.trim()).map_err(|e| format!("{what}: {e}"))?;
    if d > max {
        return Err(format!(
            "{what}: {text:?} is longer than {}",
            if max >= Duration::from_secs(2 * 86_400) {
                format!("{} days", max.as_secs() / 86_400)
            } else {
                format!("{} hours", max.as_secs() / 3_600)
            }
        ));
    }
    Ok(d.as_millis() as i64)
}

/// The `for` of a `no data` rule: `N intervals` or a duration.
fn silence(text: &str) -> Result<Silence, String> {
    let t = text.trim();
    if let Some(n) = t
        .strip_suffix("intervals")
        .or_else(|| t.strip_suffix("interval"))
    {
        let n: u32 = n.trim().parse().map_err(|_| {
            format!(
                "for: {text:?}: {:?} is not a whole number of intervals",
                n.trim()
            )
        })?;
        if n == 0 || n > MAX_INTERVALS {
            return Err(format!("for: {text:?}: 1 to {MAX_INTERVALS} intervals"));
        }
        return Ok(Silence::Intervals(n));
    }
    let ms = duration_ms("for", t, MAX_HOLD)
        .map_err(|e| format!("{e}; or write \"N intervals\" (of the device's cadence)"))?;
    if ms < 1_000 {
        return Err(format!("for: {text:?}: at least 1s"));
    }
    Ok(Silence::Ms(ms))
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
        let when = self.when.trim();
        let word = when
            .split(|c: char| !c.is_ascii_alphabetic())
            .next()
            .unwrap_or("");
        // `no data` waits `for` itself: it has no separate hold.
        let hold_ms = match &self.hold {
            Some(h) if when != "no data" => duration_ms("for", h, MAX_HOLD)?,
            _ => 0,
        };
        let condition = match (when, word) {
            ("stale" | "silent" | "offline", _) => {
                if self.series.is_some() || self.clear.is_some() {
                    return Err(format!(
                        "when: {:?} is about the device's presence: leave out series and clear",
                        self.when
                    ));
                }
                Condition::Presence(match when {
                    "stale" => vec![Presence::Stale, Presence::Silent],
                    "silent" => vec![Presence::Silent],
                    _ => vec![Presence::Offline],
                })
            }
            ("no data", _) => {
                if self.clear.is_some() {
                    return Err(
                        "clear: a \"no data\" rule resolves when data comes back: leave out clear"
                            .into(),
                    );
                }
                Condition::NoData {
                    series: self.series_of("a \"no data\"")?,
                    after: match &self.hold {
                        Some(h) => silence(h)?,
                        None => Silence::Intervals(3),
                    },
                }
            }
            (_, "rate") => {
                let rest = &when["rate".len()..];
                let (op, per_s) =
                    rate_comparison(rest, &self.when).map_err(|e| format!("when: {e}"))?;
                let clear = |c: &str| {
                    let t = c.trim();
                    rate_comparison(t.strip_prefix("rate").unwrap_or(t), c)
                };
                Condition::Rate {
                    series: self.series_of("a rate")?,
                    bounds: bounds(&self, op, per_s, clear, false)?,
                }
            }
            (_, "rejects" | "gaps") => {
                let what = if word == "rejects" {
                    Counted::Rejects
                } else {
                    Counted::Gaps
                };
                if self.series.is_some() {
                    return Err(format!(
                        "series: {word} are counted per device: leave out series"
                    ));
                }
                let rest = &when[word.len()..];
                let Some((cmp, window)) = rest.split_once(" in ") else {
                    return Err(format!(
                        "when: {:?}: give the window to count in, e.g. \"{word} > 10 in 5m\"",
                        self.when
                    ));
                };
                let (op, n) = comparison(cmp).map_err(|e| format!("when: {e}"))?;
                if !matches!(op, Op::Gt | Op::Ge) || n < 0.0 {
                    return Err(format!(
                        "when: {:?}: {word} rules fire on a rising count: use > N or >= N with N >= 0",
                        self.when
                    ));
                }
                let window_ms = duration_ms("when", window, MAX_COUNT_WINDOW)?;
                if window_ms < 1_000 {
                    return Err(format!("when: {:?}: the window is at least 1s", self.when));
                }
                let clear = |c: &str| {
                    let t = c.trim();
                    comparison(t.strip_prefix(word).unwrap_or(t))
                };
                Condition::Count {
                    what,
                    bounds: bounds(&self, op, n, clear, true)?,
                    window_ms,
                }
            }
            _ => {
                let (op, threshold) = comparison(&self.when).map_err(|e| format!("when: {e}"))?;
                Condition::Threshold {
                    series: self.series_of("a threshold")?,
                    bounds: bounds(&self, op, threshold, comparison, false)?,
                }
            }
        };
        Ok(Rule {
            spec: self,
            condition,
            hold_ms,
        })
    }

    /// The checked `series` a series rule needs.
    fn series_of(&self, kind: &str) -> Result<String, String> {
        let series = self.series.clone().ok_or_else(|| {
            format!("series: {kind} rule needs the series it watches, e.g. \"cpu.usage_pct\"")
        })?;
        check_text("series", &series)?;
        Ok(series)
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

    /// The series glob of a threshold, rate or no-data rule.
    pub fn series_glob(&self) -> Option<&str> {
        match &self.condition {
            Condition::Threshold { series, .. }
            | Condition::Rate { series, .. }
            | Condition::NoData { series, .. } => Some(series),
            Condition::Count { .. } | Condition::Presence(_) => None,
        }
    }

    /// Whether a series rule watches the series `key` (`name{labels}`).
    pub fn watches_series(&self, key: &str) -> bool {
        self.series_glob().is_some_and(|glob| {
            let name = key.split_once('{').map_or(key, |(n, _)| n);
            widgetry_common::glob::matches(glob, name)
        })
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
                bounds: Bounds {
                    op: Op::Gt,
                    threshold: 90.0,
                    clear_op: Op::Lt,
                    clear: 85.5
                }
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
        assert!(matches!(r.condition, Condition::Threshold { bounds, .. } if bounds.clear == 80.0));
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

    #[test]
    fn rates_are_per_second_with_the_same_hysteresis() {
        let r = spec("rate > 5/s").validate().expect("valid");
        let Condition::Rate { series, bounds } = &r.condition else {
            panic!("{:?}", r.condition)
        };
        assert_eq!(series, "cpu.usage_pct");
        assert_eq!((bounds.op, bounds.threshold), (Op::Gt, 5.0));
        assert_eq!((bounds.clear_op, bounds.clear), (Op::Lt, 4.75));
        let r = RuleSpec {
            clear: Some("rate < 60/m".into()),
            hold: Some("30s".into()),
            ..spec("rate >= 120/m")
        }
        .validate()
        .expect("valid");
        assert_eq!(r.hold_ms, 30_000);
        let Condition::Rate { bounds, .. } = r.condition else {
            panic!("rate")
        };
        assert_eq!((bounds.threshold, bounds.clear), (2.0, 1.0));
        let r = spec("rate < -3600/h").validate().expect("a falling rate");
        assert!(
            matches!(r.condition, Condition::Rate { bounds, .. } if bounds.threshold == -1.0 && bounds.clear_op == Op::Gt)
        );
        let e = |s: RuleSpec| s.validate().expect_err("invalid");
        let no_unit = e(spec("rate > 5"));
        assert!(
            no_unit.starts_with("when:")
                && no_unit.contains("\"rate > 5\"")
                && no_unit.contains("/s"),
            "{no_unit}"
        );
        let bad_unit = e(spec("rate > 5/day"));
        assert!(bad_unit.contains("\"day\""), "{bad_unit}");
        assert!(e(spec("rate > fast/s")).contains("\"fast\" is not a number"));
        assert!(
            e(RuleSpec {
                series: None,
                ..spec("rate > 1/s")
            })
            .starts_with("series: a rate rule")
        );
        assert!(
            e(RuleSpec {
                clear: Some("rate < 6/s".into()),
                ..spec("rate > 5/s")
            })
            .contains("overlaps")
        );
    }

    #[test]
    fn no_data_waits_intervals_or_a_duration() {
        let r = spec("no data").validate().expect("valid");
        assert_eq!(
            r.condition,
            Condition::NoData {
                series: "cpu.usage_pct".into(),
                after: Silence::Intervals(3)
            }
        );
        assert_eq!(r.hold_ms, 0, "the silence is the condition, not a hold");
        let with = |hold: &str| {
            RuleSpec {
                hold: Some(hold.into()),
                ..spec("no data")
            }
            .validate()
        };
        assert!(matches!(
            with("5 intervals").expect("valid").condition,
            Condition::NoData {
                after: Silence::Intervals(5),
                ..
            }
        ));
        assert!(matches!(
            with("1 interval").expect("valid").condition,
            Condition::NoData {
                after: Silence::Intervals(1),
                ..
            }
        ));
        assert!(matches!(
            with("2m").expect("valid").condition,
            Condition::NoData {
                after: Silence::Ms(120_000),
                ..
            }
        ));
        for (bad, needle) in [
            ("0 intervals", "1 to 1000"),
            ("1001 intervals", "1 to 1000"),
            ("many intervals", "\"many\""),
            ("5 parsecs", "N intervals"),
            ("8d", "7 days"),
            ("500ms", "at least 1s"),
        ] {
            let err = with(bad).expect_err(bad);
            assert!(
                err.starts_with("for:") && err.contains(needle),
                "{bad}: {err}"
            );
        }
        let e = |s: RuleSpec| s.validate().expect_err("invalid");
        assert!(
            e(RuleSpec {
                clear: Some("< 1".into()),
                ..spec("no data")
            })
            .starts_with("clear:")
        );
        assert!(
            e(RuleSpec {
                series: None,
                ..spec("no data")
            })
            .starts_with("series:")
        );
    }

    #[test]
    fn rejects_and_gaps_count_over_a_window() {
        let count = |when: &str| RuleSpec {
            series: None,
            ..spec(when)
        };
        let r = count("rejects > 10 in 5m").validate().expect("valid");
        assert_eq!(
            r.condition,
            Condition::Count {
                what: Counted::Rejects,
                bounds: Bounds {
                    op: Op::Gt,
                    threshold: 10.0,
                    clear_op: Op::Le,
                    clear: 9.5
                },
                window_ms: 300_000
            }
        );
        let r = count("gaps > 0 in 1h").validate().expect("valid");
        assert!(
            matches!(r.condition, Condition::Count { what: Counted::Gaps, bounds, window_ms: 3_600_000 } if bounds.clear == 0.0 && bounds.clears(0.0))
        );
        let r = RuleSpec {
            clear: Some("rejects < 3".into()),
            hold: Some("1m".into()),
            ..count("rejects >= 5 in 10m")
        }
        .validate()
        .expect("valid");
        assert_eq!(r.hold_ms, 60_000);
        assert!(
            matches!(r.condition, Condition::Count { bounds, .. } if bounds.clear == 3.0 && bounds.clear_op == Op::Lt)
        );
        for (bad, needle) in [
            ("rejects > 10", "in 5m"),
            ("rejects < 10 in 5m", "rising count"),
            ("gaps > -1 in 5m", "rising count"),
            ("gaps > 1 in 2d", "24 hours"),
            ("gaps > 1 in 10ms", "at least 1s"),
            ("gaps > 1 in soon", "\"soon\""),
            ("rejects > lots in 5m", "\"lots\" is not a number"),
        ] {
            let err = count(bad).validate().expect_err(bad);
            assert!(
                err.starts_with("when:") && err.contains(needle),
                "{bad}: {err}"
            );
        }
        let err = spec("rejects > 1 in 5m")
            .validate()
            .expect_err("series given");
        assert!(err.starts_with("series:"), "{err}");
        let err = RuleSpec {
            clear: Some("rejects < 20".into()),
            ..count("rejects > 10 in 5m")
        }
        .validate()
        .expect_err("overlap");
        assert!(err.contains("overlaps"), "{err}");
    }

    #[test]
    fn clear_conditions_must_not_overlap_at_the_threshold() {
        let with = |when: &str, clear: &str| {
            RuleSpec {
                clear: Some(clear.into()),
                ..spec(when)
            }
            .validate()
        };
        assert!(with("> 90", "< 90").is_ok());
        assert!(with(">= 90", "< 90").is_ok());
        assert!(
            with(">= 90", "<= 90").is_err(),
            "90 would both fire and clear"
        );
        assert!(with("< 5", ">= 5").is_ok());
        assert!(with("<= 5", ">= 5").is_err());
        assert!(with("> 90", "> 95").is_err(), "same side");
    }
}
