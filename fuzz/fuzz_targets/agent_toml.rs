//! The `agent.toml` loader (`settings::from_file_text`: the flat TOML
//! reader and the settings' validation): returns the settings or at least
//! one problem, never panics, and never echoes the `password` value (a
//! value found in the problems must be there whatever the password is).
#![no_main]

use libfuzzer_sys::fuzz_target;
use widgetry_agent::settings::from_file_text;

/// The value of each `password = …` line (quoted or not), if it occurs
/// once in the text and is long enough not to appear by chance.
fn passwords(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(key, _)| key.trim().trim_matches('"') == "password")
        .map(|(_, value)| {
            let value = value.trim();
            match value.strip_prefix('"') {
                Some(rest) => rest.split('"').next().unwrap_or(rest),
                None => value,
            }
        })
        .filter(|secret| secret.len() >= 8 && text.matches(secret).count() == 1)
        .collect()
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
    match from_file_text("agent.toml", text) {
        Ok(cfg) => {
            widgetry_proto::validate::validate_device(&cfg.device)
                .expect("an accepted device id validates");
            assert!(cfg.broker_port != 0);
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "an error names at least one problem");
            for pw in passwords(text) {
                let shown = problems.join("\n");
                if !shown.contains(pw) {
                    continue;
                }
                // Echoed, unless the problems contain that text anyway
                // (a "password" that is the text of a message): load the
                // file again with the password changed.
                let other = text.replacen(pw, &rotate(pw), 1);
                let shown_other = from_file_text("agent.toml", &other)
                    .err()
                    .unwrap_or_default()
                    .join("\n");
                assert!(
                    rotate(pw) == pw || shown_other.contains(pw),
                    "password {pw:?} echoed in: {shown}"
                );
            }
        }
    }
});
