//! The service registry: which instances serve which logical name, kept by leases.
//!
//! [`Registry`] is the embedded in-memory store the router serves as `mesh.v1.Registry`. Writes
//! (register, deregister, expiry) take one short lock; snapshots of a service are built once per
//! change and only when someone reads them, so a burst of registrations costs no more than one
//! rebuild per reader. Readers learn of changes through version counters ([`tokio::sync::watch`]),
//! which coalesce bursts instead of queueing them.

mod service;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard, OnceLock, Weak},
    time::Duration,
};

pub use mesh_proto::mesh::v1::Instance;
pub use service::RegistryService;
use tokio::{sync::watch, time::Instant};

use mesh::{Address, InvalidName, ServiceName};

/// Lease time to live when a registration asks for none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// The instances of one service at one moment, sorted by instance id.
pub type Snapshot = Arc<[Instance]>;

/// Identifies a registration; keep it alive, or deregister with it.
pub type LeaseId = u64;

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The lease id.
    pub id: LeaseId,
    /// How long it lives without a keep-alive; `None` lives until deregistered.
    pub ttl: Option<Duration>,
}

/// Why the registry refused a request.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The service name is not valid.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// The instance has no id.
    #[error("instance of {0} has no id; give each instance a unique id such as echo-0")]
    MissingId(String),
    /// The endpoint could not be parsed.
    #[error("instance {id} of {service}: {source}")]
    InvalidEndpoint {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
        /// The parse error.
        #[source]
        source: mesh::InvalidAddress,
    },
    /// No such lease (never granted, expired, or deregistered).
    #[error("lease {0} is unknown: it expired or was deregistered; register again")]
    UnknownLease(LeaseId),
}

impl From<RegistryError> for tonic::Status {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::UnknownLease(_) => tonic::Status::not_found(error.to_string()),
            _ => tonic::Status::invalid_argument(error.to_string()),
        }
    }
}

/// The embedded in-memory registry. Cheap to clone: clones share one store.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    /// Bumped on every change of any service.
    version: watch::Sender<u64>,
    /// True once the registry is closed: its watches end.
    closed: watch::Sender<bool>,
    reaper: OnceLock<()>,
}

#[derive(Default)]
struct State {
    services: BTreeMap<ServiceName, Entry>,
    leases: HashMap<LeaseId, LeaseEntry>,
    next_lease: LeaseId,
    version: u64,
}

struct Entry {
    instances: BTreeMap<String, Registered>,
    /// The registry version of this service's last change.
    version: u64,
    /// Built on first read after a change.
    snapshot: Option<Snapshot>,
    /// Bumped on every change of this service.
    changed: watch::Sender<u64>,
}

struct Registered {
    instance: Instance,
    lease: LeaseId,
}

struct LeaseEntry {
    service: ServiceName,
    id: String,
    ttl: Option<Duration>,
    deadline: Option<Instant>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("Registry")
            .field("services", &state.services.len())
            .field("leases", &state.leases.len())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent maps behind: every write is one step.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `instance`, replacing any instance with the same service and id.
    ///
    /// With a `ttl` the lease expires unless [`Registry::keep_alive`] renews it in time.
    pub fn register(
        &self,
        instance: Instance,
        ttl: Option<Duration>,
    ) -> Result<Lease, RegistryError> {
        let service = ServiceName::new(&instance.service)?;
        if instance.id.is_empty() {
            return Err(RegistryError::MissingId(instance.service));
        }
        if let Err(source) = instance.endpoint.parse::<Address>() {
            return Err(RegistryError::InvalidEndpoint {
                service: instance.service,
                id: instance.id,
                source,
            });
        }
        if ttl.is_some() {
            self.start_reaper();
        }
        let mut state = self.state();
        state.next_lease += 1;
        let lease = state.next_lease;
        let id = instance.id.clone();
        state.leases.insert(
            lease,
            LeaseEntry {
                service: service.clone(),
                id: id.clone(),
                ttl,
                deadline: ttl.map(|ttl| Instant::now() + ttl),
            },
        );
        let entry = state.entry(&service);
        let replaced = entry.instances.insert(id, Registered { instance, lease });
        if let Some(old) = replaced {
            state.leases.remove(&old.lease);
        }
        state.touch(&service);
        drop(state);
        self.publish();
        Ok(Lease { id: lease, ttl })
    }

