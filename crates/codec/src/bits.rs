//! Bit-level writer and reader (most significant bit first) for the
//! Gorilla encoding. The reader returns an error past the end, never panics.

use crate::DecodeError;

#[derive(Default)]
pub struct BitWriter {
    out: Vec<u8>,
    /// Pending bits, right-aligned; fewer than 8 between calls.
    acc: u128,
    n: u32,
}

impl BitWriter {
    pub fn with_capacity(bytes: usize) -> Self {
        BitWriter {
            out: Vec::with_capacity(bytes),
            ..Default::default()
        }
    }

    /// Appends the low `bits` bits of `value` (`bits` ≤ 64).
    pub fn write(&mut self, value: u64, bits: u32) {
        debug_assert!(bits <= 64);
        if bits == 0 {
            return;
        }
        let masked = if bits == 64 {
            value
        } else {
            value & ((1u64 << bits) - 1)
        };
        self.acc = (self.acc << bits) | u128::from(masked);
        self.n += bits;
        while self.n >= 8 {
            self.n -= 8;
            self.out.push((self.acc >> self.n) as u8);
        }
        self.acc &= (1u128 << self.n) - 1;
    }

    pub fn write_bit(&mut self, bit: bool) {
        self.write(u64::from(bit), 1);
    }

    /// The bytes, the last one padded with zero bits.
    pub fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push((self.acc << (8 - self.n)) as u8);
        }
        self.out
    }

    /// Bytes written so far (whole bytes only).
    pub fn bytes(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }
}

pub struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        BitReader { data, pos: 0 }
    }

    pub fn remaining_bits(&self) -> usize {
        self.data.len() * 8 - self.pos
    }

    /// Reads `bits` bits (≤ 64) as the low bits of a u64.
    pub fn read(&mut self, bits: u32, what: &'static str) -> Result<u64, DecodeError> {
        debug_assert!(bits <= 64);
        if bits as usize > self.remaining_bits() {
            return Err(DecodeError::Truncated(what));
        }
        let mut v = 0u64;
        let mut need = bits;
        while need > 0 {
            let byte = self.data[self.pos / 8];
            let off = (self.pos % 8) as u32;
            let avail = 8 - off;
            let take = avail.min(need);
            let chunk = (u16::from(byte) >> (avail - take)) & ((1u16 << take) - 1);
            v = (v << take) | u64::from(chunk);
            need -= take;
            self.pos += take as usize;
        }
        Ok(v)
    }

    pub fn read_bit(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        Ok(self.read(1, what)? == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_from_1_to_64_round_trip() {
        let mut w = BitWriter::default();
        for bits in 1..=64u32 {
            w.write(u64::MAX - u64::from(bits), bits);
        }
        let data = w.finish();
        let mut r = BitReader::new(&data);
        for bits in 1..=64u32 {
            let want = if bits == 64 {
                u64::MAX - 64
            } else {
                (u64::MAX - u64::from(bits)) & ((1u64 << bits) - 1)
            };
            assert_eq!(
                r.read(bits, "test").expect("within the written bits"),
                want,
                "width {bits}"
            );
        }
        assert!(r.remaining_bits() < 8);
        assert_eq!(
            r.read(8, "past end"),
            Err(DecodeError::Truncated("past end"))
        );
    }
}
