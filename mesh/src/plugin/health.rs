//! The plugin's own say over its health: what `grpc.health.v1.Health/Check` answers, for the
//! whole plugin (`""`, what the manager checks) and per service.

use std::sync::Arc;

use tokio::sync::Mutex;
use tonic_health::{ServingStatus, server::HealthReporter};

/// A handle on what the plugin's health service reports; cheap to clone, usable from any task.
///
/// The whole plugin (`service = ""`) is what the manager checks: `NOT_SERVING` takes the
/// instance out of routing, and `health_failures` checks in a row restart it; `SERVING` puts
/// it back. A single service's status is for clients that check that service; the manager does
/// not look at it.
///
/// Changes made before [`Plugin::serve`](super::Plugin::serve) starts are kept and applied, in
/// order, once it serves (everything else starts `SERVING`).
///
/// ```no_run
/// # async fn run(plugin: mesh::plugin::Plugin) {
/// let health = plugin.health();
/// tokio::spawn(async move {
///     // The database went away: stop taking calls until it is back.
///     health.set_not_serving().await;
/// });
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Health {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
enum State {
    /// Not serving yet: the changes asked for so far, oldest first.
    Pending(Vec<(Target, ServingStatus)>),
    /// Health is served: changes go to the reporter.
    Serving {
        reporter: HealthReporter,
        services: Vec<&'static str>,
    },
}

/// What a change applies to.
#[derive(Debug)]
enum Target {
    /// The whole plugin and each of its services.
    All,
    /// One service by its full name (`echo.v1.Echo`).
    Service(String),
}

impl Health {
    pub(super) fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(State::Pending(Vec::new()))),
        }
    }

    /// Reports the whole plugin and each of its services `SERVING`.
    pub async fn set_serving(&self) {
        self.set(Target::All, ServingStatus::Serving).await;
    }

    /// Reports the whole plugin and each of its services `NOT_SERVING` (what SIGUSR1 does).
    pub async fn set_not_serving(&self) {
        self.set(Target::All, ServingStatus::NotServing).await;
    }

    /// Reports one service (its full name, `echo.v1.Echo`) `SERVING`.
    pub async fn set_service_serving(&self, service: &str) {
        self.set(Target::Service(service.into()), ServingStatus::Serving)
            .await;
    }

    /// Reports one service (its full name, `echo.v1.Echo`) `NOT_SERVING`; the plugin as a whole
    /// keeps its status.
    pub async fn set_service_not_serving(&self, service: &str) {
        self.set(Target::Service(service.into()), ServingStatus::NotServing)
            .await;
    }

    async fn set(&self, target: Target, status: ServingStatus) {
        let mut state = self.state.lock().await;
        match &mut *state {
            State::Pending(changes) => changes.push((target, status)),
            State::Serving { reporter, services } => {
                apply(reporter, services, &target, status).await;
            }
        }
    }

    /// Reports through `reporter` from now on (which reports `services` `SERVING`), after the
    /// changes asked for before.
    pub(super) async fn start(&self, reporter: HealthReporter, services: Vec<&'static str>) {
        let mut state = self.state.lock().await;
        if let State::Pending(changes) = &mut *state {
            for (target, status) in changes.drain(..) {
                apply(&reporter, &services, &target, status).await;
            }
        }
        *state = State::Serving { reporter, services };
    }
}

async fn apply(
    reporter: &HealthReporter,
    services: &[&'static str],
    target: &Target,
    status: ServingStatus,
) {
    match target {
        Target::All => {
            for service in services.iter().copied().chain([""]) {
                reporter.set_service_status(service, status).await;
            }
        }
        Target::Service(service) => reporter.set_service_status(service, status).await,
    }
}
