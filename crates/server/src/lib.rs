//! Widgetry server: the embedded broker, the ingestor and the web service,
//! runnable together (`serve`) or one role per process (`ingest`, `web`).
//!
//! Roles talk to each other only through MQTT and the database, even when
//! they share this process. `main.rs` parses arguments and calls into here;
//! tests call the same functions.

pub mod broker;
pub mod config;
pub mod device_cmd;
pub mod import;
pub mod ingest;
pub mod metrics;
pub mod mqtt;
pub mod presence;
pub mod roles;
pub mod rules;
pub mod sinks;
pub mod sources;
pub mod store;
pub mod supervisor;
pub mod web;

pub use roles::*;
