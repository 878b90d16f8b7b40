//! Reading `timestamp,value` CSV — the NAB corpus' format — one bounded
//! line at a time, for `widgetry import` and the codec benchmark.
//!
//! A timestamp is epoch milliseconds (`1396310400000`) or ISO 8601 in UTC
//! (`2014-04-01 00:00:00`, `2014-04-01T00:00:00.250Z`, an offset such as
//! `+02:00`). A first line that does not start with a timestamp is a
//! header. Never holds more than [`MAX_LINE_BYTES`] of a line in memory:
//! a longer line is read past and reported as a bad row.

use std::io::{self, BufRead};

/// The longest line kept; the longest NAB line is 40 bytes.
pub const MAX_LINE_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// A first line that names the columns (`timestamp,value`).
    Header {
        line: u64,
    },
    Sample {
        line: u64,
        ts_ms: i64,
        value: f64,
    },
    /// A line that is not a sample, with the reason (input quoted through
    /// [`crate::excerpt`]).
    Bad {
        line: u64,
        error: String,
    },
}

pub struct SampleReader<R> {
    inner: R,
    line: u64,
    bytes: u64,
    buf: Vec<u8>,
}

impl<R: BufRead> SampleReader<R> {
    pub fn new(inner: R) -> Self {
        SampleReader {
            inner,
            line: 0,
            bytes: 0,
            buf: Vec::new(),
        }
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Bytes consumed so far (for progress reports).
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// The next row, or `None` at the end of the input.
    pub fn next_row(&mut self) -> io::Result<Option<Row>> {
        let Some(too_long) = self.read_line()? else {
            return Ok(None);
        };
        let line = self.line;
        if too_long {
            return Ok(Some(Row::Bad {
                line,
                error: format!("line longer than {MAX_LINE_BYTES} bytes"),
            }));
        }
        let text = match std::str::from_utf8(&self.buf) {
            Ok(t) => t.strip_suffix('\r').unwrap_or(t),
            Err(_) => {
                return Ok(Some(Row::Bad {
                    line,
                    error: "not UTF-8 text".into(),
                }));
            }
        };
        let is_header = line == 1
            && !text
                .trim_start()
                .trim_start_matches('"')
                .starts_with(|c: char| c.is_ascii_digit() || c == '-');
        Ok(Some(if is_header {
            Row::Header { line }
        } else {
            match parse_line(text) {
                Ok((ts_ms, value)) => Row::Sample { line, ts_ms, value },
                Err(error) => Row::Bad { line, error },
            }
        }))
    }

    /// Reads one line into `buf` (without its `\n`); `Some(true)` when it
    /// was longer than [`MAX_LINE_BYTES`] and was skipped, `None` at EOF.
    fn read_line(&mut self) -> io::Result<Option<bool>> {
        self.buf.clear();
        let mut too_long = false;
        let mut any = false;
        loop {
            let avail = match self.inner.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                break;
            }
            any = true;
            let (take, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (avail.len(), false),
            };
            if !too_long {
                if self.buf.len() + take > MAX_LINE_BYTES {
                    too_long = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(&avail[..take]);
                }
            }
            let used = take + usize::from(done);
            self.inner.consume(used);
            self.bytes += used as u64;
            if done {
                break;
            }
        }
        if !any {
            return Ok(None);
        }
        self.line += 1;
        Ok(Some(too_long))
    }
}

/// Parses `timestamp,value`.
pub fn parse_line(text: &str) -> Result<(i64, f64), String> {
    let Some((ts, value)) = text.split_once(',') else {
        return Err(format!(
            "\"{}\": expected `timestamp,value`",
            crate::excerpt(text)
        ));
    };
    if value.contains(',') {
        return Err(format!(
            "\"{}\": more than two fields (expected `timestamp,value`)",
            crate::excerpt(text)
        ));
    }
    let ts = parse_timestamp(unquote(ts))?;
    let v = unquote(value);
    let value = v
        .parse::<f64>()
        .map_err(|_| format!("value \"{}\" is not a number", crate::excerpt(v)))?;
    Ok((ts, value))
}

fn unquote(field: &str) -> &str {
    let f = field.trim();
    f.strip_prefix('"')
        .and_then(|f| f.strip_suffix('"'))
        .unwrap_or(f)
        .trim()
}

/// Epoch milliseconds, or ISO 8601 (`YYYY-MM-DD[T ]HH:MM[:SS[.fff]]`,
/// optional `Z` or `±HH:MM`; UTC without one).
pub fn parse_timestamp(text: &str) -> Result<i64, String> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<i64>()
            .map_err(|_| format!("timestamp \"{}\" is out of range", crate::excerpt(text)));
    }
    parse_iso(text).map_err(|why| {
        format!(
            "timestamp \"{}\": {why} (expected epoch ms or e.g. 2014-04-01 00:00:00)",
            crate::excerpt(text)
        )
    })
}

