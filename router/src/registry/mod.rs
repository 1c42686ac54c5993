//! The service registry: which instances serve which logical name, kept by leases.
//!
//! [`Registry`] is the embedded in-memory store the router serves as `mesh.v1.Registry`. Writes
//! (register, deregister, expiry) take one short lock; snapshots of a service are built once per
//! change and only when someone reads them, so a burst of registrations costs no more than one
//! rebuild per reader. Readers learn of changes through version counters ([`tokio::sync::watch`]),
//! which coalesce bursts instead of queueing them.
//!
//! Every registration has a [`Holder`]: the manager (its supervisor, in process) or the local
//! uid that called `Register`. Lease ids are random 64-bit numbers from the operating system's
//! CSPRNG, and only their holder may renew or release them: a lease id that is guessed, or
//! held by someone else, is "unknown". An instance id held by one holder cannot be replaced by
//! another — except by the manager, whose instances win. Registrations over the wire are
//! bounded ([`Bounds`]): time to live, labels, instances per service and in all; the manager's
//! own are bounded by its config.

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

/// Who holds a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// The manager's supervisor, in the router's own process: bounded by its config, and its
    /// instances replace anyone else's.
    Manager,
    /// A local process of this uid, over the router socket.
    Uid(u32),
    /// A TCP client granted registry writes alone (`[tls] registry_writers`), by a hash of
    /// its certificate identity: its leases are its own, apart from the owner's and every
    /// other writer's.
    Writer(u64),
}

impl Holder {
    /// The holder a registry writer's certificate `identity` stands for.
    pub fn writer(identity: &str) -> Self {
        use std::hash::{BuildHasher as _, BuildHasherDefault};
        // Fixed keys: the same identity is the same holder for the life of the process.
        let hasher = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
        Self::Writer(hasher.hash_one(identity))
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Manager => f.write_str("the manager"),
            Self::Uid(uid) => write!(f, "uid {uid}"),
            Self::Writer(_) => f.write_str("a registry writer's certificate identity"),
        }
    }
}

/// The bounds on registrations over the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounds {
    /// Shortest lease time to live.
    pub min_ttl: Duration,
    /// Longest lease time to live.
    pub max_ttl: Duration,
    /// Most labels on one instance.
    pub max_labels: usize,
    /// Longest label key, in bytes.
    pub max_label_key: usize,
    /// Longest label value, in bytes.
    pub max_label_value: usize,
    /// Most bytes of all labels of one instance, keys and values.
    pub max_labels_size: usize,
    /// Most instances of one service (the manager's `MAX_INSTANCES` per plugin).
    pub max_instances_per_service: usize,
    /// Most instances in the registry, every service together.
    pub max_instances: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(3600),
            max_labels: 32,
            max_label_key: 63,
            max_label_value: 1024,
            max_labels_size: 4096,
            max_instances_per_service: 1024,
            max_instances: 16_384,
        }
    }
}

/// Longest instance id, in bytes.
pub const MAX_ID_LEN: usize = 253;
/// Longest TCP endpoint (`host:port`), in bytes.
const MAX_HOSTPORT_LEN: usize = 253 + 6;

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
    /// No such lease (never granted, expired, deregistered, or held by someone else).
    #[error("lease {0} is unknown: it expired or was deregistered; register again")]
    UnknownLease(LeaseId),
    /// A registration is over one of the [`Bounds`], or not well formed.
    #[error("instance {id:?} of {service}: {what}")]
    Invalid {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
        /// What is wrong, naming the bound.
        what: String,
    },
    /// The registry holds as many instances as it may.
    #[error("{0}; deregister some first")]
    Full(String),
    /// The instance id is held by someone else.
    #[error(
        "instance {id:?} of {service} is held by {holder}: only its holder may replace or remove it"
    )]
    Held {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
        /// Who holds it.
        holder: Holder,
    },
    /// The operating system gave no random lease id.
    #[error("no random lease id: {0}")]
    Entropy(String),
}

