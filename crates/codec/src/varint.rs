//! LEB128 varints and zig-zag, shared by the codecs' headers and layouts.

use crate::DecodeError;

pub fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint at `*pos`, advancing it; at most 10 bytes, and the tenth
/// may carry only the top bit.
pub fn get(data: &[u8], pos: &mut usize, what: &'static str) -> Result<u64, DecodeError> {
    let mut v = 0u64;
    for i in 0..10 {
        let b = *data.get(*pos).ok_or(DecodeError::Truncated(what))?;
        *pos += 1;
        if i == 9 && b > 1 {
            return Err(DecodeError::Corrupt(format!(
                "{what}: varint overflows 64 bits"
            )));
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError::Corrupt(format!(
        "{what}: varint longer than 10 bytes"
    )))
}

pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}