    /// Renews a lease; returns its time to live.
    pub fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>, RegistryError> {
        let mut state = self.state();
        let entry = state
            .leases
            .get_mut(&lease)
            .ok_or(RegistryError::UnknownLease(lease))?;
        entry.deadline = entry.ttl.map(|ttl| Instant::now() + ttl);
        Ok(entry.ttl)
    }

    /// Removes the instance held by `lease`; returns whether there was one.
    pub fn deregister(&self, lease: LeaseId) -> bool {
        let removed = self.state().remove_lease(lease);
        if removed {
            self.publish();
        }
        removed
    }

    /// The instances of `service` now.
    pub fn resolve(&self, service: &str) -> Snapshot {
        let mut state = self.state();
        match state.services.get_mut(service) {
            Some(entry) => entry.snapshot(),
            None => Arc::from([]),
        }
    }

    /// Every service with at least one instance, sorted by name.
    pub fn list(&self) -> Vec<(ServiceName, Snapshot)> {
        let mut state = self.state();
        state
            .services
            .iter_mut()
            .filter(|(_, entry)| !entry.instances.is_empty())
            .map(|(name, entry)| (name.clone(), entry.snapshot()))
            .collect()
    }

    /// A receiver that changes whenever `service` changes; read the set with [`Registry::resolve`].
    pub fn watch(&self, service: &ServiceName) -> watch::Receiver<u64> {
        self.state().entry(service).changed.subscribe()
    }

    /// A receiver that changes whenever any service changes; read what changed with
    /// [`Registry::changes_since`].
    pub fn watch_all(&self) -> watch::Receiver<u64> {
        self.inner.version.subscribe()
    }

    /// The services that changed after registry version `seen` (all of them for 0), with their
    /// instances now (possibly none), and the version this answer is current to.
    pub fn changes_since(&self, seen: u64) -> (Vec<(ServiceName, Snapshot)>, u64) {
        let mut state = self.state();
        let version = state.version;
        let changed = state
            .services
            .iter_mut()
            .filter(|(_, entry)| entry.version > seen)
            .map(|(name, entry)| (name.clone(), entry.snapshot()))
            .collect();
        (changed, version)
    }

    /// Ends every watch of this registry (its gRPC `Watch` streams), so that a router can shut
    /// down while clients are still connected. Registrations keep working.
    pub fn close(&self) {
        self.inner.closed.send_replace(true);
    }

    /// Completes once [`Registry::close`] was called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closed = self.inner.closed.subscribe();
        async move {
            let _ = closed.wait_for(|closed| *closed).await;
        }
    }

    fn publish(&self) {
        let version = self.state().version;
        self.inner.version.send_replace(version);
    }

    /// Expires leases whose time ran out, twice a second, for as long as the registry exists.
    fn start_reaper(&self) {
        self.inner.reaper.get_or_init(|| {
            let weak: Weak<Inner> = Arc::downgrade(&self.inner);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    let registry = Registry { inner };
                    registry.expire(Instant::now());
                }
            });
        });
    }

    fn expire(&self, now: Instant) {
        let mut state = self.state();
        let expired: Vec<LeaseId> = state
            .leases
            .iter()
            .filter(|(_, l)| l.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for lease in &expired {
            if let Some(entry) = state.leases.get(lease) {
                tracing::info!(service = %entry.service, instance = %entry.id, lease, "lease expired");
            }
            state.remove_lease(*lease);
        }
        drop(state);
        if !expired.is_empty() {
            self.publish();
        }
    }
}

impl State {
    fn entry(&mut self, service: &ServiceName) -> &mut Entry {
        self.services
            .entry(service.clone())
            .or_insert_with(|| Entry {
                instances: BTreeMap::new(),
                version: 0,
                snapshot: None,
                changed: watch::Sender::new(0),
            })
    }

    fn touch(&mut self, service: &ServiceName) {
        self.version += 1;
        let version = self.version;
        if let Some(entry) = self.services.get_mut(service) {
            entry.version = version;
            entry.snapshot = None;
            entry.changed.send_replace(version);
        }
    }

    fn remove_lease(&mut self, lease: LeaseId) -> bool {
        let Some(held) = self.leases.remove(&lease) else {
            return false;
        };
        let Some(entry) = self.services.get_mut(&held.service) else {
            return false;
        };
        if entry
            .instances
            .get(&held.id)
            .is_some_and(|r| r.lease == lease)
        {
            entry.instances.remove(&held.id);
            self.touch(&held.service);
            true
        } else {
            false
        }
    }
}

