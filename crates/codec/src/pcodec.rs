//! The `pco` crate (pcodec) on the two columns: timestamps as `i64`,
//! values as `f64`, each a standalone pco file at the default level (8).
//! pco chooses its own delta order and float mode per column; both are
//! lossless for every bit pattern.
//!
//! Layout: varint count; if any points, varint lengths of the timestamp
//! and the value column's bytes, then those bytes (pco ignores what
//! follows its footer, so the lengths are what detects trailing bytes).

use pco::ChunkConfig;
use pco::standalone::{simple_compress, simple_decompress_into};

use crate::{DecodeError, EncodeError, read_count, varint};

/// The caller has checked that the columns have equal lengths.
pub fn encode(ts: &[i64], values: &[f64]) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    varint::put(&mut out, ts.len() as u64);
    if ts.is_empty() {
        return Ok(out);
    }
    let config = ChunkConfig::default();
    let t = simple_compress(ts, &config).map_err(|e| EncodeError::Pco(e.to_string()))?;
    let v = simple_compress(values, &config).map_err(|e| EncodeError::Pco(e.to_string()))?;
    varint::put(&mut out, t.len() as u64);
    varint::put(&mut out, v.len() as u64);
    out.extend_from_slice(&t);
    out.extend_from_slice(&v);
    Ok(out)
}

pub fn decode(data: &[u8]) -> Result<(Vec<i64>, Vec<f64>), DecodeError> {
    let Some((n, mut pos)) = read_count(data)? else {
        return Ok((Vec::new(), Vec::new()));
    };
    let t_len = varint::get(data, &mut pos, "the timestamp column's length")?;
    let v_len = varint::get(data, &mut pos, "the value column's length")?;
    let rest = &data[pos..];
    if t_len.checked_add(v_len) != Some(rest.len() as u64) {
        return Err(DecodeError::Corrupt(format!(
            "columns of {t_len} + {v_len} bytes in {} bytes",
            rest.len()
        )));
    }
    let (t_bytes, v_bytes) = rest.split_at(t_len as usize);
    let mut ts = vec![0i64; n];
    let mut values = vec![0f64; n];
    column(t_bytes, &mut ts, "timestamp")?;
    column(v_bytes, &mut values, "value")?;
    Ok((ts, values))
}

fn column<T: pco::data_types::Number>(
    src: &[u8],
    dst: &mut [T],
    what: &str,
) -> Result<(), DecodeError> {
    let progress = simple_decompress_into(src, dst)
        .map_err(|e| DecodeError::Corrupt(format!("{what} column: {e}")))?;
    if progress.n_processed != dst.len() || !progress.finished {
        return Err(DecodeError::Corrupt(format!(
            "{what} column holds {}{} points, the header says {}",
            progress.n_processed,
            if progress.finished { "" } else { " or more" },
            dst.len()
        )));
    }
    Ok(())
}
