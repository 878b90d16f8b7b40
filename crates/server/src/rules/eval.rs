//! The alert state machine of one rule on one device (and series): pure,
//! so the lifecycle is tested without a server.
//!
//! Nothing open: the condition starts to hold → `pending` (or `firing` at
//! once when the rule has no `for`). Pending: the condition stops holding →
//! resolved without firing; it has held for `for` → `firing`. Firing: only
//! the rule's clear condition (the other side of the threshold, with a
//! margin) resolves it, so a value hovering at the threshold does not flap.
//! [`Window`] is the sliding count of rejects/gaps rules.

use super::COUNT_STEPS;

/// The phase of an open alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Firing,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Firing => "firing",
        }
    }
}

/// An alert that is pending or firing.
#[derive(Debug, Clone, PartialEq)]
pub struct Open {
    /// Its row in the database (None until stored).
    pub id: Option<i64>,
    pub phase: Phase,
    /// When the condition started to hold (ms).
    pub since_ms: i64,
    /// When it fired.
    pub fired_ms: Option<i64>,
    /// The latest value that kept it open (threshold rules).
    pub value: Option<f64>,
}

/// What one observation did to the alert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transition {
    Pending {
        at: i64,
    },
    Firing {
        at: i64,
    },
    /// `fired`: it had fired (false: it was only pending).
    Resolved {
        at: i64,
        fired: bool,
    },
}

/// One observation at `at`: `holds` is the rule's condition, `clears` its
/// clear condition (for presence rules, `!holds`).
pub fn step(
    open: &mut Option<Open>,
    hold_ms: i64,
    holds: bool,
    clears: bool,
    at: i64,
    value: Option<f64>,
) -> Option<Transition> {
    match open {
        None if holds => {
            let firing = hold_ms <= 0;
            *open = Some(Open {
                id: None,
                phase: if firing {
                    Phase::Firing
                } else {
                    Phase::Pending
                },
                since_ms: at,
                fired_ms: firing.then_some(at),
                value,
            });
            Some(if firing {
                Transition::Firing { at }
            } else {
                Transition::Pending { at }
            })
        }
        None => None,
        Some(o) if o.phase == Phase::Pending => {
            if !holds {
                *open = None;
                return Some(Transition::Resolved { at, fired: false });
            }
            o.value = value.or(o.value);
            if at.saturating_sub(o.since_ms) >= hold_ms {
                o.phase = Phase::Firing;
                o.fired_ms = Some(at);
                return Some(Transition::Firing { at });
            }
            None
        }
        Some(o) => {
            if clears {
                *open = None;
                return Some(Transition::Resolved { at, fired: true });
            }
            if holds {
                o.value = value.or(o.value);
            }
            None
        }
    }
}

/// Time passing without observations: a pending alert whose condition was
/// last seen holding fires once it has held for `hold_ms`.
pub fn tick(open: &mut Option<Open>, hold_ms: i64, now: i64) -> Option<Transition> {
    match open {
        Some(o) if o.phase == Phase::Pending && now.saturating_sub(o.since_ms) >= hold_ms => {
            o.phase = Phase::Firing;
            o.fired_ms = Some(now);
            Some(Transition::Firing { at: now })
        }
        _ => None,
    }
}

/// A count over a sliding window (rejects/gaps rules), kept in
/// [`COUNT_STEPS`] steps of the window: memory is fixed whatever the count,
/// and the window slides by one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    step_ms: i64,
    /// Index (time / step) of the newest step, once anything was added.
    head: Option<i64>,
    steps: [u64; COUNT_STEPS],
}

impl Window {
    pub fn new(window_ms: i64) -> Window {
        let n = COUNT_STEPS as i64;
        Window {
            step_ms: ((window_ms.max(1) + n - 1) / n).max(1),
            head: None,
            steps: [0; COUNT_STEPS],
        }
    }

    /// The window it counts over (ms).
    pub fn window_ms(&self) -> i64 {
        self.step_ms * COUNT_STEPS as i64
    }

    fn slot(idx: i64) -> usize {
        idx.rem_euclid(COUNT_STEPS as i64) as usize
    }

