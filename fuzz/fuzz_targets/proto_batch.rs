//! The protobuf batch decoder (`DecodedBatch::decode`, what the ingestor
//! runs on every `…/samples` payload): never panics; what it accepts is
//! within the limits and validates; encode∘decode is the identity and
//! the encoding is stable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use widgetry_proto::batch::{MAX_GAP_SPAN, MAX_GAPS};
use widgetry_proto::validate::{MAX_FUTURE_MS, MIN_TS_MS, validate_value};
use widgetry_proto::{DecodedBatch, Limits};

/// A fixed "now", so a run is repeatable: 2023-11-14T22:13:20Z.
const NOW_MS: i64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    // The server's limits, or small ones so that the bounds are reached
    // by short inputs: an odd first byte picks them (a protobuf field key
    // of wire type 1 or 5, which prost skips when the field is unknown).
    let limits = if data.first().is_some_and(|b| b & 1 == 1) {
        Limits {
            max_payload_bytes: 4096,
            max_samples: 8,
            max_series: 4,
        }
    } else {
        Limits::default()
    };
    let Ok(batch) = DecodedBatch::decode(data, &limits, NOW_MS) else {
        return;
    };
    assert!(batch.seq >= 1 && batch.seq <= i64::MAX as u64);
    assert!(batch.settled_through < batch.seq);
    assert!(batch.series.len() <= limits.max_series);
    assert!(batch.runs.len() <= limits.max_series);
    assert!(batch.sample_count() <= limits.max_samples);
    for (_, key) in &batch.series {
        key.validate().expect("an accepted series key validates");
    }
    for run in &batch.runs {
        assert_eq!(run.ts_ms.len(), run.values.len());
        for ts in &run.ts_ms {
            assert!((MIN_TS_MS..=NOW_MS + MAX_FUTURE_MS).contains(ts), "{ts}");
        }
        for v in &run.values {
            validate_value(*v).expect("an accepted value validates");
        }
    }
    assert!(batch.gaps.len() <= MAX_GAPS);
    for g in &batch.gaps {
        assert!(g.from_seq >= 1 && g.from_seq <= g.to_seq);
        let span = g.to_seq - g.from_seq + 1;
        assert!(span <= MAX_GAP_SPAN);
        assert!(g.samples <= span * limits.max_samples as u64);
        if g.session == batch.session {
            assert!(g.to_seq < batch.seq);
        }
    }
    if let Some((lo, hi)) = batch.ts_range() {
        assert!(lo <= hi);
    }
    // Round trip: our own encoding decodes to the same batch, and
    // re-encoding that gives the same bytes.
    let bytes = batch.encode();
    let again = DecodedBatch::decode(&bytes, &Limits::default(), NOW_MS)
        .expect("the encoding of an accepted batch is accepted");
    assert_eq!(batch, again);
    assert_eq!(bytes, again.encode());
});
