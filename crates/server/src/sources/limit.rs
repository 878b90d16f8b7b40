//! The per-device message rate limit: a token bucket per device id, so one
//! device (or anyone publishing under its id) flooding the broker costs the
//! ingestor a hash lookup per message, not a decode and a transaction.
//! Memory stays bounded: past [`MAX_TRACKED`] devices the buckets start
//! over (each then begins full again).

use std::collections::HashMap;
use std::time::Instant;

/// Devices whose buckets are kept at once.
pub const MAX_TRACKED: usize = 100_000;

/// What to do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Over the limit; the first such message of a 10 s window, whose
    /// reject is reported to the device.
    DropAndReport,
    /// Over the limit, already reported in this window.
    Drop,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    reported_window: u64,
}

pub struct RateLimiter {
    per_s: f64,
    burst: f64,
    buckets: HashMap<String, Bucket>,
    start: Instant,
}

impl RateLimiter {
    pub fn new(per_s: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            per_s: f64::from(per_s),
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
            start: Instant::now(),
        }
    }

    /// Takes one message of `device` at `now`.
    pub fn check(&mut self, device: &str, now: Instant) -> Verdict {
        if self.buckets.len() >= MAX_TRACKED && !self.buckets.contains_key(device) {
            self.buckets.clear();
        }
        let (burst, per_s) = (self.burst, self.per_s);
        let bucket = self
            .buckets
            .entry(device.to_string())
            .or_insert_with(|| Bucket {
                tokens: burst,
                at: now,
                reported_window: u64::MAX,
            });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_s).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Verdict::Pass;
        }
        let window = now.saturating_duration_since(self.start).as_secs() / 10;
        if bucket.reported_window == window {
            Verdict::Drop
        } else {
            bucket.reported_window = window;
            Verdict::DropAndReport
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate_per_device() {
        let mut l = RateLimiter::new(10, 5);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(l.check("a", t0), Verdict::Pass);
        }
        assert_eq!(l.check("a", t0), Verdict::DropAndReport);
        assert_eq!(l.check("a", t0), Verdict::Drop);
        assert_eq!(
            l.check("b", t0),
            Verdict::Pass,
            "another device has its own bucket"
        );
        // 10/s: after 300 ms three more pass.
        let t1 = t0 + Duration::from_millis(300);
        let passed = (0..10)
            .filter(|_| l.check("a", t1) == Verdict::Pass)
            .count();
        assert_eq!(passed, 3);
        // A new 10 s window reports again.
        let t2 = t0 + Duration::from_millis(10_000);
        let verdicts: Vec<Verdict> = (0..7).map(|_| l.check("a", t2)).collect();
        assert!(verdicts.contains(&Verdict::DropAndReport), "{verdicts:?}");
    }
}
