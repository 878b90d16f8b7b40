//! Lossless encodings of one series' points — timestamps in ms since the
//! Unix epoch (`i64`) and `f64` values — for storage chunks, and the
//! benchmark that chose between them (`widgetry-codec-bench`,
//! docs/BENCHMARKS.md).
//!
//! Three candidates, each a self-describing byte string:
//! - [`gorilla`]: delta-of-delta timestamps and XOR'd floats as in
//!   Facebook's Gorilla paper (what Prometheus-style engines store);
//! - [`pcodec`]: the two columns compressed by the `pco` crate;
//! - [`delta_zstd`]: delta-of-delta varints and byte-transposed XOR'd
//!   floats, compressed by zstd.
//!
//! [`Codec::encode`] prefixes the codec's tag byte so that [`decode`]
//! reads any of them. Every codec is bit-exact: values come back with the
//! same bits (NaN payloads, -0.0, subnormals), timestamps with any `i64`
//! in any order. Decoders return errors on any input, never panic, and
//! allocate at most [`MAX_SAMPLES`] points.

pub mod bits;
pub mod delta_zstd;
pub mod gorilla;
pub mod pcodec;
mod varint;

/// The most points one encoded series may hold: bounds what a decoder
/// allocates for an untrusted count (2M points = 32 MiB decoded; a week of
/// 1 Hz samples is 604,800).
pub const MAX_SAMPLES: usize = 1 << 21;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("{timestamps} timestamps but {values} values: a series needs one of each per point")]
    Mismatch { timestamps: usize, values: usize },
    #[error("{0} points: a series holds at most {MAX_SAMPLES}; split it into smaller chunks")]
    TooMany(usize),
    #[error("pcodec: {0}")]
    Pco(String),
    #[error("zstd: {0}")]
    Zstd(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("truncated: the data ends inside {0}")]
    Truncated(&'static str),
    #[error("corrupt: {0}")]
    Corrupt(String),
    #[error("{0} points claimed: a series holds at most {MAX_SAMPLES}")]
    TooMany(u64),
    #[error("unknown codec tag {0}")]
    UnknownTag(u8),
    #[error("empty input: no codec tag")]
    Empty,
}

/// Which encoding a chunk uses; its `tag` is the chunk's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Gorilla,
    Pcodec,
    /// zstd at the given level (1-22).
    DeltaZstd(i32),
}

impl Codec {
    pub fn tag(self) -> u8 {
        match self {
            Codec::Gorilla => 1,
            Codec::Pcodec => 2,
            Codec::DeltaZstd(_) => 3,
        }
    }

    pub fn name(self) -> String {
        match self {
            Codec::Gorilla => "gorilla".into(),
            Codec::Pcodec => "pcodec".into(),
            Codec::DeltaZstd(l) => format!("delta+zstd-{l}"),
        }
    }

    /// The codec's bytes for the series, without a tag.
    pub fn encode_raw(self, ts: &[i64], values: &[f64]) -> Result<Vec<u8>, EncodeError> {
        check_lengths(ts, values)?;
        match self {
            Codec::Gorilla => Ok(gorilla::encode(ts, values)),
            Codec::Pcodec => pcodec::encode(ts, values),
            Codec::DeltaZstd(level) => delta_zstd::encode(ts, values, level),
        }
    }

    /// Decodes what [`Codec::encode_raw`] wrote.
    pub fn decode_raw(self, data: &[u8]) -> Result<(Vec<i64>, Vec<f64>), DecodeError> {
        match self {
            Codec::Gorilla => gorilla::decode(data),
            Codec::Pcodec => pcodec::decode(data),
            Codec::DeltaZstd(_) => delta_zstd::decode(data),
        }
    }

    /// The tag byte followed by the codec's bytes: what a chunk stores.
    pub fn encode(self, ts: &[i64], values: &[f64]) -> Result<Vec<u8>, EncodeError> {
        let raw = self.encode_raw(ts, values)?;
        let mut out = Vec::with_capacity(raw.len() + 1);
        out.push(self.tag());
        out.extend_from_slice(&raw);
        Ok(out)
    }
}

/// Decodes a tagged chunk written by [`Codec::encode`], whichever codec.
pub fn decode(data: &[u8]) -> Result<(Vec<i64>, Vec<f64>), DecodeError> {
    let (&tag, rest) = data.split_first().ok_or(DecodeError::Empty)?;
    let codec = match tag {
        1 => Codec::Gorilla,
        2 => Codec::Pcodec,
        // The level only matters when encoding.
        3 => Codec::DeltaZstd(0),
        t => return Err(DecodeError::UnknownTag(t)),
    };
    codec.decode_raw(rest)
}

fn check_lengths(ts: &[i64], values: &[f64]) -> Result<(), EncodeError> {
    if ts.len() != values.len() {
        return Err(EncodeError::Mismatch {
            timestamps: ts.len(),
            values: values.len(),
        });
    }
    if ts.len() > MAX_SAMPLES {
        return Err(EncodeError::TooMany(ts.len()));
    }
    Ok(())
}

/// A decoded count, checked against [`MAX_SAMPLES`].
fn checked_count(n: u64) -> Result<usize, DecodeError> {
    if n > MAX_SAMPLES as u64 {
        return Err(DecodeError::TooMany(n));
    }
    Ok(n as usize)
}

/// The point count at the start of a column-pair encoding (pcodec,
/// delta+zstd): `None` for an empty series, which must end right there,
/// else the count and the position after it.
fn read_count(data: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut pos = 0;
    let n = checked_count(varint::get(data, &mut pos, "the point count")?)?;
    if n == 0 {
        if pos != data.len() {
            return Err(DecodeError::Corrupt("bytes follow an empty series".into()));
        }
        return Ok(None);
    }
    Ok(Some((n, pos)))
}
