//! Post-commit consumers: what happens to data once the ingestor has
//! committed it. Each follows the commit ids (contiguous, in commit order)
//! and fetches what it missed from the database, so a lost message costs
//! latency, never data.
//!
//! Sinks read the store; they never write data (only their own cursor)
//! and never acknowledge. `live` feeds `/api/v1/live`; `graphite` forwards
//! to Carbon.

pub mod graphite;
pub mod live;
