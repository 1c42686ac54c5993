//! The manager's configuration: parsed once, validated once, then handed around as plain values.
//!
//! Every error names the file, the line, what is wrong and how to fix it.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    ops::Range,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use mesh::{
    ServiceName, labels,
    plugin::{self, DEFAULT_MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE_VAR},
    runtime, tuning,
};
use mesh_router::{
    Limits,
    cluster::{
        NodeName,
        etcd::{DEFAULT_PREFIX, DEFAULT_TTL, EtcdConfig},
    },
};
use serde::Deserialize;
use toml::Spanned;

use crate::{
    host::{Capability, Rate},
    supervisor::MAX_INSTANCES,
};

mod telemetry;
pub use telemetry::{DEFAULT_SERVICE_NAME, Telemetry};

mod tls;
use tls::RawTls;
pub use tls::TlsConfig;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// Where sockets live.
    pub runtime_dir: PathBuf,
    /// The router's Unix socket: `[mesh] socket`, unless [`Config::override_socket`] set one.
    pub socket: PathBuf,
    /// Whether `socket` came from the command line (`mesh up --socket`, `MESH_SOCKET`) rather
    /// than the file; a reload keeps it.
    pub socket_overridden: bool,
    /// The router socket's permission bits (`0o600` unless `socket_mode` says otherwise).
    /// Opening it to other users lets them call plugins and read the registry, never control.
    pub socket_mode: u32,
    /// The group the router socket is given (`socket_group`), if any.
    pub socket_group: Option<u32>,
    /// TCP address for remote clients, if any.
    pub listen: Option<SocketAddr>,
    /// mTLS on `listen` (`[tls]`); `None`: plaintext, which only a loopback `listen` or
    /// `allow_plaintext = true` permits.
    pub tls: Option<TlsConfig>,
    /// The router's limits and default call timeout.
    pub limits: Limits,
    /// Router worker threads, each serving calls start to end on its own.
    pub router_threads: usize,
    /// Router workers poll their sockets instead of sleeping: lower latency, one busy core each.
    pub busy_poll: bool,
    /// How long a router worker keeps polling after a call before it sleeps
    /// ([`mesh::tuning::set_linger`], [`mesh::tuning::linger`]); zero: never.
    pub spin: Duration,
    /// The largest gRPC message plugins accept and send, in bytes; handed to each plugin as
    /// `MESH_MAX_MESSAGE_SIZE` (the router itself streams messages without a limit of its own).
    pub max_message_size: usize,
    /// The audit log of host-service decisions (`[mesh] audit_log`, default
    /// `<runtime_dir>/audit.log`).
    pub audit_log: PathBuf,
    /// The audit log's bound before it is rotated to `audit.log.1` (`audit_max_size`).
    pub audit_max_size: u64,
    /// Where plugins' default roots live (`[mesh] data_dir`, default `$XDG_DATA_HOME/mesh`,
    /// else `~/.local/share/mesh`).
    pub data_dir: PathBuf,
    /// The admin HTTP listener (`[admin]`): metrics, health, status page; `None`: off.
    pub admin: Option<AdminConfig>,
    /// Whether the router records call metrics (`[telemetry] metrics`, default off).
    pub metrics: bool,
    /// `[telemetry]`: trace export, sampling, log format.
    pub telemetry: Telemetry,
    /// This node among many, and the registry backend (`[mesh] node`, `advertise`,
    /// `[registry]`).
    pub cluster: ClusterConfig,
    /// The manager's own environment variables every plugin is handed (`[mesh] env_allow`,
    /// default [`DEFAULT_ENV_ALLOW`]): names, or prefixes ending in `*` (`LC_*`).
    pub env_allow: Vec<String>,
    /// The plugins, in file order.
    pub plugins: Vec<PluginConfig>,
}

/// The admin HTTP listener (`[admin]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where it listens (`listen`): loopback unless `allow_non_loopback = true`.
    pub listen: SocketAddr,
    /// Serve local users other than the owner (and root) on loopback
    /// (`allow_other_users = true`); by default their connections are answered 403.
    pub allow_other_users: bool,
}

/// `[mesh] node`, `[mesh] advertise` and `[registry]`: which node this is and where the
/// registry lives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterConfig {
    /// This node's name, if it is one of many.
    pub node: Option<NodeName>,
    /// `host:port` other routers dial this one at: `advertise`, else `listen` when it is a
    /// concrete address.
    pub advertise: Option<String>,
    /// etcd, when `[registry] etcd` names it; else the embedded registry.
    pub etcd: Option<EtcdConfig>,
}

/// One plugin's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// The plugin's name (`echo`).
    pub name: String,
    /// Its registry name (`plugin.echo`).
    pub service: ServiceName,
    /// The program to run, resolved to a path.
    pub command: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment variables (with `MESH_MAX_MESSAGE_SIZE` unless the file sets it).
    pub env: BTreeMap<String, String>,
    /// The manager's variables its instances are handed: `[mesh] env_allow` and then the
    /// plugin's own `env_allow` (names, or prefixes ending in `*`). Nothing else of the
    /// manager's environment reaches a plugin.
    pub env_allow: Vec<String>,
    /// Methods that may be sent twice (`echo.v1.Echo/Echo`): a call to one is retried on
    /// another instance even after it may have reached the first. Its answer is handed on
    /// once its first message is there, so mark unary and server-streaming methods, not ones
    /// whose first answer waits for the caller.
    pub idempotent: Vec<String>,
    /// How many instances to run.
    pub instances: u32,
    /// How long an instance may take to report SERVING.
    pub ready_timeout: Duration,
    /// How long an instance may drain after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
    /// Between leaving the registry and SIGTERM: time for clients to learn of the change.
    pub drain_delay: Duration,
    /// Where the instances' sockets live.
    pub socket_dir: PathBuf,
    /// When an instance that ended is started again.
    pub restart: RestartPolicy,
    /// Restart backoff: first delay, ceiling, and how long an instance must stay ready for the
    /// delay to start over from the first.
    pub backoff: Backoff,
    /// How often a ready instance's health is checked.
    pub health_interval: Duration,
    /// Consecutive failed health checks after which an instance is restarted.
    pub health_failures: u32,
    /// Working directory of the instances (default: the manager's).
    pub working_dir: Option<PathBuf>,
    /// User and group to run as, when the manager runs as root.
    pub credentials: Option<Credentials>,
    /// Resource limits applied before exec.
    pub limits: ResourceLimits,
    /// What it may reach through host services (`capabilities = [...]`).
    pub capabilities: Vec<Capability>,
    /// The directory its host paths are relative to (`root`; default `<data_dir>/<name>`,
    /// created 0700 when first used).
    pub root: PathBuf,
    /// How the instances serve: a Unix socket (default) or loopback TCP.
    pub transport: Transport,
    /// Calls to this plugin by all callers together (`rate_limit = "1000/s"`).
    pub rate_limit: Option<Rate>,
    /// Calls to this plugin by each caller (`caller_rate_limit = "50/s burst 10"`).
    pub caller_rate_limit: Option<Rate>,
    /// The kernel sandbox it asks for (`sandbox`, `sandbox_paths`).
    pub sandbox: Sandbox,
}

/// The kernel sandbox a plugin asks for: `sandbox = true | false | "best-effort"` and
/// `sandbox_paths = [...]` in its `[[plugin]]` table (docs/security.md, "Kernel sandbox").
#[derive(Debug, Clone, Default)]
pub struct Sandbox {
    /// Whether, and how strictly.
    pub mode: SandboxMode,
    /// More paths it may read and execute (`sandbox_paths`, relative to the config file):
    /// an interpreter's libraries, a script, a virtual environment.
    pub paths: Vec<PathBuf>,
    /// `FILE:LINE` of the `sandbox` setting, for messages that refuse it.
    pub origin: String,
    /// Directories that no rule the sandbox adds by itself may reach: the data directory
    /// (every plugin's default root), the runtime directory, the config file's directory and
    /// `$HOME` (`supervisor::sandbox`, "a command's prefix"). `sandbox_paths` may still name
    /// them.
    pub protected: Vec<PathBuf>,
}

/// A change of `origin` alone (lines moved) is no change of the sandbox.
impl PartialEq for Sandbox {
    fn eq(&self, other: &Self) -> bool {
        self.mode == other.mode && self.paths == other.paths
    }
}

/// How strictly a plugin is sandboxed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SandboxMode {
    /// Not sandboxed (the default).
    #[default]
    Off,
    /// `sandbox = true`: confined, or not started where the kernel cannot confine it fully.
    Strict,
    /// `sandbox = "best-effort"`: confined as far as the kernel allows, with a warning for
    /// what it cannot.
    BestEffort,
}

/// How a plugin's instances serve (`transport` in `[[plugin]]`): the host picks, the plugin
/// follows the variable it is given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// A Unix socket under the runtime directory (`PLUGIN_SOCKET`).
    #[default]
    Unix,
    /// A loopback TCP port the manager picks for each start (`PLUGIN_ADDRESS=127.0.0.1:PORT`),
    /// for runtimes without Unix sockets.
    Tcp,
}

/// A user and group to run a plugin as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name, for messages.
    pub user: String,
    /// Numeric user id.
    pub uid: u32,
    /// Numeric group id (the user's primary group unless `group` is set).
    pub gid: u32,
}

/// Resource limits (soft = hard) applied to each instance before exec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceLimits {
    /// RLIMIT_NOFILE.
    pub open_files: Option<u64>,
    /// RLIMIT_AS, in MiB.
    pub address_space_mb: Option<u64>,
    /// RLIMIT_CPU, in seconds.
    pub cpu_seconds: Option<u64>,
}

/// When an instance that ended is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whatever the exit.
    Always,
    /// Unless it exited with status 0.
    OnFailure,
    /// Never.
    Never,
}

/// Exponential restart backoff with jitter, and crash-loop detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
    /// Ready this long, an instance's next delay starts over from `base`.
    pub reset_after: Duration,
    /// This many failures within `window` mark the plugin failed.
    pub max_failures: u32,
    /// See `max_failures`.
    pub window: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(10),
            max_failures: 5,
            window: Duration::from_secs(60),
        }
    }
}

impl PluginConfig {
    /// The id of instance number `index` (`echo-0`).
    pub fn instance_id(&self, index: u32) -> String {
        format!("{}-{index}", self.name)
    }

    /// The socket of instance `id`.
    pub fn socket(&self, id: &str) -> PathBuf {
        self.socket_dir.join(format!("{id}.sock"))
    }
}

/// A configuration error: the file, the line (when known) and a message that says the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The config file.
    pub path: PathBuf,
    /// 1-based line, when the error has a place.
    pub line: Option<usize>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds for the sizes and counts in `[mesh]`: enough for any machine, and keeps typos out.
