//! A reader for `agent.toml`, which is flat TOML: `key = value` lines with
//! strings (`"…"`, escapes `\"` and `\\`), numbers, booleans and one-line
//! arrays of those; `#` comments and blank lines. Tables are not used by
//! the agent's settings. A full TOML parser would add ~230 KB to a binary
//! whose budget is 1 MB.

/// Keys whose values are never quoted in a problem.
pub const SECRET_KEYS: [&str; 1] = ["password"];

/// A value from the file, kept as text for the settings' own validation.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Scalar(String),
    List(Vec<String>),
}

fn parse_scalar(text: &str) -> Result<(String, &str), String> {
    let text = text.trim_start();
    if let Some(rest) = text.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => return Ok((out, &rest[i + 1..])),
                '\\' => match chars.next() {
                    Some((_, '"')) => out.push('"'),
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    _ => return Err("unsupported escape in string".into()),
                },
                c => out.push(c),
            }
        }
        Err("unterminated string".into())
    } else {
        let end = text.find([',', ']', '#']).unwrap_or(text.len());
        let word = text[..end].trim();
        let ok = !word.is_empty()
            && word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_'));
        if ok {
            Ok((word.replace('_', ""), &text[end..]))
        } else {
            Err(format!(
                "{word:?} is not a string (quote it), number or boolean"
            ))
        }
    }
}

fn parse_value(text: &str) -> Result<Value, String> {
    let text = text.trim();
    let rest;
    let value = if let Some(mut inner) = text.strip_prefix('[') {
        let mut items = Vec::new();
        loop {
            inner = inner.trim_start();
            if let Some(r) = inner.strip_prefix(']') {
                rest = r;
                break;
            }
            let (item, r) = parse_scalar(inner)?;
            items.push(item);
            let r = r.trim_start();
            inner = match r.strip_prefix(',') {
                Some(r) => r,
                None if r.starts_with(']') => r,
                None => return Err("expected ',' or ']' in array".into()),
            };
        }
        Value::List(items)
    } else {
        let (v, r) = parse_scalar(text)?;
        rest = r;
        Value::Scalar(v)
    };
    let rest = rest.trim();
    if rest.is_empty() || rest.starts_with('#') {
        Ok(value)
    } else {
        Err(format!("unexpected {rest:?} after the value"))
    }
}

/// Parses the file; every bad line is reported with its number.
pub fn parse(text: &str) -> Result<Vec<(String, Value)>, Vec<String>> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            problems.push(format!("line {}: expected key = value", n + 1));
            continue;
        };
        let key = key.trim().trim_matches('"');
        match parse_value(value) {
            Ok(v) => out.push((key.to_string(), v)),
            // The messages quote the text they could not read: never a
            // secret's.
            Err(_) if SECRET_KEYS.contains(&key) => problems.push(format!(
                "line {} ({key}): not a valid value (quote it: {key} = \"…\"; the value is not shown)",
                n + 1
            )),
            Err(e) => problems.push(format!("line {} ({key}): {e}", n + 1)),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_flat_toml() {
        let text = "# agent\ndevice = \"kiosk-1\"  # trailing comment\nspool_max_bytes = 1_048_576\n\
                    watch = [\"nginx\", \"ssh d\"]\nwatch_pid = [12, 34,]\nname = \"a \\\"b\\\"\"\n";
        let got = parse(text).expect("valid");
        assert_eq!(got[0], ("device".into(), Value::Scalar("kiosk-1".into())));
        assert_eq!(got[1].1, Value::Scalar("1048576".into()));
        assert_eq!(got[2].1, Value::List(vec!["nginx".into(), "ssh d".into()]));
        assert_eq!(got[3].1, Value::List(vec!["12".into(), "34".into()]));
        assert_eq!(got[4].1, Value::Scalar("a \"b\"".into()));
    }

    /// Found by the fuzz target `agent_toml`: an unquoted password with a
    /// space was quoted back in the problem ("… is not a string").
    #[test]
    fn a_bad_password_line_is_reported_without_its_value() {
        for line in [
            "password = ce tttttttttottmmte",
            "password = \"pa55word-x\" trailing",
            "\"password\" = \"pa55word-x\\q\"",
            "password = [\"pa55word-x\" \"y\"]",
            "password = \"pa55word-x",
        ] {
            let errs = parse(&format!("device = \"d\"\n{line}\n")).expect_err(line);
            assert_eq!(errs.len(), 1, "{line}: {errs:?}");
            assert!(errs[0].starts_with("line 2 (password)"), "{errs:?}");
            assert!(
                !errs[0].contains("pa55word") && !errs[0].contains("ttttt"),
                "password leaked: {errs:?}"
            );
        }
        // Other keys still show what was wrong.
        let errs = parse("device = two words\n").expect_err("unquoted");
        assert!(errs[0].contains("two words"), "{errs:?}");
    }

    #[test]
    fn reports_every_bad_line() {
        let errs = parse("a = \"open\nno equals\nb = bare words\nc = [1 2]\n").expect_err("bad");
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert!(errs[0].starts_with("line 1"));
    }
}
