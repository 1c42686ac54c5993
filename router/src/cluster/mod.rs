//! Many machines: this node's name and published address, what it knows of the other nodes'
//! instances, and the registry [`Backend`] that shares instances between nodes.
//!
//! The router's own [`Registry`] always holds this node's instances (the supervisor registers
//! them there). A backend publishes them and learns the other nodes' instances into
//! [`Cluster::remote`]: one entry per service and node, whose endpoint is that node's router.
//! The router forwards a call for a name with no local instance to one of those routers
//! ([`crate::peers`]), and never forwards again a call another router forwarded to it.
//!
//! So that `mesh::connect` on this node reaches a service that runs only elsewhere without a
//! change to the client, the local registry also shows such a service with one *gateway*
//! instance: this router's own socket, labelled [`GATEWAY_LABEL`]. A client dials it like any
//! instance; the router never routes to a gateway itself and no backend publishes one.
//!
//! Backends: [`Embedded`] (this machine only, the default) and [`etcd::Etcd`].

pub mod etcd;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::registry::{Instance, Registry};
use mesh::{Address, ServiceName};

/// Label of a gateway instance in the local registry: the other nodes that serve it.
pub const GATEWAY_LABEL: &str = "mesh.gateway";
/// Id of the gateway instance of a service that runs only on other nodes.
pub const GATEWAY_ID: &str = "@remote";
/// Label naming the node of an entry in [`Cluster::remote`].
pub const NODE_LABEL: &str = "mesh.node";
/// Header a router sets on a call it forwards to another node, naming itself: a router never
/// forwards such a call again. Honouring it only ever narrows where a call may go (local
/// instances), so a caller who sets it gains nothing.
pub const FORWARDED_HEADER: &str = "mesh-forwarded-by";

/// Longest node name, in bytes.
pub const MAX_NODE_NAME: usize = 63;

/// A node's name: 1 to 63 bytes of `[a-z0-9-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName(String);

/// A node name that is not one.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "invalid node name {0:?}: write 1 to 63 characters of a-z, 0-9 and '-', such as \"node-a\""
)]
pub struct InvalidNodeName(pub String);

impl NodeName {
    /// Checks `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidNodeName> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= MAX_NODE_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if valid {
            Ok(Self(name))
        } else {
            Err(InvalidNodeName(name.chars().take(80).collect()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// This node: its name and the TCP address other routers reach its router at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `[mesh] node`.
    pub name: NodeName,
    /// `[mesh] advertise`: `host:port` of this router's TCP listener, as other nodes dial it.
    pub advertise: Option<String>,
}

/// How the backend is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// The embedded registry: this machine only, nothing to reach.
    Local,
    /// Reaching the store for the first time (or again after a lost lease).
    Connecting,
    /// This node's instances are published and the others' followed.
    Connected,
    /// The store cannot be reached: routing goes on from the last view.
    Unreachable {
        /// Why, as last seen.
        error: String,
    },
}

impl State {
    /// `local`, `connecting`, `connected` or `unreachable`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Unreachable { .. } => "unreachable",
        }
    }
}

/// The backend's state now, for `mesh status` and metrics.
#[derive(Debug, Clone)]
pub struct Status {
    /// `embedded` or `etcd`.
    pub kind: &'static str,
    /// The state.
    pub state: State,
    /// When it last changed.
    pub since: Instant,
    /// How often this node's instances were registered again under a new lease (a lease
    /// that expired or was revoked, a store that lost its data).
    pub reregistrations: u64,
}

/// This node and its view of the others. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<ClusterInner>,
}

struct ClusterInner {
    node: Option<Node>,
    remote: Registry,
    status: watch::Sender<Status>,
    /// When the backend last had an answer from its store (kept apart from `status`, whose
    /// watchers need not wake on every keep-alive).
    contact: std::sync::Mutex<Option<Instant>>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.inner.node)
            .field("state", &self.inner.status.borrow().state)
            .finish()
    }
}

impl Cluster {
    /// One machine, no other nodes: the embedded registry.
    pub fn single() -> Self {
        Self::with(None, "embedded", State::Local)
    }

    /// `node`, sharing instances through a backend of `kind`.
    pub fn node(node: Node, kind: &'static str) -> Self {
        Self::with(Some(node), kind, State::Connecting)
    }