const MESSAGE_SIZES: std::ops::RangeInclusive<u64> = 1024..=1 << 30;
const MAX_COUNT: u64 = 10_000_000;
/// Bounds for `handshake_timeout` and `idle_timeout`.
const MIN_CONNECTION_TIMEOUT: Duration = Duration::from_millis(10);
const MAX_CONNECTION_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Bounds for `max_header_list_size`.
const HEADER_LIST_SIZES: std::ops::RangeInclusive<u64> = 1024..=1 << 20;
const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
const DEFAULT_DRAIN_DELAY: Duration = Duration::from_millis(100);
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_HEALTH_FAILURES: u32 = 3;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    mesh: Option<Spanned<RawMesh>>,
    #[serde(default)]
    telemetry: Option<Spanned<telemetry::RawTelemetry>>,
    #[serde(default)]
    plugin: Vec<Spanned<RawPlugin>>,
    #[serde(default)]
    admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    registry: Option<Spanned<RawRegistry>>,
    #[serde(default)]
    tls: Option<Spanned<RawTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Spanned<String>,
    #[serde(default)]
    allow_non_loopback: bool,
    #[serde(default)]
    allow_other_users: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    etcd: Option<Spanned<Vec<Spanned<String>>>>,
    prefix: Option<Spanned<String>>,
    lease_ttl: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMesh {
    runtime_dir: Option<Spanned<PathBuf>>,
    socket: Option<Spanned<PathBuf>>,
    listen: Option<Spanned<String>>,
    allow_plaintext: Option<Spanned<bool>>,
    call_timeout: Option<Spanned<String>>,
    max_message_size: Option<Spanned<RawSize>>,
    max_connections: Option<Spanned<u64>>,
    max_concurrent_streams: Option<Spanned<u64>>,
    max_in_flight: Option<Spanned<u64>>,
    max_in_flight_per_connection: Option<Spanned<u64>>,
    handshake_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_header_list_size: Option<Spanned<RawSize>>,
    socket_mode: Option<Spanned<String>>,
    socket_group: Option<Spanned<String>>,
    router_threads: Option<Spanned<u64>>,
    #[serde(default)]
    busy_poll: bool,
    spin: Option<Spanned<String>>,
    data_dir: Option<Spanned<PathBuf>>,
    audit_log: Option<Spanned<PathBuf>>,
    audit_max_size: Option<Spanned<RawSize>>,
    node: Option<Spanned<String>>,
    advertise: Option<Spanned<String>>,
    env_allow: Option<Vec<Spanned<String>>>,
}

/// A size in bytes, or text with a unit (`"16MiB"`).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    name: Spanned<String>,
    command: Spanned<String>,
    #[serde(default)]
    args: Vec<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    env_allow: Vec<Spanned<String>>,
    #[serde(default)]
    idempotent: Vec<Spanned<String>>,
    instances: Option<Spanned<u32>>,
    ready_timeout: Option<Spanned<String>>,
    stop_grace: Option<Spanned<String>>,
    drain_delay: Option<Spanned<String>>,
    restart: Option<RestartPolicy>,
    backoff_base: Option<Spanned<String>>,
    backoff_max: Option<Spanned<String>>,
    backoff_reset: Option<Spanned<String>>,
    max_failures: Option<Spanned<u32>>,
    failure_window: Option<Spanned<String>>,
    health_interval: Option<Spanned<String>>,
    health_failures: Option<Spanned<u32>>,
    working_dir: Option<Spanned<PathBuf>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    capabilities: Vec<Spanned<String>>,
    root: Option<Spanned<PathBuf>>,
    transport: Option<Spanned<String>>,
    rate_limit: Option<Spanned<String>>,
    caller_rate_limit: Option<Spanned<String>>,
    sandbox: Option<Spanned<RawSandbox>>,
    #[serde(default)]
    sandbox_paths: Vec<Spanned<PathBuf>>,
}

/// `sandbox = true | false | "best-effort"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSandbox {
    Flag(bool),
    Mode(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    open_files: Option<Spanned<u64>>,
    address_space_mb: Option<Spanned<u64>>,
    cpu_seconds: Option<Spanned<u64>>,
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            line: None,
            message: format!(
                "cannot read the config file: {e}; pass an existing file with --config"
            ),
        })?;
        Self::parse(path, &text)
    }

    /// Listens on `socket` instead of the file's `[mesh] socket`: `mesh up --socket` and
    /// `MESH_SOCKET`, so that one variable serves `mesh up` and the commands that talk to it.
    pub fn override_socket(&mut self, socket: PathBuf) -> Result<(), ConfigError> {
        let error = |message: String| ConfigError {
            path: self.path.clone(),
            line: None,
            message,
        };
        let socket = std::path::absolute(&socket).map_err(|e| {
            error(format!(
                "cannot resolve the socket {}: {e}",
                socket.display()
            ))
        })?;
        runtime::check_socket_path(&socket)
            .map_err(|e| error(format!("--socket/MESH_SOCKET: {e}")))?;
        // Plugins export traces to the relay on the router's socket: follow it.
        let (old, new) = (
            telemetry::relay_endpoint(&self.socket),
            telemetry::relay_endpoint(&socket),
        );
        for plugin in &mut self.plugins {
            if let Some(endpoint) = plugin
                .env
                .get_mut(mesh::telemetry::OTEL_EXPORTER_OTLP_ENDPOINT)
                .filter(|e| **e == old)
            {
                endpoint.clone_from(&new);
            }
        }
        self.socket = socket;
        self.socket_overridden = true;
        Ok(())
    }

    /// Logs as `format` whatever `[telemetry] log_format` says (`mesh up --log-format`), and
    /// hands plugins the same format (`MESH_LOG_FORMAT`); a reload keeps it.
    pub fn override_log_format(&mut self, format: mesh::telemetry::LogFormat) {
        use mesh::telemetry::{LogFormat, MESH_LOG_FORMAT};
        self.telemetry.log_format = format;
        self.telemetry.log_format_overridden = true;
        for plugin in &mut self.plugins {
            match format {
                LogFormat::Json => {
                    plugin
                        .env
                        .entry(MESH_LOG_FORMAT.to_owned())
                        .or_insert_with(|| "json".to_owned());
                }
                LogFormat::Text => {
                    if plugin.env.get(MESH_LOG_FORMAT).is_some_and(|f| f == "json") {
                        plugin.env.remove(MESH_LOG_FORMAT);
                    }
                }
            }
        }
    }

    /// Validates `text`, read from `path` (relative commands resolve against its directory).
    ///
    /// Never panics, whatever the text (the tests fuzz it): every value is checked against
    /// its bounds, and a value out of them is an error naming the line and the fix.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let file = File {
            path,
            text,
            base: path.parent().unwrap_or(Path::new(".")),
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| file.at(e.span(), explain(e.message())))?;
        let mesh_span = raw.mesh.as_ref().map(|m| m.span());
        let mut mesh = raw.mesh.map(Spanned::into_inner).unwrap_or_default();
        let node = mesh.node.take();
        let advertise = mesh.advertise.take();
        let allow_plaintext = mesh.allow_plaintext.clone();
        let listen_span = mesh.listen.as_ref().map(|l| l.span());
        let mut config = file.mesh(mesh)?;
        config.admin = raw.admin.map(|admin| file.admin(admin)).transpose()?;
        config.metrics = metrics_enabled(raw.telemetry.as_ref().map(Spanned::get_ref));
        config.telemetry = Telemetry::parse(
            raw.telemetry.map(Spanned::into_inner).unwrap_or_default(),
            &|name| std::env::var(name).ok().filter(|v| !v.is_empty()),
            &|span, message| file.at(span, message),
        )?;
        config.tls = match raw.tls {
            Some(tls) => Some(file.tls(tls)?),
            None => None,
        };
        file.check_plaintext(&config, allow_plaintext.as_ref(), listen_span)?;
        config.cluster =
            file.cluster(&config, node, advertise, raw.registry.as_ref(), mesh_span)?;
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for table in raw.plugin {
            let table_line = line_of(text, table.span().start);
            let raw = table.into_inner();
            let name = raw.name.get_ref().clone();
            if let Some(first) = seen.insert(name.clone(), table_line) {
                return Err(file.at(
                    Some(raw.name.span()),
                    format!(
                        "plugin {name:?} is defined twice (first at line {first}); give each [[plugin]] a unique name"
                    ),
                ));
            }
            let plugin = file.plugin(&config, raw, table_line)?;
            config.plugins.push(plugin);
        }
        Ok(config)
    }
}

/// The file being parsed: where errors point, and what relative paths are relative to.
struct File<'a> {
    path: &'a Path,
    text: &'a str,
    base: &'a Path,
}

