//! The supervisor: runs every configured plugin's instances and keeps the registry in step.
//!
//! - [`process`]: starting a plugin process (environment, process group, parent-death signal)
//!   and stopping it (SIGTERM to the group, SIGKILL after the grace);
//! - [`instance`]: one instance's life as a task with an explicit [`State`];
//! - [`logs`]: captured stdout and stderr.

mod instance;
pub mod logs;
mod process;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

pub use instance::{InstanceStatus, State};
use logs::LogBook;
use mesh::registry::Registry;
use tokio::{sync::watch, task::JoinHandle};

use crate::config::PluginConfig;
use instance::Instance;
use process::Launch;

/// Runs plugins. Cheap to share behind an `Arc`.
pub struct Supervisor {
    registry: Registry,
    mesh_socket: PathBuf,
    plugins: Mutex<BTreeMap<String, PluginRun>>,
}

struct PluginRun {
    config: Arc<PluginConfig>,
    logs: Arc<LogBook>,
    instances: Vec<InstanceHandle>,
}

struct InstanceHandle {
    status: watch::Receiver<InstanceStatus>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A plugin's instances as they are now.
#[derive(Debug, Clone)]
pub struct PluginStatus {
    /// The plugin's settings.
    pub config: Arc<PluginConfig>,
    /// Its instances, in id order.
    pub instances: Vec<InstanceStatus>,
}

impl Supervisor {
    /// A supervisor registering ready instances in `registry`; plugins learn the router socket
    /// `mesh_socket` through `MESH_SOCKET`.
    pub fn new(registry: Registry, mesh_socket: PathBuf) -> Self {
        Self {
            registry,
            mesh_socket,
            plugins: Mutex::default(),
        }
    }

    fn plugins(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PluginRun>> {
        self.plugins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `config.instances` instances of a plugin; returns at once.
    pub fn start(&self, config: PluginConfig) -> Result<(), mesh::runtime::SocketError> {
        mesh::runtime::create_private_dir(&config.socket_dir)?;
        let config = Arc::new(config);
        let logs = Arc::new(LogBook::default());
        let instances = (0..config.instances)
            .map(|index| self.spawn_instance(&config, &logs, index))
            .collect();
        self.plugins().insert(
            config.name.clone(),
            PluginRun {
                config,
                logs,
                instances,
            },
        );
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
        });
        let (stop, stop_rx) = watch::channel(false);
        let instance = Instance {
            launch: Launch {
                plugin: config.clone(),
                id,
                mesh_socket: self.mesh_socket.clone(),
            },
            registry: self.registry.clone(),
            logs: logs.clone(),
            status,
            stop: stop_rx,
        };
        InstanceHandle {
            status: status_rx,
            stop,
            task: tokio::spawn(instance.run()),
        }
    }

    /// Waits until every instance of `name` is ready or has given up, and returns their states.
    pub async fn settled(&self, name: &str) -> Vec<InstanceStatus> {
        let receivers: Vec<_> = match self.plugins().get(name) {
            Some(run) => run.instances.iter().map(|i| i.status.clone()).collect(),
            None => return Vec::new(),
        };
        let mut statuses = Vec::with_capacity(receivers.len());
        for mut status in receivers {
            let settled = status
                .wait_for(|s| s.state.is_settled())
                .await
                .map(|s| s.clone());
            statuses.push(settled.unwrap_or_else(|_| status.borrow().clone()));
        }
        statuses
    }

    /// Every plugin and its instances now.
    pub fn status(&self) -> Vec<PluginStatus> {
        self.plugins()
            .values()
            .map(|run| PluginStatus {
                config: run.config.clone(),
                instances: run
                    .instances
                    .iter()
                    .map(|i| i.status.borrow().clone())
                    .collect(),
            })
            .collect()
    }

    /// The captured output of plugin `name`.
    pub fn logs(&self, name: &str) -> Option<Arc<LogBook>> {
        self.plugins().get(name).map(|run| run.logs.clone())
    }

    /// Stops every instance of every plugin (deregister, SIGTERM, SIGKILL after the grace), all
    /// at once, and waits for them.
    pub async fn shutdown(&self) {
        let runs: Vec<PluginRun> = std::mem::take(&mut *self.plugins()).into_values().collect();
        let tasks: Vec<JoinHandle<()>> = runs
            .into_iter()
            .flat_map(|run| run.instances)
            .map(|instance| {
                let _ = instance.stop.send(true);
                instance.task
            })
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }
}
