//! Checks the aggregator's accounting against the allocator: under floods
//! of every kind, the heap it really holds (counted by a global-allocator
//! wrapper) never exceeds `held_bytes()` plus the four tables' first
//! buckets, and `held_bytes()` never exceeds the budget.
//!
//! One test function only: the allocator's counters are process-wide, so
//! tests running in parallel threads would pollute each other's figures.

use std::alloc::System;

use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use widgetry_statsd::{Aggregator, Config};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Heap an empty aggregator's four hash tables take with their first
/// entries, which the budget does not charge (module doc of `aggregate`).
const SLACK: i64 = 1024;
const MAX: usize = 256 * 1024;

fn live_bytes() -> i64 {
    // `bytes_allocated`/`bytes_deallocated` already include the growth and
    // shrinkage of reallocations (`bytes_reallocated` is their net sum).
    let s = GLOBAL.stats();
    s.bytes_allocated as i64 - s.bytes_deallocated as i64
}

/// Feeds `packets` one at a time and checks the heap after each; returns
/// the aggregator's heap at the end and the aggregator.
fn flood(name: &str, packets: impl Iterator<Item = String>) -> (i64, Aggregator) {
    let mut a = Aggregator::new(Config {
        max_bytes: MAX,
        ..Config::default()
    });
    let mut held_heap = 0i64;
    let mut worst = 0.0f64;
    for packet in packets {
        // The packet is allocated before and freed after the measured span,
        // so the difference is what the aggregator kept.
        let before = live_bytes();
        a.ingest(packet.as_bytes());
        held_heap += live_bytes() - before;
        let held = a.held_bytes() as i64;
        assert!(a.held_bytes() <= MAX, "{name}: held {held} > budget {MAX}");
        assert!(
            held_heap <= held + SLACK,
            "{name}: the aggregator holds {held_heap} bytes of heap but is charged {held}"
        );
        worst = worst.max(held_heap as f64 / held.max(1) as f64);
    }
    assert!(
        a.stats().dropped_total() > 0,
        "{name}: the flood should have hit the budget"
    );
    eprintln!(
        "{name}: heap {held_heap} B, charged {} B (worst heap/charged {worst:.2}), {} drops",
        a.held_bytes(),
        a.stats().dropped_total()
    );
    (held_heap, a)
}

fn flush_and_check(name: &str, heap: i64, a: &mut Aggregator) {
    let before = live_bytes();
    a.flush(10.0, |_, _| {});
    let after = heap + live_bytes() - before;
    assert!(
        after <= a.held_bytes() as i64 + SLACK,
        "{name}: after the flush the aggregator holds {after} bytes of heap but is charged {}",
        a.held_bytes()
    );
}

/// Makes the i-th packet of a flood.
type Packet = fn(usize) -> String;

#[test]
fn heap_held_stays_within_the_charged_bytes() {
    let scenarios: &[(&str, Packet)] = &[
        ("short counters", |i| format!("c{i}:1|c")),
        ("tagged counters", |i| format!("c{i}:1|c|#t")),
        ("16-tag counters", |i| {
            let tags: Vec<String> = (0..40).map(|t| format!("k{t}:{i}")).collect();
            format!("c{i}:1|c|#{}", tags.join(","))
        }),
        ("gauges", |i| format!("g{i}:{i}|g")),
        ("timers, one value each", |i| format!("t{i}:1|ms")),
        ("one timer", |i| format!("t:{i}|ms\n").repeat(10)),
        ("sets, one member each", |i| format!("s{i}:m|s")),
        ("one set, short members", |i| format!("s:{i}|s")),
        ("one set, 4 KB members", |i| {
            format!("s:{i}{}|s", "x".repeat(4000))
        }),
        ("mixed", |i| {
            format!(
                "a{}:1|c\nb{}:2|g\nc{}:3|ms|#k:{i}\nd{}:{i}|s",
                i % 97,
                i % 89,
                i % 83,
                i % 7
            )
        }),
    ];
    for (name, packet) in scenarios {
        let (heap, mut a) = flood(name, (0..40_000).map(packet));
        flush_and_check(name, heap, &mut a);
    }
}
