//! Helpers shared by every Widgetry crate (agent, server, load generator):
//! wall-clock time, reconnect backoff with jitter, duration and `HOST:PORT`
//! parsing. One tested copy of each.
//!
//! No dependencies and no async runtime by default: the agent links it,
//! and its binary must stay small. The `signal` feature adds
//! [`shutdown_signal`] (tokio, which both binaries already use); `mqtt`
//! adds [`mqtt_client`].

pub mod csv;
pub mod glob;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A rumqttc client and its event loop, with `TCP_NODELAY` on the
/// connections it makes. Every Widgetry MQTT client is made here: with
/// Nagle's algorithm on (rumqttc's default), a small packet written while
/// the previous one is unacknowledged waits for the peer's delayed ACK,
/// and every publish→ack round trip took ~40 ms even on an idle loopback.
#[cfg(feature = "mqtt")]
pub fn mqtt_client(
    opts: rumqttc::MqttOptions,
    cap: usize,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (client, mut ev) = rumqttc::AsyncClient::new(opts, cap);
    let mut net = ev.network_options();
    net.set_tcp_nodelay(true);
    ev.set_network_options(net);
    (client, ev)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `ms` since the Unix epoch as UTC, `YYYY-MM-DDTHH:MM:SSZ` (whole
/// seconds; years outside 0..=9999 are clamped to that range's ends).
pub fn utc_string(ms: i64) -> String {
    const MIN: i64 = -62_167_219_200; // 0000-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let secs = ms.div_euclid(1000).clamp(MIN, MAX);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Process-wide jitter state (splitmix64), seeded from the clock and the
/// process id on first use.
static JITTER: AtomicU64 = AtomicU64::new(0);

/// A pseudo-random u64 for jitter (not for anything secret).
pub fn jitter_u64() -> u64 {
    if JITTER.load(Ordering::Relaxed) == 0 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let seed = nanos ^ (u64::from(std::process::id()) << 32) | 1;
        let _ = JITTER.compare_exchange(0, seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    let mut z = JITTER
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Reconnect delay before attempt `attempt` (1, 2, …): exponential with
/// jitter, 100–200 ms at first, doubling up to `cap`, always in
/// `[limit/2, limit]` so many clients reconnecting at once spread out.
pub fn backoff(attempt: u32, cap: Duration) -> Duration {
    let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX).max(2);
    let limit = (100u64 << attempt.min(20)).min(cap_ms);
    Duration::from_millis(limit / 2 + jitter_u64() % (limit / 2 + 1))
}

/// Parses a duration: a number with a unit `ms`, `s`, `m`, `h`, `d` or `w`
/// (`250ms`, `1.5s`, `30d`), or a bare number of seconds. The error says
/// what was wrong and gives examples.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (num, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 10s, 2m, 30d)"))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3_600.0,
        "d" => 86_400.0,
        "w" => 604_800.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m, h, d or w)"
            ));
        }
    };
    let secs = n * scale;
    if !secs.is_finite() || secs > 1e12 {
        return Err(format!("{text:?} is too long"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Longest excerpt of an untrusted string that goes into a log line.
pub const EXCERPT_CHARS: usize = 120;

/// An untrusted string (a topic, a client id, a reject message quoting
/// input) made safe for one log line: control characters and quotes
/// escaped, at most [`EXCERPT_CHARS`] characters of it, "…" if cut.
pub fn excerpt(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(EXCERPT_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().nth(EXCERPT_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// Parses `HOST:PORT` (an IPv6 host may be bracketed: `[::1]:1883`); the
/// port must be 1–65535.
pub fn parse_host_port(text: &str) -> Result<(String, u16), String> {
    match text.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>())) {
        Some((host, Ok(port))) if !host.is_empty() && port != 0 => {
            Ok((host.trim_matches(['[', ']']).to_string(), port))
        }
        _ => Err(format!(
            "{text:?} is not HOST:PORT with a port of 1-65535 (e.g. 127.0.0.1:1883)"
        )),
    }
}

/// Resolves on SIGINT or SIGTERM (SIGINT only where SIGTERM cannot be
/// watched).
#[cfg(feature = "signal")]
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn excerpts_are_one_escaped_short_line() {
        let e = super::excerpt(&format!("a\nb\"{}", "x".repeat(500)));
        assert!(!e.contains('\n'), "{e}");
        assert!(e.starts_with("a\\nb\\\""), "{e}");
        assert!(e.ends_with('…'), "{e}");
        assert!(
            e.chars().count() <= 2 * super::EXCERPT_CHARS + 1,
            "{}",
            e.len()
        );
        assert_eq!(super::excerpt("plain/topic"), "plain/topic");
        assert_eq!(
            super::excerpt(&"y".repeat(super::EXCERPT_CHARS)),
            "y".repeat(super::EXCERPT_CHARS)
        );
    }

    use super::*;

    #[test]
    fn utc_strings() {
        assert_eq!(utc_string(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_string(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc_string(1_798_761_599_999), "2026-12-31T23:59:59Z");
        assert_eq!(utc_string(-1), "1969-12-31T23:59:59Z");
        assert_eq!(utc_string(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(utc_string(i64::MIN), "0000-01-01T00:00:00Z");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let cap = Duration::from_secs(10);
        for attempt in 1..30 {
            let d = backoff(attempt, cap).as_millis() as u64;
            let limit = (100u64 << attempt.min(20)).min(10_000);
            assert!(d >= limit / 2 && d <= limit, "attempt {attempt}: {d} ms");
        }
        let spread: std::collections::BTreeSet<u128> =
            (0..50).map(|_| backoff(8, cap).as_millis()).collect();
        assert!(spread.len() > 10, "jitter spreads delays: {spread:?}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(
            parse_duration("5y")
                .expect_err("5y")
                .contains("unknown unit")
        );
        assert!(
            parse_duration("abc")
                .expect_err("abc")
                .contains("not a duration")
        );
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1e300s").is_err());
    }

    #[test]
    fn host_ports() {
        assert_eq!(
            parse_host_port("127.0.0.1:1883"),
            Ok(("127.0.0.1".into(), 1883))
        );
        assert_eq!(parse_host_port("[::1]:8080"), Ok(("::1".into(), 8080)));
        assert_eq!(parse_host_port("broker:1"), Ok(("broker".into(), 1)));
        for bad in ["", "host", ":1883", "host:0", "host:65536", "host:x"] {
            assert!(parse_host_port(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn now_is_after_2020() {
        assert!(now_ms() > 1_577_836_800_000);
    }
}
