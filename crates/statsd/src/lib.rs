//! statsd for Widgetry: a parser for statsd and DogStatsD lines
//! ([`parse_line`], [`parse_packet`]) and an [`Aggregator`] that turns them
//! into one sample per aggregate at each flush.
//!
//! Used by the agent's UDP listener, and meant for the server too: no async
//! runtime, no I/O, no logging, nothing that grows past the aggregator's
//! byte budget ([`Config::max_bytes`], default [`DEFAULT_MAX_BYTES`] = 1 MiB)
//! whatever it is fed. Parsing never panics; bad lines and drops are counted
//! by reason in [`Stats`] for the caller to expose.

mod aggregate;
mod key;
mod parse;

pub use aggregate::{
    Aggregator, Config, DEFAULT_MAX_BYTES, Dropped, Percentile, PercentileError, Stats,
};
pub use parse::{BadLine, Kind, MAX_NAME, Metric, ParseError, parse_line, parse_packet};
