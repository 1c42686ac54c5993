//! `mesh`: run and control a plugin mesh.

use std::{io::IsTerminal, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use mesh_manager::{Config, up};
use tokio::signal::unix::{SignalKind, signal};

/// Exit status for a bad command line or configuration (sysexits' EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(name = "mesh", version, about = "A plugin mesh for gRPC services")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router (embedded registry) and the configured plugins until SIGINT/SIGTERM.
    Up {
        /// The config file.
        #[arg(long, short, default_value = "mesh.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Up { config } => {
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("mesh: {error}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("mesh: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(async {
                up::run(config, shutdown_signal()?)
                    .await
                    .map_err(Into::into)
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    let error: anyhow::Error = error;
                    eprintln!("mesh: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Completes on the first SIGINT or SIGTERM.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
