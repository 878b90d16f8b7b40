//! A layout made for a general-purpose compressor, then zstd: timestamps
//! as zig-zag varints of their delta-of-delta (wrapping, so any `i64`
//! order round-trips), values XOR'd with the previous value's bits and
//! byte-transposed (all most significant bytes, then the next, ...), so
//! that the slowly-changing sign/exponent bytes form long runs.
//!
//! Layout: varint count; if any points, one zstd frame holding the
//! timestamp varints followed by the 8 value byte planes of `count` bytes.

use crate::{DecodeError, EncodeError, read_count, varint};

/// The caller has checked that the columns have equal lengths.
pub fn encode(ts: &[i64], values: &[f64], level: i32) -> Result<Vec<u8>, EncodeError> {
    let n = ts.len();
    let mut out = Vec::new();
    varint::put(&mut out, n as u64);
    if n == 0 {
        return Ok(out);
    }
    let mut plain = Vec::with_capacity(n * 10);
    let (mut prev_ts, mut prev_delta) = (0i64, 0i64);
    for &t in ts {
        let delta = t.wrapping_sub(prev_ts);
        varint::put(&mut plain, varint::zigzag(delta.wrapping_sub(prev_delta)));
        (prev_ts, prev_delta) = (t, delta);
    }
    let start = plain.len();
    plain.resize(start + 8 * n, 0);
    let mut prev = 0u64;
    for (i, v) in values.iter().enumerate() {
        let x = (v.to_bits() ^ prev).to_be_bytes();
        prev = v.to_bits();
        for (plane, byte) in x.iter().enumerate() {
            plain[start + plane * n + i] = *byte;
        }
    }
    let frame =
        zstd::bulk::compress(&plain, level).map_err(|e| EncodeError::Zstd(e.to_string()))?;
    out.extend_from_slice(&frame);
    Ok(out)
}

pub fn decode(data: &[u8]) -> Result<(Vec<i64>, Vec<f64>), DecodeError> {
    let Some((n, pos)) = read_count(data)? else {
        return Ok((Vec::new(), Vec::new()));
    };
    // At most 10 bytes per timestamp varint and 8 per value.
    let plain = zstd::bulk::decompress(&data[pos..], n * 18)
        .map_err(|e| DecodeError::Corrupt(format!("zstd frame: {e}")))?;
    let mut p = 0;
    let mut ts = Vec::with_capacity(n);
    let (mut prev_ts, mut prev_delta) = (0i64, 0i64);
    for _ in 0..n {
        let dod = varint::unzigzag(varint::get(&plain, &mut p, "a timestamp")?);
        let delta = prev_delta.wrapping_add(dod);
        let t = prev_ts.wrapping_add(delta);
        (prev_ts, prev_delta) = (t, delta);
        ts.push(t);
    }
    let planes = &plain[p..];
    if planes.len() != 8 * n {
        return Err(DecodeError::Corrupt(format!(
            "{} value bytes for {n} points, want {}",
            planes.len(),
            8 * n
        )));
    }
    let mut values = Vec::with_capacity(n);
    let mut prev = 0u64;
    for i in 0..n {
        let mut b = [0u8; 8];
        for (plane, byte) in b.iter_mut().enumerate() {
            *byte = planes[plane * n + i];
        }
        prev ^= u64::from_be_bytes(b);
        values.push(f64::from_bits(prev));
    }
    Ok((ts, values))
}
