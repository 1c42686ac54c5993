//! The supervisor: runs every configured plugin's instances and keeps the registry in step.
//!
//! - [`process`]: starting a plugin process (environment, process group, parent-death signal,
//!   limits, credentials) and stopping it (SIGTERM to the group, SIGKILL after the grace);
//! - [`init`]: a PID namespace per instance, so that no descendant outlives the manager;
//! - [`sandbox`]: the opt-in kernel sandbox (a mount namespace and Landlock) `init` sets up;
//! - [`instance`]: one instance's life as a task with an explicit [`State`];
//! - [`logs`]: captured stdout and stderr;
//! - `identify`: which instance a local process belongs to, for the router ([`Supervisor::identify`]).
//!
//! Operations on one plugin (start, stop, restart, scale, reload) run one at a time; reading
//! its status never waits for them.

mod identify;
pub mod init;
mod instance;
pub mod logs;
mod process;
pub mod sandbox;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

#[cfg(test)]
pub(crate) use identify::{Process, ancestor_in};
pub use instance::{InstanceStatus, State};
use logs::LogBook;
use mesh_router::registry::Registry;
use tokio::{sync::watch, task::JoinHandle};

use crate::config::{Config, PluginConfig};
use instance::Instance;
use process::Launch;

/// Most instances of one plugin, in the config and when scaled: enough for any machine, and
/// keeps typos like 1000000 out.
pub const MAX_INSTANCES: u32 = 1024;

/// Why an operation on a plugin was refused.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// No plugin by that name.
    #[error("no plugin named {0:?}; `mesh status` lists the plugins")]
    Unknown(String),
    /// The count is out of range.
    #[error("cannot scale to {0} instances; use 0 to {MAX_INSTANCES}")]
    Range(u32),
    /// The plugin's socket directory could not be prepared.
    #[error(transparent)]
    Socket(#[from] mesh::runtime::SocketError),
    /// The plugin asks for `sandbox = true` and this kernel cannot sandbox it fully.
    #[error("{0}")]
    Sandbox(String),
}

/// Runs plugins. Share it behind an `Arc`.
pub struct Supervisor {
    /// Instance tasks run here, whichever thread asks for them (the control API is served on
    /// the router's threads).
    runtime: tokio::runtime::Handle,
    registry: Registry,
    mesh_socket: PathBuf,
    /// The `mesh` binary that runs each instance in its own PID namespace ([`init`]); `None`:
    /// instances run directly.
    init: Option<PathBuf>,
    /// Opens each instance's private channel for checking its callers (set once, after the
    /// gate that answers it is built).
    channels: ChannelsCell,
    /// What the kernel offers sandboxed plugins ([`sandbox::probe`]); `None`: not probed,
    /// no sandbox.
    sandbox: Option<sandbox::Support>,
    plugins: Mutex<BTreeMap<String, Arc<Slot>>>,
}

/// Opens an instance's private channel to the manager, over which its SDK asks who its callers
/// are and whether each call may run (`MESH_CALLERS_FD`; `crate::host::direct`).
pub trait CallerChannels: Send + Sync + 'static {
    /// A new channel for `instance` of `plugin` serving `service`: the end the instance
    /// inherits (close-on-exec; the child clears that).
    fn open(
        &self,
        plugin: &str,
        instance: &str,
        service: &str,
    ) -> std::io::Result<std::os::fd::OwnedFd>;
}

/// Where instances find the [`CallerChannels`], once it is set.
#[derive(Clone, Default)]
pub(crate) struct ChannelsCell(Arc<std::sync::OnceLock<Arc<dyn CallerChannels>>>);

impl ChannelsCell {
    pub(crate) fn get(&self) -> Option<&Arc<dyn CallerChannels>> {
        self.0.get()
    }
}

impl std::fmt::Debug for ChannelsCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "set"
        } else {
            "unset"
        })
    }
}

/// One plugin: its settings and instances, and the lock that serialises operations on it.
struct Slot {
    ops: tokio::sync::Mutex<()>,
    logs: Arc<LogBook>,
    run: Mutex<Run>,
}

struct Run {
    config: Arc<PluginConfig>,
    desired: u32,
    instances: Vec<InstanceHandle>,
}

