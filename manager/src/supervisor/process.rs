//! Starting and stopping one plugin process.
//!
//! Each instance runs in its own process group, so a stop reaches everything it started, and
//! with a parent-death signal, so it dies with the manager even when the manager is SIGKILLed.

use std::{io, path::Path, process::Stdio, sync::Arc, time::Duration};

use mesh::{Address, plugin, runtime::MESH_SOCKET};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use tokio::process::{Child, Command};

use super::logs::{LogBook, Stream};
use crate::config::{PluginConfig, ResourceLimits, SandboxMode, Transport};

/// What a started instance needs to know.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub(crate) plugin: Arc<PluginConfig>,
    pub(crate) id: String,
    pub(crate) mesh_socket: std::path::PathBuf,
    /// The `mesh` binary, to run the instance in its own PID namespace (`super::init`).
    pub(crate) init: Option<std::path::PathBuf>,
    /// Where the instance's private channel for checking callers comes from.
    pub(crate) channels: super::ChannelsCell,
    /// Whether `init` may sandbox the plugins that ask for it ([`super::sandbox`]).
    pub(crate) sandbox: bool,
}

impl Launch {
    /// The plugin's own pid, given the pid of the process started for it: the same, unless the
    /// instance runs in a PID namespace, where it is the plugin under the namespace's init.
    pub(crate) fn plugin_pid(&self, started: u32) -> u32 {
        match self.init {
            Some(_) => super::init::plugin_pid(started).unwrap_or(started),
            None => started,
        }
    }
}

/// Tasks reading an instance's stdout and stderr.
pub(crate) struct Capture(Vec<tokio::task::JoinHandle<()>>);

impl Capture {
    /// Waits (at most `limit`) until the output is read to its end, so that the last lines an
    /// instance wrote before it died are in the log book.
    pub(crate) async fn finish(self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            for task in self.0 {
                let _ = task.await;
            }
        })
        .await;
    }
}

/// Where an instance of `plugin` serves this time: its socket, or (`transport = "tcp"`) a
/// loopback port free a moment ago. Another process may take that port before the plugin
/// binds it; the plugin then fails to start, and its restart picks a port again.
pub(crate) fn endpoint(plugin: &PluginConfig, id: &str) -> io::Result<Address> {
    match plugin.transport {
        Transport::Unix => Ok(Address::Unix(plugin.socket(id))),
        Transport::Tcp => {
            let port = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?
                .local_addr()?
                .port();
            Ok(Address::Tcp(format!("127.0.0.1:{port}")))
        }
    }
}

