//! Small shared helpers: wall-clock time and reconnect backoff.

use std::time::Duration;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Exponential backoff with full jitter: attempt 1 waits up to 200 ms,
/// doubling up to 10 s, so many clients reconnecting at once spread out.
pub fn backoff(attempt: u32) -> Duration {
    let cap_ms = (100u64 << attempt.min(7)).min(10_000);
    Duration::from_millis(rand::random_range(cap_ms / 2..=cap_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..20 {
            let d = backoff(attempt).as_millis() as u64;
            let cap = (100u64 << attempt.min(7)).min(10_000);
            assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d} ms");
        }
        assert!(backoff(30) <= Duration::from_secs(10));
    }
}
