//! One instance's life: start, wait for SERVING, register, watch, stop or restart.
//!
//! The instance is a task that owns its process; the supervisor holds a handle (its status and
//! a stop switch). Its state is one [`State`] value, and every change is logged with its id.

use std::{
    collections::VecDeque,
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use mesh::{Address, Channel};
use mesh_router::registry::Registry;
use tokio::{process::Child, sync::watch, time::Instant};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{
    logs::{LogBook, Stream},
    process::{self, Launch},
};
use crate::config::RestartPolicy;

/// Stderr lines quoted in an error about an instance.
const QUOTED_LINES: usize = 5;
/// A single health check gets no longer than this.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Where an instance is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Not started yet.
    Pending,
    /// Started, not yet SERVING.
    Starting {
        /// Process id.
        pid: u32,
    },
    /// SERVING and registered.
    Ready {
        /// Process id.
        pid: u32,
    },
    /// Failing health checks: out of the registry until it is SERVING again.
    Unhealthy {
        /// Process id.
        pid: u32,
        /// Consecutive failed checks.
        failures: u32,
    },
    /// Asked to stop: deregistered, draining.
    Stopping {
        /// Process id.
        pid: u32,
    },
    /// Ended and will not be restarted (policy).
    Exited {
        /// How it ended (`exited with status 0`).
        exit: String,
    },
    /// Ended; restarts when the delay is over.
    Backoff {
        /// When it restarts.
        until: SystemTime,
        /// The whole delay.
        delay: Duration,
    },
    /// Given up on.
    Failed {
        /// Why, with the last lines of its stderr.
        reason: String,
    },
    /// Stopped on request.
    Stopped,
}

impl State {
    /// The state's name as `mesh status` shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Starting { .. } => "starting",
            Self::Ready { .. } => "ready",
            Self::Unhealthy { .. } => "unhealthy",
            Self::Stopping { .. } => "stopping",
            Self::Exited { .. } => "exited",
            Self::Backoff { .. } => "backoff",
            Self::Failed { .. } => "failed",
            Self::Stopped => "stopped",
        }
    }

    /// The process id, while there is a process.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::Starting { pid }
            | Self::Ready { pid }
            | Self::Unhealthy { pid, .. }
            | Self::Stopping { pid } => Some(*pid),
            _ => None,
        }
    }

    /// Whether the instance is done changing on its own (ready, or will not start again).
    pub fn is_settled(&self) -> bool {
        matches!(
            self,
            Self::Ready { .. } | Self::Exited { .. } | Self::Failed { .. } | Self::Stopped
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Starting { pid } | Self::Ready { pid } | Self::Stopping { pid } => {
                write!(f, "{} (pid {pid})", self.name())
            }
            Self::Unhealthy { pid, failures } => {
                write!(
                    f,
                    "unhealthy (pid {pid}): {failures} failed health check(s), out of routing"
                )
            }
            Self::Exited { exit } => write!(f, "exited: {exit}"),
            Self::Backoff { delay, .. } => {
                write!(f, "backoff: restarting in {} ms", delay.as_millis())
            }
            Self::Failed { reason } => write!(f, "failed: {reason}"),
            Self::Pending | Self::Stopped => f.write_str(self.name()),
        }
    }
}

/// An instance's state and history, as the supervisor publishes it.
#[derive(Debug, Clone)]
pub struct InstanceStatus {
    /// Instance id (`echo-0`).
    pub id: String,
    /// Where it is now.
    pub state: State,
    /// When the current process started.
    pub started: Option<SystemTime>,
    /// How many times it was started again.
    pub restarts: u32,
    /// How its last process ended.
    pub last_exit: Option<String>,
    /// The process the supervisor started for it now, which it and everything it starts
    /// descend from (in a PID namespace: the namespace's host side), with its start time.
    pub process: Option<super::identify::Process>,
}

/// The task behind one instance.
pub(crate) struct Instance {
    pub(crate) launch: Launch,
    pub(crate) registry: Registry,
    pub(crate) logs: Arc<LogBook>,
    pub(crate) status: watch::Sender<InstanceStatus>,
    pub(crate) stop: watch::Receiver<bool>,
}

/// How one run of the process ended.
struct Ended {
    /// Whether it counts as a failure for the restart policy and crash-loop detection.
    failure: bool,
    /// What happened, for the log and `Failed`.
    reason: String,
    /// The last lines it wrote to stderr (`last stderr: …`), for a failure.
    stderr: Option<String>,
}

