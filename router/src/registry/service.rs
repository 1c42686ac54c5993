//! `mesh.v1.Registry` over gRPC, served by the router on top of a [`Registry`].
//!
//! Writes are held by the caller the router put in the request's extensions ([`Caller`], from
//! the kernel): the router lets only the owner write (`policy`), and this service checks again,
//! so that served anywhere without that identity it refuses every write.

use std::{pin::Pin, time::Duration};

use futures_util::{Stream, StreamExt, stream};
use mesh_proto::mesh::v1::{
    BackendRequest, BackendResponse, DeregisterRequest, DeregisterResponse, KeepAliveRequest,
    KeepAliveResponse, ListRequest, ListResponse, RegisterRequest, RegisterResponse,
    ResolveRequest, ResolveResponse, Service, WatchRequest, WatchResponse, registry_server,
};
use tonic::{Request, Response, Status};

use super::{DEFAULT_TTL, Holder, Registry, Snapshot};
use crate::{cluster::Cluster, identity::Caller};
use mesh::ServiceName;

/// The gRPC face of a [`Registry`].
#[derive(Debug, Clone)]
pub struct RegistryService {
    registry: Registry,
    cluster: Cluster,
}

impl RegistryService {
    /// Serves `registry`.
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            cluster: Cluster::single(),
        }
    }

    /// Reports `cluster`'s backend in `Backend`.
    pub fn with_cluster(mut self, cluster: Cluster) -> Self {
        self.cluster = cluster;
        self
    }

    /// The tonic service, ready to add to a server or the router.
    pub fn into_server(self) -> registry_server::RegistryServer<Self> {
        registry_server::RegistryServer::new(self)
    }
}

fn ttl_seconds(ttl: Option<Duration>) -> u32 {
    ttl.map_or(0, |ttl| ttl.as_secs() as u32)
}

