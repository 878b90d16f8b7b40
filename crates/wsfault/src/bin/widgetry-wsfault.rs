//! `widgetry-wsfault`: the misbehaving websocket upstream as a process,
//! for benchmarks and manual runs. Prints its URL on the first line of
//! stdout, serves until `--duration` has passed (or forever), then prints
//! what it sent.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use widgetry_wsfault::{Config, Tail, Upstream};

#[derive(Parser)]
#[command(
    name = "widgetry-wsfault",
    about = "A websocket upstream that misbehaves on a seeded schedule (for widgetry bridge ws)"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Seed of the schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fault cycles (every fault once each) before the tail.
    #[arg(long, default_value_t = 2)]
    cycles: u32,
    /// What follows the cycles: quiet, stream (one valid message per --every) or flood (valid messages as fast as they go).
    #[arg(long, value_enum, default_value = "quiet")]
    tail: TailArg,
    /// Interval of the stream tail, e.g. 5ms.
    #[arg(long, default_value = "10ms")]
    every: String,
    /// The bridge's idle timeout (silences and half-open sockets are sized from it).
    #[arg(long, default_value = "30s")]
    idle_timeout: String,
    /// Valid messages resent at the start of each later connection.
    #[arg(long, default_value_t = 0)]
    replay: usize,
    /// Stop after this long, e.g. 20s [default: run until killed].
    #[arg(long)]
    duration: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum TailArg {
    Quiet,
    Stream,
    Flood,
}

fn duration(text: &str, flag: &str) -> Result<Duration, String> {
    widgetry_common::parse_duration(text).map_err(|e| format!("--{flag}: {e}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let parsed = (|| {
        let listen: std::net::SocketAddr = args
            .listen
            .parse()
            .map_err(|e| format!("--listen {:?}: {e}", args.listen))?;
        let tail = match args.tail {
            TailArg::Quiet => Tail::Quiet,
            TailArg::Stream => Tail::Stream {
                every: duration(&args.every, "every")?,
            },
            TailArg::Flood => Tail::Flood,
        };
        let idle = duration(&args.idle_timeout, "idle-timeout")?;
        let run_for = args
            .duration
            .as_deref()
            .map(|d| duration(d, "duration"))
            .transpose()?;
        Ok::<_, String>((listen, tail, idle, run_for))
    })();
    let (listen, tail, idle, run_for) = match parsed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("widgetry-wsfault: {e}");
            return ExitCode::from(64);
        }
    };
    let mut cfg = Config::new(
        args.seed,
        args.cycles,
        tail,
        idle,
        widgetry_common::now_ms(),
    );
    cfg.replay = args.replay;
    let upstream = match Upstream::start_on(listen, cfg).await {
        Ok(u) => u,
        Err(e) => {
            eprintln!("widgetry-wsfault: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", upstream.url());
    match run_for {
        Some(d) => tokio::time::sleep(d).await,
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    let log = upstream.log();
    println!(
        "sent valid {} duplicates {} invalid {} connections {} cycles {}",
        log.valid.len(),
        log.duplicates,
        log.invalid_total(),
        log.connections,
        log.cycles_done
    );
    ExitCode::SUCCESS
}