impl From<RegistryError> for tonic::Status {
    fn from(error: RegistryError) -> Self {
        let message = error.to_string();
        match error {
            RegistryError::UnknownLease(_) => tonic::Status::not_found(message),
            RegistryError::Full(_) => tonic::Status::resource_exhausted(message),
            RegistryError::Held { .. } => tonic::Status::permission_denied(message),
            RegistryError::Entropy(_) => tonic::Status::unavailable(message),
            RegistryError::InvalidName(_)
            | RegistryError::MissingId(_)
            | RegistryError::InvalidEndpoint { .. }
            | RegistryError::Invalid { .. } => tonic::Status::invalid_argument(message),
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
    /// Instances in every service together.
    instances: usize,
    bounds: Bounds,
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
    holder: Holder,
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

    /// An empty registry whose registrations over the wire are held within `bounds`.
    pub fn with_bounds(bounds: Bounds) -> Self {
        let registry = Self::default();
        registry.state().bounds = bounds;
        registry
    }

    /// Adds `instance` for the manager, replacing any instance with the same service and id.
    ///
    /// With a `ttl` the lease expires unless [`Registry::keep_alive`] renews it in time.
    pub fn register(
        &self,
        instance: Instance,
        ttl: Option<Duration>,
    ) -> Result<Lease, RegistryError> {
        self.register_as(Holder::Manager, instance, ttl)
    }

    /// Adds `instance` for `holder`. It replaces an instance with the same service and id only
    /// if `holder` holds that one too, or is the manager. Anyone but the manager must give a
    /// `ttl`, and stays within the registry's [`Bounds`].
    pub fn register_as(
        &self,
        holder: Holder,
        instance: Instance,
        ttl: Option<Duration>,
    ) -> Result<Lease, RegistryError> {
        let service = ServiceName::new(&instance.service)?;
        if instance.id.is_empty() {
            return Err(RegistryError::MissingId(instance.service));
        }
        let invalid = |what: String| invalid(&instance, what);
        if instance.id.len() > MAX_ID_LEN || instance.id.chars().any(char::is_control) {
            return Err(invalid(format!(
                "an instance id is 1 to {MAX_ID_LEN} bytes without control characters"
            )));
        }
        match instance.endpoint.parse::<Address>() {
            Err(source) => {
                return Err(RegistryError::InvalidEndpoint {
                    service: instance.service.clone(),
                    id: instance.id.clone(),
                    source,
                });
            }
            Ok(Address::Unix(path)) => {
                if let Err(error) = mesh::runtime::check_socket_path(&path) {
                    return Err(invalid(error.to_string()));
                }
            }
            Ok(Address::Tcp(hostport)) if hostport.len() > MAX_HOSTPORT_LEN => {
                return Err(invalid(format!(
                    "endpoint is over {MAX_HOSTPORT_LEN} bytes"
                )));
            }
            Ok(Address::Tcp(_)) => {}
            // Never parsed from an endpoint; named here so that a new kind is decided on.
            Ok(Address::Dialer(_)) => {
                return Err(invalid(
                    "an in-process transport cannot be registered with a router".into(),
                ));
            }
        }
        let lease = random_lease()?;
        let mut state = self.state();
        if holder != Holder::Manager {
            state.check_bounds(&instance, ttl).map_err(invalid)?;
        }
        let existing = state
            .services
            .get(&service)
            .and_then(|entry| entry.instances.get(&instance.id))
            .map(|held| held.lease);
        match existing {
            Some(old) => {
                let owner = state.leases.get(&old).map_or(Holder::Manager, |l| l.holder);
                if holder != Holder::Manager && owner != holder {
                    return Err(RegistryError::Held {
                        service: instance.service,
                        id: instance.id,
                        holder: owner,
                    });
                }
            }
            None if holder != Holder::Manager => state.check_room(&service)?,
            None => {}
        }
        if state.leases.contains_key(&lease) {
            // One chance in 2^64 per lease held: draw again rather than reason about it.
            drop(state);
            return self.register_as(holder, instance, ttl);
        }
        if ttl.is_some() {
            self.start_reaper();
        }
        let id = instance.id.clone();
        state.leases.insert(
            lease,
            LeaseEntry {
                holder,
                service: service.clone(),
                id: id.clone(),
                ttl,
                deadline: ttl.map(|ttl| Instant::now() + ttl),
            },
        );
        let entry = state.entry(&service);
        let replaced = entry.instances.insert(id, Registered { instance, lease });
        match replaced {
            Some(old) => {
                state.leases.remove(&old.lease);
            }
            None => state.instances += 1,
        }
        state.touch(&service);
        drop(state);
        self.publish();
        Ok(Lease { id: lease, ttl })
    }

    /// Renews a lease for the manager (any lease); returns its time to live.
    pub fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>, RegistryError> {
        self.keep_alive_as(Holder::Manager, lease)
    }

    /// Renews `holder`'s lease; returns its time to live. Someone else's lease is unknown.
    pub fn keep_alive_as(
        &self,
        holder: Holder,
        lease: LeaseId,
    ) -> Result<Option<Duration>, RegistryError> {
        let mut state = self.state();
        let entry = state
            .leases
            .get_mut(&lease)
            .filter(|entry| holder == Holder::Manager || entry.holder == holder)
            .ok_or(RegistryError::UnknownLease(lease))?;
        entry.deadline = entry.ttl.map(|ttl| Instant::now() + ttl);
        Ok(entry.ttl)
    }

    /// Removes the instance held by `lease` (for the manager: any lease); returns whether
    /// there was one.
    pub fn deregister(&self, lease: LeaseId) -> bool {
        self.deregister_as(Holder::Manager, lease).is_ok()
    }

    /// Removes the instance `holder` holds by `lease`. Someone else's lease is unknown.
    pub fn deregister_as(&self, holder: Holder, lease: LeaseId) -> Result<(), RegistryError> {
        let mut state = self.state();
        let held = state
            .leases
            .get(&lease)
            .is_some_and(|entry| holder == Holder::Manager || entry.holder == holder);
        if !(held && state.remove_lease(lease)) {
            return Err(RegistryError::UnknownLease(lease));
        }
        drop(state);
        self.publish();
        Ok(())
    }

    /// Whether `lease` still holds its instance (it did not expire, and no one removed it).
    pub fn holds(&self, lease: LeaseId) -> bool {
        let state = self.state();
        state.leases.get(&lease).is_some_and(|entry| {
            state
                .services
                .get(&entry.service)
                .and_then(|service| service.instances.get(&entry.id))
                .is_some_and(|registered| registered.lease == lease)
        })
    }

    /// Removes instance `id` of `service`, whoever holds it; returns whether there was one.
    /// In process only: for the manager, and for tests of what follows a lost registration.
    pub fn remove(&self, service: &str, id: &str) -> bool {
        let mut state = self.state();
        let lease = state
            .services
            .get(service)
            .and_then(|entry| entry.instances.get(id))
            .map(|registered| registered.lease);
        let removed = lease.is_some_and(|lease| state.remove_lease(lease));
        drop(state);
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

    /// A receiver that changes whenever `service` changes (and maybe more often); read the set
    /// with [`Registry::resolve`].
    pub fn watch(&self, service: &ServiceName) -> watch::Receiver<u64> {
        match self.state().services.get(service) {
            Some(entry) => entry.changed.subscribe(),
            // Anyone may watch: watching a name nobody registered must not add it to the
            // registry. Such a watch follows every change instead.
            None => self.inner.version.subscribe(),
        }
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

/// A refusal of `instance`, saying `what` is wrong.
fn invalid(instance: &Instance, what: String) -> RegistryError {
    RegistryError::Invalid {
        service: instance.service.clone(),
        id: instance.id.chars().take(64).collect(),
        what,
    }
}

/// A lease id nobody can guess: 64 bits from the operating system's CSPRNG (never 0, which
/// protobuf readers take for "none").
fn random_lease() -> Result<LeaseId, RegistryError> {
    loop {
        let id = getrandom::u64().map_err(|e| RegistryError::Entropy(e.to_string()))?;
        if id != 0 {
            return Ok(id);
        }
    }
}

impl State {
    /// Whether a registration over the wire stays within the bounds; why not if it does not.
    fn check_bounds(&self, instance: &Instance, ttl: Option<Duration>) -> Result<(), String> {
        let bounds = &self.bounds;
        match ttl {
            None => return Err("a lease needs a time to live".into()),
            Some(ttl) if ttl < bounds.min_ttl || ttl > bounds.max_ttl => {
                return Err(format!(
                    "ttl_seconds {} is out of bounds: {} to {} s",
                    ttl.as_secs(),
                    bounds.min_ttl.as_secs(),
                    bounds.max_ttl.as_secs()
                ));
            }
            Some(_) => {}
        }
        let labels = &instance.labels;
        if labels.len() > bounds.max_labels {
            return Err(format!(
                "{} labels, over the bound of {}",
                labels.len(),
                bounds.max_labels
            ));
        }
        let mut size = 0;
        for (key, value) in labels {
            if key.is_empty() || key.len() > bounds.max_label_key {
                return Err(format!(
                    "label key {:?} is not 1 to {} bytes",
                    key.chars().take(64).collect::<String>(),
                    bounds.max_label_key
                ));
            }
            if value.len() > bounds.max_label_value {
                return Err(format!(
                    "label {key:?} is {} bytes, over the bound of {}",
                    value.len(),
                    bounds.max_label_value
                ));
            }
            size += key.len() + value.len();
        }
        if size > bounds.max_labels_size {
            return Err(format!(
                "labels are {size} bytes in all, over the bound of {}",
                bounds.max_labels_size
            ));
        }
        Ok(())
    }

    /// Whether one more instance of `service` fits.
    fn check_room(&self, service: &ServiceName) -> Result<(), RegistryError> {
        let bounds = &self.bounds;
        let here = self.services.get(service).map_or(0, |e| e.instances.len());
        if here >= bounds.max_instances_per_service {
            return Err(RegistryError::Full(format!(
                "{service} has {here} instances, the most one service may have"
            )));
        }
        if self.instances >= bounds.max_instances {
            return Err(RegistryError::Full(format!(
                "the registry holds {} instances, the most it may",
                self.instances
            )));
        }
        Ok(())
    }

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
            self.instances = self.instances.saturating_sub(1);
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

    const OWNER: Holder = Holder::Uid(1000);
    const OTHER: Holder = Holder::Uid(1001);
    const TTL: Option<Duration> = Some(Duration::from_secs(10));

    #[tokio::test]
    async fn leases_are_random_and_only_their_holder_uses_them() {
        let registry = Registry::new();
        let managed = registry
            .register(instance("plugin.echo", "echo-0"), None)
            .unwrap();
        let mine = registry
            .register_as(OWNER, instance("plugin.x", "x-0"), TTL)
            .unwrap();
        assert!(
            managed.id > 1 << 20 || mine.id > 1 << 20,
            "not small sequential numbers"
        );
        assert_ne!(managed.id, mine.id);
        // Someone else's lease is unknown, whether guessed or seen.
        for lease in (1..=200).chain([managed.id, mine.id]) {
            assert!(matches!(
                registry.deregister_as(OTHER, lease),
                Err(RegistryError::UnknownLease(_))
            ));
            assert!(registry.keep_alive_as(OTHER, lease).is_err());
        }
        assert!(
            registry.deregister_as(OWNER, managed.id).is_err(),
            "the manager's own"
        );
        assert_eq!(registry.list().len(), 2);
        assert!(registry.holds(managed.id) && registry.holds(mine.id));
        registry.keep_alive_as(OWNER, mine.id).unwrap();
        registry.deregister_as(OWNER, mine.id).unwrap();
        assert!(!registry.holds(mine.id));
    }

    #[tokio::test]
    async fn an_instance_id_is_replaced_by_its_holder_or_the_manager_only() {
        let registry = Registry::new();
        registry
            .register(instance("plugin.echo", "echo-0"), None)
            .unwrap();
        let mut planted = instance("plugin.echo", "echo-0");
        planted.endpoint = "unix:/tmp/attacker.sock".into();
        let err = registry.register_as(OWNER, planted, TTL).unwrap_err();
        assert!(
            matches!(
                err,
                RegistryError::Held {
                    holder: Holder::Manager,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            registry.resolve("plugin.echo")[0].endpoint,
            "unix:/tmp/echo-0.sock"
        );

        let first = registry
            .register_as(OWNER, instance("plugin.echo", "echo-9"), TTL)
            .unwrap();
        assert!(
            registry
                .register_as(OTHER, instance("plugin.echo", "echo-9"), TTL)
                .is_err()
        );
        let again = registry
            .register_as(OWNER, instance("plugin.echo", "echo-9"), TTL)
            .unwrap();
        assert!(!registry.holds(first.id) && registry.holds(again.id));
        // The manager takes over an id someone else registered first.
        let managed = registry
            .register(instance("plugin.echo", "echo-9"), None)
            .unwrap();
        assert!(registry.holds(managed.id) && !registry.holds(again.id));
        assert!(registry.remove("plugin.echo", "echo-9"));
        assert!(!registry.holds(managed.id));
        assert_eq!(ids(&registry.resolve("plugin.echo")), ["echo-0"]);
    }

    #[tokio::test]
    async fn registrations_over_the_wire_stay_within_bounds() {
        let registry = Registry::with_bounds(Bounds {
            max_instances_per_service: 3,
            max_instances: 4,
            ..Bounds::default()
        });
        let err = registry
            .register_as(
                OWNER,
                instance("plugin.a", "a"),
                Some(Duration::from_secs(u32::MAX.into())),
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("ttl_seconds 4294967295 is out of bounds: 1 to 3600 s"),
            "{err}"
        );
        assert!(
            registry
                .register_as(OWNER, instance("plugin.a", "a"), None)
                .is_err()
        );

        let mut many = instance("plugin.a", "a");
        many.labels = (0..1000).map(|i| (format!("k{i}"), "v".into())).collect();
        let err = registry.register_as(OWNER, many, TTL).unwrap_err();
        assert!(
            err.to_string()
                .contains("1000 labels, over the bound of 32"),
            "{err}"
        );
        for (key, value, bound) in [
            ("k".repeat(64), String::new(), "1 to 63 bytes"),
            ("k".into(), "v".repeat(1025), "over the bound of 1024"),
        ] {
            let mut big = instance("plugin.a", "a");
            big.labels.insert(key, value);
            let err = registry.register_as(OWNER, big, TTL).unwrap_err();
            assert!(err.to_string().contains(bound), "{err}");
        }
        let mut heavy = instance("plugin.a", "a");
        heavy.labels = (0..8)
            .map(|i| (format!("k{i}"), "v".repeat(1000)))
            .collect();
        assert!(
            registry
                .register_as(OWNER, heavy, TTL)
                .unwrap_err()
                .to_string()
                .contains("in all")
        );
        let mut far = instance("plugin.a", "a");
        far.endpoint = format!("unix:/tmp/{}.sock", "d".repeat(120));
        assert!(
            registry
                .register_as(OWNER, far, TTL)
                .unwrap_err()
                .to_string()
                .contains("107-byte")
        );
        let long = registry.register_as(OWNER, instance("plugin.a", &"i".repeat(300)), TTL);
        assert_eq!(
            tonic::Status::from(long.unwrap_err()).code(),
            tonic::Code::InvalidArgument
        );

        for id in ["a-0", "a-1", "a-2"] {
            registry
                .register_as(OWNER, instance("plugin.a", id), TTL)
                .unwrap();
        }
        let err = registry
            .register_as(OWNER, instance("plugin.a", "a-3"), TTL)
            .unwrap_err();
        assert!(
            err.to_string().contains("plugin.a has 3 instances"),
            "{err}"
        );
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::ResourceExhausted
        );
        registry
            .register_as(OWNER, instance("plugin.b", "b-0"), TTL)
            .unwrap();
        let err = registry
            .register_as(OWNER, instance("plugin.c", "c-0"), TTL)
            .unwrap_err();
        assert!(
            err.to_string().contains("the registry holds 4 instances"),
            "{err}"
        );
        // Replacing one's own instance adds none; the manager is bounded by its config.
        registry
            .register_as(OWNER, instance("plugin.a", "a-0"), TTL)
            .unwrap();
        registry
            .register(instance("plugin.c", "c-0"), None)
            .unwrap();
        assert_eq!(registry.list().len(), 3);
    }

    #[tokio::test]
    async fn watching_a_name_adds_nothing() {
        let registry = Registry::new();
        for i in 0..100 {
            let _ = registry.watch(&ServiceName::new(format!("plugin.n{i}")).unwrap());
        }
        assert_eq!(registry.state().services.len(), 0);
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
