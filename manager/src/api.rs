//! `mesh.v1.Manager`: the supervisor's control API, served on the router socket.

use std::{path::PathBuf, pin::Pin, sync::Arc, time::SystemTime};

use futures_util::{Stream, StreamExt, stream};
use mesh_proto::mesh::v1::{
    AuditLine, Capability as CapabilityInfo, CapabilityRequest, CapsResponse, InstanceInfo,
    ListPluginsRequest, ListPluginsResponse, LogLine, LogsRequest, Plugin, PluginRequest,
    ReadAuditRequest, ReloadRequest, ReloadResponse, ScaleRequest, manager_server,
};
use tokio::sync::{Mutex, broadcast::error::RecvError};
use tonic::{Request, Response, Status};

use crate::{
    Config, ConfigError,
    host::{
        Audit, Policies, Policy, RateLimits,
        caps::{CapsError, RELOAD},
    },
    supervisor::{PluginStatus, ReloadReport, Supervisor, SupervisorError, logs},
};

/// The manager API over a [`Supervisor`], and the config it reloads.
#[derive(Clone)]
pub struct ManagerService {
    supervisor: Arc<Supervisor>,
    config: Arc<Mutex<Config>>,
    policies: Arc<Policies>,
    rates: Arc<RateLimits>,
    audit: Arc<Audit>,
}

