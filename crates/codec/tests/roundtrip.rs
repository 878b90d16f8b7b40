//! Every codec returns exactly what it was given — the same timestamps
//! and the same value bits — for edge cases and for arbitrary series, and
//! any bytes given to a decoder give a result or an error, never a panic.

use proptest::prelude::*;
use widgetry_codec::{Codec, DecodeError, EncodeError, MAX_SAMPLES, decode};

const CODECS: [Codec; 4] = [
    Codec::Gorilla,
    Codec::Pcodec,
    Codec::DeltaZstd(3),
    Codec::DeltaZstd(19),
];

fn assert_round_trip(ts: &[i64], values: &[f64]) {
    for codec in CODECS {
        let bytes = codec
            .encode(ts, values)
            .unwrap_or_else(|e| panic!("{}: encode failed: {e}", codec.name()));
        let (t2, v2) = decode(&bytes)
            .unwrap_or_else(|e| panic!("{}: decode of its own output failed: {e}", codec.name()));
        assert_eq!(t2, ts, "{}: timestamps differ", codec.name());
        let want: Vec<u64> = values.iter().map(|v| v.to_bits()).collect();
        let got: Vec<u64> = v2.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want, "{}: value bits differ", codec.name());
    }
}

/// Floats that encoders often get wrong.
fn special_values() -> Vec<f64> {
    vec![
        f64::NAN,
        -f64::NAN,
        f64::from_bits(0x7ff0_0000_0000_0001), // signalling NaN
        f64::from_bits(0xfff8_dead_beef_0001), // NaN with a payload
        f64::INFINITY,
        f64::NEG_INFINITY,
        0.0,
        -0.0,
        f64::MIN_POSITIVE,
        f64::from_bits(1),                      // smallest subnormal
        -f64::from_bits(0x000f_ffff_ffff_ffff), // largest negative subnormal
        f64::MAX,
        f64::MIN,
        f64::EPSILON,
        1.0,
        -1.0,
        69.88083514,
        74.93588199999998,
    ]
}

#[test]
fn empty_series() {
    assert_round_trip(&[], &[]);
}

#[test]
fn one_sample_series() {
    for v in special_values() {
        assert_round_trip(&[1_396_310_400_000], &[v]);
        assert_round_trip(&[i64::MIN], &[v]);
        assert_round_trip(&[i64::MAX], &[v]);
    }
}

#[test]
fn special_values_in_every_order() {
    let vals = special_values();
    let ts: Vec<i64> = (0..vals.len() as i64)
        .map(|i| 1_700_000_000_000 + i * 1000)
        .collect();
    assert_round_trip(&ts, &vals);
    let mut rev = vals.clone();
    rev.reverse();
    assert_round_trip(&ts, &rev);
    // Every pair next to each other, so each XOR between specials occurs.
    let mut pairs = Vec::new();
    for a in &vals {
        for b in &vals {
            pairs.push(*a);
            pairs.push(*b);
        }
    }
    let ts: Vec<i64> = (0..pairs.len() as i64).collect();
    assert_round_trip(&ts, &pairs);
}

#[test]
fn timestamp_extremes_out_of_order_and_duplicates() {
    let ts = vec![
        i64::MIN,
        i64::MAX,
        i64::MIN,
        0,
        0,
        0,
        -1,
        i64::MAX,
        i64::MAX,
        1_396_310_400_000,
        1_396_310_100_000, // backwards by 5 minutes
        1_396_310_100_000, // duplicate
        1_396_310_400_000,
        i64::MIN + 1,
        i64::MAX - 1,
    ];
    let values: Vec<f64> = (0..ts.len()).map(|i| i as f64 * 0.5).collect();
    assert_round_trip(&ts, &values);
}

#[test]
fn every_timestamp_bucket_boundary() {
    // Deltas of delta at each bucket edge: ±(2^(k-1)) and one past.
    let mut ts = vec![1_000_000_000_000i64];
    let mut delta = 0i64;
    for bits in [7u32, 9, 12, 32, 63] {
        let half = 1i64 << (bits - 1);
        for dod in [half - 1, -half, half, -half - 1, 1, -1, 0] {
            delta = delta.wrapping_add(dod);
            let last = *ts.last().expect("seeded with one timestamp");
            ts.push(last.wrapping_add(delta));
        }
    }
    let values = vec![2.5; ts.len()];
    assert_round_trip(&ts, &values);
}