    fn with(node: Option<Node>, kind: &'static str, state: State) -> Self {
        Self {
            inner: Arc::new(ClusterInner {
                node,
                remote: Registry::new(),
                status: watch::Sender::new(Status {
                    kind,
                    state,
                    since: Instant::now(),
                    reregistrations: 0,
                }),
                contact: std::sync::Mutex::new(None),
            }),
        }
    }

    /// This node, if it is one of many.
    pub fn this_node(&self) -> Option<&Node> {
        self.inner.node.as_ref()
    }

    /// The other nodes' instances: per service, one entry per node (id: the node's name,
    /// endpoint: its router), kept by the backend.
    pub fn remote(&self) -> &Registry {
        &self.inner.remote
    }

    /// The backend's state now; changes are announced on [`Cluster::watch_status`].
    pub fn status(&self) -> Status {
        self.inner.status.borrow().clone()
    }

    /// A receiver that changes with the backend's state.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.inner.status.subscribe()
    }

    /// The other nodes in the view now, sorted.
    pub fn nodes(&self) -> Vec<String> {
        let nodes: BTreeSet<String> = self
            .remote()
            .list()
            .iter()
            .flat_map(|(_, instances)| instances.iter().map(|i| i.id.clone()))
            .collect();
        nodes.into_iter().collect()
    }

    /// Sets the state, logging each transition once.
    pub(crate) fn set_state(&self, state: State) {
        self.inner.status.send_if_modified(|status| {
            if status.state == state {
                return false;
            }
            match &state {
                State::Unreachable { error } => tracing::warn!(
                    "registry backend {} unreachable: {error}; routing goes on from the last view \
                     of the other nodes",
                    status.kind
                ),
                other => tracing::info!("registry backend {}: {}", status.kind, other.name()),
            }
            status.state = state;
            status.since = Instant::now();
            true
        });
    }

    /// How long since the backend last had an answer from its store; `None` before the first
    /// (and always for the embedded registry, which has no store to reach).
    pub fn since_contact(&self) -> Option<std::time::Duration> {
        let at = *self.inner.contact.lock().unwrap_or_else(|e| e.into_inner());
        at.map(|at| at.elapsed())
    }

    /// Notes an answer from the store.
    pub(crate) fn contacted(&self) {
        *self.inner.contact.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Counts a registration from scratch under a new lease.
    pub(crate) fn reregistered(&self) {
        self.inner
            .status
            .send_modify(|status| status.reregistrations += 1);
    }
}

/// A registry backend: shares this node's instances with the other nodes and learns theirs.
pub trait Backend: Send + 'static {
    /// `embedded`, `etcd`.
    fn kind(&self) -> &'static str;

    /// Starts following `local` (this node's instances) and keeping `cluster`'s view of the
    /// others, until the handle is stopped.
    fn start(self: Box<Self>, local: Registry, cluster: Cluster) -> BackendHandle;
}

/// A running backend.
pub struct BackendHandle {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for BackendHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendHandle").finish_non_exhaustive()
    }
}

/// A future a backend runs as its task.
pub type BackendTask = Pin<Box<dyn Future<Output = ()> + Send>>;

impl BackendHandle {
    /// Runs `task`, given a receiver that turns true when asked to stop.
    pub fn spawn(task: impl FnOnce(watch::Receiver<bool>) -> BackendTask) -> Self {
        let (stop, stopped) = watch::channel(false);
        Self {
            stop,
            task: Some(tokio::spawn(task(stopped))),
        }
    }

