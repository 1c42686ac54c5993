//! The router's view of the registry: one balancer per service name, kept current by a task
//! that follows every change. The per-call path reads a sharded map and never the registry.

use std::sync::Arc;

use dashmap::DashMap;

use crate::{
    ServiceName,
    balance::{Balancer, Target},
    registry::{Registry, Snapshot},
};

/// Balancers by service name.
#[derive(Default)]
pub(crate) struct Upstreams {
    balancers: DashMap<ServiceName, Arc<Balancer>>,
}

impl Upstreams {
    /// The balancer of `service`, if it was ever registered.
    pub(crate) fn get(&self, service: &ServiceName) -> Option<Arc<Balancer>> {
        self.balancers.get(service).map(|b| b.value().clone())
    }

    /// Names with at least one instance, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .balancers
            .iter()
            .filter(|entry| entry.value().len() > 0)
            .map(|entry| entry.key().to_string())
            .collect();
        names.sort();
        names
    }

    fn apply(&self, service: ServiceName, instances: &Snapshot) {
        let targets = targets(instances);
        match self.balancers.get(&service) {
            Some(balancer) => balancer.update(targets),
            None => {
                self.balancers
                    .insert(service, Arc::new(Balancer::new(targets)));
            }
        }
    }

    /// Applies every registry change until the registry or these upstreams are gone.
    pub(crate) fn follow(self: &Arc<Self>, registry: Registry) {
        let weak = Arc::downgrade(self);
        let mut changes = registry.watch_all();
        let (initial, mut seen) = registry.changes_since(0);
        for (service, instances) in initial {
            self.apply(service, &instances);
        }
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(upstreams) = weak.upgrade() else {
                    return;
                };
                let (changed, version) = registry.changes_since(seen);
                seen = version;
                for (service, instances) in changed {
                    upstreams.apply(service, &instances);
                }
            }
        });
    }
}

/// The instances a balancer can dial; ones with unreadable endpoints are skipped (the registry
/// validates endpoints, so this only guards against a future backend that does not).
pub(crate) fn targets(instances: &[crate::registry::Instance]) -> Vec<Target> {
    instances
        .iter()
        .filter_map(|instance| match instance.endpoint.parse() {
            Ok(address) => Some(Target {
                id: instance.id.clone(),
                address,
            }),
            Err(error) => {
                tracing::warn!(service = %instance.service, instance = %instance.id, %error, "skipping instance");
                None
            }
        })
        .collect()
}