#[test]
fn regular_series_is_small_with_gorilla() {
    // 1 Hz, constant value: 1 bit + 1 bit per point after the first.
    let ts: Vec<i64> = (0..10_000).map(|i| 1_700_000_000_000 + i * 1000).collect();
    let values = vec![42.0; ts.len()];
    let bytes = Codec::Gorilla.encode(&ts, &values).expect("encode");
    assert!(
        bytes.len() < 2_600,
        "{} bytes for 10,000 regular points",
        bytes.len()
    );
    assert_round_trip(&ts, &values);
}

#[test]
fn mismatched_columns_and_oversized_series_are_refused() {
    for codec in CODECS {
        assert_eq!(
            codec.encode(&[1, 2], &[1.0]),
            Err(EncodeError::Mismatch {
                timestamps: 2,
                values: 1
            })
        );
        let n = MAX_SAMPLES + 1;
        assert_eq!(
            codec.encode(&vec![0; n], &vec![0.0; n]),
            Err(EncodeError::TooMany(n))
        );
    }
}

#[test]
fn corrupt_headers_are_errors() {
    assert_eq!(decode(&[]), Err(DecodeError::Empty));
    assert_eq!(decode(&[9, 0]), Err(DecodeError::UnknownTag(9)));
    for codec in CODECS {
        let tag = codec.tag();
        // A count past the bound is refused before anything is allocated.
        let huge = [
            tag, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ];
        assert!(
            matches!(decode(&huge), Err(DecodeError::TooMany(_))),
            "{}: {:?}",
            codec.name(),
            decode(&huge)
        );
        // A plausible count with nothing behind it.
        assert!(decode(&[tag, 5]).is_err(), "{}", codec.name());
        // Trailing bytes after a valid encoding.
        let mut bytes = codec.encode(&[1, 2, 3], &[1.0, 2.0, 3.0]).expect("encode");
        bytes.extend_from_slice(&[0xAB; 16]);
        assert!(
            decode(&bytes).is_err(),
            "{}: trailing bytes accepted",
            codec.name()
        );
    }
}

fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<u64>().prop_map(f64::from_bits),
        (-1000i32..1000).prop_map(|c| f64::from(c) / 100.0),
        prop::sample::select(special_values()),
    ]
}

fn any_series() -> impl Strategy<Value = (Vec<i64>, Vec<f64>)> {
    prop::collection::vec(
        (
            prop_oneof![
                any::<i64>(),
                (0i64..5).prop_map(|j| 1_700_000_000_000 + j * 300_000),
                (-2_000i64..2_000).prop_map(|j| 1_700_000_000_000 + j),
            ],
            any_f64(),
        ),
        0..300,
    )
    .prop_map(|pts| pts.into_iter().unzip())
}

/// A regular series with jitter: the shape real series have.
fn regular_series() -> impl Strategy<Value = (Vec<i64>, Vec<f64>)> {
    (1usize..500, any::<i64>(), -5i64..5, 1i64..100_000).prop_flat_map(|(n, start, jit, step)| {
        prop::collection::vec(any_f64(), n).prop_map(move |values| {
            let ts = (0..n as i64)
                .map(|i| {
                    start
                        .wrapping_add(i.wrapping_mul(step))
                        .wrapping_add(if i % 7 == 0 { jit } else { 0 })
                })
                .collect();
            (ts, values)
        })
    })
}

proptest! {
    #[test]
    fn arbitrary_series_round_trip((ts, values) in any_series()) {
        assert_round_trip(&ts, &values);
    }

    #[test]
    fn regular_series_round_trip((ts, values) in regular_series()) {
        assert_round_trip(&ts, &values);
    }

    #[test]
    fn any_bytes_decode_or_fail_without_panic(
        tag in 0u8..5,
        body in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut data = vec![tag];
        data.extend_from_slice(&body);
        let _ = decode(&data);
    }

    #[test]
    fn damaged_encodings_decode_or_fail_without_panic(
        (ts, values) in any_series(),
        codec in prop::sample::select(CODECS.to_vec()),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = codec.encode(&ts, &values).expect("encode");
        for (at, x) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        let _ = decode(&bytes);
        let keep = cut.index(bytes.len() + 1);
        let _ = decode(&bytes[..keep]);
    }
}
