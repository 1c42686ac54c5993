//! Calls to plugins under policy, on both paths a call can take: forwarded by the router (the
//! router's [`CallPolicy`] hook) and on the target plugin's own socket (the SDK asks the
//! manager over its private channel, [`super::direct`]). Both are decided here, in
//! [`CallGate::decide`]:
//!
//! - a plugin caller needs `call:SERVICE` or `call:SERVICE/pkg.Svc/Method`, read from its
//!   [`Policies`] (one atomic load per call, so a grant or revoke applies to the next call);
//! - every caller is held to the target's [`RateLimits`];
//! - a plugin caller's decision is one line in the [`Audit`] log (action `call`, resource
//!   `SERVICE/pkg.Svc/Method`, `via` `router` or `direct`, a direct one with the target
//!   instance that `reported_by` it: see [`Via`]). Refusals by rate limit are logged at most
//!   once a second per caller and target, the next line counting those not logged: a flood
//!   must not rotate away the log's other lines (the audit log throttles every plugin's
//!   denials as well, and bounds each line).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mesh_router::{CallPolicy, Caller, Refusal};

use super::{
    Audit, Policies, RateLimits,
    audit::{Decision, Via},
};

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
    /// arriving `via` the router or directly (reported by the target instance): the one
    /// place such a call is decided.
    pub fn decide(
        &self,
        caller: &Caller,
        service: &str,
        method: &str,
        via: Via<'_>,
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
        // The audit log cuts it to its share of the line.
        let resource = format!("{service}/{method}");
        let counted;
        let (allowed, reason) = match &decision {
            Ok(reason) => (true, reason.as_str()),
            Err(Refusal::Denied(reason)) => (false, reason.as_str()),
            Err(Refusal::Exhausted(reason)) if suppressed > 0 => {
                counted = format!(
                    "{reason} ({suppressed} more refused by this limit since the last line)"
                );
                (false, counted.as_str())
            }
            Err(Refusal::Exhausted(reason)) => (false, reason.as_str()),
        };
        self.audit.record(&Decision {
            time: Decision::now(),
            plugin,
            instance,
            pid: *pid,
            action: "call",
            resource: &resource,
            allowed,
            reason,
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
        self.decide(caller, service, method, Via::Router)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::host::{Capability, cost::per_call};

    /// A plugin caller, as the router names it at accept time.
    fn plugin(name: &str) -> Caller {
        Caller::Plugin {
            plugin: name.into(),
            instance: format!("{name}-0").into(),
            pid: 4242,
            uid: 1000,
        }
    }

    /// Ten capabilities of the kinds a plugin declares; the one that allows `plugin.echo`'s
    /// Echo is the last, and names the method (so both lookups, by service and by method, run).
    const CAPS: [&str; 10] = [
        "read:data/**",
        "write:out/*.txt",
        "env:HOME",
        "env:LANG",
        "call:plugin.a",
        "call:plugin.b",
        "call:plugin.c/c.v1.C/Get",
        "call:plugin.d",
        "call:plugin.e/e.v1.E/Put",
        "call:plugin.echo/echo.v1.Echo/Echo",
    ];

    const ECHO: &str = "/echo.v1.Echo/Echo";
    /// On echo's own socket, as its instance `echo-0` reported it.
    const DIRECT: Via<'static> = Via::Direct {
        reported_by: "echo-0",
    };
    /// A rate no loop here reaches: checked every call, never refused.
    const UNREACHED: &str = "1000000000/s";

    /// A gate over [`CAPS`] for plugin `files`, the given limits on `plugin.echo`, and its own
    /// audit log in `dir`.
    fn gate(dir: &std::path::Path, all: Option<&str>, each: Option<&str>) -> CallGate {
        let policies = Policies::default();
        let caps: Vec<Capability> = CAPS.iter().map(|c| c.parse().unwrap()).collect();
        policies.configure([("files", PathBuf::from("/r"), &caps[..])]);
        let rates = RateLimits::default();
        let rate = |r: Option<&str>| r.map(|r| r.parse().unwrap());
        rates.configure([("echo", "plugin.echo", rate(all), rate(each))]);
        let dir = tempfile::tempdir_in(dir).unwrap().keep();
        let audit = Audit::open(dir.join("audit.log"), super::super::audit::DEFAULT_MAX_SIZE);
        CallGate::new(
            Arc::new(policies),
            Arc::new(rates),
            Arc::new(audit.unwrap()),
        )
    }

    #[test]
    fn a_plugin_is_allowed_by_its_call_capability_refused_without_and_each_is_logged() {
        let dir = tempfile::tempdir().unwrap();
        let gate = gate(dir.path(), None, Some("2/h"));
        let files = plugin("files");
        assert_eq!(
            gate.decide(&files, "plugin.echo", ECHO, Via::Router),
            Ok(())
        );
        let denied = gate.decide(&files, "plugin.echo", "/echo.v1.Echo/Expand", DIRECT);
        assert!(
            matches!(&denied, Err(Refusal::Denied(why)) if why.contains("lacks call:plugin.echo")),
            "{denied:?}"
        );
        let stranger = gate.decide(&plugin("other"), "plugin.echo", ECHO, Via::Router);
        assert!(
            matches!(&stranger, Err(Refusal::Denied(why)) if why.contains("no capabilities")),
            "{stranger:?}"
        );
        // The second allowed call uses the caller's burst of 2; the third is over it.
        assert_eq!(
            gate.decide(&files, "plugin.echo", ECHO, Via::Router),
            Ok(())
        );
        let over = gate.decide(&files, "plugin.echo", ECHO, Via::Router);
        assert!(matches!(over, Err(Refusal::Exhausted(_))), "{over:?}");
        // An owner is held to rate limits only, and not logged: its own burst of 2.
        let owner = Caller::Owner {
            uid: 1000,
            pid: None,
        };
        assert_eq!(
            gate.decide(&owner, "plugin.echo", ECHO, Via::Router),
            Ok(())
        );
        let lines: Vec<serde_json::Value> = gate
            .audit
            .lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let seen: Vec<_> = lines
            .iter()
            .map(|l| {
                (
                    l["plugin"].as_str().unwrap(),
                    l["resource"].as_str().unwrap(),
                    l["allowed"].as_bool().unwrap(),
                    l["via"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("files", "plugin.echo/echo.v1.Echo/Echo", true, "router"),
                ("files", "plugin.echo/echo.v1.Echo/Expand", false, "direct"),
                ("other", "plugin.echo/echo.v1.Echo/Echo", false, "router"),
                ("files", "plugin.echo/echo.v1.Echo/Echo", true, "router"),
                ("files", "plugin.echo/echo.v1.Echo/Echo", false, "router"),
            ]
        );
        assert_eq!(
            lines[0]["reason"],
            "allowed by call:plugin.echo/echo.v1.Echo/Echo"
        );
        // A direct line says whose word it is: the target instance that reported the call.
        assert_eq!(lines[1]["reported_by"], "echo-0");
        assert!(lines[0].get("reported_by").is_none());
    }

    /// What the call policy costs one call, by part and whole (`cargo test --release -p
    /// mesh-manager --lib -- --ignored --nocapture cost_per_call`): prints, asserts nothing.
    /// docs/performance-layers.md has the figures of a run.
    #[test]
    #[ignore]
    fn cost_per_call() {
        const CALLS: u32 = 200_000;
        let dir = tempfile::tempdir().unwrap();
        let files = plugin("files");
        let owner = Caller::Owner {
            uid: 1000,
            pid: Some(4243),
        };
        println!("the call policy, per decision (median of 5 batches):");

        let plain = gate(dir.path(), None, None);
        let policy = plain.policies.get("files").unwrap();
        per_call(
            "capability match: allowed by the last of 10 (call:S/M)",
            CALLS,
            |_| {
                assert!(policy.check_call("plugin.echo", ECHO).is_ok());
            },
        );
        per_call(
            "capability match: denied (10 held, none matches)",
            CALLS,
            |_| {
                assert!(policy.check_call("plugin.z", ECHO).is_err());
            },
        );
        per_call(
            "policy lookup: the caller's Policy, one atomic load",
            CALLS,
            |_| {
                assert!(plain.policies.get("files").is_some());
            },
        );

        let limited = gate(dir.path(), Some(UNREACHED), Some(UNREACHED));
        let global = gate(dir.path(), Some(UNREACHED), None);
        per_call("rate limit: service without limits", CALLS, |_| {
            assert!(
                plain
                    .rates
                    .check_with("plugin.echo", || unreachable!())
                    .is_ok()
            );
        });
        per_call("rate limit: under rate_limit (all callers)", CALLS, |_| {
            assert!(
                global
                    .rates
                    .check_with("plugin.echo", || unreachable!())
                    .is_ok()
            );
        });
        per_call(
            "rate limit: under both (caller_rate_limit keyed by caller)",
            CALLS,
            |_| {
                let key = || caller_key(&files);
                assert!(limited.rates.check_with("plugin.echo", key).is_ok());
            },
        );

        let audit = &plain.audit;
        let decision = |resource| Decision {
            time: Decision::now(),
            plugin: "files",
            instance: "files-0",
            pid: 4242,
            action: "call",
            resource,
            allowed: true,
            reason: "allowed by call:plugin.echo/echo.v1.Echo/Echo",
            via: Some(Via::Router),
        };
        per_call(
            "audit: the line as JSON (time, serde_json), not written",
            CALLS,
            |_| {
                let line = serde_json::to_string(&decision("plugin.echo/echo.v1.Echo/Echo"));
                assert!(line.is_ok());
            },
        );
        per_call("audit: Audit::record, one line to the file", CALLS, |_| {
            audit.record(&decision("plugin.echo/echo.v1.Echo/Echo"));
        });

        per_call("whole gate: plugin allowed, audit on", CALLS, |_| {
            assert!(
                plain
                    .decide(&files, "plugin.echo", ECHO, Via::Router)
                    .is_ok()
            );
        });
        per_call(
            "whole gate: plugin allowed under both limits, audit on",
            CALLS,
            |_| {
                assert!(
                    limited
                        .decide(&files, "plugin.echo", ECHO, Via::Router)
                        .is_ok()
                );
            },
        );
        per_call("whole gate: plugin denied, audit on", CALLS, |_| {
            assert!(plain.decide(&files, "plugin.z", ECHO, Via::Router).is_err());
        });
        per_call(
            "whole gate: owner, service without limits (not audited)",
            CALLS,
            |_| {
                assert!(
                    plain
                        .decide(&owner, "plugin.echo", ECHO, Via::Router)
                        .is_ok()
                );
            },
        );
        per_call(
            "whole gate: owner under both limits (mesh-bench (h))",
            CALLS,
            |_| {
                assert!(
                    limited
                        .decide(&owner, "plugin.echo", ECHO, Via::Router)
                        .is_ok()
                );
            },
        );
        let exhausted = gate(dir.path(), Some("1/h"), None);
        assert!(
            exhausted
                .decide(&files, "plugin.echo", ECHO, Via::Router)
                .is_ok()
        );
        per_call(
            "whole gate: plugin over rate_limit (refused, not logged)",
            CALLS,
            |_| {
                assert!(
                    exhausted
                        .decide(&files, "plugin.echo", ECHO, Via::Router)
                        .is_err()
                );
            },
        );
    }
}
