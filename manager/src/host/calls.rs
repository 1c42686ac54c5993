//! Calls to plugins under policy, on both paths a call can take: forwarded by the router (the
//! router's [`CallPolicy`] hook) and on the target plugin's own socket (the SDK asks the
//! manager over its private channel, [`super::direct`]). Both are decided here, in
//! [`CallGate::decide`]:
//!
//! - a plugin caller needs `call:SERVICE` or `call:SERVICE/pkg.Svc/Method`, read from its
//!   [`Policies`] (one atomic load per call, so a grant or revoke applies to the next call);
//! - every caller is held to the target's [`RateLimits`];
//! - a plugin caller's decision is one line in the [`Audit`] log (action `call`, resource
//!   `SERVICE/pkg.Svc/Method`, `via` `router` or `direct`). Refusals by rate limit are logged
//!   at most once a second per caller and target, the next line counting those not logged:
//!   a flood must not rotate away the log's other lines (the file is bounded anyway).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mesh_router::{CallPolicy, Caller, Refusal};

use super::{Audit, Policies, RateLimits, audit::Decision};

/// How often a refusal by rate limit of one caller to one target is written to the audit log.
const EXHAUSTED_LOG_EVERY: Duration = Duration::from_secs(1);

/// The check of calls to plugins, on the router path and the direct path.
pub struct CallGate {
    policies: Arc<Policies>,
    rates: Arc<RateLimits>,
    audit: Arc<Audit>,
    /// (caller plugin, target service) → when a refusal by rate limit was last logged, and
    /// how many were not logged since. Bounded: callers are configured plugins, targets
    /// configured services with limits.
    exhausted: Mutex<HashMap<(Arc<str>, String), Logged>>,
}

/// When a refusal by rate limit was last logged, and how many were not logged since.
type Logged = (Instant, u64);

/// How a caller is known to rate limits: a plugin by its name, a local process by its uid, a
/// TCP client by its certificate's identity under mTLS, else by its address (not its port: a
/// client opening many connections is one caller).
pub fn caller_key(caller: &Caller) -> String {
    match caller {
        Caller::Plugin { plugin, .. } => format!("plugin {plugin:?}"),
        Caller::Owner { uid, .. } | Caller::Local { uid, .. } => format!("uid {uid}"),
        Caller::Remote {
            identity: Some(identity),
            ..
        } => format!("TCP client {identity}"),
        Caller::Remote { addr, .. } => format!("TCP client {}", addr.ip()),
    }
}

impl CallGate {
    /// Checks calls against `policies` and `rates`, recording plugins' decisions in `audit`.
    pub fn new(policies: Arc<Policies>, rates: Arc<RateLimits>, audit: Arc<Audit>) -> Self {
        Self {
            policies,
            rates,
            audit,
            exhausted: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `caller` may call `method` (`/pkg.Svc/Method`) on `service` (`plugin.echo`),
    /// arriving `via` `router` or `direct`: the one place such a call is decided.
    pub fn decide(
        &self,
        caller: &Caller,
        service: &str,
        method: &str,
        via: &'static str,
    ) -> Result<(), Refusal> {
        let Caller::Plugin {
            plugin,
            instance,
            pid,
            ..
        } = caller
        else {
            return self
                .rates
                .check_with(service, || caller_key(caller))
                .map_err(Refusal::Exhausted);
        };
        let decision = match self.policies.get(plugin) {
            Some(policy) => policy.check_call(service, method).map_err(Refusal::Denied),
            None => Err(Refusal::Denied(format!(
                "plugin {plugin:?} has no capabilities configured"
            ))),
        };
        let decision = decision.and_then(|allowed| {
            self.rates
                .check_with(service, || caller_key(caller))
                .map(|()| allowed)
                .map_err(Refusal::Exhausted)
        });
        let suppressed = match &decision {
            Err(Refusal::Exhausted(_)) => match self.log_exhausted(plugin, service) {
                Some(suppressed) => suppressed,
                None => return decision.map(drop),
            },
            _ => 0,
        };
        let method = method.strip_prefix('/').unwrap_or(method);
        let resource = format!("{service}/{method}");
        let (allowed, reason) = match &decision {
            Ok(reason) => (true, reason.clone()),
            Err(Refusal::Denied(reason)) => (false, reason.clone()),
            Err(Refusal::Exhausted(reason)) if suppressed > 0 => (
                false,
                format!("{reason} ({suppressed} more refused by this limit since the last line)"),
            ),
            Err(Refusal::Exhausted(reason)) => (false, reason.clone()),
        };
        self.audit.record(&Decision {
            time: Decision::now(),
            plugin,
            instance,
            pid: *pid,
            action: "call",
            resource: &resource,
            allowed,
            reason: &reason,
            via: Some(via),
        });
        decision.map(drop)
    }

    /// Whether to log this refusal by rate limit: `Some(refusals not logged since the last
    /// line)`, or `None` to count it and log nothing.
    fn log_exhausted(&self, plugin: &Arc<str>, service: &str) -> Option<u64> {
        let mut logged = self.exhausted.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match logged.get_mut(&(plugin.clone(), service.to_owned())) {
            Some((last, count)) if now.duration_since(*last) < EXHAUSTED_LOG_EVERY => {
                *count += 1;
                None
            }
            Some((last, count)) => {
                *last = now;
                Some(std::mem::take(count))
            }
            None => {
                logged.insert((plugin.clone(), service.to_owned()), (now, 0));
                Some(0)
            }
        }
    }
}

impl CallPolicy for CallGate {
    fn check(&self, caller: &Caller, service: &str, method: &str) -> Result<(), Refusal> {
        self.decide(caller, service, method, "router")
    }
}
