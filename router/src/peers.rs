//! Other nodes' routers: where a call goes when no instance of its service runs here.
//!
//! One balancer per service over the routers of the nodes that have it ([`Cluster::remote`]),
//! the same balancer as for local instances, with its pooled HTTP/2 connections: one per node
//! and thread, dialed by `mesh::transport` over TCP — with mTLS when the router has `[tls]`
//! ([`crate::RouterBuilder::peer_tls`]: this node's certificate, checked against the same CA
//! by the router dialed). This is the one place a router dials another.
//!
//! Local instances always win. A call this router forwards carries [`FORWARDED_HEADER`] naming
//! this node; a router that receives such a call routes it to its own instances only, so a
//! call crosses at most one hop and never loops. The header only ever narrows where a call may
//! go, so a caller who sets it itself gains nothing by it; with mTLS between nodes it will also
//! say which node forwarded, from the certificate.
//! Under mTLS the router dialed knows the dialing node by its certificate
//! (`spiffe://mesh/node/NAME`), which may forward calls but not use the Manager API unless
//! granted (`[tls] admins`).

use std::sync::Arc;

use http::{HeaderMap, HeaderValue};

use crate::{
    cluster::{Cluster, FORWARDED_HEADER},
    upstream::{Upstream, Upstreams},
};

/// The other nodes' routers, as this thread reaches them.
pub(crate) struct Peers {
    /// This node's name, sent in [`FORWARDED_HEADER`].
    node: HeaderValue,
    upstreams: Arc<Upstreams>,
    cluster: Cluster,
    /// mTLS to the other routers; `None`: plaintext (loopback, or `allow_plaintext`).
    tls: Option<mesh::transport::ClientTls>,
}

/// Where a call goes.
pub(crate) enum Pick {
    /// An instance on this node.
    Local(Arc<Upstream>),
    /// Another node's router.
    Remote(Arc<Upstream>),
    /// Nowhere: no instance here, and none elsewhere (or the call was forwarded to us).
    Nowhere,
}

impl Peers {
    /// The peers of `cluster`'s node; none for a single machine.
    /// Their routers are dialed with `tls` when it is given.
    pub(crate) fn new(cluster: &Cluster, tls: Option<mesh::transport::ClientTls>) -> Option<Self> {
        let node = cluster.this_node()?;
        let upstreams = Arc::new(Upstreams::with_tls(cluster.remote().clone(), tls.clone()));
        upstreams.follow();
        Some(Self {
            node: HeaderValue::from_str(node.name.as_str()).expect("node names are header-safe"),
            upstreams,
            cluster: cluster.clone(),
            tls,
        })
    }

    /// The same peers for another thread, with its own connections.
    pub(crate) fn for_this_thread(&self) -> Self {
        let upstreams = Arc::new(Upstreams::with_tls(
            self.cluster.remote().clone(),
            self.tls.clone(),
        ));
        upstreams.follow();
        Self {
            node: self.node.clone(),
            upstreams,
            cluster: self.cluster.clone(),
            tls: self.tls.clone(),
        }
    }

    /// This node's name.
    pub(crate) fn node(&self) -> &str {
        self.node.to_str().unwrap_or_default()
    }

    /// Marks a call this router forwards to another node.
    pub(crate) fn mark(&self, headers: &mut HeaderMap) {
        headers.insert(FORWARDED_HEADER, self.node.clone());
    }
}

/// Where a call for `service` goes: a local instance if there is one, else another node's
/// router unless another router forwarded the call here.
pub(crate) fn pick(
    local: &Upstreams,
    peers: Option<&Peers>,
    service: &str,
    headers: &HeaderMap,
) -> Pick {
    let here = local.get(service);
    if let Some(upstream) = &here
        && !upstream.balancer.is_empty()
    {
        return Pick::Local(upstream.clone());
    }
    if let Some(peers) = peers
        && !headers.contains_key(FORWARDED_HEADER)
        && let Some(remote) = peers.upstreams.get(service)
        && !remote.balancer.is_empty()
    {
        return Pick::Remote(remote);
    }
    match here {
        // One machine, the name known but no instance ready: the balancer says so.
        Some(upstream) if peers.is_none() => Pick::Local(upstream),
        // Of many, the answer names this node and says whether others were asked.
        _ => Pick::Nowhere,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cluster::{Node, NodeName},
        registry::{Instance, Registry},
    };

    fn instance(service: &str, id: &str, endpoint: &str) -> Instance {
        Instance {
            service: service.into(),
            id: id.into(),
            endpoint: endpoint.into(),
            labels: Default::default(),
        }
    }

    fn which(pick: Pick) -> &'static str {
        match pick {
            Pick::Local(_) => "local",
            Pick::Remote(_) => "remote",
            Pick::Nowhere => "nowhere",
        }
    }

    #[tokio::test]
    async fn local_instances_win_and_a_forwarded_call_is_never_forwarded_again() {
        let cluster = Cluster::node(
            Node {
                name: NodeName::new("a").unwrap(),
                advertise: Some("127.0.0.1:7701".into()),
            },
            "etcd",
        );
        let peers = Peers::new(&cluster, None).unwrap();
        let registry = Registry::new();
        let local = Upstreams::new(registry.clone());
        let plain = HeaderMap::new();
        let mut forwarded = HeaderMap::new();
        forwarded.insert(FORWARDED_HEADER, HeaderValue::from_static("b"));

        assert_eq!(
            which(pick(&local, Some(&peers), "plugin.x", &plain)),
            "nowhere"
        );
        cluster
            .remote()
            .register(instance("plugin.x", "b", "http://127.0.0.1:7702"), None)
            .unwrap();
        assert_eq!(
            which(pick(&local, Some(&peers), "plugin.x", &plain)),
            "remote"
        );
        assert_eq!(
            which(pick(&local, Some(&peers), "plugin.x", &forwarded)),
            "nowhere",
            "a forwarded call goes to local instances only"
        );

        registry
            .register(instance("plugin.x", "x-0", "unix:/tmp/x-0.sock"), None)
            .unwrap();
        assert_eq!(
            which(pick(&local, Some(&peers), "plugin.x", &plain)),
            "local"
        );
        assert_eq!(
            which(pick(&local, Some(&peers), "plugin.x", &forwarded)),
            "local"
        );

        let mut headers = HeaderMap::new();
        peers.mark(&mut headers);
        assert_eq!(headers[FORWARDED_HEADER], "a");
    }
}