fn parse_iso(text: &str) -> Result<i64, &'static str> {
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Result<i64, &'static str> {
        let part = b.get(from..from + len).ok_or("too short")?;
        if !part.iter().all(u8::is_ascii_digit) {
            return Err("not a date and time");
        }
        Ok(part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let sep = |at: usize, want: &[u8]| b.get(at).is_some_and(|c| want.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"T ") && sep(13, b":")) {
        return Err("not a date and time");
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute) = (num(11, 2)?, num(14, 2)?);
    let mut pos = 16;
    let mut second = 0;
    let mut ms = 0;
    if sep(pos, b":") {
        second = num(pos + 1, 2)?;
        pos += 3;
        if sep(pos, b".") {
            pos += 1;
            let start = pos;
            while b.get(pos).is_some_and(u8::is_ascii_digit) {
                pos += 1;
            }
            let frac = &b[start..pos];
            if frac.is_empty() || frac.len() > 9 {
                return Err("fraction of a second needs 1-9 digits");
            }
            if frac.iter().skip(3).any(|&d| d != b'0') {
                return Err("finer than a millisecond");
            }
            ms = frac
                .iter()
                .take(3)
                .chain(std::iter::repeat(&b'0'))
                .take(3)
                .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
        }
    }
    let offset_min = match &b[pos..] {
        [] | [b'Z'] | [b'z'] => 0,
        [s @ (b'+' | b'-'), rest @ ..] if rest.len() == 5 && rest[2] == b':' => {
            let h = num(pos + 1, 2)?;
            let m = num(pos + 4, 2)?;
            if h > 23 || m > 59 {
                return Err("offset out of range");
            }
            let o = h * 60 + m;
            if *s == b'-' { -o } else { o }
        }
        _ => return Err("unexpected text after the time"),
    };
    if !(1..=12).contains(&month) {
        return Err("month out of range");
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if day < 1 || day > month_days[(month - 1) as usize] {
        return Err("day out of range for the month");
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err("time of day out of range");
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_min * 60;
    Ok(secs * 1000 + ms)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(input: &[u8]) -> Vec<Row> {
        let mut r = SampleReader::new(input);
        let mut out = Vec::new();
        while let Some(row) = r.next_row().expect("reading from memory") {
            out.push(row);
        }
        assert_eq!(r.bytes_read(), input.len() as u64);
        out
    }

    #[test]
    fn nab_lines_parse_to_utc_milliseconds() {
        assert_eq!(
            parse_line("2014-04-01 00:00:00,69.88083514"),
            Ok((1_396_310_400_000, 69.88083514))
        );
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Ok(0));
        assert_eq!(parse_timestamp("1969-12-31T23:59:59.999Z"), Ok(-1));
        assert_eq!(
            parse_timestamp("2000-02-29T12:00:00+01:30"),
            Ok(951_825_600_000 - 5_400_000)
        );
        assert_eq!(parse_timestamp("2013-12-02 21:15"), Ok(1_386_018_900_000));
        assert_eq!(
            parse_timestamp("2014-04-01 00:00:00.25"),
            Ok(1_396_310_400_250)
        );
        assert_eq!(parse_timestamp("1396310400000"), Ok(1_396_310_400_000));
        assert_eq!(parse_timestamp("-5"), Ok(-5));
    }

    #[test]
    fn bad_timestamps_say_why() {
        for (text, why) in [
            ("2014-02-30 00:00:00", "day out of range"),
            ("2013-02-29 00:00:00", "day out of range"),
            ("2014-13-01 00:00:00", "month out of range"),
            ("2014-04-01 24:00:00", "time of day"),
            ("2014-04-01 00:00:00.0001", "finer than a millisecond"),
            ("2014-04-01 00:00:00 UTC", "unexpected text"),
            ("99999999999999999999", "out of range"),
            ("yesterday", "not a date"),
            ("", "not a date"),
            ("2014-04-01 00:0", "too short"),
        ] {
            let e = parse_timestamp(text).expect_err(text);
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn header_samples_and_bad_rows_carry_line_numbers() {
        let got = rows(b"timestamp,value\n2014-04-01 00:00:00,1.5\r\nnope\n\n1396310400000,x\n1,2,3\n2014-04-01 00:05:00,-0\n");
        assert_eq!(got[0], Row::Header { line: 1 });
        assert_eq!(
            got[1],
            Row::Sample {
                line: 2,
                ts_ms: 1_396_310_400_000,
                value: 1.5
            }
        );
        for (i, line, why) in [
            (2, 3, "expected `timestamp,value`"),
            (3, 4, "expected `timestamp,value`"),
            (4, 5, "not a number"),
            (5, 6, "more than two fields"),
        ] {
            match &got[i] {
                Row::Bad { line: l, error } => {
                    assert_eq!(*l, line, "{error}");
                    assert!(error.contains(why), "line {line}: {error}");
                }
                other => panic!("line {line}: expected a bad row, got {other:?}"),
            }
        }
        assert!(
            matches!(got[6], Row::Sample { line: 7, value, .. } if value.to_bits() == (-0.0f64).to_bits())
        );
        assert_eq!(got.len(), 7);
    }

    #[test]
    fn a_header_is_only_recognised_on_line_1() {
        let got = rows(b"1,2\ntimestamp,value\n");
        assert!(matches!(got[0], Row::Sample { line: 1, .. }));
        assert!(matches!(got[1], Row::Bad { line: 2, .. }));
    }

    #[test]
    fn an_overlong_line_is_skipped_without_being_held() {
        // Through a small buffer, so the line arrives in many pieces.
        let mut input = b"1,1\n".to_vec();
        input.extend(std::iter::repeat_n(b'9', 10 * MAX_LINE_BYTES));
        input.extend_from_slice(b",1\n3,3");
        let mut r = SampleReader::new(io::BufReader::with_capacity(64, &input[..]));
        let mut got = Vec::new();
        while let Some(row) = r.next_row().expect("reading from memory") {
            assert!(
                r.buf.capacity() <= 2 * MAX_LINE_BYTES,
                "held {} bytes",
                r.buf.capacity()
            );
            got.push(row);
        }
        assert!(matches!(got[0], Row::Sample { line: 1, .. }));
        assert_eq!(
            got[1],
            Row::Bad {
                line: 2,
                error: format!("line longer than {MAX_LINE_BYTES} bytes")
            }
        );
        assert!(matches!(
            got[2],
            Row::Sample {
                line: 3,
                ts_ms: 3,
                ..
            }
        ));
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1600, 1, 1), -135_140);
    }
}
