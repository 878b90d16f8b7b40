//! The JSON sample decoder (`json::parse_samples`, for plain MQTT clients
//! on `…/samples/json`): never panics; what it accepts is within the
//! limits and validates; the samples written back as JSON parse to the
//! same samples; the content-derived seq is never 0 and deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use widgetry_proto::Limits;
use widgetry_proto::json::{json_seq, parse_samples};
use widgetry_proto::validate::{MAX_FUTURE_MS, MIN_TS_MS, validate_value};

const NOW_MS: i64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_payload_bytes: 64 * 1024,
        max_samples: 64,
        max_series: 64,
    };
    let Ok(samples) = parse_samples(data, &limits, NOW_MS) else {
        return;
    };
    assert!(!samples.is_empty() && samples.len() <= limits.max_samples);
    for s in &samples {
        s.series
            .validate()
            .expect("an accepted series key validates");
        assert!((MIN_TS_MS..=NOW_MS + MAX_FUTURE_MS).contains(&s.ts_ms));
        validate_value(s.value).expect("an accepted value validates");
    }
    let seq = json_seq(&samples);
    assert!(seq >= 1 && seq <= i64::MAX as u64);
    assert_eq!(seq, json_seq(&samples));
    // Write them back in the documented form and parse again.
    let list: Vec<serde_json::Value> = samples
        .iter()
        .map(|s| {
            serde_json::json!({
                "series": s.series.name,
                "labels": s.series.labels,
                "ts": s.ts_ms,
                "value": s.value,
            })
        })
        .collect();
    let text = serde_json::json!({ "samples": list }).to_string();
    let again = parse_samples(text.as_bytes(), &limits, NOW_MS)
        .expect("accepted samples written as JSON are accepted");
    assert_eq!(samples.len(), again.len());
    for (a, b) in samples.iter().zip(&again) {
        assert_eq!(a.series, b.series);
        assert_eq!(a.ts_ms, b.ts_ms);
        // serde_json (without float_roundtrip) may round the last bit.
        assert!(
            (a.value - b.value).abs() <= a.value.abs() * 2.0 * f64::EPSILON,
            "{} vs {}",
            a.value,
            b.value
        );
    }
});
