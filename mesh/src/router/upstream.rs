//! The router's view of the registry: one balancer per service name, kept current by a task
//! that follows every change. A call reads the map without a lock (it is swapped whole when a
//! service first appears, which is rare) and never reads the registry.

use std::{collections::HashMap, sync::Arc};

use arc_swap::ArcSwap;
use hyper::body::Incoming;

use crate::{
    ServiceName,
    balance::Balancer,
    registry::{Registry, Snapshot},
};

type Balancers = HashMap<ServiceName, Arc<Upstream>>;

/// One service behind the router.
pub(crate) struct Upstream {
    pub(crate) name: ServiceName,
    pub(crate) balancer: Balancer<Incoming>,
}

/// Balancers by service name.
#[derive(Default)]
pub(crate) struct Upstreams {
    balancers: ArcSwap<Balancers>,
}

impl Upstreams {
    /// The balancer of `service`, if it was ever registered.
    pub(crate) fn get(&self, service: &str) -> Option<Arc<Upstream>> {
        self.balancers.load().get(service).cloned()
    }

    /// Names with at least one instance, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .balancers
            .load()
            .iter()
            .filter(|(_, upstream)| upstream.balancer.len() > 0)
            .map(|(name, _)| name.to_string())
            .collect();
        names.sort();
        names
    }

    /// Only the follower task writes, so read-modify-write needs no lock.
    fn apply(&self, service: ServiceName, instances: &Snapshot) {
        let balancers = self.balancers.load();
        match balancers.get(&service) {
            Some(upstream) => upstream.balancer.update(instances),
            None => {
                let mut next = Balancers::clone(&balancers);
                let upstream = Upstream {
                    name: service.clone(),
                    balancer: Balancer::new(instances),
                };
                next.insert(service, Arc::new(upstream));
                self.balancers.store(Arc::new(next));
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
