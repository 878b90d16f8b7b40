//! The aggregator's compact form of a `SeriesKey`: name and labels packed
//! into one allocation, so that what a metric's identity costs is its bytes
//! plus a small fixed amount, whatever the number of labels.
//!
//! Why: a `SeriesKey` with one label allocates a whole B-tree leaf (about
//! 540 bytes on 64-bit targets) besides its strings, so a flood of distinct
//! tagged names would cost several times what its text suggests. This type
//! must round-trip any `SeriesKey` exactly (names and labels are not
//! re-validated here), so it uses length prefixes, not separators.

use std::collections::BTreeMap;

use widgetry_proto::SeriesKey;

/// Bytes of each length prefix.
const PREFIX: usize = 4;

/// `len(name) name (len(k) k len(v) v)*`, lengths as u32 little-endian.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key(Box<[u8]>);

/// How many bytes [`Key::new`] allocates for `key`.
pub(crate) fn encoded_len(key: &SeriesKey) -> usize {
    let labels: usize = key
        .labels
        .iter()
        .map(|(k, v)| 2 * PREFIX + k.len() + v.len())
        .sum();
    PREFIX + key.name.len() + labels
}

fn push(out: &mut Vec<u8>, part: &str) {
    // A part longer than 4 GiB would be cut rather than panic; parsed keys
    // are at most a few KiB.
    let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&part.as_bytes()[..len as usize]);
}

impl Key {
    /// Packs `key` into exactly [`encoded_len`] bytes.
    pub(crate) fn new(key: &SeriesKey) -> Key {
        let mut out = Vec::with_capacity(encoded_len(key));
        push(&mut out, &key.name);
        for (k, v) in &key.labels {
            push(&mut out, k);
            push(&mut out, v);
        }
        Key(out.into_boxed_slice())
    }

    /// The `SeriesKey` this was made from.
    pub(crate) fn to_series_key(&self) -> SeriesKey {
        let mut rest: &[u8] = &self.0;
        let name = next_part(&mut rest);
        let mut labels = BTreeMap::new();
        while !rest.is_empty() {
            let k = next_part(&mut rest);
            let v = next_part(&mut rest);
            labels.insert(k, v);
        }
        SeriesKey { name, labels }
    }
}

/// Takes one length-prefixed part off the front of `rest`.
fn next_part(rest: &mut &[u8]) -> String {
    let Some((len, tail)) = rest.split_first_chunk::<PREFIX>() else {
        *rest = &[];
        return String::new();
    };
    let len = (u32::from_le_bytes(*len) as usize).min(tail.len());
    let (part, tail) = tail.split_at(len);
    *rest = tail;
    // Always valid UTF-8: each part was copied whole from a `str`.
    String::from_utf8_lossy(part).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn packs_into_its_encoded_length() {
        let key = SeriesKey::parse("page.views{env=prod,region=eu-1}").expect("valid");
        let packed = Key::new(&key);
        assert_eq!(packed.0.len(), encoded_len(&key));
        assert_eq!(packed.0.len(), 4 + 10 + (4 + 3 + 4 + 4) + (4 + 6 + 4 + 4));
        assert_eq!(packed.to_series_key(), key);
    }

    proptest! {
        #[test]
        fn round_trips_any_series_key(
            name in ".{0,40}",
            labels in proptest::collection::btree_map(".{0,12}", ".{0,12}", 0..6),
        ) {
            let key = SeriesKey { name, labels };
            let packed = Key::new(&key);
            prop_assert_eq!(packed.0.len(), encoded_len(&key));
            prop_assert_eq!(packed.to_series_key(), key);
        }
    }
}