impl Ended {
    /// The reason with what it wrote to stderr.
    fn full(&self) -> String {
        match &self.stderr {
            Some(stderr) => format!("{}; {stderr}", self.reason),
            None => self.reason.clone(),
        }
    }
}

impl Instance {
    pub(crate) async fn run(mut self) {
        let backoff = self.launch.plugin.backoff;
        let mut attempt: u32 = 0;
        let mut failures: VecDeque<Instant> = VecDeque::new();
        loop {
            let Some(ended) = self.run_once(&mut attempt).await else {
                self.set(State::Stopped);
                return;
            };
            let restart = match self.launch.plugin.restart {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => ended.failure,
                RestartPolicy::Never => false,
            };
            if !restart {
                if ended.failure {
                    self.set(State::Failed {
                        reason: ended.full(),
                    });
                } else {
                    self.set(State::Exited { exit: ended.reason });
                }
                return;
            }
            if ended.failure {
                let now = Instant::now();
                failures.push_back(now);
                while failures
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > backoff.window)
                {
                    failures.pop_front();
                }
                if failures.len() >= backoff.max_failures as usize {
                    // LAST EXIT says how the last run ended: say it here only if it says more.
                    let last_exit = self.status.borrow().last_exit.clone();
                    let mut reason = format!(
                        "{} failures within {:?}, giving up",
                        failures.len(),
                        backoff.window
                    );
                    if last_exit.as_deref() != Some(ended.reason.as_str()) {
                        reason = format!("{reason}; last: {}", ended.reason);
                    }
                    if let Some(stderr) = &ended.stderr {
                        reason = format!("{reason}; {stderr}");
                    }
                    self.set(State::Failed { reason });
                    return;
                }
            }
            let delay = delay(backoff.base, backoff.max, attempt);
            attempt = attempt.saturating_add(1);
            self.set(State::Backoff {
                until: SystemTime::now() + delay,
                delay,
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stopped(self.stop.clone()) => {
                    self.set(State::Stopped);
                    return;
                }
            }
            self.status.send_modify(|s| s.restarts += 1);
        }
    }

