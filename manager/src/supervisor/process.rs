//! Starting and stopping one plugin process.
//!
//! Each instance runs in its own process group, so a stop reaches everything it started, and
//! with a parent-death signal, so it dies with the manager even when the manager is SIGKILLed.
//! Its environment is built in one place, [`environment`]: clean but for an allow-list of the
//! manager's variables, then the config's `env`, then the plugin contract.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    io,
    os::fd::{AsRawFd, RawFd},
    path::Path,
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use mesh::{Address, plugin, runtime::MESH_SOCKET};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use tokio::process::{Child, Command};

use super::logs::{LogBook, Stream};
use crate::config::{
    CONTRACT_VARIABLES, PluginConfig, ResourceLimits, SandboxMode, Transport, env_allowed,
};

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
    if let Address::Unix(socket) = endpoint {
        // A socket left by a crashed instance would make the plugin's bind fail.
        if let Err(error) = mesh::runtime::remove_stale_socket(socket) {
            return Err(io::Error::other(error));
        }
    }
    // Kept open until the child has it; then only the child (and the manager's end) holds it.
    let channel = match (endpoint, launch.channels.get()) {
        (Address::Unix(_), Some(channels)) => {
            Some(channels.open(&plugin.name, &launch.id, plugin.service.as_str())?)
        }
        // A TCP peer has no pidfd: nothing to check it by (docs/security.md says so).
        _ => None,
    };
    let callers_fd = channel.as_ref().map(AsRawFd::as_raw_fd);
    let env = environment(launch, endpoint, callers_fd, std::env::vars_os())?;
    command
        .args(&plugin.args)
        .env_clear()
        .envs(env)
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
    if let Some(channel) = &channel {
        inherit(&mut command, channel);
    }
    let mut child = command.spawn()?;
    drop(channel);
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

