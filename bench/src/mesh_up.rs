//! A real `mesh up` (the release binary) with the echo plugin, started by the shared harness
//! (`mesh-testkit`, which the end-to-end tests use too): the config the benchmark wants, and
//! the registry of the echo plugin.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::bail;
use mesh::Address;
use mesh_proto::mesh::v1::Instance;

use crate::Bins;

pub(crate) use mesh_proto::mesh::v1::WatchResponse;

/// The service the echo plugin registers as.
pub(crate) const SERVICE: &str = "plugin.echo";
/// How long `mesh up` may take to print its TCP address, once it listens on its socket.
const LISTEN_DEADLINE: Duration = Duration::from_secs(10);
/// How long a stopping `mesh up` may take before it is killed (it stops its plugins first).
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a dropped one (an error, Ctrl-C) may take to stop its plugins.
const DROP_GRACE: Duration = Duration::from_secs(5);

/// How to configure one `mesh up`.
#[derive(Debug, Clone)]
pub(crate) struct MeshSpec {
    /// `instances` of the echo plugin.
    pub(crate) instances: u32,
    /// `backoff_base` of the echo plugin; `None` keeps the default.
    pub(crate) backoff_base: Option<String>,
    /// Whether the router also listens on TCP (`listen = "127.0.0.1:0"`).
    pub(crate) tcp: bool,
    /// Whether the router records call metrics (`[telemetry] metrics = true`, with the
    /// admin listener on a free loopback port, as the demo runs).
    pub(crate) metrics: bool,
    /// Whether to run a second echo plugin under a policy (variant h).
    pub(crate) policy_plugin: bool,
    /// `[telemetry]`: export traces to this OTLP endpoint, sampling this ratio of new traces;
    /// `None`: telemetry off (the default).
    pub(crate) telemetry: Option<(String, f64)>,
    /// More `[mesh]` lines, then more tables before the plugin's (a node of a cluster).
    pub(crate) node: Option<(String, String)>,
    /// mTLS on that listener: the directory `mesh certs` wrote `ca.pem` and `node-bench.*`
    /// to (see [`make_certs`]).
    pub(crate) tls: Option<PathBuf>,
}

/// A development CA, the router's certificate (`node-bench`) and a client's (`client-bench`)
/// in `dir`, as `mesh certs` makes them.
pub(crate) fn make_certs(dir: &std::path::Path) -> anyhow::Result<()> {
    use mesh_manager::certs::{self, Kind, Validity};
    certs::init(dir, Validity::days(1), false)?;
    certs::issue(dir, Kind::Node, "bench", &[], Validity::days(1), false)?;
    certs::issue(dir, Kind::Client, "bench", &[], Validity::days(1), false)?;
    Ok(())
}

/// A running `mesh up`; stopped (with its plugins) when dropped.
pub(crate) struct MeshUp {
    up: mesh_testkit::MeshUp,
    /// When the process was started.
    pub(crate) spawned_at: Instant,
    /// The router's Unix socket.
    pub(crate) socket: PathBuf,
    /// The router's TCP address (`127.0.0.1:PORT`), when asked for.
    pub(crate) tcp: Option<String>,
}

impl MeshUp {
    /// Writes the config, starts `mesh up`, and waits until it prints where it listens.
    pub(crate) async fn start(bins: &Bins, spec: &MeshSpec) -> anyhow::Result<Self> {
        let (settings, plugins) = config_text(bins, spec);
        let up = mesh_testkit::MeshUp::builder(&bins.mesh)
            .settings(&settings)
            .plugins(&plugins)
            .drop_grace(DROP_GRACE)
            .start()
            .await?;
        let tcp = match (spec.tcp, &spec.tls) {
            (true, None) => Some(up.tcp_address(LISTEN_DEADLINE).await?),
            (true, Some(_)) => Some(up.tls_address(LISTEN_DEADLINE).await?),
            (false, _) => None,
        };
        Ok(Self {
            spawned_at: up.spawned_at,
            socket: up.socket.clone(),
            tcp,
            up,
        })
    }

    /// Watches the registry (`mesh.v1.Registry/Watch` on the router) until `done` holds for the
    /// echo plugin's instances; returns when it first held, and those instances.
    pub(crate) async fn wait_registry(
        &self,
        within: Duration,
        done: impl Fn(&[Instance]) -> bool,
    ) -> anyhow::Result<(Instant, Vec<Instance>)> {
        self.up.wait_registry(SERVICE, within, done).await
    }