    /// Moves the window to end at step `idx`, emptying the steps it leaves.
    fn advance(&mut self, idx: i64) {
        match self.head {
            Some(h) if idx <= h => {}
            Some(h) if idx - h < COUNT_STEPS as i64 => {
                for i in h + 1..=idx {
                    self.steps[Self::slot(i)] = 0;
                }
                self.head = Some(idx);
            }
            _ => {
                self.steps = [0; COUNT_STEPS];
                self.head = Some(idx);
            }
        }
    }

    /// Counts `n` at `at` (ms); what is older than the window is ignored.
    pub fn add(&mut self, at: i64, n: u64) {
        let idx = at.div_euclid(self.step_ms);
        self.advance(idx);
        if let Some(h) = self.head
            && idx > h - COUNT_STEPS as i64
        {
            let s = &mut self.steps[Self::slot(idx)];
            *s = s.saturating_add(n);
        }
    }

    /// The count within the window ending at `now`.
    pub fn count(&mut self, now: i64) -> u64 {
        self.advance(now.div_euclid(self.step_ms));
        self.steps.iter().fold(0u64, |a, s| a.saturating_add(*s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `values` 1 s apart through a `> 90` rule cleared at `< 85`.
    fn run(values: &[f64], hold_ms: i64) -> Vec<Transition> {
        let mut open = None;
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let at = i as i64 * 1000;
            out.extend(step(&mut open, hold_ms, *v > 90.0, *v < 85.0, at, Some(*v)));
        }
        out
    }

    #[test]
    fn fires_after_holding_and_resolves_on_the_clear_side_only() {
        use Transition::*;
        assert_eq!(
            run(&[50.0, 95.0, 96.0, 97.0, 89.0, 91.0, 86.0, 84.0], 2000),
            [
                Pending { at: 1000 },
                Firing { at: 3000 },
                Resolved {
                    at: 7000,
                    fired: true
                }
            ]
        );
        // Hovering at the threshold after firing: no flapping.
        assert_eq!(
            run(&[95.0, 90.5, 89.5, 90.5, 89.5, 90.5], 0),
            [Firing { at: 0 }]
        );
    }

    #[test]
    fn a_pending_alert_that_stops_holding_resolves_unfired() {
        use Transition::*;
        assert_eq!(
            run(&[95.0, 50.0, 95.0], 5000),
            [
                Pending { at: 0 },
                Resolved {
                    at: 1000,
                    fired: false
                },
                Pending { at: 2000 }
            ]
        );
    }

    #[test]
    fn time_alone_fires_a_pending_alert() {
        let mut open = None;
        assert_eq!(
            step(&mut open, 3000, true, false, 0, None),
            Some(Transition::Pending { at: 0 })
        );
        assert_eq!(tick(&mut open, 3000, 2999), None);
        assert_eq!(
            tick(&mut open, 3000, 3000),
            Some(Transition::Firing { at: 3000 })
        );
        assert_eq!(tick(&mut open, 3000, 9000), None, "fires once");
        assert_eq!(open.as_ref().map(|o| o.phase), Some(Phase::Firing));
    }

    #[test]
    fn a_window_counts_what_is_within_it_and_slides() {
        // 60 s in 60 steps of 1 s.
        let mut w = Window::new(60_000);
        assert_eq!(w.window_ms(), 60_000);
        assert_eq!(w.count(0), 0);
        w.add(1_000, 3);
        w.add(1_500, 2);
        w.add(30_000, 1);
        assert_eq!(w.count(30_000), 6);
        assert_eq!(w.count(60_999), 6, "the first step is still inside");
        assert_eq!(w.count(61_000), 1, "the first step slid out");
        w.add(1_000, 9);
        assert_eq!(w.count(61_000), 1, "older than the window: ignored");
        w.add(60_500, 4);
        assert_eq!(w.count(61_000), 5, "a late one within the window counts");
        assert_eq!(w.count(10_000_000), 0, "a long quiet empties it");
        w.add(10_000_000, u64::MAX);
        w.add(10_000_000, 1);
        assert_eq!(w.count(10_000_000), u64::MAX, "saturates");
        // Windows that do not divide into steps round the step up.
        assert_eq!(Window::new(1_000).window_ms(), 1_020);
        assert_eq!(Window::new(0).window_ms(), 60);
    }
}
