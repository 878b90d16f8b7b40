//! `widgetry`: parses arguments, validates configuration (exit 64 on any
//! problem, before binding anything), sets up tracing and signals, then
//! calls the library. No logic of its own beyond that.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use widgetry_server::ServeError;
use widgetry_server::config::cli::{Cli, EXIT_CONFIG, LogFormat, Role, resolve_command};

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs `role`; the first signal asks it to drain, a second exits at once.
async fn run(role: Role) -> Result<bool, ServeError> {
    let token = CancellationToken::new();
    // loadgen has nothing to drain: a signal ends it before --duration
    // (in containers it is PID 1, and `docker stop` must not need SIGKILL).
    let is_loadgen = matches!(role, Role::Loadgen(_));
    let work = async {
        match role {
            Role::Serve(cfg) => widgetry_server::run_serve(*cfg, token.clone()).await,
            Role::Ingest(cfg, db) => widgetry_server::run_ingest(*cfg, db, token.clone()).await,
            Role::Web(cfg) => widgetry_server::run_web(*cfg, token.clone()).await,
            Role::Bridge(b) => widgetry_server::roles::run_bridge(*b, token.clone()).await,
            Role::Statsd(r) => widgetry_server::roles::run_statsd(*r, token.clone()).await,
            Role::Device(action, db) => {
                let mut stdin = std::io::stdin().lock();
                let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
                let run =
                    widgetry_server::device_cmd::run(action, &db, &mut stdin, &mut out, &mut err);
                return match run.await {
                    Ok(()) => Ok(true),
                    Err(e) => {
                        eprintln!("widgetry device: {e}");
                        Ok(false)
                    }
                };
            }
            Role::Loadgen(cfg) => {
                let report = widgetry_loadgen::run(*cfg, |l| eprintln!("{l}")).await;
                println!("{}", report.render());
                return Ok(report.clean());
            }
            Role::Compact(db, everything) => {
                return match widgetry_server::store::compact::run_command(&db, everything).await {
                    Ok(summary) => {
                        println!("{summary}");
                        Ok(true)
                    }
                    Err(e) => {
                        eprintln!("widgetry compact: {e}");
                        Ok(false)
                    }
                };
            }
            Role::Import(cfg) => {
                return match widgetry_server::import::run(&cfg, &mut |l| eprintln!("{l}")).await {
                    Ok(report) => {
                        println!("{}", report.render(&cfg));
                        Ok(true)
                    }
                    Err(e) => {
                        eprintln!("widgetry import: {e}");
                        Ok(false)
                    }
                };
            }
        }
        .map(|()| true)
    };
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => return r,
        _ = widgetry_common::shutdown_signal() => {
            if is_loadgen {
                eprintln!("loadgen: stopped by a signal before --duration ended; no report");
                return Ok(true);
            }
            tracing::info!("shutdown requested; draining (signal again to exit immediately)");
            token.cancel();
        }
    }
    tokio::select! {
        r = &mut work => r,
        _ = widgetry_common::shutdown_signal() => {
            tracing::warn!("second signal: exiting without draining");
            std::process::exit(130);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Validate everything before any runtime, socket or file is touched.
    let role = match resolve_command(&cli.cmd) {
        Ok(Ok(role)) => role,
        Ok(Err(checked)) => {
            println!("{checked}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprint!("widgetry: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if !matches!(
        role,
        Role::Loadgen(_) | Role::Device(..) | Role::Import(_) | Role::Compact(..)
    ) {
        init_tracing(cli.log_format);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("widgetry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(role));
    // The embedded broker's thread cannot be stopped; leaving main ends it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            tracing::error!("{msg}");
            eprintln!("widgetry: {msg}");
            ExitCode::FAILURE
        }
    }
}