impl ManagerService {
    /// Serves `supervisor`, which runs `config`; grants and revokes change `policies`
    /// (configured here from `config`, as are the rate limits `rates`), and `audit` is the log
    /// `ReadAudit` reads.
    pub fn new(
        supervisor: Arc<Supervisor>,
        config: Config,
        policies: Arc<Policies>,
        rates: Arc<RateLimits>,
        audit: Arc<Audit>,
    ) -> Self {
        configure(&policies, &config);
        configure_rates(&rates, &config);
        Self {
            supervisor,
            config: Arc::new(Mutex::new(config)),
            policies,
            rates,
            audit,
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
        if current.telemetry.log_format_overridden {
            next.override_log_format(current.telemetry.log_format);
        }
        let report = self.supervisor.reload(&current, next.clone()).await;
        // Capabilities and roots from the new file, run-time grants and revokes kept.
        configure(&self.policies, &next);
        configure_rates(&self.rates, &next);
        *current = next;
        Ok(report)
    }
}

/// Every configured plugin's capabilities and root, into `policies`.
fn configure(policies: &Policies, config: &Config) {
    policies.configure(
        config
            .plugins
            .iter()
            .map(|p| (p.name.as_str(), p.root.clone(), &p.capabilities[..])),
    );
}

/// Every configured plugin's rate limits, into `rates`.
fn configure_rates(rates: &RateLimits, config: &Config) {
    rates.configure(config.plugins.iter().map(|p| {
        (
            p.name.as_str(),
            p.service.as_str(),
            p.rate_limit,
            p.caller_rate_limit,
        )
    }));
}

impl ManagerService {
    /// `caps` with what the kernel sandbox does for the plugin's processes.
    fn with_sandbox(&self, mut caps: CapsResponse) -> CapsResponse {
        use crate::config::SandboxMode;
        let mode = self
            .supervisor
            .get(&caps.name)
            .map(|s| s.config.sandbox.mode)
            .unwrap_or_default();
        let support = || self.supervisor.sandbox_support().describe();
        caps.sandbox = match mode {
            SandboxMode::Off => "off".into(),
            SandboxMode::Strict => format!("on: {}", support()),
            SandboxMode::BestEffort => format!("best-effort: {}", support()),
        };
        caps
    }
}

fn caps_response(policy: &Policy) -> CapsResponse {
    CapsResponse {
        name: policy.plugin.clone(),
        root: policy.root.display().to_string(),
        effective: policy
            .effective()
            .into_iter()
            .map(|(cap, source)| CapabilityInfo {
                capability: cap.to_string(),
                source: source.into(),
            })
            .collect(),
        revoked: policy.revoked.iter().map(|c| c.to_string()).collect(),
        reload: RELOAD.into(),
        // Filled in by `ManagerService::with_sandbox`.
        sandbox: String::new(),
    }
}

fn caps_status(error: CapsError) -> Status {
    match error {
        CapsError::Unknown(_) => Status::not_found(error.to_string()),
        CapsError::Invalid(_) => Status::invalid_argument(error.to_string()),
        CapsError::NotHeld { .. } => Status::failed_precondition(error.to_string()),
    }
}

type AuditStream = Pin<Box<dyn Stream<Item = Result<AuditLine, Status>> + Send>>;

fn status(error: SupervisorError) -> Status {
    match error {
        SupervisorError::Unknown(_) => Status::not_found(error.to_string()),
        SupervisorError::Range(_) => Status::invalid_argument(error.to_string()),
        SupervisorError::Socket(_) => Status::internal(error.to_string()),
        SupervisorError::Sandbox(_) => Status::failed_precondition(error.to_string()),
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

    async fn grant(
        &self,
        request: Request<CapabilityRequest>,
    ) -> Result<Response<CapsResponse>, Status> {
        let CapabilityRequest { name, capability } = request.into_inner();
        let policy = self
            .policies
            .grant(&name, &capability)
            .map_err(caps_status)?;
        tracing::info!(plugin = %name, %capability, "capability granted");
        Ok(Response::new(self.with_sandbox(caps_response(&policy))))
    }

    async fn revoke(
        &self,
        request: Request<CapabilityRequest>,
    ) -> Result<Response<CapsResponse>, Status> {
        let CapabilityRequest { name, capability } = request.into_inner();
        let policy = self
            .policies
            .revoke(&name, &capability)
            .map_err(caps_status)?;
        tracing::info!(plugin = %name, %capability, "capability revoked");
        Ok(Response::new(self.with_sandbox(caps_response(&policy))))
    }

    async fn caps(
        &self,
        request: Request<PluginRequest>,
    ) -> Result<Response<CapsResponse>, Status> {
        let name = request.into_inner().name;
        let policy = self
            .policies
            .get(&name)
            .ok_or_else(|| caps_status(CapsError::Unknown(name)))?;
        Ok(Response::new(self.with_sandbox(caps_response(&policy))))
    }

    type ReadAuditStream = AuditStream;

    async fn read_audit(
        &self,
        request: Request<ReadAuditRequest>,
    ) -> Result<Response<AuditStream>, Status> {
        let follow = request.into_inner().follow;
        // Subscribe first: a line written between the two is shown twice rather than lost.
        let updates = self.audit.subscribe();
        // The kept lines, read off the runtime's threads a line at a time (the files may hold
        // twice audit_max_size) and sent one per message: a line is at most
        // audit::MAX_LINE bytes, far under any client's message limit.
        let audit = self.audit.clone();
        let (send, kept) = tokio::sync::mpsc::channel(64);
        tokio::task::spawn_blocking(move || {
            for json in audit.kept() {
                // The reader went away: stop reading.
                if send.blocking_send(Ok(AuditLine { json })).is_err() {
                    return;
                }
            }
        });
        let first = tokio_stream::wrappers::ReceiverStream::new(kept);
        if !follow {
            return Ok(Response::new(Box::pin(first)));
        }
        let rest = stream::unfold(updates, |mut updates| async move {
            match updates.recv().await {
                Ok(json) => Some((Ok(AuditLine { json }), updates)),
                Err(RecvError::Lagged(n)) => {
                    let note = serde_json::json!({ "note": format!("{n} lines dropped: the reader was too slow") });
                    Some((
                        Ok(AuditLine {
                            json: note.to_string(),
                        }),
                        updates,
                    ))
                }
                Err(RecvError::Closed) => None,
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