    /// Asks the backend to withdraw this node's instances and stop; waits up to `grace`.
    pub async fn stop(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take()
            && tokio::time::timeout(grace, task).await.is_err()
        {
            tracing::warn!("registry backend did not stop within {grace:?}");
        }
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The embedded registry: this machine only. Nothing to publish, nobody to learn from.
#[derive(Debug, Default)]
pub struct Embedded;

impl Backend for Embedded {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn start(self: Box<Self>, _: Registry, _: Cluster) -> BackendHandle {
        BackendHandle::spawn(|mut stop| {
            Box::pin(async move {
                let _ = stop.wait_for(|stop| *stop).await;
            })
        })
    }
}

/// Whether `instance` is a gateway (this router's socket standing for other nodes).
pub fn is_gateway(instance: &Instance) -> bool {
    instance.labels.contains_key(GATEWAY_LABEL)
}

/// Keeps one gateway instance (`via`, this router's socket) in `local` for each service that
/// runs on other nodes and not here, so local clients reach it through this router. Runs until
/// both registries are gone.
pub fn follow_gateways(local: Registry, cluster: &Cluster, via: Address) -> JoinHandle<()> {
    let remote = cluster.remote().clone();
    tokio::spawn(async move {
        let mut local_changes = local.watch_all();
        let mut remote_changes = remote.watch_all();
        loop {
            local_changes.mark_unchanged();
            remote_changes.mark_unchanged();
            sync_gateways(&local, &remote, &via);
            tokio::select! {
                changed = local_changes.changed() => if changed.is_err() { return },
                changed = remote_changes.changed() => if changed.is_err() { return },
            }
        }
    })
}

fn sync_gateways(local: &Registry, remote: &Registry, via: &Address) {
    let mut wanted: BTreeMap<ServiceName, String> = BTreeMap::new();
    for (service, instances) in remote.list() {
        let nodes: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
        wanted.insert(service, nodes.join(","));
    }
    let mut present: BTreeMap<ServiceName, Option<String>> = BTreeMap::new();
    let mut served_here: BTreeSet<ServiceName> = BTreeSet::new();
    for (service, instances) in local.list() {
        for instance in instances.iter() {
            if is_gateway(instance) {
                present.insert(service.clone(), instance.labels.get(GATEWAY_LABEL).cloned());
            } else {
                served_here.insert(service.clone());
            }
        }
    }
    for (service, label) in &present {
        let keep = !served_here.contains(service) && wanted.get(service) == label.as_ref();
        if !keep {
            local.remove(service.as_str(), GATEWAY_ID);
        }
    }
    for (service, nodes) in wanted {
        if served_here.contains(&service) || present.get(&service) == Some(&Some(nodes.clone())) {
            continue;
        }
        let gateway = Instance {
            service: service.to_string(),
            id: GATEWAY_ID.into(),
            endpoint: via.to_string(),
            labels: [(GATEWAY_LABEL.to_owned(), nodes)].into(),
        };
        if let Err(error) = local.register(gateway, None) {
            tracing::warn!(%service, %error, "cannot show the service of other nodes here");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(service: &str, id: &str, endpoint: &str) -> Instance {
        Instance {
            service: service.into(),
            id: id.into(),
            endpoint: endpoint.into(),
            labels: Default::default(),
        }
    }

    #[test]
    fn node_names_are_checked() {
        assert!(NodeName::new("node-a").is_ok());
        for bad in ["", "A", "a.b", "a/b", &"n".repeat(64)] {
            let error = NodeName::new(bad).unwrap_err();
            assert!(error.to_string().contains("invalid node name"), "{error}");
        }
    }

    #[tokio::test]
    async fn a_service_of_other_nodes_gets_a_gateway_only_while_none_runs_here() {
        let local = Registry::new();
        let remote = Registry::new();
        let via: Address = "unix:/tmp/mesh-a.sock".parse().unwrap();
        remote
            .register(instance("plugin.x", "b", "http://127.0.0.1:7702"), None)
            .unwrap();
        sync_gateways(&local, &remote, &via);
        let seen = local.resolve("plugin.x");
        assert_eq!(seen.len(), 1);
        assert!(is_gateway(&seen[0]));
        assert_eq!(seen[0].endpoint, "unix:/tmp/mesh-a.sock");
        assert_eq!(seen[0].labels[GATEWAY_LABEL], "b");

        // A local instance wins: the gateway goes.
        local
            .register(instance("plugin.x", "x-0", "unix:/tmp/x-0.sock"), None)
            .unwrap();
        sync_gateways(&local, &remote, &via);
        let seen = local.resolve("plugin.x");
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].id, "x-0");

        // Gone here and there: nothing left.
        local.remove("plugin.x", "x-0");
        remote.remove("plugin.x", "b");
        sync_gateways(&local, &remote, &via);
        assert!(local.resolve("plugin.x").is_empty());
    }
}