/// The whole environment of an instance, built in one place and in this order, each layer
/// over the one before:
///
/// 1. the manager's own variables that the plugin's `env_allow` names (`inherited`: the
///    manager's environment), and nothing else of it — secrets the manager was started with
///    stay out of plugins, which reach them only through `GetEnv` and an `env:` capability;
/// 2. the config's `env` (with the manager's defaults for it: `MESH_MAX_MESSAGE_SIZE`, the
///    telemetry variables);
/// 3. the plugin contract ([`CONTRACT_VARIABLES`]), last, so that nothing overrides it.
///
/// The caller clears the process environment and sets exactly this.
pub(crate) fn environment(
    launch: &Launch,
    endpoint: &Address,
    callers_fd: Option<RawFd>,
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
) -> io::Result<BTreeMap<OsString, OsString>> {
    let plugin = &launch.plugin;
    let mut env: BTreeMap<OsString, OsString> = inherited
        .into_iter()
        .filter(|(name, _)| {
            name.to_str().is_some_and(|name| {
                env_allowed(&plugin.env_allow, name) && !CONTRACT_VARIABLES.contains(&name)
            })
        })
        .collect();
    env.extend(
        plugin
            .env
            .iter()
            .map(|(name, value)| (name.into(), value.into())),
    );
    let mut contract: Vec<(&str, OsString)> = vec![
        (plugin::PLUGIN_NAME, plugin.name.as_str().into()),
        (plugin::PLUGIN_INSTANCE, launch.id.as_str().into()),
        (MESH_SOCKET, launch.mesh_socket.clone().into()),
    ];
    match endpoint {
        Address::Unix(socket) => contract.push((plugin::PLUGIN_SOCKET, socket.clone().into())),
        Address::Tcp(address) => contract.push((plugin::PLUGIN_ADDRESS, address.into())),
        Address::Dialer(name) => {
            return Err(io::Error::other(format!(
                "{name} is an in-process transport; a plugin process cannot serve it"
            )));
        }
    }
    if plugin.sandbox.mode != SandboxMode::Off {
        // Its direct dial of another plugin's socket cannot succeed: `mesh::connect` routes.
        contract.push((mesh::MESH_DIRECT, "0".into()));
    }
    if let Some(fd) = callers_fd {
        contract.push((plugin::CALLERS_FD, fd.to_string().into()));
    }
    for (name, value) in contract {
        debug_assert!(CONTRACT_VARIABLES.contains(&name), "{name} is in the list");
        env.insert(name.into(), value);
    }
    Ok(env)
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

/// Hands `channel` to the child under its own number (`MESH_CALLERS_FD`, set by
/// [`environment`]): close-on-exec cleared in the child only, so no other process the manager
/// starts inherits it.
#[allow(unsafe_code)]
fn inherit(command: &mut Command, channel: &std::os::fd::OwnedFd) {
    use std::os::fd::BorrowedFd;
    let fd = channel.as_raw_fd();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(plugin_table: &str) -> Launch {
        let text = format!(
            "[mesh]\nruntime_dir = \"/run/m\"\nenv_allow = [\"PATH\", \"LC_*\"]\n\
             [[plugin]]\nname = \"echo\"\ncommand = \"/bin/sh\"\n{plugin_table}"
        );
        let config = crate::Config::parse(Path::new("/etc/mesh/mesh.toml"), &text).unwrap();
        Launch {
            plugin: Arc::new(config.plugins[0].clone()),
            id: "echo-0".into(),
            mesh_socket: "/run/m/mesh.sock".into(),
            init: None,
            channels: super::super::ChannelsCell::default(),
            sandbox: false,
        }
    }

    fn manager_env() -> Vec<(OsString, OsString)> {
        [
            ("PATH", "/usr/bin"),
            ("LC_ALL", "C.UTF-8"),
            ("LANG", "de_DE.UTF-8"),
            ("SECRET_TOKEN", "s3cret"),
            ("HOME", "/root"),
            ("MESH_DIRECT", "1"),
            ("PLUGIN_NAME", "forged"),
            ("MESH_CALLERS_FD", "7"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
    }

    fn names(env: &BTreeMap<OsString, OsString>) -> Vec<&str> {
        env.keys().filter_map(|k| k.to_str()).collect()
    }

    #[test]
    fn an_instance_gets_the_allowed_variables_its_env_and_the_contract_only() {
        let launch = launch("env = { RUST_LOG = \"info\", PATH = \"/opt/bin\" }\n");
        let socket = Address::Unix("/run/m/echo/echo-0.sock".into());
        let env = environment(&launch, &socket, Some(9), manager_env()).unwrap();
        assert_eq!(
            names(&env),
            [
                "LC_ALL",
                "MESH_CALLERS_FD",
                "MESH_MAX_MESSAGE_SIZE",
                "MESH_SOCKET",
                "PATH",
                "PLUGIN_INSTANCE",
                "PLUGIN_NAME",
                "PLUGIN_SOCKET",
                "RUST_LOG",
            ]
        );
        let get = |name: &str| env[&OsString::from(name)].to_str().unwrap().to_owned();
        // The config's env over the manager's own; the contract over both.
        assert_eq!(get("PATH"), "/opt/bin");
        assert_eq!(get("PLUGIN_NAME"), "echo");
        assert_eq!(get("MESH_CALLERS_FD"), "9");
        assert_eq!(get("PLUGIN_SOCKET"), "/run/m/echo/echo-0.sock");
        assert_eq!(get("MESH_SOCKET"), "/run/m/mesh.sock");
    }

    #[test]
    fn a_plugin_adds_to_the_allow_list_and_a_sandboxed_one_routes() {
        let launch = launch("env_allow = [\"HOME\", \"MESH_*\"]\nsandbox = \"best-effort\"\n");
        let address = Address::Tcp("127.0.0.1:4000".into());
        let env = environment(&launch, &address, None, manager_env()).unwrap();
        let get = |name: &str| env.get(&OsString::from(name)).and_then(|v| v.to_str());
        assert_eq!(get("HOME"), Some("/root"));
        assert_eq!(get("PLUGIN_ADDRESS"), Some("127.0.0.1:4000"));
        // `MESH_*` lets through none of the contract's: the manager sets those (or not).
        assert_eq!(get("MESH_DIRECT"), Some("0"));
        assert_eq!(get("MESH_CALLERS_FD"), None);
        assert_eq!(get("PLUGIN_SOCKET"), None);
        assert_eq!(get("SECRET_TOKEN"), None);
        assert_eq!(get("LANG"), None, "[mesh] env_allow replaced the default");
        // Unsandboxed: no MESH_DIRECT at all, whatever the manager's.
        let plain = environment(&super::tests::launch(""), &address, None, manager_env()).unwrap();
        assert!(!plain.contains_key(&OsString::from("MESH_DIRECT")));
    }

    #[test]
    fn every_contract_variable_the_spawn_sets_is_in_the_list() {
        let launch = launch("sandbox = \"best-effort\"\n");
        let socket = Address::Unix("/run/m/echo/echo-0.sock".into());
        let env = environment(&launch, &socket, Some(3), Vec::new()).unwrap();
        for name in names(&env) {
            assert!(
                CONTRACT_VARIABLES.contains(&name) || launch.plugin.env.contains_key(name),
                "{name}"
            );
        }
    }
}