    /// As [`MeshUp::wait_registry`], for another service (the policy plugin of variant h).
    pub(crate) async fn wait_service(
        &self,
        service: &str,
        within: Duration,
        done: impl Fn(&[Instance]) -> bool,
    ) -> anyhow::Result<(Instant, Vec<Instance>)> {
        self.up.wait_registry(service, within, done).await
    }

    /// Opens a watch of the echo plugin's instances; its first message is the set now.
    pub(crate) async fn watch(&self) -> anyhow::Result<tonic::Streaming<WatchResponse>> {
        self.up.watch(SERVICE).await
    }

    /// Reads `updates` until `done` holds; see [`MeshUp::wait_registry`].
    pub(crate) async fn wait_on(
        &self,
        updates: &mut tonic::Streaming<WatchResponse>,
        within: Duration,
        done: impl Fn(&[Instance]) -> bool,
    ) -> anyhow::Result<(Instant, Vec<Instance>)> {
        self.up.wait_on(updates, within, done).await
    }

    /// The manager's pid (the router runs in this process).
    pub(crate) fn pid(&self) -> u32 {
        self.up.pid()
    }

    /// Stops `mesh up` (SIGTERM: it deregisters and stops its plugins) and waits for it.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.up.stop(STOP_GRACE).await
    }
}

/// The process id the manager put in an instance's labels.
pub(crate) fn pid_of(instance: &Instance) -> Option<u32> {
    instance.labels.get("pid")?.parse().ok()
}

/// The Unix socket an instance serves on.
pub(crate) fn socket_of(instance: &Instance) -> anyhow::Result<PathBuf> {
    match instance.endpoint.parse::<Address>() {
        Ok(Address::Unix(path)) => Ok(path),
        _ => bail!(
            "instance {} has endpoint {:?}, not a Unix socket",
            instance.id,
            instance.endpoint
        ),
    }
}

/// The `[mesh]` settings and the echo plugin's table.
fn config_text(bins: &Bins, spec: &MeshSpec) -> (String, String) {
    let mut settings = String::from("# Written by mesh-bench.\n");
    // The plugin polls and spins as the bench's own environment says (MESH_BUSY_POLL=1,
    // MESH_SPIN_US), as the client and the router do: mesh up hands plugins only what this names.
    settings.push_str(
        "env_allow = [\"PATH\", \"LANG\", \"LC_*\", \"TZ\", \"MESH_BUSY_POLL\", \"MESH_SPIN_US\"]\n",
    );
    if spec.tcp && spec.node.is_none() {
        settings.push_str("listen = \"127.0.0.1:0\"\n");
    }
    let mut tables = String::new();
    if let Some((lines, more)) = &spec.node {
        settings.push_str(lines);
        tables.push_str(more);
    }
    if mesh::tuning::busy_poll_from_env() {
        settings.push_str("busy_poll = true\n");
    }
    // One [telemetry] table for call metrics and traces, with the tables after every [mesh] key.
    let mut telemetry = String::new();
    if spec.metrics {
        tables.push_str("[admin]\nlisten = \"127.0.0.1:0\"\n");
        telemetry.push_str("metrics = true\n");
    }
    if let Some((endpoint, ratio)) = &spec.telemetry {
        telemetry.push_str(&format!(
            "otlp_endpoint = {endpoint:?}\nsample_ratio = {ratio:?}\n"
        ));
    }
    if !telemetry.is_empty() {
        tables.push_str(&format!("[telemetry]\n{telemetry}"));
    }
    let mut plugin = format!(
        "[[plugin]]\nname = \"echo\"\ncommand = {:?}\ninstances = {}\nstop_grace = \"2s\"\n\
         # Every kill measures the first restart: the delay starts over after 1 ms of readiness,\n\
         # and repeated kills never count as a crash loop.\n\
         backoff_reset = \"1ms\"\nmax_failures = 1000\n",
        bins.echo_plugin.display().to_string(),
        spec.instances,
    );
    if let Some(base) = &spec.backoff_base {
        plugin.push_str(&format!("backoff_base = {base:?}\n"));
    }
    if spec.instances == 0 {
        plugin.clear();
    }
    if spec.policy_plugin {
        // Limits that never refuse at these rates, but are checked on every call.
        plugin.push_str(&format!(
            "\n[[plugin]]\nname = \"echo-policy\"\ncommand = {:?}\n\
             rate_limit = \"1000000000/s\"\ncaller_rate_limit = \"1000000000/s\"\n",
            bins.echo_plugin.display().to_string(),
        ));
    }
    if let Some(dir) = &spec.tls {
        let file = |name: &str| dir.join(name).display().to_string();
        plugin.push_str(&format!(
            "\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            file("ca.pem"),
            file("node-bench.pem"),
            file("node-bench.key")
        ));
    }
    (settings, tables + &plugin)
}
