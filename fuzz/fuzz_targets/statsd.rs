//! The statsd/DogStatsD parser (`parse_packet`) and the aggregator it
//! feeds in the agent: parsing never panics and yields valid series keys,
//! finite numbers and rates in (0, 1]; the aggregator stays within its
//! byte budget and flushes only valid keys and finite values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use widgetry_statsd::{Aggregator, Config, Kind, MAX_NAME, parse_packet};

fuzz_target!(|data: &[u8]| {
    for m in parse_packet(data).flatten() {
        m.key.validate().expect("a parsed key validates");
        assert!(m.key.name.len() <= MAX_NAME);
        assert!(m.rate > 0.0 && m.rate <= 1.0, "rate {}", m.rate);
        match m.kind {
            Kind::Counter(v) | Kind::Gauge(v) | Kind::GaugeDelta(v) | Kind::Timer(v) => {
                assert!(v.is_finite())
            }
            Kind::Set(_) => {}
        }
    }
    // A small budget, so that dropping at the limit is exercised.
    let mut agg = Aggregator::new(Config {
        max_bytes: 16 * 1024,
        ..Config::default()
    });
    for _ in 0..2 {
        agg.ingest(data);
        assert!(agg.held_bytes() <= agg.max_bytes());
        agg.flush(10.0, |key, value| {
            key.validate().expect("a flushed key validates");
            assert!(value.is_finite());
        });
        assert!(agg.held_bytes() <= agg.max_bytes());
    }
});