fn watch_response(service: &ServiceName, instances: &Snapshot) -> WatchResponse {
    WatchResponse {
        service: service.to_string(),
        instances: instances.to_vec(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

/// Who holds what `request` registers: the owner's uid, or a refusal.
fn holder<T>(request: &Request<T>) -> Result<Holder, Status> {
    match request.extensions().get::<Caller>() {
        Some(Caller::Owner { uid, .. }) => Ok(Holder::Uid(*uid)),
        // A certificate identity granted control is trusted as the owner is.
        Some(caller @ Caller::Remote { .. }) if caller.may_control() => {
            Ok(Holder::Uid(crate::identity::own_uid()))
        }
        // Granted registry writes alone: its own leases, never the owner's.
        Some(Caller::Remote {
            identity: Some(identity),
            grant: crate::Grant::RegistryWriter,
            ..
        }) => Ok(Holder::writer(identity)),
        Some(caller) => Err(Status::permission_denied(format!(
            "registry writes are for the mesh's owner and root (and certificate identities in \
             [tls] admins or registry_writers) only, not {caller}"
        ))),
        None => Err(Status::permission_denied(
            "registry writes need a caller the router identified; none was",
        )),
    }
}

#[tonic::async_trait]
impl registry_server::Registry for RegistryService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let holder = holder(&request)?;
        let request = request.into_inner();
        let instance = request
            .instance
            .ok_or_else(|| Status::invalid_argument("RegisterRequest.instance is missing"))?;
        let ttl = match request.ttl_seconds {
            0 => DEFAULT_TTL,
            s => Duration::from_secs(s.into()),
        };
        let lease = self.registry.register_as(holder, instance, Some(ttl))?;
        Ok(Response::new(RegisterResponse {
            lease: lease.id,
            ttl_seconds: ttl_seconds(lease.ttl),
        }))
    }

    async fn keep_alive(
        &self,
        request: Request<KeepAliveRequest>,
    ) -> Result<Response<KeepAliveResponse>, Status> {
        let holder = holder(&request)?;
        let lease = request.into_inner().lease;
        let ttl = self.registry.keep_alive_as(holder, lease)?;
        Ok(Response::new(KeepAliveResponse {
            lease,
            ttl_seconds: ttl_seconds(ttl),
        }))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let holder = holder(&request)?;
        let lease = request.into_inner().lease;
        self.registry.deregister_as(holder, lease)?;
        Ok(Response::new(DeregisterResponse {}))
    }

    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let service = ServiceName::new(request.into_inner().service)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(ResolveResponse {
            instances: self.registry.resolve(service.as_str()).to_vec(),
        }))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let services = self
            .registry
            .list()
            .into_iter()
            .map(|(name, instances)| Service {
                name: name.to_string(),
                instances: instances.to_vec(),
            })
            .collect();
        Ok(Response::new(ListResponse { services }))
    }

    async fn backend(
        &self,
        _: Request<BackendRequest>,
    ) -> Result<Response<BackendResponse>, Status> {
        let status = self.cluster.status();
        let node = self.cluster.this_node();
        let error = match &status.state {
            crate::cluster::State::Unreachable { error } => error.clone(),
            _ => String::new(),
        };
        let remote_instances = self
            .cluster
            .remote()
            .list()
            .iter()
            .map(|(_, instances)| instances.len() as u32)
            .sum();
        Ok(Response::new(BackendResponse {
            kind: status.kind.into(),
            node: node.map(|n| n.name.to_string()).unwrap_or_default(),
            advertise: node.and_then(|n| n.advertise.clone()).unwrap_or_default(),
            state: status.state.name().into(),
            since_seconds: status.since.elapsed().as_secs(),
            error,
            nodes: self.cluster.nodes(),
            remote_instances,
            reregistrations: status.reregistrations,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let registry = self.registry.clone();
        if service.is_empty() {
            return Ok(Response::new(watch_all(registry)));
        }
        let service =
            ServiceName::new(service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let changes = registry.watch(&service);
        let closed = registry.closed();
        // The first item is the set now; then one item per (coalesced) change of the set,
        // until the registry closes (the router shuts down: watchers must not hold it open).
        let stream = stream::unfold((changes, None), move |(mut changes, last)| {
            let registry = registry.clone();
            let service = service.clone();
            async move {
                let instances = loop {
                    if last.is_some() {
                        changes.changed().await.ok()?;
                    }
                    changes.mark_unchanged();
                    let instances = registry.resolve(service.as_str());
                    // A watch of a name not registered yet wakes on every change: say only
                    // what changed this one.
                    match &last {
                        Some(last) if same(last, &instances) => continue,
                        _ => break instances,
                    }
                };
                Some((
                    Ok(watch_response(&service, &instances)),
                    (changes, Some(instances)),
                ))
            }
        });
        Ok(Response::new(Box::pin(stream.take_until(closed))))
    }
}

/// Whether two reads of a service's instances are the same set (snapshots are shared until
/// the service changes).
fn same(a: &Snapshot, b: &Snapshot) -> bool {
    std::sync::Arc::ptr_eq(a, b) || (a.is_empty() && b.is_empty())
}

/// Every service with instances now, then each service that changes, with its new set.
fn watch_all(registry: Registry) -> WatchStream {
    let changes = registry.watch_all();
    let closed = registry.closed();
    let batches = stream::unfold((changes, 0u64, true), move |(mut changes, seen, first)| {
        let registry = registry.clone();
        async move {
            if !first {
                changes.changed().await.ok()?;
            }
            changes.mark_unchanged();
            let (changed, version) = registry.changes_since(seen);
            let batch: Vec<_> = changed
                .iter()
                // The first batch lists only services that have instances.
                .filter(|(_, instances)| !(first && instances.is_empty()))
                .map(|(name, instances)| Ok(watch_response(name, instances)))
                .collect();
            Some((stream::iter(batch), (changes, version, false)))
        }
    });
    Box::pin(batches.flatten().take_until(closed))
}
