//! `widgetry-mqtt-bench`: plain MQTT load for comparing brokers
//! (`scripts/bench-brokers.sh` runs it against the embedded broker and
//! Mosquitto). A thin front end over `widgetry_loadgen::broker`.

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Plain MQTT load for comparing brokers: fan-in throughput and idle connections"
)]
struct Cli {
    /// MQTT broker, HOST:PORT (MQTT 3.1.1).
    #[arg(long, default_value = "127.0.0.1:1883", global = true)]
    broker: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// PUBLISHERS clients each publish MESSAGES QoS 1 messages into one
    /// subscriber; prints messages/s and how many were lost or duplicated.
    Fanin {
        #[arg(long, default_value_t = 100)]
        publishers: usize,
        #[arg(long, default_value_t = 2000)]
        messages: u32,
        /// Payload bytes per message (at least 12: publisher, seq, run).
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Unacknowledged publishes per publisher.
        #[arg(long, default_value_t = 100)]
        inflight: u16,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Opens CONNECTIONS idle connections and holds them for HOLD seconds.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Keep-alive of each connection, seconds.
        #[arg(long, default_value_t = 60)]
        keep_alive: u64,
        #[arg(long, default_value_t = 10)]
        hold: u64,
    },
}

fn split(broker: &str) -> Result<(String, u16), String> {
    widgetry_common::parse_host_port(broker)
        .map_err(|e| format!("--broker {broker:?}: {e} (expected HOST:PORT)"))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let (host, port) = match split(&cli.broker) {
        Ok(hp) => hp,
        Err(e) => {
            eprintln!("widgetry-mqtt-bench: {e}");
            return std::process::ExitCode::from(64);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("widgetry-mqtt-bench: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let progress = |line: String| eprintln!("{line}");
    match cli.cmd {
        Cmd::Fanin {
            publishers,
            messages,
            payload,
            inflight,
            timeout,
        } => {
            let cfg = widgetry_loadgen::broker::FaninConfig {
                host,
                port,
                publishers,
                messages,
                payload,
                inflight,
                timeout: Duration::from_secs(timeout),
            };
            let r = rt.block_on(widgetry_loadgen::broker::fanin(cfg, progress));
            println!(
                "fanin publishers={publishers} payload={payload} qos=1 sent={} received={} lost={} duplicates={} seconds={:.2} msgs_per_s={:.0}",
                r.sent,
                r.received_unique,
                r.lost(),
                r.duplicates,
                r.seconds,
                r.per_second()
            );
            if r.lost() > 0 {
                return std::process::ExitCode::FAILURE;
            }
        }
        Cmd::Idle {
            connections,
            keep_alive,
            hold,
        } => {
            let n = rt.block_on(widgetry_loadgen::broker::idle(
                &host,
                port,
                connections,
                Duration::from_secs(keep_alive),
                Duration::from_secs(hold),
                progress,
            ));
            println!("idle connections={connections} connected={n}");
            if n < connections {
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    std::process::ExitCode::SUCCESS
}