impl Entry {
    fn snapshot(&mut self) -> Snapshot {
        self.snapshot
            .get_or_insert_with(|| {
                self.instances
                    .values()
                    .map(|r| r.instance.clone())
                    .collect()
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(service: &str, id: &str) -> Instance {
        Instance {
            service: service.into(),
            id: id.into(),
            endpoint: format!("unix:/tmp/{id}.sock"),
            labels: Default::default(),
        }
    }

    fn ids(snapshot: &Snapshot) -> Vec<&str> {
        snapshot.iter().map(|i| i.id.as_str()).collect()
    }

    #[tokio::test]
    async fn register_resolve_deregister() {
        let registry = Registry::new();
        let mut watch = registry.watch(&ServiceName::new("plugin.echo").unwrap());
        let a = registry
            .register(instance("plugin.echo", "echo-0"), None)
            .unwrap();
        registry
            .register(instance("plugin.echo", "echo-1"), None)
            .unwrap();
        registry
            .register(instance("plugin.other", "other-0"), None)
            .unwrap();
        assert!(watch.has_changed().unwrap());
        watch.mark_unchanged();
        assert_eq!(ids(&registry.resolve("plugin.echo")), ["echo-0", "echo-1"]);
        assert_eq!(registry.list().len(), 2);

        assert!(registry.deregister(a.id));
        assert!(!registry.deregister(a.id), "a lease is released once");
        assert!(watch.has_changed().unwrap());
        assert_eq!(ids(&registry.resolve("plugin.echo")), ["echo-1"]);
        assert!(registry.resolve("plugin.nothing").is_empty());
    }

    #[tokio::test]
    async fn re_registering_an_id_replaces_it_and_its_lease() {
        let registry = Registry::new();
        let old = registry
            .register(instance("plugin.echo", "echo-0"), None)
            .unwrap();
        let mut newer = instance("plugin.echo", "echo-0");
        newer.endpoint = "unix:/tmp/new.sock".into();
        registry.register(newer, None).unwrap();
        assert!(
            !registry.deregister(old.id),
            "the replaced lease no longer holds the instance"
        );
        assert_eq!(
            registry.resolve("plugin.echo")[0].endpoint,
            "unix:/tmp/new.sock"
        );
    }

    #[tokio::test]
    async fn changes_since_names_only_what_changed() {
        let registry = Registry::new();
        registry
            .register(instance("plugin.a", "a-0"), None)
            .unwrap();
        let (all, v1) = registry.changes_since(0);
        assert_eq!(all.len(), 1);
        let b = registry
            .register(instance("plugin.b", "b-0"), None)
            .unwrap();
        registry.deregister(b.id);
        let (changed, v2) = registry.changes_since(v1);
        assert!(v2 > v1);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].0.as_str(), "plugin.b");
        assert!(
            changed[0].1.is_empty(),
            "a service whose last instance left shows as empty"
        );
    }

    #[tokio::test]
    async fn rejects_bad_registrations_with_the_reason() {
        let registry = Registry::new();
        let err = registry
            .register(instance("Plugin.Echo", "x"), None)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid service name \"Plugin.Echo\""),
            "{err}"
        );
        let err = registry
            .register(instance("plugin.echo", ""), None)
            .unwrap_err();
        assert!(err.to_string().contains("has no id"), "{err}");
        let mut bad = instance("plugin.echo", "e");
        bad.endpoint = "nowhere".into();
        let err = registry.register(bad, None).unwrap_err();
        assert!(
            err.to_string().contains("invalid endpoint \"nowhere\""),
            "{err}"
        );
        assert!(matches!(
            registry.keep_alive(99),
            Err(RegistryError::UnknownLease(99))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn leases_expire_unless_kept_alive() {
        let registry = Registry::new();
        let kept = registry
            .register(
                instance("plugin.echo", "kept"),
                Some(Duration::from_secs(2)),
            )
            .unwrap();
        registry
            .register(
                instance("plugin.echo", "dropped"),
                Some(Duration::from_secs(2)),
            )
            .unwrap();
        let mut changes = registry.watch_all();
        changes.mark_unchanged();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            registry.keep_alive(kept.id).unwrap();
        }
        // The reaper runs on the (paused, auto-advancing) clock: wait for its change.
        changes.changed().await.unwrap();
        assert_eq!(ids(&registry.resolve("plugin.echo")), ["kept"]);
    }
}
