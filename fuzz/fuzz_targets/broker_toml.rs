//! The `broker.toml` loader (`config::parse_broker_config`): returns the
//! config or a `ConfigError` with at least one problem, never panics, and
//! never echoes a password of a `[….connections.auth]` table in its errors
//! (a value found in the error must be there whatever the password is).
#![no_main]

use libfuzzer_sys::fuzz_target;
use widgetry_server::config::{BrokerSource, ListenOverride, parse_broker_config};

/// The values of `user = "password"` lines under a
/// `[v4.*.connections.auth]` or `[v5.*.connections.auth]` header,
/// found line by line (so also in a text that is not valid TOML), that
/// occur once in the text and are long enough not to appear by chance.
fn passwords(text: &str) -> Vec<&str> {
    let mut in_auth = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            // `[v4.1.connections.auth]`, not any table with "auth" in its
            // name (`[v5.1auth]` is a listener named "1auth").
            let name: String = line.chars().filter(|c| !c.is_whitespace()).collect();
            in_auth = name.starts_with("[v") && name.ends_with(".connections.auth]");
            continue;
        }
        let Some((_, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let secret = match value.strip_prefix('"') {
            Some(rest) => rest.split('"').next().unwrap_or(rest),
            None => value,
        };
        if in_auth && secret.len() >= 8 && text.matches(secret).count() == 1 {
            out.push(secret);
        }
    }
    out
}

/// `s` with every ASCII letter and digit replaced by the next one (z→a,
/// 9→0): the same shape to a parser, different text.
fn rotate(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'a'..='y' | 'A'..='Y' | '0'..='8' => char::from(c as u8 + 1),
            'z' => 'a',
            'Z' => 'A',
            '9' => '0',
            c => c,
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_broker_config(&BrokerSource::BuiltIn, text, ListenOverride::default()) {
        Ok(cfg) => {
            assert!(cfg.rumqttd.v4.as_ref().is_some_and(|v4| !v4.is_empty()));
        }
        Err(e) => {
            assert!(!e.0.is_empty(), "an error names at least one problem");
            let shown = e.to_string();
            for pw in passwords(text) {
                if !shown.contains(pw) {
                    continue;
                }
                // Echoed, unless the error contains that text anyway:
                // load the file again with the password changed.
                let other = text.replacen(pw, &rotate(pw), 1);
                let shown_other =
                    parse_broker_config(&BrokerSource::BuiltIn, &other, ListenOverride::default())
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                assert!(
                    rotate(pw) == pw || shown_other.contains(pw),
                    "password {pw:?} echoed in: {shown}"
                );
            }
        }
    }
});