/// Starts the instance with the plugin contract's environment, serving on `endpoint`, and
/// captures its output.
pub(crate) fn spawn(
    launch: &Launch,
    endpoint: &Address,
    logs: &Arc<LogBook>,
) -> io::Result<(Child, Capture)> {
    let plugin = &launch.plugin;
    let sandboxed = plugin.sandbox.mode != SandboxMode::Off;
    let mut command = match &launch.init {
        Some(init) => {
            let mut command = Command::new(init);
            command.arg(super::init::INIT_ARG);
            if sandboxed && launch.sandbox {
                let port = match endpoint {
                    Address::Tcp(address) => address
                        .rsplit_once(':')
                        .and_then(|(_, port)| port.parse().ok()),
                    _ => None,
                };
                let spec = super::sandbox::spec(plugin, &launch.mesh_socket, port);
                let spec = serde_json::to_string(&spec).map_err(io::Error::other)?;
                command.arg(super::init::SANDBOX_ARG).arg(spec);
            }
            command.arg("--").arg(&plugin.command);
            command
        }
        None => Command::new(&plugin.command),
    };
    if sandboxed {
        // Its direct dial of another plugin's socket cannot succeed: `mesh::connect` routes.
        command.env(mesh::MESH_DIRECT, "0");
    }
    match endpoint {
        Address::Unix(socket) => {
            // A socket left by a crashed instance would make the plugin's bind fail.
            if let Err(error) = mesh::runtime::remove_stale_socket(socket) {
                return Err(io::Error::other(error));
            }
            command.env(plugin::PLUGIN_SOCKET, socket)
        }
        Address::Tcp(address) => command.env(plugin::PLUGIN_ADDRESS, address),
        Address::Dialer(name) => {
            return Err(io::Error::other(format!(
                "{name} is an in-process transport; a plugin process cannot serve it"
            )));
        }
    };
    command
        .args(&plugin.args)
        .envs(&plugin.env)
        .env(plugin::PLUGIN_NAME, &plugin.name)
        .env(plugin::PLUGIN_INSTANCE, &launch.id)
        .env(MESH_SOCKET, &launch.mesh_socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // A backstop: normal stops signal the whole group and wait.
        .kill_on_drop(true);
    if let Some(dir) = &plugin.working_dir {
        command.current_dir(dir);
    }
    if let Some(credentials) = &plugin.credentials {
        // std drops supplementary groups too when it changes the uid as root.
        command.uid(credentials.uid).gid(credentials.gid);
    }
    crate::systemd::hide(&mut command);
    before_exec(&mut command, plugin.limits);
    // Kept open until the child has it; then only the child (and the manager's end) holds it.
    let _channel = match (endpoint, launch.channels.get()) {
        (Address::Unix(_), Some(channels)) => {
            let channel = channels.open(&plugin.name, &launch.id, plugin.service.as_str())?;
            inherit(&mut command, &channel);
            Some(channel)
        }
        // A TCP peer has no pidfd: nothing to check it by (docs/security.md says so).
        _ => None,
    };
    let mut child = command.spawn()?;
    let mut capture = Capture(Vec::with_capacity(2));
    for (stream, output) in [
        (Stream::Stdout, child.stdout.take().map(Output::Stdout)),
        (Stream::Stderr, child.stderr.take().map(Output::Stderr)),
    ] {
        if let Some(output) = output {
            let logs = logs.clone();
            let id = launch.id.clone();
            capture.0.push(tokio::spawn(async move {
                match output {
                    Output::Stdout(out) => logs.capture(id, stream, out).await,
                    Output::Stderr(err) => logs.capture(id, stream, err).await,
                }
            }));
        }
    }
    Ok((child, capture))
}

enum Output {
    Stdout(tokio::process::ChildStdout),
    Stderr(tokio::process::ChildStderr),
}

/// In the child, before exec: die with the manager (SIGKILL when it dies, even if it is
/// SIGKILLed itself), and apply the resource limits.
#[allow(unsafe_code)]
fn before_exec(command: &mut Command, limits: ResourceLimits) {
    use nix::sys::resource::{Resource, setrlimit};
    let parent = std::process::id();
    let limits = [
        (Resource::RLIMIT_NOFILE, limits.open_files),
        (
            Resource::RLIMIT_AS,
            limits.address_space_mb.map(|mb| mb.saturating_mul(1 << 20)),
        ),
        (Resource::RLIMIT_CPU, limits.cpu_seconds),
    ];
    // SAFETY: the closure runs in the child between fork and exec, and only makes
    // async-signal-safe system calls (prctl, getppid, kill, setrlimit); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The manager may have died between fork and prctl: then nobody would kill us.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                nix::sys::signal::raise(Signal::SIGKILL).map_err(io::Error::from)?;
            }
            for (resource, limit) in limits {
                if let Some(limit) = limit {
                    setrlimit(resource, limit, limit).map_err(io::Error::from)?;
                }
            }
            Ok(())
        });
    }
}

/// Hands `channel` to the child as `MESH_CALLERS_FD`: the same number, close-on-exec cleared
/// in the child only, so no other process the manager starts inherits it.
#[allow(unsafe_code)]
fn inherit(command: &mut Command, channel: &std::os::fd::OwnedFd) {
    use std::os::fd::{AsRawFd, BorrowedFd};
    let fd = channel.as_raw_fd();
    command.env(plugin::CALLERS_FD, fd.to_string());
    // SAFETY: runs in the child between fork and exec, and only calls fcntl (async-signal-safe)
    // on an fd that is open there (the parent keeps it open until spawn returns).
    unsafe {
        command.pre_exec(move || {
            let fd = BorrowedFd::borrow_raw(fd);
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map_err(io::Error::from)?;
            Ok(())
        });
    }
}

/// Sends `signal` to the instance's whole process group.
pub(crate) fn signal_group(pid: u32, signal: Signal) {
    // The group id is the leader's pid (process_group(0)). ESRCH: already gone.
    let _ = killpg(Pid::from_raw(pid as i32), signal);
}

/// SIGTERM to the group, SIGKILL after `grace`, then SIGKILL to any straggler in the group.
pub(crate) async fn stop(
    child: &mut Child,
    grace: Duration,
) -> io::Result<std::process::ExitStatus> {
    let Some(pid) = child.id() else {
        // Already reaped.
        return child.wait().await;
    };
    signal_group(pid, Signal::SIGTERM);
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            tracing::warn!(
                pid,
                ?grace,
                "instance did not exit in its grace period; killing its process group"
            );
            signal_group(pid, Signal::SIGKILL);
            child.wait().await
        }
    };
    // Children the instance left behind still hold the group id; nothing else can have it.
    signal_group(pid, Signal::SIGKILL);
    status
}

/// `exited with status 3`, `killed by SIGKILL`.
pub(crate) fn describe(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(signal) => format!("killed by {signal}"),
            Err(_) => format!("killed by signal {signal}"),
        },
        _ => "ended".into(),
    }
}

/// Removes the instance's socket file, if it left one.
pub(crate) fn remove_socket(path: &Path) {
    let _ = std::fs::remove_file(path);
}
