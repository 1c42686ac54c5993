//! The router's view of the registry: one balancer per service name, kept current by a task
//! that follows every change. A call reads the map without a lock (it is swapped whole when a
//! service first appears, which is rare) and reads the registry only for a name the map does
//! not have yet, so a service is routable as soon as it is registered. Gateway instances
//! (this router standing for other nodes, see [`crate::cluster`]) are never routed to.

use std::{collections::HashMap, sync::Arc};

use arc_swap::ArcSwap;

use mesh::{ServiceName, balance::Balancer};

use crate::{
    cluster::is_gateway,
    registry::{Registry, Snapshot},
};

type Balancers = HashMap<ServiceName, Arc<Upstream>>;

/// One service behind the router.
pub(crate) struct Upstream {
    pub(crate) name: ServiceName,
    pub(crate) balancer: Balancer,
}

/// Balancers by service name.
pub(crate) struct Upstreams {
    balancers: ArcSwap<Balancers>,
    registry: Registry,
}

impl Upstreams {
    pub(crate) fn new(registry: Registry) -> Self {
        Self {
            balancers: ArcSwap::default(),
            registry,
        }
    }

    /// The registry these upstreams follow.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The balancer of `service`, if it was ever registered.
    pub(crate) fn get(&self, service: &str) -> Option<Arc<Upstream>> {
        match self.balancers.load().get(service) {
            Some(upstream) if !upstream.balancer.is_empty() => Some(upstream.clone()),
            Some(upstream) => {
                // No instance here, but one may have registered a moment ago (a restart):
                // the registry has the newest view.
                let upstream = upstream.clone();
                upstream
                    .balancer
                    .update(&routable(self.registry.resolve(service)));
                Some(upstream)
            }
            None => self.catch_up(service),
        }
    }

    /// A name registered a moment ago, before the follower task saw it: take it from the
    /// registry now. Adds it only if still absent, so it never overwrites newer news.
    #[cold]
    fn catch_up(&self, service: &str) -> Option<Arc<Upstream>> {
        let instances = routable(self.registry.resolve(service));
        if instances.is_empty() {
            return None;
        }
        let name = ServiceName::new(service).ok()?;
        Some(self.insert(name, &instances))
    }

    /// Adds `service` unless it is there already; returns the one in the map.
    fn insert(&self, service: ServiceName, instances: &Snapshot) -> Arc<Upstream> {
        let fresh = Arc::new(Upstream {
            name: service.clone(),
            balancer: Balancer::new(instances),
        });
        self.balancers.rcu(|current| {
            if current.contains_key(&service) {
                Arc::clone(current)
            } else {
                let mut next = Balancers::clone(current);
                next.insert(service.clone(), fresh.clone());
                Arc::new(next)
            }
        });
        self.balancers.load()[&service].clone()
    }

    /// Names with at least one instance, sorted, from the registry itself: this thread's
    /// follower may not have seen the newest registrations yet, and an error message must not
    /// say "none is registered" when one is. Only the unknown-name path asks.
    pub(crate) fn names(&self) -> Vec<String> {
        self.registry
            .list()
            .into_iter()
            .map(|(name, _)| name.to_string())
            .collect()
    }

    /// The follower's news, the newest there is: it updates what `catch_up` added.
    fn apply(&self, service: ServiceName, instances: &Snapshot) {
        let instances = &routable(instances.clone());
        let existing = self.balancers.load().get(&service).cloned();
        match existing {
            Some(upstream) => upstream.balancer.update(instances),
            None => self.insert(service, instances).balancer.update(instances),
        }
    }

    /// Applies every registry change until the registry or these upstreams are gone.
    pub(crate) fn follow(self: &Arc<Self>) {
        let registry = self.registry.clone();
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

/// `instances` without gateways.
fn routable(instances: Snapshot) -> Snapshot {
    if instances.iter().any(is_gateway) {
        instances
            .iter()
            .filter(|i| !is_gateway(i))
            .cloned()
            .collect()
    } else {
        instances
    }
}
