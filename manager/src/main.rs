//! `mesh`: run and control a plugin mesh.

mod cli;

use std::{io::IsTerminal, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use cli::{Action, CapsAction};
use mesh_manager::{Config, up};
use tokio::signal::unix::{SignalKind, signal};

/// Exit status for a bad command line or configuration (sysexits' EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// `mesh --version`: the crate's version and the git commit it was built from (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("MESH_GIT_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "mesh",
    version = VERSION,
    about = "A plugin mesh for gRPC services"
)]
struct Cli {
    /// Router socket: where `mesh up` listens (over the config's `[mesh] socket`) and where the
    /// other commands find it (default: $MESH_SOCKET, else $XDG_RUNTIME_DIR/mesh/mesh.sock or
    /// /tmp/mesh-<uid>/mesh.sock).
    #[arg(long, global = true, env = "MESH_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router (embedded registry) and the configured plugins until SIGINT/SIGTERM;
    /// SIGHUP reloads the config.
    Up {
        /// The config file.
        #[arg(long, short, default_value = "mesh.toml")]
        config: PathBuf,
        /// Log lines as `text` or `json` (one object per line, with trace_id and span_id
        /// inside a traced call), over the config's `[telemetry] log_format`.
        #[arg(long, value_name = "FORMAT")]
        log_format: Option<mesh::telemetry::LogFormat>,
    },
    /// Plugins and instances: pid, state, uptime, restarts, last exit.
    Status {
        /// Print JSON (a stable shape for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Run N instances of a plugin: start new ones, or drain and stop the newest.
    Scale {
        /// Plugin name.
        name: String,
        /// Instances to run.
        instances: u32,
    },
    /// Restart a plugin's instances one at a time.
    Restart {
        /// Plugin name.
        name: String,
    },
    /// Stop a plugin's instances.
    Stop {
        /// Plugin name.
        name: String,
    },
    /// Start a plugin's stopped or failed instances.
    Start {
        /// Plugin name.
        name: String,
    },
    /// Captured stdout and stderr of a plugin's instances.
    Logs {
        /// Plugin name.
        name: String,
        /// Keep printing new lines.
        #[arg(long, short)]
        follow: bool,
        /// Only the last N kept lines first.
        #[arg(long, short = 'n', default_value_t = 0)]
        tail: u32,
    },
    /// Re-read the config and apply the difference.
    Reload,
    /// Print a completion script for SHELL to stdout (e.g. `mesh completions bash >
    /// /etc/bash_completion.d/mesh`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to stdout: `mesh man | man -l -`.
    #[command(hide = true)]
    Man,
    /// Grant a plugin a capability now (read:GLOB, write:GLOB, env:NAME, call:SERVICE[/METHOD]).
    Grant {
        /// Plugin name.
        name: String,
        /// The capability.
        capability: String,
    },
    /// Revoke a plugin's capability now (from the config or granted).
    Revoke {
        /// Plugin name.
        name: String,
        /// The capability.
        capability: String,
    },
    /// A plugin's capabilities: from the config, granted and revoked at run time.
    Caps {
        /// Plugin name.
        name: String,
        /// Print JSON (a stable shape for scripts).
        #[arg(long)]
        json: bool,
    },
    /// The audit log of host-service decisions, one JSON line each.
    Audit {
        /// Keep printing new lines.
        #[arg(long, short)]
        follow: bool,
    },
    /// A development CA and node/client certificates for mTLS (see docs/operations.md).
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
    /// Make a plugin crate in ./NAME that builds and runs under `mesh up` as it is.
    New {
        /// Plugin name (also the crate's and the proto package's: `hello`, `my-plugin`).
        name: String,
        /// The mesh source tree the crate depends on by path (default: the one this `mesh`
        /// was built from).
        #[arg(long, value_name = "DIR")]
        mesh_path: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CertsAction {
    /// Make a new CA: DIR/ca.pem and DIR/ca-key/ca.key (move that directory away after use).
    Init {
        #[command(flatten)]
        common: CertsCommon,
    },
    /// A router's certificate (spiffe://mesh/node/NAME; localhost, 127.0.0.1, ::1 and each
    /// --host): DIR/node-NAME.pem and .key.
    Node {
        /// The node's name ([mesh] node).
        name: String,
        /// Another DNS name or IP address the node is reached by (repeatable).
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        #[command(flatten)]
        common: CertsCommon,
    },
    /// A remote client's certificate (spiffe://mesh/client/NAME): DIR/client-NAME.pem and .key.
    Client {
        /// The client's name.
        name: String,
        #[command(flatten)]
        common: CertsCommon,
    },
}

#[derive(clap::Args)]
struct CertsCommon {
    /// Where the CA and certificates live (made 0700).
    #[arg(long, default_value = "certs")]
    dir: PathBuf,
    /// Days the certificate is valid (default: 3650 for the CA, 365 otherwise).
    #[arg(long)]
    days: Option<u32>,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

/// `mesh certs ...`.
fn certs(action: CertsAction) -> anyhow::Result<ExitCode> {
    use mesh_manager::certs::{self, Kind, Validity};
    let validity = |common: &CertsCommon, default| Validity::days(common.days.unwrap_or(default));
    let (issued, common) = match &action {
        CertsAction::Init { common } => (
            certs::init(&common.dir, validity(common, 3650), common.force)?,
            common,
        ),
        CertsAction::Node {
            name,
            hosts,
            common,
        } => (
            certs::issue(
                &common.dir,
                Kind::Node,
                name,
                hosts,
                validity(common, 365),
                common.force,
            )?,
            common,
        ),
        CertsAction::Client { name, common } => (
            certs::issue(
                &common.dir,
                Kind::Client,
                name,
                &[],
                validity(common, 365),
                common.force,
            )?,
            common,
        ),
    };
    println!(
        "wrote {} and {} (0600)",
        issued.cert.display(),
        issued.key.display()
    );
    let ca = common.dir.join(certs::CA_CERT);
    match (&action, issued.identity) {
        (CertsAction::Node { .. }, Some(id)) => println!(
            "identity {id}; in its mesh.toml:\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"",
            ca.display(),
            issued.cert.display(),
            issued.key.display()
        ),
        (CertsAction::Client { .. }, Some(id)) => println!(
            "identity {id} (grant it with [tls] admins = [\"{id}\"]); use it with\n\
             MESH_ROUTER=https://HOST:PORT MESH_TLS_CA={} MESH_TLS_CERT={} MESH_TLS_KEY={}\n\
             or grpcurl -cacert {} -cert {} -key {} HOST:PORT ...",
            ca.display(),
            issued.cert.display(),
            issued.key.display(),
            ca.display(),
            issued.cert.display(),
            issued.key.display()
        ),
        _ => {
            println!("next: mesh certs node NAME --dir {}", common.dir.display());
            eprintln!("{}", certs::ca_key_warning(&issued.key));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // The host side of one instance (mesh up starts it; see supervisor::init): before anything
    // starts a thread, because it forks.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .get(1)
        .is_some_and(|a| a == mesh_manager::supervisor::init::INIT_ARG)
    {
        mesh_manager::supervisor::init::main(&args[2..]);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Completions { shell } => return print_completions(shell),
        Command::Man => return print_man(),
        Command::Certs { action } => {
            return certs(action).unwrap_or_else(|error| {
                eprintln!("mesh: {error:#}");
                ExitCode::FAILURE
            });
        }
        _ => {}
    }
    // Before anything asks rustls for its default provider (tonic's TLS, an exporter): ring,
    // so that it never has to guess.
    mesh_router::install_default_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("mesh: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let flag = cli.socket.filter(|s| !s.as_os_str().is_empty());
    let socket = cli::socket(flag.clone());
    // `mesh up` reads its config before logging starts: `[telemetry]` says how it logs.
    let mut up_config = None;
    if let Command::Up { config, log_format } = &cli.command {
        let loaded = Config::load(config).and_then(|mut config| {
            if let Some(socket) = flag.clone() {
                config.override_socket(socket)?;
            }
            if let Some(format) = log_format {
                config.override_log_format(*format);
            }
            Ok(config)
        });
        match loaded {
            Ok(config) => up_config = Some(config),
            Err(error) => {
                eprintln!("mesh: {error}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let _telemetry = match &up_config {
        Some(config) => {
            let _entered = runtime.enter();
            match mesh_manager::telemetry::init(config) {
                Ok(telemetry) => Some(telemetry),
                Err(error) => {
                    eprintln!("mesh: {error}");
                    return ExitCode::from(EXIT_USAGE);
                }
            }
        }
        None => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_ansi(std::io::stderr().is_terminal())
                // Lines say what happened; the span (`instance{plugin=echo instance=echo-0}`)
                // says where.
                .with_target(false)
                .with_writer(std::io::stderr)
                .init();
            None
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up { .. } => {
                let config = up_config.expect("loaded above");
                up::run(config, shutdown_signal()?).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Status { json } => {
                cli::status(&socket, json).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Scale { name, instances } => {
                cli::act(&socket, Action::Scale(instances), &name)
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Command::Restart { name } => cli::act(&socket, Action::Restart, &name)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Stop { name } => cli::act(&socket, Action::Stop, &name)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Start { name } => cli::act(&socket, Action::Start, &name)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Logs { name, follow, tail } => cli::logs(&socket, &name, follow, tail)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Reload => cli::reload(&socket).await.map(|()| ExitCode::SUCCESS),
            Command::Completions { .. } | Command::Man | Command::Certs { .. } => {
                unreachable!("handled before")
            }
            Command::Grant { name, capability } => {
                cli::caps(&socket, CapsAction::Grant(capability), &name, false)
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Command::Revoke { name, capability } => {
                cli::caps(&socket, CapsAction::Revoke(capability), &name, false)
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Command::Caps { name, json } => cli::caps(&socket, CapsAction::Show, &name, json)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Audit { follow } => cli::audit(&socket, follow)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::New { name, mesh_path } => new_plugin(&name, mesh_path),
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            let error: anyhow::Error = error;
            eprintln!("mesh: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `mesh new NAME [--mesh-path DIR]`.
fn new_plugin(name: &str, mesh_path: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    use mesh_manager::scaffold;
    let mesh_path = mesh_path.unwrap_or_else(scaffold::default_mesh_path);
    let dir = scaffold::new_plugin(std::path::Path::new("."), name, &mesh_path)?;
    println!(
        "made {}: cd {name} && cargo build && mesh up (see {name}/README.md)",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
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

/// `mesh completions SHELL`: generated from the same clap definitions that parse the command.
fn print_completions(shell: clap_complete::Shell) -> ExitCode {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "mesh", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// `mesh man`: the manual page, from the clap definitions.
fn print_man() -> ExitCode {
    use clap::CommandFactory;
    match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mesh: cannot write the manual page: {error}");
            ExitCode::FAILURE
        }
    }
}
