//! Gorilla-style encoding (Pelkonen et al., VLDB 2015): delta-of-delta
//! timestamps in prefix-coded buckets and XOR'd floats with a reused
//! leading/trailing-zero window.
//!
//! Layout: varint count; then, if any, the first timestamp and value as 64
//! raw bits each; then per further point a timestamp code and a value code.
//! Timestamp code, on `dod = delta - previous delta` (wrapping, so any
//! `i64` order round-trips; the first delta's previous delta is 0):
//! `0` for 0, `10`+7 bits, `110`+9, `1110`+12, `11110`+32 (signed), and
//! `11111`+64 bits for the rest. Value code, on `x = bits ^ previous bits`:
//! `0` for 0; `10` + the meaningful bits when they fit the previous window;
//! else `11` + 5 bits of leading zeros (at most 31) + 6 bits of (length - 1)
//! + the meaningful bits.

use crate::bits::{BitReader, BitWriter};
use crate::{DecodeError, checked_count, varint};

/// Timestamp buckets after the `0` code: (prefix ones, payload bits).
const TS_BUCKETS: [(u32, u32); 4] = [(1, 7), (2, 9), (3, 12), (4, 32)];

fn fits(v: i64, bits: u32) -> bool {
    let half = 1i64 << (bits - 1);
    (-half..half).contains(&v)
}

fn sign_extend(v: u64, bits: u32) -> i64 {
    if bits == 64 {
        v as i64
    } else {
        ((v << (64 - bits)) as i64) >> (64 - bits)
    }
}

/// The caller has checked that the columns have equal lengths.
pub fn encode(ts: &[i64], values: &[f64]) -> Vec<u8> {
    let mut w = BitWriter::with_capacity(16 + ts.len() * 2);
    varint::put(w.bytes(), ts.len() as u64);
    let (Some(&t0), Some(&v0)) = (ts.first(), values.first()) else {
        return w.finish();
    };
    w.write(t0 as u64, 64);
    w.write(v0.to_bits(), 64);
    let (mut prev_ts, mut prev_delta) = (t0, 0i64);
    let mut prev_bits = v0.to_bits();
    // The current value window: leading zeros and meaningful length (0 = none yet).
    let (mut lead, mut len) = (0u32, 0u32);
    for (&t, &v) in ts.iter().zip(values).skip(1) {
        let delta = t.wrapping_sub(prev_ts);
        let dod = delta.wrapping_sub(prev_delta);
        (prev_ts, prev_delta) = (t, delta);
        if dod == 0 {
            w.write_bit(false);
        } else if let Some(&(ones, bits)) = TS_BUCKETS.iter().find(|(_, b)| fits(dod, *b)) {
            // `ones` ones, then a zero.
            w.write(((1u64 << ones) - 1) << 1, ones + 1);
            w.write(dod as u64, bits);
        } else {
            w.write(0b11111, 5);
            w.write(dod as u64, 64);
        }

        let bits = v.to_bits();
        let x = bits ^ prev_bits;
        prev_bits = bits;
        if x == 0 {
            w.write_bit(false);
            continue;
        }
        let l = x.leading_zeros().min(31);
        let tz = x.trailing_zeros();
        if len > 0 && l >= lead && tz >= 64 - lead - len {
            w.write(0b10, 2);
            w.write(x >> (64 - lead - len), len);
        } else {
            lead = l;
            len = 64 - l - tz;
            w.write(0b11, 2);
            w.write(u64::from(lead), 5);
            w.write(u64::from(len - 1), 6);
            w.write(x >> tz, len);
        }
    }
    w.finish()
}

pub fn decode(data: &[u8]) -> Result<(Vec<i64>, Vec<f64>), DecodeError> {
    let mut pos = 0;
    let n = checked_count(varint::get(data, &mut pos, "the point count")?)?;
    let mut r = BitReader::new(&data[pos..]);
    if n == 0 {
        return finish(&r, Vec::new(), Vec::new());
    }
    // The first point takes 128 bits, every further one at least 2.
    let need = 128 + 2 * (n as u64 - 1);
    if need > r.remaining_bits() as u64 {
        return Err(DecodeError::Corrupt(format!(
            "{n} points claimed in {} bytes",
            data.len()
        )));
    }
    let mut ts = Vec::with_capacity(n);
    let mut values = Vec::with_capacity(n);
    let t0 = r.read(64, "the first timestamp")? as i64;
    let mut prev_bits = r.read(64, "the first value")?;
    ts.push(t0);
    values.push(f64::from_bits(prev_bits));
    let (mut prev_ts, mut prev_delta) = (t0, 0i64);
    let (mut lead, mut len) = (0u32, 0u32);
    for _ in 1..n {
        let mut ones = 0;
        while ones < 5 && r.read_bit("a timestamp code")? {
            ones += 1;
        }
        let dod = match ones {
            0 => 0,
            5 => r.read(64, "a timestamp")? as i64,
            k => {
                let bits = TS_BUCKETS[k - 1].1;
                sign_extend(r.read(bits, "a timestamp")?, bits)
            }
        };
        let delta = prev_delta.wrapping_add(dod);
        let t = prev_ts.wrapping_add(delta);
        (prev_ts, prev_delta) = (t, delta);
        ts.push(t);

        if r.read_bit("a value code")? {
            if r.read_bit("a value code")? {
                lead = r.read(5, "a value window")? as u32;
                len = r.read(6, "a value window")? as u32 + 1;
                if lead + len > 64 {
                    return Err(DecodeError::Corrupt(format!(
                        "value window of {lead} leading zeros and {len} bits exceeds 64"
                    )));
                }
            } else if len == 0 {
                return Err(DecodeError::Corrupt(
                    "value reuses a window before any was set".into(),
                ));
            }
            let x = r.read(len, "a value")? << (64 - lead - len);
            prev_bits ^= x;
        }
        values.push(f64::from_bits(prev_bits));
    }
    finish(&r, ts, values)
}

/// Only the last byte's zero padding may follow the points.
fn finish(
    r: &BitReader<'_>,
    ts: Vec<i64>,
    values: Vec<f64>,
) -> Result<(Vec<i64>, Vec<f64>), DecodeError> {
    if r.remaining_bits() >= 8 {
        return Err(DecodeError::Corrupt(format!(
            "{} bytes follow the last point",
            r.remaining_bits() / 8
        )));
    }
    Ok((ts, values))
}
