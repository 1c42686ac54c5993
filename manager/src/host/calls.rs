//! Plugin-to-plugin calls through the router under `call:` capabilities: the router's
//! [`CallPolicy`] hook, answered from the plugins' [`Policies`] (one atomic load per call, so
//! a grant or revoke applies to the next call) and recorded in the [`Audit`] log, one line per
//! decision with action `call` and resource `SERVICE/pkg.Svc/Method`.
//!
//! Not covered yet: a plugin dialing another plugin's socket itself, or `mesh::connect`'s
//! direct dial, never passes the router and is not checked here.

use std::sync::Arc;

use mesh_router::CallPolicy;

use super::{Audit, Policies, audit::Decision};

/// The check of calls plugins forward through the router.
pub struct CallGate {
    policies: Arc<Policies>,
    audit: Arc<Audit>,
}

impl CallGate {
    /// Checks calls against `policies`, recording each decision in `audit`.
    pub fn new(policies: Arc<Policies>, audit: Arc<Audit>) -> Self {
        Self { policies, audit }
    }
}

impl CallPolicy for CallGate {
    fn check(
        &self,
        plugin: &str,
        instance: &str,
        pid: u32,
        service: &str,
        method: &str,
    ) -> Result<(), String> {
        let decision = match self.policies.get(plugin) {
            Some(policy) => policy.check_call(service, method),
            None => Err(format!("plugin {plugin:?} has no capabilities configured")),
        };
        let method = method.strip_prefix('/').unwrap_or(method);
        let resource = format!("{service}/{method}");
        let (allowed, reason) = match &decision {
            Ok(reason) => (true, reason.as_str()),
            Err(reason) => (false, reason.as_str()),
        };
        self.audit.record(&Decision {
            time: Decision::now(),
            plugin,
            instance,
            pid,
            action: "call",
            resource: &resource,
            allowed,
            reason,
        });
        decision.map(drop)
    }
}
