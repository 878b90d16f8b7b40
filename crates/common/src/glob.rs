//! Shell-style name patterns: `*` matches any run of characters (also
//! none), `?` exactly one, every other character itself. Used for the
//! device and series filters of sinks (`[graphite] filter`).
//!
//! Matching costs at most `pattern.len() × name.len()` steps (one
//! backtrack point, the last `*`), so an untrusted pattern or name cannot
//! make it exponential.

/// Whether `name` matches `pattern` as a whole.
pub fn matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and the name position it was tried from.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                // Let the last `*` take one more character.
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn stars_and_question_marks() {
        assert!(matches("*", ""));
        assert!(matches("*", "anything"));
        assert!(matches("line-1-*", "line-1-press"));
        assert!(!matches("line-1-*", "line-2-press"));
        assert!(matches("cpu.*_pct", "cpu.usage_pct"));
        assert!(!matches("cpu.*_pct", "cpu.usage_pct2"));
        assert!(matches("d-??", "d-42"));
        assert!(!matches("d-??", "d-4"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(!matches("a*b*c", "axxbyy"));
        assert!(matches("exact", "exact"));
        assert!(!matches("exact", "exactly"));
        assert!(!matches("", "x"));
        assert!(matches("", ""));
    }

    #[test]
    fn a_hostile_pattern_stays_linear_per_star() {
        let name = "a".repeat(10_000);
        let pattern = format!("{}b", "*a".repeat(100));
        assert!(!matches(&pattern, &name));
    }
}
