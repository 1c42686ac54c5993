//! `mesh up`: the router with its embedded registry, and the configured plugins, until a
//! signal asks them to stop.

use std::{future::Future, sync::Arc};

use mesh::runtime;
use mesh_router::{
    Router,
    cluster::{self, Backend, Cluster, Embedded, Node, etcd::Etcd},
    registry::Registry,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    Config, Supervisor,
    api::ManagerService,
    host::{Audit, CallGate, DirectGate, HostService, Policies, RateLimits},
    supervisor::{PluginStatus, State},
    systemd,
};

/// Why `mesh up` could not start. Each says its cause once: the message carries it, and there
/// is no source to repeat it (`mesh` prints the whole chain).
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// The runtime directory or the router socket could not be prepared (in use, too long,
    /// unsafe); the message names the path.
    #[error("{0}")]
    Socket(runtime::SocketError),
    /// The router's worker threads could not be started.
    #[error("cannot start the router threads: {0}")]
    Workers(std::io::Error),
    /// A signal handler could not be installed.
    #[error("cannot handle signals: {0}")]
    Signal(std::io::Error),
    /// The router socket's mode or group could not be set.
    #[error("router socket {path}: cannot apply socket_mode/socket_group: {error}")]
    SocketAccess {
        /// The socket.
        path: std::path::PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The audit log could not be opened (a symlink, another owner's, unwritable).
    #[error("{0}; set [mesh] audit_log to a file mesh up may write")]
    Audit(std::io::Error),
    /// The `[tls]` files could not be read or used; the message names the file.
    #[error("{0}")]
    Tls(String),
    /// The admin listener could not be bound.
    #[error("[admin] listen = {addr}: {error}; pick a free port, or port 0 for any")]
    Admin {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// The metrics could not be set up.
    #[error("{0}")]
    Metrics(crate::admin::MetricsError),
    /// The OTLP metrics exporter could not be built.
    #[error("metrics export: {0}")]
    MetricsExport(mesh::telemetry::TelemetryError),
    /// The trace relay's collector address is not one tonic can dial.
    #[error("[telemetry] otlp_endpoint = {0:?}: the trace relay cannot dial it: {1}")]
    TraceRelay(String, tonic::transport::Error),
    /// The TCP listener could not be bound.
    #[error("listen = {addr}: {error}; pick a free port, or port 0 for any")]
    Listen {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why.
        error: std::io::Error,
    },
}

impl From<runtime::SocketError> for UpError {
    fn from(error: runtime::SocketError) -> Self {
        Self::Socket(error)
    }
}

/// Runs the mesh described by `config` until `shutdown` completes; then deregisters and stops
/// every plugin and closes the router.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), UpError> {
    let watchdog = systemd::watchdog();
    runtime::create_private_dir(&config.runtime_dir)?;
    let listener = runtime::bind(&config.socket)?;
    open_socket(&config)?;
    let tcp = match config.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|error| UpError::Listen { addr, error })?,
        ),
        None => None,
    };
    let admin_listener = match &config.admin {
        Some(admin) => {
            Some(
                crate::admin::bind(admin.listen)
                    .await
                    .map_err(|error| UpError::Admin {
                        addr: admin.listen,
                        error,
                    })?,
            )
        }
        None => None,
    };
    let registry = Registry::new();
    let closing = registry.clone();
    let supervisor = Arc::new(isolating(Supervisor::new(
        registry.clone(),
        config.socket.clone(),
    )));
    let audit = Arc::new(
        Audit::open(config.audit_log.clone(), config.audit_max_size).map_err(UpError::Audit)?,
    );
    let policies = Arc::new(Policies::default());
    let rates = Arc::new(RateLimits::default());
    let manager = ManagerService::new(
        supervisor.clone(),
        config.clone(),
        policies.clone(),
        rates.clone(),
        audit.clone(),
    );
    let calls = Arc::new(CallGate::new(policies.clone(), rates, audit.clone()));
    // The direct path: each instance's SDK asks about its callers over a private channel,
    // answered by the same gate. Set before any plugin starts.
    if DirectGate::supported() {
        supervisor.set_caller_channels(Arc::new(DirectGate::new(
            calls.clone(),
            Arc::downgrade(&supervisor),
        )));
    } else {
        tracing::warn!(
            "this kernel has no SO_PEERPIDFD (Linux 6.5): plugins cannot check their callers \
             on their own sockets, so call: capabilities and rate limits bound the router path \
             only"
        );
    }
    let host = HostService::new(policies, audit);
    // Scrape-time supervisor metrics, and the router's per call when asked for; exported by
    // OTLP too with an endpoint.
    let metrics = if config.admin.is_some() || config.metrics {
        let export = crate::telemetry::metrics_export(&config).map_err(UpError::MetricsExport)?;
        Some(
            crate::admin::Metrics::new(
                supervisor.clone(),
                config.metrics,
                |builder| match export {
                    Some(export) => export.install(builder),
                    None => builder,
                },
            )
            .map_err(UpError::Metrics)?,
        )
    } else {
        None
    };
    let identify = supervisor.clone();
    let (cluster, backend) = backend(&config);
    if let Some(metrics) = &metrics {
        metrics.observe_cluster(&cluster);
    }
    let mut router = Router::builder(registry.clone())
        .metrics(metrics.as_ref().map(|m| m.router()).unwrap_or_default())
        .cluster(cluster.clone());
    if let Some(tls) = &config.tls {
        for key in crate::certs::exposed_keys(&tls.ca, &tls.key) {
            tracing::warn!("{}", crate::certs::exposed_warning(&key));
        }
        router = router.tls(tls.server().map_err(UpError::Tls)?);
        // The same node certificate dials the other nodes' routers (node certificates serve
        // and dial).
        router = router.peer_tls(tls.client().map_err(UpError::Tls)?);
    }
    // Plugins' traces, relayed to the collector (they export to the router's socket).
    if let Some(endpoint) = &config.telemetry.otlp_endpoint {
        let relay = crate::telemetry::relay::TraceRelay::new(endpoint)
            .map_err(|error| UpError::TraceRelay(endpoint.clone(), error))?;
        router = router
            .add_service(relay.into_server(config.max_message_size))
            .describe(opentelemetry_proto::DESCRIPTORS);
    }
    let router = router
        .limits(config.limits.clone())
        .add_service(manager.clone().into_server())
        .add_service(host.into_server())
        // Once per connection: is the peer a managed instance, or a process it started?
        .identify(move |pid| identify.identify(pid))
        // Per forwarded call of a plugin: its call: capabilities, audited.
        .call_policy(CallPolicyOf(calls))
        .build()
        .await;
    let backend = backend.start(registry.clone(), cluster.clone());
    let gateways = cluster.this_node().is_some().then(|| {
        cluster::follow_gateways(
            registry.clone(),
            &cluster,
            mesh::Address::Unix(config.socket.clone()),
        )
    });
    let mut hangup = signal(SignalKind::hangup()).map_err(UpError::Signal)?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            match manager.reload().await {
                Ok(report) if !report.failed.is_empty() => {
                    tracing::error!("reloaded, but these failed: {}", report.failed.join("; "))
                }
                Ok(report) => tracing::info!("reloaded: {report:?}"),
                Err(error) => tracing::error!("reload refused, nothing changed: {error}"),
            }
        }
    });

    let (stopping, stop_rx) = watch::channel(false);
    println!("mesh: router listening on unix:{}", config.socket.display());
    let tcp = match tcp {
        Some(tcp) => {
            let addr = tcp.local_addr().map_err(|error| UpError::Listen {
                addr: config.listen.expect("set"),
                error,
            })?;
            match config.tls {
                Some(_) => println!("mesh: router listening on https://{addr} (mTLS)"),
                None => println!("mesh: router listening on http://{addr}"),
            }
            Some(tcp.into_std().map_err(UpError::Workers)?)
        }
        None => None,
    };
    if let (Some(listener), Some(metrics)) = (admin_listener, &metrics) {
        let admin_config = config.admin.clone().expect("bound from it");
        let any_host = !admin_config.listen.ip().is_loopback();
        if let Ok(addr) = listener.local_addr() {
            println!(
                "mesh: admin listening on http://{addr} (/metrics, /healthz, /readyz, status page at /)"
            );
        }
        let admin = crate::admin::Admin::new(
            supervisor.clone(),
            metrics.clone(),
            any_host,
            admin_config.allow_other_users,
        );
        let mut stop = stop_rx.clone();
        tokio::spawn(admin.serve(listener, async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }));
    }
    let listener = listener.into_std().map_err(UpError::Workers)?;
    mesh::tuning::set_linger(config.spin);
    let workers = router
        .spawn_workers(
            config.router_threads,
            listener,
            tcp,
            stop_rx,
            config.busy_poll,
        )
        .map_err(UpError::Workers)?;
    println!(
        "mesh: try `MESH_SOCKET={} cargo run --example client` or \
         `grpcurl -plaintext -unix -authority plugin.<name> {} list`",
        config.socket.display(),
        config.socket.display()
    );

    let mut settling = Vec::with_capacity(config.plugins.len());
    for plugin in config.plugins {
        let name = plugin.name.clone();
        if let Err(error) = supervisor.add(plugin) {
            tracing::error!(plugin = %name, %error, "cannot start plugin");
            continue;
        }
        let supervisor = supervisor.clone();
        settling.push(tokio::spawn(async move {
            if let Ok(status) = supervisor.settled(&name).await {
                report_settled(&status);
            }
        }));
    }
    // Startup is over once every plugin had its first chance, ready or not: a unit that waits
    // for READY=1 must not wait on a plugin that fails (`mesh status` says which did).
    tokio::spawn(async move {
        for plugin in settling {
            let _ = plugin.await;
        }
        systemd::ready();
    });

    shutdown.await;
    systemd::stopping();
    tracing::info!("stopping: deregistering and stopping plugins");
    supervisor.shutdown().await;
    // Withdraws this node's instances from the other nodes' view at once.
    backend.stop(std::time::Duration::from_secs(3)).await;
    if let Some(gateways) = gateways {
        gateways.abort();
    }
    // Watch streams (every mesh::connect channel has one) would keep the router draining.
    closing.close();
    let _ = stopping.send(true);
    if let Err(error) = workers.join().await {
        tracing::warn!(%error, "router workers");
    }
    let _ = std::fs::remove_file(&config.socket);
    // The last OTLP export (the calls since the previous one), bounded: a collector that
    // does not answer delays the exit by at most this.
    if let Some(metrics) = &metrics {
        metrics.shutdown(METRICS_FLUSH_WITHIN).await;
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long `mesh up` waits at exit for the last OTLP metrics export.
const METRICS_FLUSH_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The router's hook, answered by the gate the direct path shares.
struct CallPolicyOf(Arc<CallGate>);

impl mesh_router::CallPolicy for CallPolicyOf {
    fn check(
        &self,
        caller: &mesh_router::Caller,
        service: &str,
        method: &str,
    ) -> Result<(), mesh_router::Refusal> {
        self.0
            .decide(caller, service, method, crate::host::audit::Via::Router)
    }
}

/// This node and its registry backend: etcd when `[registry]` names it, else the embedded
/// registry alone.
fn backend(config: &Config) -> (Cluster, Box<dyn Backend>) {
    let cluster = &config.cluster;
    match (&cluster.node, &cluster.etcd) {
        (Some(name), Some(etcd)) => {
            let node = Node {
                name: name.clone(),
                advertise: cluster.advertise.clone(),
            };
            println!(
                "mesh: node {name}, registry etcd at {} (prefix {}, lease {}s), advertising {}",
                etcd.endpoints.join(", "),
                etcd.prefix,
                etcd.ttl.as_secs(),
                node.advertise.as_deref().unwrap_or("nothing")
            );
            (
                Cluster::node(node.clone(), "etcd"),
                Box::new(Etcd::new(etcd.clone(), node)),
            )
        }
        _ => (Cluster::single(), Box::new(Embedded)),
    }
}

/// Runs instances in PID namespaces of their own where this machine allows it (see
/// [`crate::supervisor::init`]); says once why not where it does not.
fn isolating(supervisor: Supervisor) -> Supervisor {
    let program = match std::env::current_exe() {
        Ok(program) => program,
        Err(error) => {
            tracing::warn!(
                "cannot find the mesh binary ({error}): plugins run without a PID namespace, \
                 and what they start may outlive mesh up if it is killed"
            );
            return supervisor;
        }
    };
    match crate::supervisor::init::probe(&program) {
        Ok(()) => {
            // What a plugin with `sandbox = true` would get; each one says so as it starts.
            let support = crate::supervisor::sandbox::probe(&program);
            tracing::debug!("kernel sandbox: {}", support.describe());
            supervisor.with_init(program).with_sandbox(support)
        }
        Err(why) => {
            tracing::warn!(
                "no PID namespace per instance ({why}): plugins run without one, and what they \
                 start may outlive mesh up if it is killed; allow user namespaces or run as root"
            );
            supervisor
        }
    }
}

/// Gives the router socket the configured group and mode. Whoever it lets connect may call
/// plugins and read the registry; control stays with the owner's uid and root, whom the
/// router knows by the kernel's credentials, not by the socket's mode.
fn open_socket(config: &Config) -> Result<(), UpError> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |error| UpError::SocketAccess {
        path: config.socket.clone(),
        error,
    };
    if let Some(gid) = config.socket_group {
        nix::unistd::chown(&config.socket, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| failed(e.into()))?;
    }
    if config.socket_mode != 0o600 {
        std::fs::set_permissions(
            &config.socket,
            std::fs::Permissions::from_mode(config.socket_mode),
        )
        .map_err(failed)?;
    }
    Ok(())
}

/// One line per plugin once its instances settle: all ready, or which are not and why.
fn report_settled(status: &PluginStatus) {
    let name = &status.config.name;
    let service = &status.config.service;
    let total = status.instances.len();
    let ready = status
        .instances
        .iter()
        .filter(|s| matches!(s.state, State::Ready { .. }))
        .count();
    if ready == total {
        tracing::info!("plugin {name}: {ready}/{total} instances ready as {service}");
    } else {
        let problems: Vec<String> = status
            .instances
            .iter()
            .filter(|s| !matches!(s.state, State::Ready { .. }))
            // The reasons were logged as each instance failed: name them, do not repeat them.
            .map(|s| format!("{} {}", s.id, s.state.name()))
            .collect();
        tracing::error!(
            "plugin {name}: {ready}/{total} instances ready as {service} ({}); `mesh status` says why",
            problems.join(", ")
        );
    }
}
