//! `mesh.v1.Manager`: the supervisor's control API, served on the router socket.

use std::{path::PathBuf, pin::Pin, sync::Arc, time::SystemTime};

use futures_util::{Stream, StreamExt, stream};
use mesh_proto::mesh::v1::{
    InstanceInfo, ListPluginsRequest, ListPluginsResponse, LogLine, LogsRequest, Plugin,
    PluginRequest, ReloadRequest, ReloadResponse, ScaleRequest, manager_server,
};
use tokio::sync::{Mutex, broadcast::error::RecvError};
use tonic::{Request, Response, Status};

use crate::{
    Config, ConfigError,
    supervisor::{PluginStatus, ReloadReport, Supervisor, SupervisorError, logs},
};

/// The manager API over a [`Supervisor`], and the config it reloads.
#[derive(Clone)]
pub struct ManagerService {
    supervisor: Arc<Supervisor>,
    config: Arc<Mutex<Config>>,
}

impl ManagerService {
    /// Serves `supervisor`, which runs `config`.
    pub fn new(supervisor: Arc<Supervisor>, config: Config) -> Self {
        Self {
            supervisor,
            config: Arc::new(Mutex::new(config)),
        }
    }

    /// The tonic service, for the router.
    pub fn into_server(self) -> manager_server::ManagerServer<Self> {
        manager_server::ManagerServer::new(self)
    }

    /// Re-reads the config file and applies the difference. An invalid file changes nothing.
    pub async fn reload(&self) -> Result<ReloadReport, ConfigError> {
        let mut current = self.config.lock().await;
        let _reloading = crate::systemd::Reloading::start();
        let path: PathBuf = current.path.clone();
        let mut next = Config::load(&path)?;
        if current.socket_overridden {
            next.override_socket(current.socket.clone())?;
        }
        let report = self.supervisor.reload(&current, next.clone()).await;
        *current = next;
        Ok(report)
    }
}

fn status(error: SupervisorError) -> Status {
    match error {
        SupervisorError::Unknown(_) => Status::not_found(error.to_string()),
        SupervisorError::Range(_) => Status::invalid_argument(error.to_string()),
        SupervisorError::Socket(_) => Status::internal(error.to_string()),
    }
}

fn plugin(status: &PluginStatus) -> Plugin {
    let now = SystemTime::now();
    Plugin {
        name: status.config.name.clone(),
        service: status.config.service.to_string(),
        desired: status.desired,
        instances: status
            .instances
            .iter()
            .map(|i| {
                let pid = i.state.pid().unwrap_or_default();
                let uptime = match (pid, i.started) {
                    (0, _) | (_, None) => 0,
                    (_, Some(started)) => {
                        now.duration_since(started).unwrap_or_default().as_millis() as u64
                    }
                };
                let detail = match &i.state {
                    crate::supervisor::State::Failed { reason } => reason.clone(),
                    crate::supervisor::State::Exited { exit } => exit.clone(),
                    crate::supervisor::State::Pending
                    | crate::supervisor::State::Stopped
                    | crate::supervisor::State::Starting { .. }
                    | crate::supervisor::State::Ready { .. }
                    | crate::supervisor::State::Stopping { .. } => String::new(),
                    other => other.to_string(),
                };
                InstanceInfo {
                    id: i.id.clone(),
                    state: i.state.name().into(),
                    pid,
                    uptime_ms: uptime,
                    restarts: i.restarts,
                    last_exit: i.last_exit.clone().unwrap_or_default(),
                    detail,
                }
            })
            .collect(),
    }
}

fn log_line(line: &logs::LogLine) -> LogLine {
    LogLine {
        unix_ms: line
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64,
        instance: line.instance.clone(),
        stream: line.stream.as_str().into(),
        text: line.text.clone(),
    }
}

type LogStream = Pin<Box<dyn Stream<Item = Result<LogLine, Status>> + Send>>;

#[tonic::async_trait]
impl manager_server::Manager for ManagerService {
    async fn list(
        &self,
        _: Request<ListPluginsRequest>,
    ) -> Result<Response<ListPluginsResponse>, Status> {
        let plugins = self.supervisor.status().iter().map(plugin).collect();
        Ok(Response::new(ListPluginsResponse { plugins }))
    }

    async fn get(&self, request: Request<PluginRequest>) -> Result<Response<Plugin>, Status> {
        let name = request.into_inner().name;
        let status = self.supervisor.get(&name).map_err(status)?;
        Ok(Response::new(plugin(&status)))
    }

    async fn start(&self, request: Request<PluginRequest>) -> Result<Response<Plugin>, Status> {
        let name = request.into_inner().name;
        let status = self.supervisor.start(&name).await.map_err(status)?;
        Ok(Response::new(plugin(&status)))
    }

    async fn stop(&self, request: Request<PluginRequest>) -> Result<Response<Plugin>, Status> {
        let name = request.into_inner().name;
        let status = self.supervisor.stop(&name).await.map_err(status)?;
        Ok(Response::new(plugin(&status)))
    }

    async fn restart(&self, request: Request<PluginRequest>) -> Result<Response<Plugin>, Status> {
        let name = request.into_inner().name;
        let status = self.supervisor.restart(&name).await.map_err(status)?;
        Ok(Response::new(plugin(&status)))
    }

    async fn scale(&self, request: Request<ScaleRequest>) -> Result<Response<Plugin>, Status> {
        let ScaleRequest { name, instances } = request.into_inner();
        let status = self
            .supervisor
            .scale(&name, instances)
            .await
            .map_err(status)?;
        Ok(Response::new(plugin(&status)))
    }

    type LogsStream = LogStream;

    async fn logs(&self, request: Request<LogsRequest>) -> Result<Response<LogStream>, Status> {
        let LogsRequest { name, follow, tail } = request.into_inner();
        let book = self.supervisor.logs(&name).map_err(status)?;
        // Subscribe before reading the kept lines; sequence numbers drop the overlap.
        let updates = book.subscribe();
        let mut kept = book.lines();
        if tail > 0 && kept.len() > tail as usize {
            kept.drain(..kept.len() - tail as usize);
        }
        let seen = kept.last().map_or(0, |l| l.seq + 1);
        let first = stream::iter(kept.iter().map(log_line).map(Ok).collect::<Vec<_>>());
        if !follow {
            return Ok(Response::new(Box::pin(first)));
        }
        let rest = stream::unfold((updates, seen), |(mut updates, mut seen)| async move {
            loop {
                match updates.recv().await {
                    Ok(line) if line.seq < seen => continue,
                    Ok(line) => {
                        seen = line.seq + 1;
                        return Some((Ok(log_line(&line)), (updates, seen)));
                    }
                    Err(RecvError::Lagged(n)) => {
                        let note = LogLine {
                            unix_ms: 0,
                            instance: String::new(),
                            stream: "mesh".into(),
                            text: format!("({n} lines dropped: the reader was too slow)"),
                        };
                        return Some((Ok(note), (updates, seen)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(Box::pin(first.chain(rest))))
    }

    async fn reload(&self, _: Request<ReloadRequest>) -> Result<Response<ReloadResponse>, Status> {
        let report = ManagerService::reload(self).await.map_err(|e| {
            Status::failed_precondition(format!("reload refused, nothing changed: {e}"))
        })?;
        Ok(Response::new(ReloadResponse {
            added: report.added,
            removed: report.removed,
            restarted: report.restarted,
            scaled: report.scaled,
            ignored: report.ignored,
            failed: report.failed,
        }))
    }
}