struct InstanceHandle {
    status: watch::Receiver<InstanceStatus>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl InstanceHandle {
    /// Asks the instance to stop and waits until it has.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

/// A plugin's instances as they are now.
#[derive(Debug, Clone)]
pub struct PluginStatus {
    /// The plugin's settings.
    pub config: Arc<PluginConfig>,
    /// How many instances it should run.
    pub desired: u32,
    /// Its instances, in id order.
    pub instances: Vec<InstanceStatus>,
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Plugins started.
    pub added: Vec<String>,
    /// Plugins stopped and forgotten.
    pub removed: Vec<String>,
    /// Plugins whose settings changed, restarted one instance at a time.
    pub restarted: Vec<String>,
    /// Plugins whose instance count alone changed.
    pub scaled: Vec<String>,
    /// Settings that only a new `mesh up` applies.
    pub ignored: Vec<String>,
    /// Actions that failed (`echo: echo-0 failed: …`); the others were applied.
    pub failed: Vec<String>,
}

impl Supervisor {
    /// A supervisor registering ready instances in `registry`; plugins learn the router socket
    /// `mesh_socket` through `MESH_SOCKET`.
    /// Call it on the runtime the instances should run on.
    pub fn new(registry: Registry, mesh_socket: PathBuf) -> Self {
        Self {
            runtime: tokio::runtime::Handle::current(),
            registry,
            mesh_socket,
            init: None,
            channels: ChannelsCell::default(),
            sandbox: None,
            plugins: Mutex::default(),
        }
    }

    /// Runs each instance through `program __init` (the `mesh` binary), in a PID namespace of
    /// its own, so that nothing a plugin starts outlives the manager however it dies; see
    /// [`init`]. Check first with [`init::probe`] that this machine allows it.
    pub fn with_init(mut self, program: PathBuf) -> Self {
        self.init = Some(program);
        self
    }

    /// Gives every instance started from now on a private channel from `channels`, over which
    /// its SDK checks its callers; set once (a second call is ignored).
    pub fn set_caller_channels(&self, channels: Arc<dyn CallerChannels>) {
        let _ = self.channels.0.set(channels);
    }

    /// Sandboxes the plugins that ask for it (`sandbox = true`) as `support` says the kernel
    /// can; needs [`Supervisor::with_init`] (the sandbox is set up by `mesh __init`).
    pub fn with_sandbox(mut self, support: sandbox::Support) -> Self {
        self.sandbox = Some(support);
        self
    }

    /// What the kernel offers sandboxed plugins here.
    pub fn sandbox_support(&self) -> sandbox::Support {
        match (&self.init, &self.sandbox) {
            (Some(_), Some(support)) => support.clone(),
            (None, _) => sandbox::Support::none(
                "no PID namespace per instance, in which the sandbox is set up".into(),
            ),
            (Some(_), None) => sandbox::Support::none("not probed".into()),
        }
    }

    /// Refuses a plugin with `sandbox = true` that this kernel cannot sandbox fully; warns of
    /// a `"best-effort"` one.
    fn check_sandbox(&self, config: &PluginConfig) -> Result<(), SupervisorError> {
        use crate::config::SandboxMode;
        let support = self.sandbox_support();
        let name = &config.name;
        let origin = &config.sandbox.origin;
        match config.sandbox.mode {
            SandboxMode::Off => Ok(()),
            _ if support.full() => {
                tracing::info!("plugin {name}: sandboxed: {}", support.describe());
                Ok(())
            }
            SandboxMode::Strict => Err(SupervisorError::Sandbox(format!(
                "{origin}: plugin {name:?} asks for sandbox = true, but this kernel cannot \
                 sandbox it fully: {}; not started. Set sandbox = \"best-effort\" to run it \
                 with what the kernel offers, or allow user namespaces and Landlock",
                support.describe()
            ))),
            SandboxMode::BestEffort => {
                tracing::warn!(
                    "{origin}: plugin {name}: sandbox = \"best-effort\", and this kernel cannot \
                     sandbox fully: {}",
                    support.describe()
                );
                Ok(())
            }
        }
    }

    fn plugins(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Slot>>> {
        self.plugins.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(&self, name: &str) -> Result<Arc<Slot>, SupervisorError> {
        self.plugins()
            .get(name)
            .cloned()
            .ok_or_else(|| SupervisorError::Unknown(name.to_owned()))
    }

    /// Adds a plugin and starts its instances; returns at once (see [`Supervisor::settled`]).
    pub fn add(&self, config: PluginConfig) -> Result<(), SupervisorError> {
        self.check_sandbox(&config)?;
        prepare_socket_dir(&config)?;
        let config = Arc::new(config);
        let logs = Arc::new(LogBook::default());
        let instances = (0..config.instances)
            .map(|index| self.spawn_instance(&config, &logs, index))
            .collect();
        let slot = Slot {
            ops: tokio::sync::Mutex::new(()),
            run: Mutex::new(Run {
                desired: config.instances,
                config: config.clone(),
                instances,
            }),
            logs,
        };
        self.plugins().insert(config.name.clone(), Arc::new(slot));
        Ok(())
    }

    /// Stops every instance of `name` and forgets the plugin.
    pub async fn remove(&self, name: &str) -> Result<(), SupervisorError> {
        let slot = self.slot(name)?;
        let _op = slot.ops.lock().await;
        self.plugins().remove(name);
        let instances = std::mem::take(&mut slot.run().instances);
        stop_all(instances).await;
        Ok(())
    }

    fn spawn_instance(
        &self,
        config: &Arc<PluginConfig>,
        logs: &Arc<LogBook>,
        index: u32,
    ) -> InstanceHandle {
        let id = config.instance_id(index);
        let (status, status_rx) = watch::channel(InstanceStatus {
            id: id.clone(),
            state: State::Pending,
            started: None,
            restarts: 0,
            last_exit: None,
            process: None,
        });
        let (stop, stop_rx) = watch::channel(false);
        let watchdog = status.clone();
        let span = tracing::info_span!("instance", plugin = %config.name, instance = %id);
        let instance = Instance {
            launch: Launch {
                plugin: config.clone(),
                id,
                mesh_socket: self.mesh_socket.clone(),
                init: self.init.clone(),
                channels: self.channels.clone(),
                sandbox: self.init.is_some() && self.sandbox.is_some(),
            },
            registry: self.registry.clone(),
            logs: logs.clone(),
            status,
            stop: stop_rx,
        };
        let task = async move {
            use futures_util::FutureExt;
            let run = std::panic::AssertUnwindSafe(instance.run()).catch_unwind();
            if let Err(panic) = run.await {
                ended_unexpectedly(&watchdog, panic.as_ref());
            }
        };
        InstanceHandle {
            status: status_rx,
            stop,
            task: self
                .runtime
                .spawn(tracing::Instrument::instrument(task, span)),
        }
    }

    /// Waits until every instance of `name` is ready or has given up (bounded by the
    /// plugin's ready timeout and backoff), and returns the plugin's status.
    pub async fn settled(&self, name: &str) -> Result<PluginStatus, SupervisorError> {
        let slot = self.slot(name)?;
        let (receivers, limit) = {
            let run = slot.run();
            let receivers: Vec<_> = run.instances.iter().map(|i| i.status.clone()).collect();
            (receivers, settle_limit(&run.config))
        };
        let wait_all = async {
            for mut status in receivers {
                let _ = status.wait_for(|s| s.state.is_settled()).await;
            }
        };
        let _ = tokio::time::timeout(limit, wait_all).await;
        self.get(name)
    }

    /// Every plugin and its instances now.
    pub fn status(&self) -> Vec<PluginStatus> {
        let slots: Vec<Arc<Slot>> = self.plugins().values().cloned().collect();
        slots.iter().map(|slot| slot.status()).collect()
    }

    /// One plugin now.
    pub fn get(&self, name: &str) -> Result<PluginStatus, SupervisorError> {
        Ok(self.slot(name)?.status())
    }

    /// The captured output of plugin `name`.
    pub fn logs(&self, name: &str) -> Result<Arc<LogBook>, SupervisorError> {
        Ok(self.slot(name)?.logs.clone())
    }

    /// Starts again every instance of `name` that is not running (stopped, failed, exited).
    pub async fn start(&self, name: &str) -> Result<PluginStatus, SupervisorError> {
        let slot = self.slot(name)?;
        {
            let _op = slot.ops.lock().await;
            let mut run = slot.run();
            let config = run.config.clone();
            if run.instances.is_empty() {
                run.desired = config.instances;
            }
            let desired = run.desired;
            for index in 0..desired {
                let i = index as usize;
                if i < run.instances.len() && run.instances[i].is_running() {
                    continue;
                }
                let handle = self.spawn_instance(&config, &slot.logs, index);
                if i < run.instances.len() {
                    run.instances[i] = handle;
                } else {
                    run.instances.push(handle);
                }
            }
        }
        self.settled(name).await
    }

    /// Stops every instance of `name` (deregister, SIGTERM, SIGKILL after the grace); they
    /// stay listed as stopped until started again.
    pub async fn stop(&self, name: &str) -> Result<PluginStatus, SupervisorError> {
        let slot = self.slot(name)?;
        let _op = slot.ops.lock().await;
        let statuses: Vec<_> = slot
            .run()
            .instances
            .iter()
            .map(|i| {
                let _ = i.stop.send(true);
                i.status.clone()
            })
            .collect();
        for status in statuses {
            finished(status).await;
        }
        Ok(slot.status())
    }

    /// Restarts the instances of `name` one at a time, each ready before the next stops.
    pub async fn restart(&self, name: &str) -> Result<PluginStatus, SupervisorError> {
        let slot = self.slot(name)?;
        let _op = slot.ops.lock().await;
        self.roll(&slot).await;
        Ok(slot.status())
    }

    /// Replaces each instance in turn with one running the slot's current settings.
    async fn roll(&self, slot: &Slot) {
        let count = slot.run().instances.len();
        for index in 0..count {
            let old = {
                let run = slot.run();
                let _ = run.instances[index].stop.send(true);
                run.instances[index].status.clone()
            };
            finished(old).await;
            let config = slot.run().config.clone();
            let fresh = self.spawn_instance(&config, &slot.logs, index as u32);
            let mut status = fresh.status.clone();
            slot.run().instances[index] = fresh;
            let settled = status.wait_for(|s| s.state.is_settled());
            let _ = tokio::time::timeout(settle_limit(&config), settled).await;
        }
    }

    /// Runs `count` instances of `name`: starts new ones (and waits until they are ready or
    /// gave up), or drains and stops the newest first.
    pub async fn scale(&self, name: &str, count: u32) -> Result<PluginStatus, SupervisorError> {
        if count > MAX_INSTANCES {
            return Err(SupervisorError::Range(count));
        }
        let slot = self.slot(name)?;
        {
            let _op = slot.ops.lock().await;
            let surplus = {
                let mut run = slot.run();
                run.desired = count;
                let config = run.config.clone();
                let current = run.instances.len() as u32;
                for index in current..count {
                    let handle = self.spawn_instance(&config, &slot.logs, index);
                    run.instances.push(handle);
                }
                let keep = (count as usize).min(run.instances.len());
                run.instances.split_off(keep)
            };
            // Newest first, so the oldest, warmest instances keep serving longest.
            for instance in surplus.into_iter().rev() {
                instance.stop().await;
            }
        }
        self.settled(name).await
    }

    /// Applies `config`: starts added plugins, removes dropped ones, restarts changed ones one
    /// instance at a time and rescales those whose count alone changed.
    pub async fn reload(&self, current: &Config, config: Config) -> ReloadReport {
        let mut report = ReloadReport::default();
        if config.socket != current.socket
            || config.listen != current.listen
            || config.runtime_dir != current.runtime_dir
            || config.limits != current.limits
            || config.router_threads != current.router_threads
            || config.busy_poll != current.busy_poll
        {
            report.ignored.push(
                "[mesh] socket, listen, runtime_dir, router limits, router_threads and busy_poll \
                 apply at the next mesh up"
                    .into(),
            );
        }
        if config.admin != current.admin || config.metrics != current.metrics {
            report
                .ignored
                .push("[admin] and [telemetry] metrics apply at the next mesh up".into());
        }
        if config.cluster != current.cluster {
            report.ignored.push(
                "[mesh] node and advertise, and [registry], apply at the next mesh up".into(),
            );
        }
        // The spin window is read on every call: it applies at once.
        mesh::tuning::set_linger(config.spin);
        let names: Vec<String> = self.plugins().keys().cloned().collect();
        for name in names {
            if !config.plugins.iter().any(|p| p.name == name) {
                match self.remove(&name).await {
                    Ok(()) => report.removed.push(name),
                    Err(error) => report
                        .failed
                        .push(format!("{name}: cannot remove: {error}")),
                }
            }
        }
        for plugin in config.plugins {
            let name = plugin.name.clone();
            let Ok(slot) = self.slot(&name) else {
                if let Err(error) = self.add(plugin) {
                    report.failed.push(format!("{name}: cannot start: {error}"));
                    continue;
                }
                self.check_settled(&name, &mut report.failed).await;
                report.added.push(name);
                continue;
            };
            let old = slot.run().config.clone();
            // Capabilities, root and rate limits apply on the next call (the host's policies),
            // not by restart.
            let same_but_count = PluginConfig {
                instances: old.instances,
                capabilities: old.capabilities.clone(),
                root: old.root.clone(),
                rate_limit: old.rate_limit,
                caller_rate_limit: old.caller_rate_limit,
                ..plugin.clone()
            };
            if same_but_count != *old {
                let _op = slot.ops.lock().await;
                if let Err(error) = self
                    .check_sandbox(&plugin)
                    .and_then(|()| Ok(prepare_socket_dir(&plugin)?))
                {
                    // Its instances keep running with the settings they have.
                    report
                        .failed
                        .push(format!("{name}: not restarted: {error}"));
                    continue;
                }
                let count = plugin.instances;
                slot.run().config = Arc::new(plugin);
                self.roll(&slot).await;
                drop(_op);
                if count != old.instances
                    && let Err(error) = self.scale(&name, count).await
                {
                    report.failed.push(format!("{name}: cannot scale: {error}"));
                }
                self.check_settled(&name, &mut report.failed).await;
                report.restarted.push(name);
            } else if plugin.instances != old.instances {
                let count = plugin.instances;
                slot.run().config = Arc::new(plugin);
                match self.scale(&name, count).await {
                    Ok(_) => self.check_settled(&name, &mut report.failed).await,
                    Err(error) => report.failed.push(format!("{name}: cannot scale: {error}")),
                }
                report.scaled.push(name);
            }
        }
        report
    }

    /// Adds to `failed` each instance of `name` that did not come up (`name: echo-0 failed: …`).
    async fn check_settled(&self, name: &str, failed: &mut Vec<String>) {
        let Ok(status) = self.settled(name).await else {
            return;
        };
        for instance in &status.instances {
            if !matches!(instance.state, State::Ready { .. }) {
                failed.push(format!("{name}: {} {}", instance.id, instance.state));
            }
        }
    }

    /// Stops every instance of every plugin (deregister, SIGTERM, SIGKILL after the grace),
    /// all at once, and waits for them.
    pub async fn shutdown(&self) {
        let slots: Vec<Arc<Slot>> = std::mem::take(&mut *self.plugins()).into_values().collect();
        let instances = slots
            .iter()
            .flat_map(|slot| std::mem::take(&mut slot.run().instances))
            .collect();
        stop_all(instances).await;
    }
}

impl Slot {
    fn run(&self) -> MutexGuard<'_, Run> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status(&self) -> PluginStatus {
        let run = self.run();
        PluginStatus {
            config: run.config.clone(),
            desired: run.desired,
            instances: run
                .instances
                .iter()
                .map(|i| i.status.borrow().clone())
                .collect(),
        }
    }
}

/// An instance task that panicked: whatever it was doing, the instance is failed, never left
/// looking ready. Unwinding has deregistered it (its registration is a guard) and killed its
/// process (`kill_on_drop`); what that process started goes with its PID namespace, or its
/// process group where there is none.
fn ended_unexpectedly(status: &watch::Sender<InstanceStatus>, panic: &(dyn std::any::Any + Send)) {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    let reason = format!(
        "the supervisor's task for this instance panicked ({what}); stopped it and took it out \
         of routing; this is a bug in mesh, please report it; `mesh start` tries again"
    );
    tracing::error!("failed: {reason}");
    status.send_modify(|s| {
        if let Some(pid) = s.state.pid() {
            process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
        }
        s.state = State::Failed { reason };
        // No process is this instance's any more: nothing is identified as it.
        s.process = None;
    });
}

/// Completes when the instance's task has ended (its status sender is gone).
async fn finished(mut status: watch::Receiver<InstanceStatus>) {
    while status.changed().await.is_ok() {}
}

/// Stops instances all at once and waits for them.
async fn stop_all(instances: Vec<InstanceHandle>) {
    for instance in &instances {
        let _ = instance.stop.send(true);
    }
    for instance in instances {
        let _ = instance.task.await;
    }
}

/// The socket directory, private, owned by the plugin's user; stale sockets removed.
fn prepare_socket_dir(config: &PluginConfig) -> Result<(), mesh::runtime::SocketError> {
    let dir = &config.socket_dir;
    match &config.credentials {
        None => mesh::runtime::create_private_dir(dir)?,
        Some(credentials) => {
            // The plugin runs as another user: it must be able to pass through the runtime
            // directory (not list it) to reach its own, which it owns.
            if let Some(runtime_dir) = dir.parent() {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(runtime_dir, std::fs::Permissions::from_mode(0o711))
                    .map_err(|source| mesh::runtime::SocketError::Io {
                        path: runtime_dir.to_owned(),
                        source,
                    })?;
            }
            mesh::runtime::create_private_dir_for(dir, credentials.uid, credentials.gid)?;
        }
    }
    // Sockets a crashed manager left behind; the live ones of a running mesh are refused.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "sock") {
                let _ = mesh::runtime::remove_stale_socket(&path);
            }
        }
    }
    Ok(())
}

/// How long to wait for instances to settle: their readiness deadline, plus a few restarts.
fn settle_limit(config: &PluginConfig) -> Duration {
    config.ready_timeout + config.stop_grace + config.backoff.max.min(Duration::from_secs(10))
}