    /// Starts the process once and follows it until it ends; `None` if stopped on request.
    async fn run_once(&mut self, attempt: &mut u32) -> Option<Ended> {
        if *self.stop.borrow() {
            return None;
        }
        let spawned =
            process::endpoint(&self.launch.plugin, &self.launch.id).and_then(|endpoint| {
                process::spawn(&self.launch, &endpoint, &self.logs).map(|s| (endpoint, s))
            });
        let (endpoint, (mut child, capture)) = match spawned {
            Ok(spawned) => spawned,
            Err(error) => {
                return Some(Ended {
                    failure: true,
                    reason: format!(
                        "cannot start {}: {error}",
                        self.launch.plugin.command.display()
                    ),
                    stderr: None,
                });
            }
        };
        // The process group's id: the process started (in a PID namespace, its host side).
        let group = child.id().unwrap_or_default();
        let mut pid = group;
        // Read before anything can reap it: the pid is ours until we wait for it.
        let process = super::identify::Process::of(group);
        self.status.send_modify(|s| {
            s.started = Some(SystemTime::now());
            s.process = process;
        });
        self.set(State::Starting { pid });

        let ready = tokio::select! {
            ready = self.wait_ready(&mut child, &endpoint) => ready,
            _ = stopped(self.stop.clone()) => {
                self.stop_child(&mut child, pid).await;
                return None;
            }
        };
        if let Err(reason) = ready {
            // Timed out, or exited: make sure it is gone, and quote what it said.
            process::stop(&mut child, self.launch.plugin.stop_grace)
                .await
                .ok();
            capture.finish(Duration::from_millis(500)).await;
            self.status
                .send_modify(|s| s.last_exit = Some(reason.clone()));
            let ended = Ended {
                failure: true,
                reason,
                stderr: Some(self.stderr_quote()),
            };
            tracing::error!("{}", ended.full());
            return Some(ended);
        }

        // From here on, the plugin's own pid (registered as the `pid` label, shown by status).
        pid = self.launch.plugin_pid(group);
        self.status
            .send_modify(|s| s.state = State::Starting { pid });
        // A guard: whatever ends this function, a panic included, takes the entry out.
        let mut lease = Registration::new(self.registry.clone(), self.register(&endpoint));
        let ready_at = Instant::now();
        self.set(State::Ready { pid });
        let mut health = health_client(&endpoint);
        let mut tick = tokio::time::interval(self.launch.plugin.health_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        let mut failures = 0;
        let exit = loop {
            tokio::select! {
                exit = child.wait() => break exit,
                _ = stopped(self.stop.clone()) => {
                    if let Some(lease) = lease.take() {
                        self.registry.deregister(lease);
                    }
                    self.stop_child(&mut child, pid).await;
                    return None;
                }
                _ = tick.tick() => {
                    if check(&mut health).await == Some(ServingStatus::Serving) {
                        if failures > 0 {
                            failures = 0;
                            lease.set(self.register(&endpoint));
                            self.set(State::Ready { pid });
                        } else if !lease.holds() {
                            // Ready but not routable (removed, or never registered): put it
                            // back, so the registry matches `mesh status` within one interval.
                            tracing::warn!("ready but missing from the registry; registering it again");
                            lease.set(self.register(&endpoint));
                        }
                        continue;
                    }
                    failures += 1;
                    // Out of routing at the first failure; restarted after several.
                    if let Some(lease) = lease.take() {
                        self.registry.deregister(lease);
                    }
                    self.set(State::Unhealthy { pid, failures });
                    if failures >= self.launch.plugin.health_failures {
                        self.stop_child(&mut child, pid).await;
                        capture.finish(Duration::from_millis(500)).await;
                        let reason = format!("instance {} failed {failures} health checks in a row", self.launch.id);
                        tracing::warn!("{reason}");
                        return Some(Ended { failure: true, reason, stderr: None });
                    }
                }
            }
        };
        if let Some(lease) = lease.take() {
            self.registry.deregister(lease);
        }
        process::signal_group(group, nix::sys::signal::Signal::SIGKILL);
        process::remove_socket(&self.launch.plugin.socket(&self.launch.id));
        if ready_at.elapsed() >= self.launch.plugin.backoff.reset_after {
            *attempt = 0;
        }
        capture.finish(Duration::from_millis(500)).await;
        let (failure, exit) = match &exit {
            Ok(status) => (!status.success(), process::describe(status)),
            Err(error) => (true, format!("could not be waited for: {error}")),
        };
        self.status
            .send_modify(|s| s.last_exit = Some(exit.clone()));
        let ended = Ended {
            failure,
            reason: if failure {
                format!("instance {} {exit}", self.launch.id)
            } else {
                exit
            },
            stderr: failure.then(|| self.stderr_quote()),
        };
        if failure {
            tracing::warn!("{}", ended.full());
        }
        Some(ended)
    }

    /// Polls health until SERVING; fails when the process exits or the deadline passes.
    async fn wait_ready(&self, child: &mut Child, endpoint: &Address) -> Result<(), String> {
        let plugin = &self.launch.plugin;
        let id = &self.launch.id;
        let mut health = health_client(endpoint);
        let probe = async {
            let mut pause = Duration::from_millis(2);
            loop {
                if check(&mut health).await == Some(ServingStatus::Serving) {
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        };
        tokio::select! {
            () = probe => Ok(()),
            exit = child.wait() => Err(match exit {
                Ok(status) => format!("instance {id} {} before it was ready", process::describe(&status)),
                Err(error) => format!("instance {id} could not be waited for: {error}"),
            }),
            () = tokio::time::sleep(plugin.ready_timeout) => Err(format!(
                "instance {id} did not report SERVING on {endpoint} within {:?} (ready_timeout)",
                plugin.ready_timeout
            )),
        }
    }

    fn register(&self, endpoint: &Address) -> Option<mesh_router::registry::LeaseId> {
        let plugin = &self.launch.plugin;
        let instance = mesh_router::registry::Instance {
            service: plugin.service.to_string(),
            id: self.launch.id.clone(),
            endpoint: endpoint.to_string(),
            labels: [(
                "pid".to_owned(),
                self.status
                    .borrow()
                    .state
                    .pid()
                    .unwrap_or_default()
                    .to_string(),
            )]
            .into_iter()
            // The router and mesh::connect retry calls to these methods on another instance.
            .chain((!plugin.idempotent.is_empty()).then(|| {
                (
                    mesh::labels::IDEMPOTENT.to_owned(),
                    mesh::labels::idempotent(plugin.idempotent.iter().map(String::as_str)),
                )
            }))
            .collect(),
        };
        match self.registry.register(instance, None) {
            Ok(lease) => Some(lease.id),
            Err(error) => {
                tracing::error!(instance = %self.launch.id, %error, "cannot register");
                None
            }
        }
    }

    /// Stops the process; the caller has taken it out of the registry already.
    async fn stop_child(&self, child: &mut Child, pid: u32) {
        self.set(State::Stopping { pid });
        // Let clients that resolved the instance just before it left the registry learn that
        // it left, before it refuses new calls.
        tokio::time::sleep(self.launch.plugin.drain_delay).await;
        match process::stop(child, self.launch.plugin.stop_grace).await {
            Ok(status) => {
                let exit = process::describe(&status);
                self.status.send_modify(|s| s.last_exit = Some(exit));
            }
            Err(error) => tracing::warn!(instance = %self.launch.id, %error, "stopping failed"),
        }
        process::remove_socket(&self.launch.plugin.socket(&self.launch.id));
    }

    /// `last stderr: a (×5) | b`: the last lines it wrote, a line repeated in a row said once.
    fn stderr_quote(&self) -> String {
        let tail = self
            .logs
            .tail(&self.launch.id, Stream::Stderr, QUOTED_LINES);
        if tail.is_empty() {
            "it wrote nothing to stderr".into()
        } else {
            format!("last stderr: {}", quote(&tail))
        }
    }

    /// Moves to `state` and logs it once (the span names the instance), as an error if it
    /// is a failure.
    fn set(&self, state: State) {
        if matches!(state, State::Failed { .. }) {
            tracing::error!("{state}");
        } else {
            tracing::info!("{state}");
        }
        self.status.send_modify(|s| {
            if state.pid().is_none() {
                s.process = None;
            }
            s.state = state
        });
    }
}

/// Lines joined with ` | `, a line repeated in a row said once with its count: `a (×5) | b`.
fn quote(lines: &[String]) -> String {
    let mut runs: Vec<(&str, usize)> = Vec::new();
    for line in lines {
        match runs.last_mut() {
            Some((last, count)) if *last == line.as_str() => *count += 1,
            _ => runs.push((line, 1)),
        }
    }
    runs.iter()
        .map(|(line, count)| match count {
            1 => (*line).to_owned(),
            n => format!("{line} (×{n})"),
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// A registered instance's lease: deregistered when dropped, so that an instance task that ends
/// in any way, a panic included, never leaves its entry behind.
struct Registration {
    registry: Registry,
    lease: Option<mesh_router::registry::LeaseId>,
}

impl Registration {
    fn new(registry: Registry, lease: Option<mesh_router::registry::LeaseId>) -> Self {
        Self { registry, lease }
    }

    fn take(&mut self) -> Option<mesh_router::registry::LeaseId> {
        self.lease.take()
    }

    /// Whether the registry still holds this lease (nobody removed the entry).
    fn holds(&self) -> bool {
        self.lease.is_some_and(|lease| self.registry.holds(lease))
    }

    fn set(&mut self, lease: Option<mesh_router::registry::LeaseId>) {
        if let Some(old) = std::mem::replace(&mut self.lease, lease) {
            self.registry.deregister(old);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.registry.deregister(lease);
        }
    }
}

fn health_client(endpoint: &Address) -> HealthClient<Channel> {
    HealthClient::new(Channel::to_server(endpoint.clone()))
}

/// Completes once a stop is asked for (at once if it already was).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// One health check of the whole server (`service = ""`); `None` if it did not answer.
pub(crate) async fn check(health: &mut HealthClient<Channel>) -> Option<ServingStatus> {
    let call = health.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(CHECK_TIMEOUT, call).await {
        Ok(Ok(response)) => Some(response.into_inner().status()),
        _ => None,
    }
}

/// Exponential backoff with "equal jitter": half the delay fixed, half random, so restarts of
/// many instances spread out while the delay still grows.
fn delay(base: Duration, max: Duration, attempt: u32) -> Duration {
    mesh::backoff::Backoff::new(base, max, mesh::backoff::Jitter::Equal).delay(attempt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_stderr_lines_are_quoted_once_with_their_count() {
        let lines = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(quote(&lines(&["a", "a", "a", "a", "a"])), "a (×5)");
        assert_eq!(quote(&lines(&["a", "a", "b", "a"])), "a (×2) | b | a");
        assert_eq!(quote(&lines(&["x"])), "x");
    }

    #[test]
    fn backoff_grows_within_jitter_and_stops_at_the_ceiling() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempt in 0..10 {
            let ceiling = (base * 2u32.pow(attempt)).min(max);
            for _ in 0..50 {
                let d = delay(base, max, attempt);
                assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
            }
        }
        assert!(delay(base, max, 1000) <= max);
    }
}