impl File<'_> {
    /// An error at `span` (its line, when there is one).
    fn at(&self, span: Option<Range<usize>>, message: String) -> ConfigError {
        ConfigError {
            path: self.path.to_owned(),
            line: span.map(|s| line_of(self.text, s.start)),
            message,
        }
    }

    /// `[mesh]`: a config without plugins yet.
    fn mesh(&self, mesh: RawMesh) -> Result<Config, ConfigError> {
        let at = |span, message| self.at(span, message);
        let runtime_dir = match &mesh.runtime_dir {
            Some(dir) => self.path_value("runtime_dir", dir)?,
            None => runtime::default_dir(),
        };
        let socket = match &mesh.socket {
            Some(socket) => self.path_value("socket", socket)?,
            None => runtime_dir.join("mesh.sock"),
        };
        let socket_span = mesh
            .socket
            .as_ref()
            .or(mesh.runtime_dir.as_ref())
            .map(|s| s.span());
        runtime::check_socket_path(&socket).map_err(|e| at(socket_span.clone(), e.to_string()))?;
        let listen = match &mesh.listen {
            None => None,
            Some(listen) => Some(listen.get_ref().parse().map_err(|_| {
                at(
                    Some(listen.span()),
                    format!(
                        "listen = {:?} is not an address; write host:port, such as \"127.0.0.1:7700\" (port 0 picks a free port)",
                        listen.get_ref()
                    ),
                )
            })?),
        };
        let limits = limits(&mesh, &at)?;
        let (socket_mode, socket_group) = socket_access(&mesh, &at)?;
        let router_threads = match &mesh.router_threads {
            None => default_router_threads(),
            Some(n) if (1..=MAX_ROUTER_THREADS).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                return Err(at(
                    Some(n.span()),
                    format!(
                        "router_threads = {} is out of range; use 1 to {MAX_ROUTER_THREADS}",
                        n.get_ref()
                    ),
                ));
            }
        };
        let spin = match &mesh.spin {
            // Not the process's current window: a reload that drops the key goes back to this.
            None => tuning::linger_from_env(),
            Some(text) => humantime::parse_duration(text.get_ref())
                .ok()
                .filter(|d| *d <= MAX_SPIN)
                .ok_or_else(|| {
                    at(
                        Some(text.span()),
                        format!(
                            "spin = {:?}: write a duration up to 1ms such as \"100us\", or \"0s\" to never spin (default {:?})",
                            text.get_ref(),
                            tuning::DEFAULT_SPIN
                        ),
                    )
                })?,
        };
        let max_message_size = match &mesh.max_message_size {
            None => DEFAULT_MAX_MESSAGE_SIZE,
            Some(size) => parse_size(size.get_ref())
                .filter(|n| MESSAGE_SIZES.contains(n))
                .ok_or_else(|| {
                    at(
                        Some(size.span()),
                        format!(
                            "max_message_size must be 1KiB to 1GiB; write bytes or a size such as \"16MiB\" (default {}MiB)",
                            DEFAULT_MAX_MESSAGE_SIZE >> 20
                        ),
                    )
                })? as usize,
        };
        let data_dir = match &mesh.data_dir {
            Some(dir) => self.path_value("data_dir", dir)?,
            None => default_data_dir(&runtime_dir),
        };
        let audit_log = match &mesh.audit_log {
            Some(path) => self.path_value("audit_log", path)?,
            None => runtime_dir.join("audit.log"),
        };
        let audit_max_size = match &mesh.audit_max_size {
            None => crate::host::audit::DEFAULT_MAX_SIZE,
            Some(size) => parse_size(size.get_ref())
                .filter(|n| AUDIT_SIZES.contains(n))
                .ok_or_else(|| {
                    at(
                        Some(size.span()),
                        "audit_max_size must be 4KiB to 1GiB; write bytes or a size such as \"10MiB\" (default 10MiB)".into(),
                    )
                })?,
        };
        let env_allow = match &mesh.env_allow {
            None => DEFAULT_ENV_ALLOW.iter().map(|&n| n.to_owned()).collect(),
            Some(list) => env_allow(list).map_err(|(span, message)| at(Some(span), message))?,
        };
        Ok(Config {
            path: self.path.to_owned(),
            env_allow,
            data_dir,
            audit_log,
            audit_max_size,
            runtime_dir,
            socket,
            socket_overridden: false,
            socket_mode,
            socket_group,
            listen,
            tls: None,
            limits,
            router_threads,
            busy_poll: mesh.busy_poll,
            spin,
            max_message_size,
            admin: None,
            metrics: false,
            telemetry: Telemetry::default(),
            cluster: ClusterConfig::default(),
            plugins: Vec::new(),
        })
    }

    /// `[admin]`: an address, loopback unless the table says `allow_non_loopback = true`.
    fn admin(&self, admin: Spanned<RawAdmin>) -> Result<AdminConfig, ConfigError> {
        let admin = admin.into_inner();
        let listen: SocketAddr = admin.listen.get_ref().parse().map_err(|_| {
            self.at(
                Some(admin.listen.span()),
                format!(
                    "[admin] listen = {:?} is not an address; write host:port, such as \"127.0.0.1:9900\" (port 0 picks a free port)",
                    admin.listen.get_ref()
                ),
            )
        })?;
        if !listen.ip().is_loopback() && !admin.allow_non_loopback {
            return Err(self.at(
                Some(admin.listen.span()),
                format!(
                    "[admin] listen = \"{listen}\" is not a loopback address: the admin listener \
                     has no authentication, so anyone who reaches it sees metrics, logs and \
                     status; use 127.0.0.1 (or ::1), or add allow_non_loopback = true to [admin] \
                     if a firewall or proxy guards it"
                ),
            ));
        }
        Ok(AdminConfig {
            listen,
            allow_other_users: admin.allow_other_users,
        })
    }

    /// `[mesh] node`, `[mesh] advertise` and `[registry]`.
    fn cluster(
        &self,
        config: &Config,
        node: Option<Spanned<String>>,
        advertise: Option<Spanned<String>>,
        registry: Option<&Spanned<RawRegistry>>,
        mesh_span: Option<Range<usize>>,
    ) -> Result<ClusterConfig, ConfigError> {
        let node = match &node {
            None => None,
            Some(name) => Some(
                NodeName::new(name.get_ref().as_str())
                    .map_err(|e| self.at(Some(name.span()), format!("node = {e}")))?,
            ),
        };
        let advertise = match &advertise {
            Some(text) => {
                let value = text.get_ref();
                let port_ok = value.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty()
                        && !host.contains('/')
                        && port.parse::<u16>().is_ok_and(|p| p != 0)
                });
                if !port_ok || value.len() > 253 + 6 || value.chars().any(char::is_control) {
                    return Err(self.at(
                        Some(text.span()),
                        format!(
                            "advertise = {value:?} is not host:port; write the address other nodes \
                             reach this router's listen address at, such as \"10.0.0.2:7700\""
                        ),
                    ));
                }
                Some(value.clone())
            }
            // `listen` is what other nodes dial when it is a concrete address.
            None => config
                .listen
                .filter(|addr| !addr.ip().is_unspecified() && addr.port() != 0)
                .map(|addr| addr.to_string()),
        };
        let Some(registry) = registry else {
            return Ok(ClusterConfig {
                node,
                advertise,
                etcd: None,
            });
        };
        let raw = registry.get_ref();
        let registry_span = Some(registry.span());
        let Some(endpoints) = &raw.etcd else {
            return Err(self.at(
                registry_span,
                "[registry] names no backend: write etcd = [\"http://127.0.0.1:2379\"], or \
                 remove [registry] for the embedded registry"
                    .into(),
            ));
        };
        let mut etcd = Vec::new();
        for endpoint in endpoints.get_ref() {
            let text = endpoint.get_ref();
            if text.starts_with("https://") {
                return Err(self.at(
                    Some(endpoint.span()),
                    format!("etcd endpoint {text:?}: TLS to etcd is not supported yet; use http:// on a trusted network or loopback"),
                ));
            }
            match text.parse::<mesh::Address>() {
                Ok(mesh::Address::Tcp(hostport)) => etcd.push(hostport),
                _ => {
                    return Err(self.at(
                        Some(endpoint.span()),
                        format!("etcd endpoint {text:?} is not http://host:port, such as \"http://127.0.0.1:2379\""),
                    ));
                }
            }
        }
        if etcd.is_empty() || etcd.len() > 16 {
            return Err(self.at(
                Some(endpoints.span()),
                "etcd = [...] needs 1 to 16 endpoints, such as [\"http://127.0.0.1:2379\"]".into(),
            ));
        }
        let prefix = match &raw.prefix {
            None => DEFAULT_PREFIX.to_owned(),
            Some(prefix) => {
                let text = prefix.get_ref();
                let ok = text.starts_with('/')
                    && text.ends_with('/')
                    && text.len() <= 128
                    && !text.chars().any(char::is_control);
                if !ok {
                    return Err(self.at(
                        Some(prefix.span()),
                        format!("prefix = {text:?}: write a key prefix that starts and ends with '/', at most 128 bytes (default {DEFAULT_PREFIX:?})"),
                    ));
                }
                text.clone()
            }
        };
        let ttl = match &raw.lease_ttl {
            None => DEFAULT_TTL,
            Some(text) => humantime::parse_duration(text.get_ref())
                .ok()
                .filter(|d| d.subsec_nanos() == 0 && (2..=300).contains(&d.as_secs()))
                .ok_or_else(|| {
                    self.at(
                        Some(text.span()),
                        format!(
                            "lease_ttl = {:?}: write whole seconds from \"2s\" to \"300s\" (default {}s)",
                            text.get_ref(),
                            DEFAULT_TTL.as_secs()
                        ),
                    )
                })?,
        };
        if node.is_none() {
            return Err(self.at(
                mesh_span.or(registry_span),
                "[registry] etcd needs this node's name: add node = \"a\" (unique per machine) to [mesh]".into(),
            ));
        }
        if config.listen.is_none() {
            return Err(self.at(
                mesh_span.or(registry_span),
                "[registry] etcd needs a TCP listener other nodes' routers forward calls to: set \
                 [mesh] listen = \"host:port\""
                    .into(),
            ));
        }
        if advertise.is_none() {
            return Err(self.at(
                mesh_span.or(registry_span),
                "[registry] etcd needs the address other nodes reach this router at: set [mesh] \
                 listen to a concrete host:port, or advertise = \"host:port\""
                    .into(),
            ));
        }
        Ok(ClusterConfig {
            node,
            advertise,
            etcd: Some(EtcdConfig {
                endpoints: etcd,
                prefix,
                ttl,
            }),
        })
    }

    /// One `[[plugin]]` table, starting at `table_line`.
    fn plugin(
        &self,
        config: &Config,
        p: RawPlugin,
        table_line: usize,
    ) -> Result<PluginConfig, ConfigError> {
        let name = p.name.get_ref().clone();
        let service = ServiceName::plugin(&name).map_err(|e| {
            self.at(
                Some(p.name.span()),
                format!("plugin name: {e}; a plugin name is one segment of a-z, 0-9 and '-', such as echo"),
            )
        })?;
        let plugin_error = |span: Range<usize>, message: String| {
            self.at(Some(span), format!("plugin {name:?}: {message}"))
        };
        let (rate_limit, caller_rate_limit) =
            rate_limits(&p).map_err(|(span, message)| plugin_error(span, message))?;
        let command = resolve_command(self.base, p.command.get_ref())
            .map_err(|message| plugin_error(p.command.span(), message))?;
        let count = |field: &str, value: &Option<Spanned<u32>>, default: u32, max: u32| match value
        {
            None => Ok(default),
            Some(n) if (1..=max).contains(n.get_ref()) => Ok(*n.get_ref()),
            Some(n) => Err(plugin_error(
                n.span(),
                format!(
                    "{field} = {} is out of range; use 1 to {max} (default {default})",
                    n.get_ref()
                ),
            )),
        };
        let duration = |field: &str, value: &Option<Spanned<String>>, default, bounds| {
            self.duration(&name, field, value.as_ref(), default, bounds)
        };
        let defaults = Backoff::default();
        let backoff = Backoff {
            base: duration("backoff_base", &p.backoff_base, defaults.base, BACKOFF)?,
            max: duration("backoff_max", &p.backoff_max, defaults.max, BACKOFF)?,
            reset_after: duration(
                "backoff_reset",
                &p.backoff_reset,
                defaults.reset_after,
                SPAN,
            )?,
            window: duration("failure_window", &p.failure_window, defaults.window, WINDOW)?,
            max_failures: count(
                "max_failures",
                &p.max_failures,
                defaults.max_failures,
                MAX_FAILURES,
            )?,
        };
        if backoff.max < backoff.base
            && let Some(max) = &p.backoff_max
        {
            return Err(plugin_error(
                max.span(),
                format!(
                    "backoff_max = {:?} is shorter than backoff_base ({:?}); make it at least as long",
                    max.get_ref(),
                    backoff.base
                ),
            ));
        }
        let working_dir = match &p.working_dir {
            None => None,
            Some(dir) => {
                let path = self.path_value("working_dir", dir)?;
                if !path.is_dir() {
                    return Err(plugin_error(
                        dir.span(),
                        format!(
                            "working_dir {} is not a directory; create it or fix the path",
                            path.display()
                        ),
                    ));
                }
                Some(path)
            }
        };
        let credentials = credentials(p.user.as_ref(), p.group.as_ref())
            .map_err(|(span, message)| plugin_error(span, message))?;
        let idempotent = p
            .idempotent
            .iter()
            .map(|m| {
                labels::method(m.get_ref())
                    .map(str::to_owned)
                    .map_err(|e| plugin_error(m.span(), format!("idempotent: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let args = p
            .args
            .into_iter()
            .map(|arg| match arg.get_ref().contains('\0') {
                true => Err(plugin_error(
                    arg.span(),
                    "an argument contains a NUL byte, which no program can receive; remove it"
                        .into(),
                )),
                false => Ok(arg.into_inner()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let capabilities = p
            .capabilities
            .iter()
            .map(|cap| {
                cap.get_ref()
                    .parse::<Capability>()
                    .map_err(|message| plugin_error(cap.span(), message))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let root = match &p.root {
            Some(root) => self.path_value("root", root)?,
            None => config.data_dir.join(&name),
        };
        let mut sandbox = self.sandbox(&name, p.sandbox.as_ref(), &p.sandbox_paths)?;
        // What the sandbox's widening for a `PREFIX/bin/NAME` command must not reach.
        sandbox.protected = [config.data_dir.as_path(), &config.runtime_dir, self.base]
            .into_iter()
            .map(|dir| dir.to_owned())
            .chain(
                std::env::var_os("HOME")
                    .filter(|home| !home.is_empty())
                    .map(PathBuf::from),
            )
            .collect();
        let mut env = environment(p.env).map_err(|(span, message)| plugin_error(span, message))?;
        let mut allow = config.env_allow.clone();
        for name in
            env_allow(&p.env_allow).map_err(|(span, message)| plugin_error(span, message))?
        {
            if !allow.contains(&name) {
                allow.push(name);
            }
        }
        env.entry(MAX_MESSAGE_SIZE_VAR.to_owned())
            .or_insert_with(|| config.max_message_size.to_string());
        config.telemetry.plugin_env(&name, &config.socket, &mut env);
        let plugin = PluginConfig {
            health_interval: duration(
                "health_interval",
                &p.health_interval,
                DEFAULT_HEALTH_INTERVAL,
                HEALTH_INTERVAL,
            )?,
            health_failures: count(
                "health_failures",
                &p.health_failures,
                DEFAULT_HEALTH_FAILURES,
                MAX_FAILURES,
            )?,
            working_dir,
            credentials,
            limits: resource_limits(&p.limits)
                .map_err(|(span, message)| plugin_error(span, message))?,
            socket_dir: config.runtime_dir.join(&name),
            restart: p.restart.unwrap_or(RestartPolicy::OnFailure),
            backoff,
            ready_timeout: duration(
                "ready_timeout",
                &p.ready_timeout,
                DEFAULT_READY_TIMEOUT,
                READY_TIMEOUT,
            )?,
            stop_grace: duration("stop_grace", &p.stop_grace, DEFAULT_STOP_GRACE, SPAN)?,
            drain_delay: duration("drain_delay", &p.drain_delay, DEFAULT_DRAIN_DELAY, SPAN)?,
            instances: count("instances", &p.instances, 1, MAX_INSTANCES)?,
            transport: match p
                .transport
                .as_ref()
                .map(|t| (t.get_ref().as_str(), t.span()))
            {
                None | Some(("unix", _)) => Transport::Unix,
                Some(("tcp", _)) => Transport::Tcp,
                Some((other, span)) => {
                    return Err(plugin_error(
                        span,
                        format!(
                            "transport = {other:?}: write \"unix\" (the default) or \"tcp\" (loopback)"
                        ),
                    ));
                }
            },
            name,
            service,
            command,
            args,
            env,
            env_allow: allow,
            idempotent,
            capabilities,
            root,
            rate_limit,
            caller_rate_limit,
            sandbox,
        };
        // The longest id this plugin can have must still fit a socket path.
        let longest = plugin.socket(&plugin.instance_id(MAX_INSTANCES));
        runtime::check_socket_path(&longest).map_err(|e| {
            self.at(
                Some(table_line_span(self.text, table_line)),
                format!("plugin {:?}: {e}", plugin.name),
            )
        })?;
        Ok(plugin)
    }

    /// A plugin's `sandbox` and `sandbox_paths`.
    fn sandbox(
        &self,
        plugin: &str,
        value: Option<&Spanned<RawSandbox>>,
        paths: &[Spanned<PathBuf>],
    ) -> Result<Sandbox, ConfigError> {
        let mode = match value.map(|v| (v.get_ref(), v.span())) {
            None | Some((RawSandbox::Flag(false), _)) => SandboxMode::Off,
            Some((RawSandbox::Flag(true), _)) => SandboxMode::Strict,
            Some((RawSandbox::Mode(mode), _)) if mode == "best-effort" => SandboxMode::BestEffort,
            Some((RawSandbox::Mode(other), span)) => {
                return Err(self.at(
                    Some(span),
                    format!(
                        "plugin {plugin:?}: sandbox = {other:?}: write true (confined, or not \
                         started where the kernel cannot), \"best-effort\" or false"
                    ),
                ));
            }
        };
        if mode == SandboxMode::Off
            && let Some(first) = paths.first()
        {
            return Err(self.at(
                Some(first.span()),
                format!(
                    "plugin {plugin:?}: sandbox_paths without sandbox = true: add sandbox = true \
                     (or \"best-effort\"), or remove sandbox_paths"
                ),
            ));
        }
        let paths = paths
            .iter()
            .map(|path| self.path_value("sandbox_paths", path))
            .collect::<Result<Vec<_>, _>>()?;
        let line = value.map(|v| line_of(self.text, v.span().start));
        Ok(Sandbox {
            mode,
            paths,
            protected: Vec::new(),
            origin: match line {
                Some(line) => format!("{}:{line}", self.path.display()),
                None => self.path.display().to_string(),
            },
        })
    }

    /// A plugin's duration setting, within `bounds`.
    fn duration(
        &self,
        plugin: &str,
        field: &str,
        value: Option<&Spanned<String>>,
        default: Duration,
        bounds: std::ops::RangeInclusive<Duration>,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        let text = value.get_ref();
        let parsed = humantime::parse_duration(text).map_err(|e| {
            self.at(
                Some(value.span()),
                format!("plugin {plugin:?}: {field} = {text:?}: {e}; write a duration such as \"5s\" or \"500ms\""),
            )
        })?;
        if !bounds.contains(&parsed) {
            return Err(self.at(
                Some(value.span()),
                format!(
                    "plugin {plugin:?}: {field} = {text:?} is out of range; use {} to {} (default {})",
                    humantime::format_duration(*bounds.start()),
                    humantime::format_duration(*bounds.end()),
                    humantime::format_duration(default),
                ),
            ));
        }
        Ok(parsed)
    }

    /// A path setting, relative to the config file; a NUL byte in it is an error.
    fn path_value(&self, field: &str, value: &Spanned<PathBuf>) -> Result<PathBuf, ConfigError> {
        use std::os::unix::ffi::OsStrExt;
        if value.get_ref().as_os_str().as_bytes().contains(&0) {
            return Err(self.at(
                Some(value.span()),
                format!("{field} contains a NUL byte, which no path can hold; remove it"),
            ));
        }
        Ok(absolute(self.base, value.get_ref()))
    }
}

/// `audit_max_size` bounds.
const AUDIT_SIZES: std::ops::RangeInclusive<u64> = 4 << 10..=1 << 30;

/// Plugins' default roots: `$XDG_DATA_HOME/mesh`, `~/.local/share/mesh`, or (no home) a
/// `data` directory beside the runtime directory's files.
fn default_data_dir(runtime_dir: &Path) -> PathBuf {
    let nonempty = |var| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(data) = nonempty("XDG_DATA_HOME") {
        return data.join("mesh");
    }
    if let Some(home) = nonempty("HOME") {
        return home.join(".local/share/mesh");
    }
    runtime_dir.join("data")
}

/// The plugin contract's variables: what the manager sets for every instance from the instance
/// itself (docs/plugin-guide.md). The spawn sets them last, over anything else; a config's
/// `env` or `env_allow` naming one is an error. (`MESH_MAX_MESSAGE_SIZE`, `MESH_LOG_FORMAT`
/// and the `OTEL_*` variables are the manager's defaults for the config's `env` instead: a
/// plugin's table may set its own.)
pub(crate) const CONTRACT_VARIABLES: [&str; 7] = [
    plugin::PLUGIN_SOCKET,
    plugin::PLUGIN_ADDRESS,
    plugin::PLUGIN_NAME,
    plugin::PLUGIN_INSTANCE,
    runtime::MESH_SOCKET,
    mesh::MESH_DIRECT,
    plugin::CALLERS_FD,
];

/// The manager's variables handed to every plugin unless `[mesh] env_allow` says otherwise:
/// what a program needs to find programs and speak the user's language, nothing that could
/// hold a secret.
pub const DEFAULT_ENV_ALLOW: [&str; 4] = ["PATH", "LANG", "LC_*", "TZ"];

/// Whether `name` is one of the manager's variables that `allow` (names, or prefixes ending
/// in `*`) hands to a plugin.
pub(crate) fn env_allowed(allow: &[String], name: &str) -> bool {
    allow.iter().any(|entry| match entry.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == entry,
    })
}

/// An `env_allow` list: variable names, or prefixes ending in `*`; never a contract variable,
/// which the manager sets itself.
fn env_allow(list: &[Spanned<String>]) -> Result<Vec<String>, (Range<usize>, String)> {
    list.iter()
        .map(|entry| {
            let text = entry.get_ref();
            let name = text.strip_suffix('*').unwrap_or(text);
            let problem = if name.is_empty() && text.is_empty() {
                Some("env_allow has an empty entry; name a variable, or a prefix such as \"LC_*\"".to_owned())
            } else if name.is_empty() {
                Some("env_allow = [\"*\"] would hand plugins the manager's whole environment, secrets included; name the variables (or prefixes such as \"LC_*\") they need".to_owned())
            } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                Some(format!(
                    "env_allow entry {text:?}: write a variable name (letters, digits, '_'), or a prefix ending in '*' such as \"LC_*\""
                ))
            } else if CONTRACT_VARIABLES.contains(&text.as_str()) {
                Some(format!(
                    "env_allow entry {text:?} is set by the manager for every instance (the plugin contract); remove it"
                ))
            } else {
                None
            };
            match problem {
                Some(problem) => Err((entry.span(), problem)),
                None => Ok(text.clone()),
            }
        })
        .collect()
}

/// A plugin's `env`: names a process environment can hold, values without NUL.
fn environment(
    env: BTreeMap<String, Spanned<String>>,
) -> Result<BTreeMap<String, String>, (Range<usize>, String)> {
    env.into_iter()
        .map(|(key, value)| {
            let problem = if key.is_empty() {
                Some("env has an empty name; name the variable".to_owned())
            } else if key.contains(['=', '\0']) {
                Some(format!(
                    "env name {key:?} contains '=' or a NUL byte; a variable name cannot"
                ))
            } else if value.get_ref().contains('\0') {
                Some(format!(
                    "env {key}: the value contains a NUL byte, which no environment can hold; remove it"
                ))
            } else if CONTRACT_VARIABLES.contains(&key.as_str()) {
                Some(format!(
                    "env {key} is set by the manager for every instance (the plugin contract); remove it"
                ))
            } else {
                None
            };
            match problem {
                Some(problem) => Err((value.span(), problem)),
                None => Ok((key, value.into_inner())),
            }
        })
        .collect()
}

/// Resource limits within what a kernel accepts, so that a typo fails here rather than as a
/// start error of every instance.
/// `rate_limit` and `caller_rate_limit` of a `[[plugin]]` table.
#[allow(clippy::type_complexity)]
fn rate_limits(p: &RawPlugin) -> Result<(Option<Rate>, Option<Rate>), (Range<usize>, String)> {
    let rate = |field: &str, value: &Option<Spanned<String>>| match value {
        None => Ok(None),
        Some(value) => value
            .get_ref()
            .parse::<Rate>()
            .map(Some)
            .map_err(|e| (value.span(), format!("{field}: {e}"))),
    };
    Ok((
        rate("rate_limit", &p.rate_limit)?,
        rate("caller_rate_limit", &p.caller_rate_limit)?,
    ))
}

fn resource_limits(limits: &RawLimits) -> Result<ResourceLimits, (Range<usize>, String)> {
    let bounded =
        |field: &str, value: &Option<Spanned<u64>>, bounds: std::ops::RangeInclusive<u64>| {
            match value {
                None => Ok(None),
                Some(n) if bounds.contains(n.get_ref()) => Ok(Some(*n.get_ref())),
                Some(n) => Err((
                    n.span(),
                    format!(
                        "limits.{field} = {} is out of range; use {} to {}",
                        n.get_ref(),
                        bounds.start(),
                        bounds.end()
                    ),
                )),
            }
        };
    Ok(ResourceLimits {
        open_files: bounded("open_files", &limits.open_files, 16..=1 << 20)?,
        address_space_mb: bounded("address_space_mb", &limits.address_space_mb, 16..=1 << 24)?,
        cpu_seconds: bounded("cpu_seconds", &limits.cpu_seconds, 1..=366 * 24 * 3600)?,
    })
}

/// Bounds of the plugins' durations: long enough for any plugin, short enough that a typo
/// (`1000000h`) cannot leave a stop or a restart waiting forever, and that timers never
/// overflow.
const SPAN: std::ops::RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(3600);
const BACKOFF: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(3600);
const WINDOW: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(24 * 3600);
const READY_TIMEOUT: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(3600);
/// Health checks more often than every 10 ms would be load, not supervision.
const HEALTH_INTERVAL: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(3600);
/// The longest default call timeout: a day; past it, a call is better without one (`0s`).
const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The most `max_failures` and `health_failures`.
const MAX_FAILURES: u32 = 1000;

const MAX_ROUTER_THREADS: u64 = 64;

/// The longest spin window the config accepts: past a millisecond, spinning costs more CPU
/// than the sleep it saves is worth.
const MAX_SPIN: Duration = Duration::from_millis(1);

/// One router thread per two cores, at least one and up to four. The router shares the machine
/// with the plugins and clients it serves, and a worker lingers briefly after each call (see
/// `spin`): on the 2-core VM two workers left sequential calls through the router at ~95 µs
/// for whole rounds in 3 runs of 6 (36 µs otherwise), one worker in none of 6 at the time, at
/// the same throughput (docs/performance-analysis.md). More than four rarely pays for the
/// connections each keeps.
fn default_router_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 4))
}

/// Resolves `user` and `group` to ids. Dropping privileges needs root; naming the user the
/// manager already runs as is accepted anywhere.
fn credentials(
    user: Option<&Spanned<String>>,
    group: Option<&Spanned<String>>,
) -> Result<Option<Credentials>, (Range<usize>, String)> {
    use nix::unistd::{Gid, Group, Uid, User};
    let Some(user) = user else {
        return match group {
            Some(group) => Err((
                group.span(),
                "group is set without user; set user too".into(),
            )),
            None => Ok(None),
        };
    };
    let found = User::from_name(user.get_ref())
        .ok()
        .flatten()
        .ok_or_else(|| {
            (
                user.span(),
                format!(
                    "user {:?} does not exist; create it or fix the name",
                    user.get_ref()
                ),
            )
        })?;
    let gid = match group {
        None => found.gid,
        Some(group) => {
            Group::from_name(group.get_ref())
                .ok()
                .flatten()
                .ok_or_else(|| {
                    (
                        group.span(),
                        format!(
                            "group {:?} does not exist; create it or fix the name",
                            group.get_ref()
                        ),
                    )
                })?
                .gid
        }
    };
    if !Uid::effective().is_root() && (found.uid != Uid::effective() || gid != Gid::effective()) {
        return Err((
            user.span(),
            format!(
                "running plugins as user {:?} needs mesh up to run as root; remove user/group or start mesh as root",
                user.get_ref()
            ),
        ));
    }
    Ok(Some(Credentials {
        user: user.get_ref().clone(),
        uid: found.uid.as_raw(),
        gid: gid.as_raw(),
    }))
}

/// `[telemetry] metrics`: the router records call metrics only when asked (off costs nothing
/// per call).
fn metrics_enabled(telemetry: Option<&telemetry::RawTelemetry>) -> bool {
    telemetry
        .and_then(|t| t.metrics.as_ref())
        .is_some_and(|m| *m.get_ref())
}

/// `socket_mode` and `socket_group` from `[mesh]`.
fn socket_access(
    mesh: &RawMesh,
    at: &impl Fn(Option<Range<usize>>, String) -> ConfigError,
) -> Result<(u32, Option<u32>), ConfigError> {
    let mode = match &mesh.socket_mode {
        None => 0o600,
        Some(text) => u32::from_str_radix(text.get_ref().trim_start_matches("0o"), 8)
            .ok()
            // Owner read and write are needed; execute bits mean nothing on a socket.
            .filter(|m| *m <= 0o777 && m & 0o600 == 0o600 && m & 0o111 == 0)
            .ok_or_else(|| {
                at(
                    Some(text.span()),
                    format!(
                        "socket_mode = {:?}: write octal permission bits with the owner's read and write, such as \"0660\" (group) or \"0666\" (everyone); default \"0600\"",
                        text.get_ref()
                    ),
                )
            })?,
    };
    let group = match &mesh.socket_group {
        None => None,
        Some(name) => {
            let group = nix::unistd::Group::from_name(name.get_ref())
                .ok()
                .flatten()
                .ok_or_else(|| {
                    at(
                        Some(name.span()),
                        format!("socket_group = {:?}: no such group", name.get_ref()),
                    )
                })?;
            Some(group.gid.as_raw())
        }
    };
    Ok((mode, group))
}

/// The router's limits from `[mesh]`.
fn limits(
    mesh: &RawMesh,
    at: &impl Fn(Option<Range<usize>>, String) -> ConfigError,
) -> Result<Limits, ConfigError> {
    let defaults = Limits::default();
    let count = |field: &str, value: &Option<Spanned<u64>>, default: u64| match value {
        None => Ok(default),
        Some(n) if (1..=MAX_COUNT).contains(n.get_ref()) => Ok(*n.get_ref()),
        Some(n) => Err(at(
            Some(n.span()),
            format!(
                "{field} = {} is out of range; use 1 to {MAX_COUNT} (default {default})",
                n.get_ref()
            ),
        )),
    };
    let call_timeout = match &mesh.call_timeout {
        None => None,
        Some(text) => {
            let timeout = humantime::parse_duration(text.get_ref()).map_err(|e| {
                at(
                    Some(text.span()),
                    format!(
                        "call_timeout = {:?}: {e}; write a duration such as \"30s\", or \"0s\" for none",
                        text.get_ref()
                    ),
                )
            })?;
            if timeout > MAX_CALL_TIMEOUT {
                return Err(at(
                    Some(text.span()),
                    format!(
                        "call_timeout = {:?} is out of range; use up to {}, or \"0s\" for none",
                        text.get_ref(),
                        humantime::format_duration(MAX_CALL_TIMEOUT)
                    ),
                ));
            }
            Some(timeout).filter(|t| !t.is_zero())
        }
    };
    let timeout = |field: &str, value: &Option<Spanned<String>>, default: Duration| {
        match value {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text.get_ref())
            .ok()
            .filter(|d| (MIN_CONNECTION_TIMEOUT..=MAX_CONNECTION_TIMEOUT).contains(d))
            .ok_or_else(|| {
                at(
                    Some(text.span()),
                    format!(
                        "{field} = {:?}: write a duration from 10ms to 24h, such as \"10s\" (default {})",
                        text.get_ref(),
                        humantime::format_duration(default)
                    ),
                )
            }),
    }
    };
    let max_header_list_size = match &mesh.max_header_list_size {
        None => defaults.max_header_list_size,
        Some(size) => parse_size(size.get_ref())
            .filter(|n| HEADER_LIST_SIZES.contains(n))
            .ok_or_else(|| {
                at(
                    Some(size.span()),
                    "max_header_list_size must be 1KiB to 1MiB; write bytes or a size such as \"16KiB\" (default 16KiB)".into(),
                )
            })? as u32,
    };
    Ok(Limits {
        max_connections: count(
            "max_connections",
            &mesh.max_connections,
            defaults.max_connections as u64,
        )? as usize,
        max_concurrent_streams: count(
            "max_concurrent_streams",
            &mesh.max_concurrent_streams,
            defaults.max_concurrent_streams.into(),
        )?
        .min(u32::MAX.into()) as u32,
        max_in_flight: count(
            "max_in_flight",
            &mesh.max_in_flight,
            defaults.max_in_flight as u64,
        )? as usize,
        max_in_flight_per_connection: match &mesh.max_in_flight_per_connection {
            None => None,
            Some(_) => Some(count(
                "max_in_flight_per_connection",
                &mesh.max_in_flight_per_connection,
                0,
            )? as usize),
        },
        call_timeout,
        handshake_timeout: timeout(
            "handshake_timeout",
            &mesh.handshake_timeout,
            defaults.handshake_timeout,
        )?,
        idle_timeout: timeout("idle_timeout", &mesh.idle_timeout, defaults.idle_timeout)?,
        max_header_list_size,
    })
}

/// Bytes, or a number with a unit: B, KiB, MiB, GiB (`"16MiB"`, `"512 KiB"`).
fn parse_size(size: &RawSize) -> Option<u64> {
    let text = match size {
        RawSize::Bytes(n) => return Some(*n),
        RawSize::Text(text) => text.trim(),
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// The byte offset's 1-based line.
fn line_of(text: &str, offset: usize) -> usize {
    // Bytes, not str slicing: an offset inside a character must not panic.
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn table_line_span(text: &str, line: usize) -> Range<usize> {
    let start: usize = text
        .split_inclusive('\n')
        .take(line - 1)
        .map(str::len)
        .sum();
    start..start
}

/// Adds the fix to serde's messages about unknown and missing fields.
fn explain(message: &str) -> String {
    let message = message.trim_end();
    if message.starts_with("unknown field") {
        format!("{message}; remove it or correct its spelling")
    } else if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        let example = match field {
            "command" => "command = \"/path/to/plugin\"",
            "name" => "name = \"echo\"",
            _ => "it",
        };
        format!("{message}; add {example} to this table")
    } else {
        message.to_owned()
    }
}

fn absolute(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        base.join(path)
    }
}

/// A command with a `/` is a path (relative to the config file); a bare name is looked up on PATH.
///
/// The path is made absolute but kept as given: a symlink is run through its own path, never
/// its target, because programs such as a virtualenv's `bin/python` find their environment
/// from the path they were started by.
fn resolve_command(base: &Path, command: &str) -> Result<PathBuf, String> {
    if command.is_empty() {
        return Err("command is empty; set it to the plugin's program".into());
    }
    if command.contains('\0') {
        return Err("command contains a NUL byte; remove it".into());
    }
    let fix =
        "set command to an absolute path, a path relative to the config file, or a program on PATH";
    let candidate = if command.contains('/') {
        let path = absolute(base, Path::new(command));
        if !path.exists() {
            return Err(format!(
                "command {command:?} not found (looked for {}); build it or {fix}",
                path.display()
            ));
        }
        path
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join(command))
            .find(|p| p.is_file())
            .ok_or_else(|| format!("command {command:?} not found on PATH; {fix}"))?
    };
    // Through the link: what runs must be an executable file.
    let meta = std::fs::metadata(&candidate)
        .map_err(|e| format!("command {}: {e}", candidate.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!(
            "command {} is not an executable file; chmod +x it or {fix}",
            candidate.display()
        ));
    }
    // Absolute, so that the instance's working_dir cannot change what runs.
    std::path::absolute(&candidate).map_err(|e| format!("command {}: {e}", candidate.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        // Commands resolve against the config's directory; /bin/sh exists on every machine.
        Config::parse(Path::new("/etc/mesh/mesh.toml"), text)
    }

    #[test]
    fn registry_and_node_parse_with_defaults_and_bad_ones_name_their_line() {
        let config = parse("[mesh]\n").unwrap();
        assert_eq!(
            config.cluster,
            ClusterConfig::default(),
            "embedded by default"
        );

        let config = parse(
            "[mesh]\nlisten = \"127.0.0.1:7701\"\nnode = \"a\"\n\
             [registry]\netcd = [\"http://127.0.0.1:2379\", \"10.0.0.9:2379\"]\n",
        )
        .unwrap();
        let cluster = config.cluster;
        assert_eq!(cluster.node.unwrap().as_str(), "a");
        assert_eq!(
            cluster.advertise.as_deref(),
            Some("127.0.0.1:7701"),
            "from listen"
        );
        let etcd = cluster.etcd.unwrap();
        assert_eq!(etcd.endpoints, ["127.0.0.1:2379", "10.0.0.9:2379"]);
        assert_eq!(
            (etcd.prefix.as_str(), etcd.ttl),
            (DEFAULT_PREFIX, DEFAULT_TTL)
        );

        let config = parse(
            "[mesh]\nlisten = \"0.0.0.0:7701\"\nallow_plaintext = true\nnode = \"b\"\n\
             advertise = \"10.0.0.2:7701\"\n\
             [registry]\netcd = [\"http://e:2379\"]\nprefix = \"/x/\"\nlease_ttl = \"3s\"\n",
        )
        .unwrap();
        assert_eq!(config.cluster.advertise.as_deref(), Some("10.0.0.2:7701"));
        let etcd = config.cluster.etcd.unwrap();
        assert_eq!(
            (etcd.prefix.as_str(), etcd.ttl),
            ("/x/", Duration::from_secs(3))
        );

        let base = "[mesh]\nlisten = \"127.0.0.1:7701\"\nnode = \"a\"\n[registry]\n";
        for (text, line, says) in [
            (
                "[mesh]\nnode = \"Node A\"\n".to_owned(),
                2,
                "invalid node name",
            ),
            (
                "[mesh]\nadvertise = \"nowhere\"\n".into(),
                2,
                "is not host:port",
            ),
            (
                "[mesh]\nadvertise = \"h:0\"\n".into(),
                2,
                "is not host:port",
            ),
            (
                format!("{base}etcd = [\"https://e:2379\"]\n"),
                5,
                "TLS to etcd",
            ),
            (format!("{base}etcd = [\"e\"]\n"), 5, "http://host:port"),
            (format!("{base}etcd = []\n"), 5, "1 to 16 endpoints"),
            (
                format!("{base}etcd = [\"e:1\"]\nprefix = \"mesh\"\n"),
                6,
                "starts and ends with '/'",
            ),
            (
                format!("{base}etcd = [\"e:1\"]\nlease_ttl = \"1s\"\n"),
                6,
                "\"2s\" to \"300s\"",
            ),
            (
                format!("{base}etcd = [\"e:1\"]\nlease_ttl = \"2500ms\"\n"),
                6,
                "whole seconds",
            ),
            (format!("{base}prefix = \"/m/\"\n"), 4, "names no backend"),
            (
                "[mesh]\nlisten = \"127.0.0.1:1\"\n[registry]\netcd = [\"e:1\"]\n".into(),
                1,
                "add node = \"a\"",
            ),
            (
                "[mesh]\nnode = \"a\"\n[registry]\netcd = [\"e:1\"]\n".into(),
                1,
                "set [mesh] listen",
            ),
            (
                "[mesh]\nnode = \"a\"\nlisten = \"0.0.0.0:1\"\nallow_plaintext = true\n\
                 [registry]\netcd = [\"e:1\"]\n"
                    .into(),
                1,
                "advertise = \"host:port\"",
            ),
            (
                "[registry]\netcd = [\"e:1\"]\nttl = 3\n".into(),
                3,
                "unknown field `ttl`",
            ),
        ] {
            let error = parse(&text).unwrap_err();
            assert_eq!(error.line, Some(line), "{text}: {error}");
            assert!(error.to_string().contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn defaults_fill_what_is_not_said() {
        let config = parse(
            "[mesh]\nruntime_dir = \"/tmp/m\"\n[[plugin]]\nname = \"sh\"\ncommand = \"/bin/sh\"\n",
        )
        .unwrap();
        assert_eq!(config.socket, Path::new("/tmp/m/mesh.sock"));
        assert_eq!(config.listen, None);
        let plugin = &config.plugins[0];
        assert_eq!(plugin.service.as_str(), "plugin.sh");
        assert_eq!(plugin.instances, 1);
        assert_eq!(plugin.ready_timeout, DEFAULT_READY_TIMEOUT);
        assert_eq!(plugin.stop_grace, DEFAULT_STOP_GRACE);
        assert_eq!(plugin.restart, RestartPolicy::OnFailure);
        assert_eq!(plugin.backoff, Backoff::default());
        assert_eq!(
            plugin.socket(&plugin.instance_id(3)),
            Path::new("/tmp/m/sh/sh-3.sock")
        );
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.limits.call_timeout, None);
        assert_eq!(config.max_message_size, 16 << 20);
        assert_eq!(
            plugin.env[MAX_MESSAGE_SIZE_VAR], "16777216",
            "handed to plugins"
        );
        assert!(plugin.idempotent.is_empty());
        assert_eq!(plugin.env_allow, DEFAULT_ENV_ALLOW);
    }

    #[test]
    fn env_allow_replaces_the_default_in_mesh_and_adds_to_it_per_plugin() {
        let config = parse(
            "[mesh]\nenv_allow = [\"PATH\", \"OTEL_BSP_*\"]\n\
             [[plugin]]\nname = \"a\"\ncommand = \"sh\"\nenv_allow = [\"HOME\", \"PATH\"]\n\
             [[plugin]]\nname = \"b\"\ncommand = \"sh\"\n",
        )
        .unwrap();
        assert_eq!(config.env_allow, ["PATH", "OTEL_BSP_*"]);
        assert_eq!(config.plugins[0].env_allow, ["PATH", "OTEL_BSP_*", "HOME"]);
        assert_eq!(config.plugins[1].env_allow, ["PATH", "OTEL_BSP_*"]);
        let allow = &config.plugins[0].env_allow;
        assert!(env_allowed(allow, "OTEL_BSP_SCHEDULE_DELAY"));
        assert!(env_allowed(allow, "HOME"));
        assert!(!env_allowed(allow, "HOMEDIR"));
        assert!(!env_allowed(allow, "SECRET_TOKEN"));
        let error = parse("[mesh]\nenv_allow = [\"PATH\",\n  \"MESH_SOCKET\"]\n").unwrap_err();
        assert_eq!(error.line, Some(3), "{error}");
        assert!(error.to_string().contains("plugin contract"), "{error}");
    }

    #[test]
    fn router_limits_message_size_and_idempotent_methods_parse() {
        let config = parse(
            "[mesh]\ncall_timeout = \"2s\"\nmax_message_size = \"4MiB\"\nmax_connections = 3\n\
             max_concurrent_streams = 8\nmax_in_flight = 4\n\
             [[plugin]]\nname = \"a\"\ncommand = \"sh\"\n\
             idempotent = [\"echo.v1.Echo/Echo\", \"/echo.v1.Echo/Expand\"]\n\
             [[plugin]]\nname = \"b\"\ncommand = \"sh\"\nenv = { MESH_MAX_MESSAGE_SIZE = \"1024\" }\n",
        )
        .unwrap();
        assert_eq!(
            config.limits,
            Limits {
                max_connections: 3,
                max_concurrent_streams: 8,
                max_in_flight: 4,
                call_timeout: Some(Duration::from_secs(2)),
                ..Limits::default()
            }
        );
        assert_eq!(config.max_message_size, 4 << 20);
        let (a, b) = (&config.plugins[0], &config.plugins[1]);
        assert_eq!(a.idempotent, ["echo.v1.Echo/Echo", "echo.v1.Echo/Expand"]);
        assert_eq!(a.env[MAX_MESSAGE_SIZE_VAR], "4194304");
        assert_eq!(
            b.env[MAX_MESSAGE_SIZE_VAR], "1024",
            "the file's own value wins"
        );

        let config = parse("[mesh]\ncall_timeout = \"0s\"\nmax_message_size = 2048\n").unwrap();
        assert_eq!(config.limits.call_timeout, None, "0s means none");
        assert_eq!(config.max_message_size, 2048);
        for (text, bytes) in [("512 KiB", 512 << 10), ("1GiB", 1 << 30), ("4096B", 4096)] {
            let size = parse_size(&RawSize::Text(text.into()));
            assert_eq!(size, Some(bytes), "{text}");
        }
    }

    #[test]
    fn durations_policies_and_addresses_parse() {
        let config = parse(
            "[mesh]\nruntime_dir = \"run\"\nlisten = \"127.0.0.1:0\"\n\
             [[plugin]]\nname = \"a\"\ncommand = \"sh\"\ninstances = 3\nready_timeout = \"1500ms\"\n\
             restart = \"always\"\nbackoff_base = \"10ms\"\nmax_failures = 2\n",
        )
        .unwrap();
        assert_eq!(
            config.runtime_dir,
            Path::new("/etc/mesh/run"),
            "relative to the config file"
        );
        assert_eq!(config.listen, Some("127.0.0.1:0".parse().unwrap()));
        assert!(!config.busy_poll, "off unless asked for");
        let plugin = &config.plugins[0];
        assert!(
            plugin.command.is_absolute(),
            "found on PATH: {}",
            plugin.command.display()
        );
        assert_eq!(plugin.instances, 3);
        assert_eq!(plugin.ready_timeout, Duration::from_millis(1500));
        assert_eq!(plugin.restart, RestartPolicy::Always);
        assert_eq!(plugin.backoff.base, Duration::from_millis(10));
        assert_eq!(plugin.backoff.max_failures, 2);
    }

    #[test]
    fn bad_values_name_the_line_and_the_fix() {
        let cases = [
            (
                "[[plugin]]\nname = \"a\"\ncommand = \"sh\"\ninstances = 0\n",
                4,
                "use 1 to 1024",
            ),
            (
                "[[plugin]]\nname = \"a\"\ncommand = \"sh\"\nstop_grace = \"soon\"\n",
                4,
                "such as \"5s\"",
            ),
            (
                "[[plugin]]\nname = \"a\"\ncommand = \"sh\"\nrestart = \"sometimes\"\n",
                4,
                "unknown variant `sometimes`",
            ),
            (
                "[mesh]\nlisten = \"localhost\"\n",
                2,
                "such as \"127.0.0.1:7700\"",
            ),
            (
                "[[plugin]]\nname = \"a.b\"\ncommand = \"sh\"\n",
                2,
                "one segment",
            ),
            (
                "[[plugin]]\nname = \"a\"\ncommand = \"/etc/passwd\"\n",
                3,
                "not an executable file",
            ),
            (
                "[[plugin]]\nname = \"a\"\ncommand = \"no-such-program-anywhere\"\n",
                3,
                "not found on PATH",
            ),
            ("[[plugin]\n", 1, ""),
            (
                "[mesh]\nmax_message_size = \"huge\"\n",
                2,
                "such as \"16MiB\"",
            ),
            ("[mesh]\nmax_message_size = \"2GiB\"\n", 2, "1KiB to 1GiB"),
            (
                "[mesh]\nlisten = \"127.0.0.1:0\"\nmax_in_flight = 0\n",
                3,
                "max_in_flight = 0 is out of range; use 1 to",
            ),
            ("[mesh]\ncall_timeout = \"soon\"\n", 2, "or \"0s\" for none"),
            (
                "[[plugin]]\nname = \"a\"\ncommand = \"sh\"\nidempotent = [\n  \"echo.v1.Echo/Echo\",\n  \"Echo\",\n]\n",
                6,
                "idempotent: \"Echo\" is not a method; write package.Service/Method",
            ),
        ];
        for (text, line, needle) in cases {
            let error = parse(text).unwrap_err();
            assert_eq!(error.line, Some(line), "{text}: {error}");
            assert!(error.to_string().contains(needle), "{text}: {error}");
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("/etc/mesh/mesh.toml:{line}: ")),
                "{error}"
            );
        }
    }

    #[test]
    fn every_duration_count_and_value_has_bounds() {
        let plugin = |line: &str| format!("[[plugin]]\nname = \"a\"\ncommand = \"sh\"\n{line}\n");
        let cases = [
            (
                "health_interval = \"0s\"",
                "health_interval = \"0s\" is out of range; use 10ms to 1h",
            ),
            ("health_interval = \"5ms\"", "use 10ms to 1h (default 1s)"),
            (
                "ready_timeout = \"0s\"",
                "ready_timeout = \"0s\" is out of range; use 10ms to 1h",
            ),
            (
                "drain_delay = \"1000000h\"",
                "drain_delay = \"1000000h\" is out of range; use 0s to 1h",
            ),
            ("stop_grace = \"2h\"", "stop_grace = \"2h\" is out of range"),
            (
                "backoff_base = \"0s\"",
                "backoff_base = \"0s\" is out of range; use 1ms to 1h",
            ),
            ("backoff_max = \"100000000000y\"", "backoff_max"),
            (
                "backoff_max = \"1s\"\nbackoff_base = \"2s\"",
                "shorter than backoff_base",
            ),
            (
                "failure_window = \"2days\"",
                "failure_window = \"2days\" is out of range",
            ),
            (
                "backoff_reset = \"3h\"",
                "backoff_reset = \"3h\" is out of range",
            ),
            (
                "instances = 1025",
                "instances = 1025 is out of range; use 1 to 1024",
            ),
            (
                "max_failures = 0",
                "max_failures = 0 is out of range; use 1 to 1000",
            ),
            (
                "health_failures = 100000",
                "health_failures = 100000 is out of range",
            ),
            (
                "env = { A = \"x\\u0000y\" }",
                "env A: the value contains a NUL byte",
            ),
            ("env = { \"A=B\" = \"x\" }", "contains '=' or a NUL byte"),
            ("env = { \"\" = \"x\" }", "env has an empty name"),
            (
                "env = { PLUGIN_SOCKET = \"/tmp/x\" }",
                "env PLUGIN_SOCKET is set by the manager",
            ),
            (
                "env = { MESH_DIRECT = \"1\" }",
                "env MESH_DIRECT is set by the manager",
            ),
            (
                "env = { MESH_CALLERS_FD = \"0\" }",
                "env MESH_CALLERS_FD is set by the manager",
            ),
            (
                "env = { PLUGIN_ADDRESS = \"127.0.0.1:1\" }",
                "env PLUGIN_ADDRESS is set by the manager",
            ),
            (
                "env_allow = [\"PLUGIN_NAME\"]",
                "env_allow entry \"PLUGIN_NAME\" is set by the manager",
            ),
            ("env_allow = [\"*\"]", "secrets included"),
            ("env_allow = [\"A-B\"]", "write a variable name"),
            ("env_allow = [\"A*B\"]", "write a variable name"),
            ("env_allow = [\"\"]", "env_allow has an empty entry"),
            (
                "args = [\"ok\", \"a\\u0000b\"]",
                "an argument contains a NUL byte",
            ),
            (
                "limits = { open_files = 0 }",
                "limits.open_files = 0 is out of range",
            ),
            (
                "limits = { address_space_mb = 18446744073709551615 }",
                "limits.address_space_mb",
            ),
        ];
        for (line, needle) in cases {
            let text = plugin(line);
            let error = parse(&text).unwrap_err();
            assert_eq!(error.line, Some(4), "{text}: {error}");
            let message = error.to_string();
            assert!(
                message.starts_with("/etc/mesh/mesh.toml:4: plugin \"a\": "),
                "{message}"
            );
            assert!(message.contains(needle), "{text}: {message}");
        }
        let error = parse("[mesh]\ncall_timeout = \"1000000h\"\n").unwrap_err();
        assert!(
            error
                .to_string()
                .contains(":2: call_timeout = \"1000000h\" is out of range; use up to 1day"),
            "{error}"
        );
        let error = parse("[mesh]\nruntime_dir = \"/tmp/a\\u0000b\"\n").unwrap_err();
        assert!(
            error
                .to_string()
                .contains(":2: runtime_dir contains a NUL byte"),
            "{error}"
        );
        let error = parse("[[plugin]]\nname = \"a\"\ncommand = \"/bin/s\\u0000h\"\n").unwrap_err();
        assert!(
            error
                .to_string()
                .contains(":3: plugin \"a\": command contains a NUL byte"),
            "{error}"
        );
        // The edges are accepted.
        let ok = parse(&plugin("health_interval = \"10ms\"\ndrain_delay = \"1h\"\nstop_grace = \"0s\"\ninstances = 1024"))
            .unwrap();
        assert_eq!(ok.plugins[0].health_interval, Duration::from_millis(10));
    }

    /// What the shipped demo config says, with its command pointed at a program that exists.
    fn demo_config() -> String {
        let text = include_str!("../../deploy/local.toml");
        text.lines()
            .map(|line| match line.trim_start().starts_with("command") {
                true => "command = \"/bin/sh\"".to_owned(),
                false => line.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_demo_config_parses() {
        parse(&demo_config()).expect("deploy/local.toml");
    }

    #[test]
    fn parse_never_panics_on_arbitrary_text() {
        bolero::check!()
            .with_iterations(2000)
            .for_each(|bytes: &[u8]| {
                if let Ok(text) = std::str::from_utf8(bytes) {
                    let _ = parse(text);
                }
            });
    }

    #[test]
    fn parse_never_panics_on_mutations_of_the_demo_config() {
        use bolero::generator::TypeGenerator;
        /// One edit of the text: replace a byte range by an arbitrary string, at a place
        /// chosen by the fuzzer.
        #[derive(Debug, TypeGenerator)]
        struct Edit {
            at: u16,
            remove: u8,
            insert: String,
        }
        // Values that reach the checks rather than the TOML syntax.
        const SEEDS: [&str; 8] = [
            "\"0s\"",
            "0",
            "\"1000000h\"",
            "4294967295",
            "-1",
            "\"\\u0000\"",
            "\"\"",
            "[]",
        ];
        let demo = demo_config();
        bolero::check!()
            .with_iterations(3000)
            .with_type::<(Vec<Edit>, u8)>()
            .for_each(|(edits, seed)| {
                let mut text = demo.clone();
                for edit in edits {
                    let start = floor_char_boundary(&text, edit.at as usize % (text.len() + 1));
                    let end =
                        floor_char_boundary(&text, (start + edit.remove as usize).min(text.len()));
                    let insert = if edit.insert.is_empty() {
                        SEEDS[*seed as usize % SEEDS.len()]
                    } else {
                        edit.insert.as_str()
                    };
                    text.replace_range(start..end.max(start), insert);
                }
                let _ = parse(&text);
            });
    }

    fn floor_char_boundary(text: &str, mut index: usize) -> usize {
        while !text.is_char_boundary(index) {
            index -= 1;
        }
        index
    }

    #[test]
    fn spin_is_a_short_duration() {
        let config = parse("[mesh]\nspin = \"250us\"\n").unwrap();
        assert_eq!(config.spin, Duration::from_micros(250));
        let config = parse("[mesh]\nspin = \"0s\"\n").unwrap();
        assert_eq!(config.spin, Duration::ZERO, "0s turns it off");
        for bad in ["\"soon\"", "\"2ms\""] {
            let error = parse(&format!("[mesh]\nspin = {bad}\n")).unwrap_err();
            let text = error.to_string();
            assert!(text.contains(":2:") && text.contains("up to 1ms"), "{text}");
        }
    }

    #[test]
    fn a_command_that_is_a_symlink_runs_by_its_own_path() {
        let dir = tempfile::Builder::new()
            .prefix("m")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        let link = dir.path().join("bin/python");
        std::os::unix::fs::symlink("/bin/sh", &link).unwrap();
        let config = Config::parse(
            &dir.path().join("mesh.toml"),
            "[[plugin]]\nname = \"py\"\ncommand = \"bin/python\"\n",
        )
        .unwrap();
        assert_eq!(config.plugins[0].command, link, "not its target");

        std::os::unix::fs::symlink("/no/such/program", dir.path().join("bin/dangling")).unwrap();
        let error = Config::parse(
            &dir.path().join("mesh.toml"),
            "[[plugin]]\nname = \"py\"\ncommand = \"bin/dangling\"\n",
        )
        .unwrap_err();
        assert!(error.to_string().contains("not found"), "{error}");
    }

    #[test]
    fn connection_limits_and_socket_access_parse_within_bounds() {
        let config = parse("[mesh]\n").unwrap();
        assert_eq!((config.socket_mode, config.socket_group), (0o600, None));
        let config = parse(
            "[mesh]\nsocket_mode = \"0660\"\nsocket_group = \"root\"\n\
             handshake_timeout = \"200ms\"\nidle_timeout = \"1m\"\n\
             max_in_flight_per_connection = 2\nmax_header_list_size = \"32KiB\"\n",
        )
        .unwrap();
        assert_eq!((config.socket_mode, config.socket_group), (0o660, Some(0)));
        assert_eq!(config.limits.handshake_timeout, Duration::from_millis(200));
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.limits.max_in_flight_per_connection, Some(2));
        assert_eq!(config.limits.max_header_list_size, 32 << 10);
        for (bad, says) in [
            ("socket_mode = \"0400\"", "owner's read and write"),
            ("socket_mode = \"0777\"", "octal permission bits"),
            ("socket_mode = \"rw\"", "octal permission bits"),
            ("socket_group = \"no-such-group-here\"", "no such group"),
            ("handshake_timeout = \"0s\"", "10ms to 24h"),
            ("idle_timeout = \"1000000h\"", "10ms to 24h"),
            ("max_in_flight_per_connection = 0", "out of range"),
            ("max_header_list_size = \"2GiB\"", "1KiB to 1MiB"),
        ] {
            let text = parse(&format!("[mesh]\n{bad}\n")).unwrap_err().to_string();
            assert!(text.contains(":2:") && text.contains(says), "{bad}: {text}");
        }
    }

    #[test]
    fn busy_poll_is_opt_in() {
        let config = parse("[mesh]\nbusy_poll = true\nrouter_threads = 2\n").unwrap();
        assert!(config.busy_poll);
        assert_eq!(config.router_threads, 2);
        let error = parse("[mesh]\nbusy_poll = \"yes\"\n").unwrap_err();
        assert_eq!(error.line, Some(2), "{error}");
    }
}

#[cfg(test)]
mod capability_tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/mesh/mesh.toml"), text)
    }

    #[test]
    fn capabilities_root_and_audit_parse_and_bad_ones_name_their_line() {
        let config = parse(
            "[mesh]\nruntime_dir = \"/run/m\"\ndata_dir = \"/var/lib/mesh\"\naudit_max_size = \"1MiB\"\n\
             [[plugin]]\nname = \"a\"\ncommand = \"sh\"\ncapabilities = [\"read:**\", \"env:HOME\", \"call:plugin.echo/echo.v1.Echo/Echo\"]\n\
             [[plugin]]\nname = \"b\"\ncommand = \"sh\"\nroot = \"files\"\n",
        )
        .unwrap();
        assert_eq!(config.audit_log, PathBuf::from("/run/m/audit.log"));
        assert_eq!(config.audit_max_size, 1 << 20);
        assert_eq!(config.plugins[0].root, PathBuf::from("/var/lib/mesh/a"));
        assert_eq!(config.plugins[0].capabilities.len(), 3);
        assert_eq!(config.plugins[1].root, PathBuf::from("/etc/mesh/files"));
        for (caps, needle) in [
            ("[\"read:/etc/*\"]", "relative"),
            ("[\"nope\"]", "no kind"),
            ("[\"env:A-B\"]", "variable"),
            ("[\"call:plugin.echo/x\"]", "method"),
        ] {
            let text =
                format!("[[plugin]]\nname = \"a\"\ncommand = \"sh\"\ncapabilities = {caps}\n");
            let error = parse(&text).unwrap_err();
            assert_eq!(error.line, Some(4), "{error}");
            assert!(error.to_string().contains(needle), "{error}");
        }
        let error = parse("[mesh]\naudit_max_size = 10\n").unwrap_err();
        assert_eq!(error.line, Some(2), "{error}");
    }
}

#[cfg(test)]
mod transport_tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/mesh/mesh.toml"), text)
    }

    #[test]
    fn transport_is_unix_unless_tcp_is_asked_for_and_anything_else_names_its_line() {
        let plugin = |transport: &str| {
            format!("[[plugin]]\nname = \"a\"\ncommand = \"/bin/sh\"\n{transport}\n")
        };
        let transport = |text: &str| parse(&plugin(text)).map(|c| c.plugins[0].transport);
        assert_eq!(transport(""), Ok(Transport::Unix));
        assert_eq!(transport("transport = \"unix\""), Ok(Transport::Unix));
        assert_eq!(transport("transport = \"tcp\""), Ok(Transport::Tcp));
        let error = parse(&plugin("transport = \"quic\"")).unwrap_err();
        assert_eq!(error.line, Some(4));
        assert!(
            error.to_string().starts_with(
                "/etc/mesh/mesh.toml:4: plugin \"a\": transport = \"quic\": write \"unix\""
            ),
            "{error}"
        );
    }
}

#[cfg(test)]
mod admin_tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/mesh.toml"), text)
    }

    #[test]
    fn admin_is_off_unless_configured_and_loopback_unless_allowed() {
        let config = parse("[mesh]\n").unwrap();
        assert_eq!((config.admin, config.metrics), (None, false));
        let config =
            parse("[admin]\nlisten = \"127.0.0.1:9900\"\n[telemetry]\nmetrics = true\n").unwrap();
        assert_eq!(
            config.admin.unwrap().listen,
            "127.0.0.1:9900".parse().unwrap()
        );
        assert!(config.metrics);
        let error = parse("[mesh]\n[admin]\nlisten = \"0.0.0.0:9900\"\n").unwrap_err();
        assert_eq!(error.line, Some(3));
        assert!(
            error.to_string().contains("allow_non_loopback = true"),
            "{error}"
        );
        let config =
            parse("[admin]\nlisten = \"0.0.0.0:9900\"\nallow_non_loopback = true\n").unwrap();
        assert_eq!(
            config.admin.unwrap().listen,
            "0.0.0.0:9900".parse().unwrap()
        );
        assert!(
            !parse("[admin]\nlisten = \"127.0.0.1:1\"\n")
                .unwrap()
                .admin
                .unwrap()
                .allow_other_users
        );
        let config =
            parse("[admin]\nlisten = \"127.0.0.1:1\"\nallow_other_users = true\n").unwrap();
        assert!(config.admin.unwrap().allow_other_users);
        let error = parse("[admin]\nlisten = \"localhost\"\n").unwrap_err();
        assert!(error.to_string().contains("127.0.0.1:9900"), "{error}");
        let error = parse("[admin]\nlisten = \"127.0.0.1:1\"\nport = 3\n").unwrap_err();
        assert_eq!(error.line, Some(3), "{error}");
    }

    #[test]
    fn one_telemetry_table_holds_metrics_and_traces() {
        let config = parse(
            "[telemetry]\nmetrics = true\notlp_endpoint = \"http://127.0.0.1:4317\"\n\
             sample_ratio = 0.5\n",
        )
        .unwrap();
        assert!(config.metrics);
        assert_eq!(
            config.telemetry.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        assert_eq!(config.telemetry.sample_ratio, 0.5);
        let config = parse("[telemetry]\nmetrics = false\nlog_format = \"json\"\n").unwrap();
        assert!(!config.metrics);
        // Unknown keys are still refused, naming their line.
        let error = parse("[telemetry]\nmetrics = true\nmetric = true\n").unwrap_err();
        assert_eq!(error.line, Some(3), "{error}");
        assert!(error.to_string().contains("remove it"), "{error}");
        let error = parse("[telemetry]\nmetrics = \"yes\"\n").unwrap_err();
        assert_eq!(error.line, Some(2), "{error}");
    }
}

#[cfg(test)]
mod rate_limit_tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/mesh/mesh.toml"), text)
    }

    #[test]
    fn rate_limits_parse_and_bad_ones_name_their_line_and_the_fix() {
        let plugin =
            |limits: &str| format!("[[plugin]]\nname = \"a\"\ncommand = \"/bin/sh\"\n{limits}\n");
        let config = parse(&plugin(
            "rate_limit = \"1000/s\"\ncaller_rate_limit = \"50/m burst 10\"",
        ))
        .unwrap();
        let p = &config.plugins[0];
        assert_eq!(p.rate_limit.map(|r| r.to_string()), Some("1000/s".into()));
        assert_eq!(
            p.caller_rate_limit.map(|r| r.to_string()),
            Some("50/m burst 10".into())
        );
        assert_eq!(parse(&plugin("")).unwrap().plugins[0].rate_limit, None);
        for (text, line, needle) in [
            (
                "rate_limit = \"fast\"",
                4,
                "rate_limit: \"fast\" is not a rate: write COUNT/UNIT",
            ),
            (
                "\ncaller_rate_limit = \"0/s\"",
                5,
                "caller_rate_limit: \"0/s\": the count must be 1 to",
            ),
            (
                "rate_limit = \"5/s burst\"",
                4,
                "optionally followed by \" burst N\"",
            ),
        ] {
            let error = parse(&plugin(text)).unwrap_err();
            assert_eq!(error.line, Some(line), "{error}");
            assert!(error.to_string().contains(needle), "{error}");
            assert!(
                error.to_string().starts_with("/etc/mesh/mesh.toml:"),
                "{error}"
            );
        }
    }
}
