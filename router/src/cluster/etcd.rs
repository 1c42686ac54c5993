//! The etcd backend: this node's instances under a lease of its own, the others' from a watch
//! of the prefix.
//!
//! Keys are `<prefix>services/<service>/<node>/<instance>` (prefix `/mesh/v1/` by default);
//! values are JSON, `{"node":"b","router":"10.0.0.2:7700","instance":"echo-0"}`: what another
//! router needs to forward a call to this node's router, which picks the instance itself.
//!
//! One task runs sessions. A session grants a lease (or keeps the last one if etcd still has
//! it), puts every local instance under it, lists the prefix, and watches it from the listed
//! revision; then it follows local changes (put, delete), keeps the lease alive every third
//! of its time to live, and applies the other nodes' changes. Whatever ends a session — a
//! lease that expired or was revoked, a deleted key of ours, a compacted or cancelled watch,
//! an error, no keep-alive answer within the lease's time to live — the next one starts over
//! from a fresh list, after a jittered backoff of at most [`MAX_BACKOFF`] when etcd failed and
//! at once otherwise. Meanwhile the router routes from the last view and the state says
//! [`State::Unreachable`].
//!
//! Bound: once etcd answers again, every live instance of this node is registered again within
//! the lease's time to live plus 2 s (noticing the loss takes at most the time to live, the
//! backoff at most 1 s, the puts the rest).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tonic::Streaming;

use super::{Backend, BackendHandle, Cluster, NODE_LABEL, Node, NodeName, State, is_gateway};
use crate::registry::{Instance, Registry};
use mesh::{Address, Channel, ServiceName};

/// The generated etcd v3 client (`proto/etcd/rpc.proto`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

/// Key prefix when the config names none.
pub const DEFAULT_PREFIX: &str = "/mesh/v1/";
/// Lease time to live when the config names none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Longest wait between attempts to reach etcd.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Largest value mesh reads from etcd; a bigger one is skipped as not mesh's.
const MAX_VALUE: usize = 4096;
/// Keys per page when listing the prefix.
const LIST_PAGE: i64 = 5000;
/// Largest message read from etcd (a page of a list, a watch response).
const MAX_MESSAGE: usize = 64 << 20;
/// Most other nodes' instances this node keeps in its view.
const MAX_REMOTE_KEYS: usize = 1_000_000;

/// How to reach etcd and what to keep there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `host:port` of each etcd endpoint (`http://` stripped); tried in turn.
    pub endpoints: Vec<String>,
    /// Key prefix, ending in `/`.
    pub prefix: String,
    /// This node's lease time to live (whole seconds, at least 2).
    pub ttl: Duration,
}

/// The etcd backend for `node`.
#[derive(Debug)]
pub struct Etcd {
    config: EtcdConfig,
    node: Node,
}

impl Etcd {
    /// A backend that keeps `node`'s instances in etcd as `config` says.
    pub fn new(config: EtcdConfig, node: Node) -> Self {
        Self { config, node }
    }
}

impl Backend for Etcd {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn start(self: Box<Self>, local: Registry, cluster: Cluster) -> BackendHandle {
        let this = *self;
        BackendHandle::spawn(move |stop| Box::pin(run(this, local, cluster, stop)))
    }
}

/// What a key's value says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Value {
    node: String,
    router: String,
    instance: String,
}

/// A parsed key: service, node, instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    service: String,
    node: String,
    instance: String,
}

impl Key {
    fn parse(prefix: &str, key: &[u8]) -> Option<Self> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(prefix)?.strip_prefix("services/")?;
        let (service, rest) = rest.split_once('/')?;
        let (node, instance) = rest.split_once('/')?;
        ServiceName::check(service.as_bytes()).ok()?;
        NodeName::new(node).ok()?;
        if instance.is_empty() || instance.len() > crate::registry::MAX_ID_LEN {
            return None;
        }
        Some(Self {
            service: service.into(),
            node: node.into(),
            instance: instance.into(),
        })
    }

    fn encode(&self, prefix: &str) -> Vec<u8> {
        format!(
            "{prefix}services/{}/{}/{}",
            self.service, self.node, self.instance
        )
        .into_bytes()
    }
}

/// The end of the range of keys that start with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The other nodes' instances: (service, node) → instance → router address.
#[derive(Default)]
struct View {
    entries: BTreeMap<(String, String), BTreeMap<String, String>>,
    keys: usize,
    /// What `Cluster::remote` holds now: (service, node) → router.
    applied: BTreeMap<(String, String), String>,
}

impl View {
    fn put(&mut self, key: Key, router: String) -> (String, String) {
        let pair = (key.service, key.node);
        let instances = self.entries.entry(pair.clone()).or_default();
        if instances.insert(key.instance, router).is_none() {
            self.keys += 1;
        }
        pair
    }

    fn delete(&mut self, key: Key) -> (String, String) {
        let pair = (key.service, key.node);
        if let Some(instances) = self.entries.get_mut(&pair) {
            if instances.remove(&key.instance).is_some() {
                self.keys -= 1;
            }
            if instances.is_empty() {
                self.entries.remove(&pair);
            }
        }
        pair
    }

    /// Brings `remote` in line with the entries of `touched` pairs.
    fn apply(&mut self, remote: &Registry, touched: BTreeSet<(String, String)>) {
        for pair in touched {
            let router = self
                .entries
                .get(&pair)
                .and_then(|instances| instances.values().next().cloned());
            match router {
                None => {
                    if self.applied.remove(&pair).is_some() {
                        remote.remove(&pair.0, &pair.1);
                    }
                }
                Some(router) if self.applied.get(&pair) == Some(&router) => {}
                Some(router) => {
                    let instance = Instance {
                        service: pair.0.clone(),
                        id: pair.1.clone(),
                        endpoint: format!("http://{router}"),
                        labels: [(NODE_LABEL.to_owned(), pair.1.clone())].into(),
                    };
                    match remote.register(instance, None) {
                        Ok(_) => {
                            self.applied.insert(pair, router);
                        }
                        Err(error) => tracing::warn!(%error, "skipping another node's instance"),
                    }
                }
            }
        }
    }

    /// Replaces everything with `listed`.
    fn replace(&mut self, remote: &Registry, listed: Vec<(Key, String)>) {
        let mut touched: BTreeSet<(String, String)> = self.applied.keys().cloned().collect();
        self.entries.clear();
        self.keys = 0;
        for (key, router) in listed {
            touched.insert(self.put(key, router));
        }
        self.apply(remote, touched);
    }
}

/// Why a session ended.
enum End {
    /// Asked to stop.
    Stopped,
    /// The lease is gone (expired, revoked) or a key of ours was deleted: start over now.
    LeaseLost(String),
    /// The watch must start again from a fresh list (compacted, cancelled): at once.
    Resync(String),
    /// etcd failed or cannot be reached: start over after a backoff.
    Failed(String),
}

fn failed(what: &str) -> impl Fn(tonic::Status) -> End + '_ {
    move |status| End::Failed(format!("{what}: {}", status.message()))
}

struct Session<'a> {
    backend: &'a Etcd,
    channel: Channel,
    local: &'a Registry,
    cluster: &'a Cluster,
    timeout: Duration,
}

async fn run(backend: Etcd, local: Registry, cluster: Cluster, mut stop: watch::Receiver<bool>) {
    let mut lease: Option<i64> = None;
    let mut attempt: u32 = 0;
    let mut endpoint = 0usize;
    let mut view = View::default();
    let mut registered_once = false;
    let endpoints = backend.config.endpoints.clone();
    let timeout = backend.config.ttl.min(Duration::from_secs(3));
    loop {
        let at = &endpoints[endpoint % endpoints.len()];
        let session = Session {
            backend: &backend,
            channel: Channel::to_server(Address::Tcp(at.clone())),
            local: &local,
            cluster: &cluster,
            timeout,
        };
        let end = session
            .run(&mut lease, &mut view, &mut registered_once, &mut stop)
            .await;
        let pause = match end {
            End::Stopped => {
                if let Some(id) = lease {
                    // Withdraw at once rather than after the time to live.
                    let request = pb::LeaseRevokeRequest { id };
                    let mut client = pb::lease_client::LeaseClient::new(session.channel.clone());
                    let _ = tokio::time::timeout(timeout, client.lease_revoke(request)).await;
                }
                return;
            }
            End::LeaseLost(why) => {
                tracing::warn!("etcd: {why}; registering this node's instances again");
                lease = None;
                cluster.set_state(State::Connecting);
                attempt = 0;
                Duration::ZERO
            }
            End::Resync(why) => {
                tracing::info!("etcd: {why}; listing again");
                attempt = 0;
                Duration::ZERO
            }
            End::Failed(why) => {
                cluster.set_state(State::Unreachable {
                    error: format!("{at}: {why}"),
                });
                endpoint += 1;
                attempt = attempt.saturating_add(1);
                backoff(attempt)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// Completes once asked to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// 100 ms, doubling, at most [`MAX_BACKOFF`], with jitter so nodes spread out.
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << attempt.min(4));
    let base = base.min(MAX_BACKOFF);
    let jitter = getrandom::u32().unwrap_or(0) % 1000;
    base.mul_f64(0.5 + f64::from(jitter) / 2000.0)
}

/// A stream fed by a channel, for the request side of etcd's bidi calls.
fn requests<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

impl Session<'_> {
    fn node(&self) -> &str {
        self.backend.node.name.as_str()
    }

    fn prefix(&self) -> &str {
        &self.backend.config.prefix
    }

    async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, End> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => {
                self.cluster.contacted();
                Ok(response.into_inner())
            }
            Ok(Err(status)) => Err(failed(what)(status)),
            Err(_) => Err(End::Failed(format!(
                "{what}: no answer in {:?}",
                self.timeout
            ))),
        }
    }

    /// This node's instances as keys and values.
    fn desired(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let router = self.backend.node.advertise.clone().unwrap_or_default();
        let mut desired = BTreeMap::new();
        for (service, instances) in self.local.list() {
            for instance in instances.iter().filter(|i| !is_gateway(i)) {
                let key = Key {
                    service: service.to_string(),
                    node: self.node().into(),
                    instance: instance.id.clone(),
                };
                let value = Value {
                    node: self.node().into(),
                    router: router.clone(),
                    instance: instance.id.clone(),
                };
                let value = serde_json::to_vec(&value).expect("plain strings encode");
                desired.insert(key.encode(self.prefix()), value);
            }
        }
        desired
    }

    async fn put(&self, key: Vec<u8>, value: Vec<u8>, lease: i64) -> Result<(), End> {
        let mut kv = pb::kv_client::KvClient::new(self.channel.clone());
        let request = pb::PutRequest {
            key,
            value,
            lease,
            prev_kv: false,
        };
        match tokio::time::timeout(self.timeout, kv.put(request)).await {
            Ok(Ok(_)) => {
                self.cluster.contacted();
                Ok(())
            }
            Ok(Err(status)) if status.message().contains("lease not found") => Err(End::LeaseLost(
                format!("lease {lease:x} is gone ({})", status.message()),
            )),
            Ok(Err(status)) => Err(failed("put")(status)),
            Err(_) => Err(End::Failed(format!("put: no answer in {:?}", self.timeout))),
        }
    }

    async fn delete(&self, key: Vec<u8>) -> Result<(), End> {
        let mut kv = pb::kv_client::KvClient::new(self.channel.clone());
        let request = pb::DeleteRangeRequest {
            key,
            range_end: Vec::new(),
            prev_kv: false,
        };
        self.call("delete", kv.delete_range(request))
            .await
            .map(drop)
    }

    /// Puts what differs between `published` and `desired`, deletes what is gone.
    async fn reconcile(
        &self,
        published: &mut BTreeMap<Vec<u8>, Vec<u8>>,
        desired: BTreeMap<Vec<u8>, Vec<u8>>,
        lease: i64,
    ) -> Result<(), End> {
        let gone: Vec<Vec<u8>> = published
            .keys()
            .filter(|key| !desired.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            self.delete(key.clone()).await?;
            published.remove(&key);
        }
        for (key, value) in desired {
            if published.get(&key) != Some(&value) {
                self.put(key.clone(), value.clone(), lease).await?;
                published.insert(key, value);
            }
        }
        Ok(())
    }

    /// Opens a keep-alive stream for `id` and reads its first answer: the stream, and whether
    /// etcd still has the lease. (etcd answers a stream's headers with its first message, so
    /// the first request goes out with the call.)
    async fn keep_alive(
        &self,
        id: i64,
    ) -> Result<
        (
            mpsc::Sender<pb::LeaseKeepAliveRequest>,
            Streaming<pb::LeaseKeepAliveResponse>,
            bool,
        ),
        End,
    > {
        let (tx, rx) = mpsc::channel(4);
        let _ = tx.send(pb::LeaseKeepAliveRequest { id }).await;
        let mut client = pb::lease_client::LeaseClient::new(self.channel.clone());
        let mut answers = self
            .call("keep-alive", client.lease_keep_alive(requests(rx)))
            .await?;
        match tokio::time::timeout(self.timeout, answers.message()).await {
            Ok(Ok(Some(answer))) => Ok((tx, answers, answer.ttl > 0)),
            Ok(Ok(None)) => Err(End::Failed("keep-alive stream ended".into())),
            Ok(Err(status)) => Err(failed("keep-alive")(status)),
            Err(_) => Err(End::Failed("keep-alive: no answer".into())),
        }
    }

    /// A new lease.
    async fn grant(&self) -> Result<i64, End> {
        let mut client = pb::lease_client::LeaseClient::new(self.channel.clone());
        let request = pb::LeaseGrantRequest {
            ttl: self.backend.config.ttl.as_secs() as i64,
            id: 0,
        };
        let granted = self
            .call("lease grant", client.lease_grant(request))
            .await?;
        if !granted.error.is_empty() {
            return Err(End::Failed(format!("lease grant: {}", granted.error)));
        }
        Ok(granted.id)
    }

    /// Lists the prefix: the others' keys into `view`, ours that we no longer want deleted.
    async fn list(
        &self,
        view: &mut View,
        published: &BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> Result<i64, End> {
        let prefix = self.prefix().as_bytes().to_vec();
        let end = prefix_end(&prefix);
        let mut kv = pb::kv_client::KvClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE);
        let mut from = prefix;
        let mut revision = 0;
        let mut others = Vec::new();
        let mut stale = Vec::new();
        // In pages, all at the first page's revision: a large cluster's list is many
        // megabytes, more than one message should be.
        loop {
            let request = pb::RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: LIST_PAGE,
                revision,
                ..Default::default()
            };
            let page = self.call("list", kv.range(request)).await?;
            if revision == 0 {
                revision = page.header.map_or(0, |h| h.revision);
            }
            let last = page.kvs.last().map(|kv| kv.key.clone());
            for kv in page.kvs {
                let Some(key) = Key::parse(self.prefix(), &kv.key) else {
                    continue;
                };
                if key.node == self.node() {
                    // Ours from before (a restart under a lease not yet expired): not wanted now.
                    if !published.contains_key(&kv.key) {
                        stale.push(kv.key);
                    }
                    continue;
                }
                if others.len() >= MAX_REMOTE_KEYS {
                    continue;
                }
                if let Some(router) = router_of(&key, &kv.value) {
                    others.push((key, router));
                }
            }
            match last {
                Some(mut last) if page.more => {
                    last.push(0);
                    from = last;
                }
                _ => break,
            }
        }
        if others.len() >= MAX_REMOTE_KEYS {
            tracing::warn!("more than {MAX_REMOTE_KEYS} instances of other nodes; some skipped");
        }
        for key in stale {
            self.delete(key).await?;
        }
        view.replace(self.cluster.remote(), others);
        Ok(revision)
    }

    async fn run(
        &self,
        lease: &mut Option<i64>,
        view: &mut View,
        registered_once: &mut bool,
        stop: &mut watch::Receiver<bool>,
    ) -> End {
        match self.session(lease, view, registered_once, stop).await {
            Ok(never) => match never {},
            Err(end) => end,
        }
    }

    async fn session(
        &self,
        lease: &mut Option<i64>,
        view: &mut View,
        registered_once: &mut bool,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<std::convert::Infallible, End> {
        let ttl = self.backend.config.ttl;
        // The last lease if etcd still keeps it (it was unreachable a while), else a new one.
        let kept = match *lease {
            Some(id) => match self.keep_alive(id).await? {
                (tx, answers, true) => Some((id, tx, answers)),
                (_, _, false) => None,
            },
            None => None,
        };
        let fresh = kept.is_none();
        let (id, ka_tx, mut answers) = match kept {
            Some(kept) => kept,
            None => {
                let id = self.grant().await?;
                match self.keep_alive(id).await? {
                    (tx, answers, true) => (id, tx, answers),
                    (_, _, false) => {
                        return Err(End::LeaseLost(format!("lease {id:x} gone at once")));
                    }
                }
            }
        };
        *lease = Some(id);
        if fresh && *registered_once {
            self.cluster.reregistered();
        }

        let mut local_changes = self.local.watch_all();
        local_changes.mark_unchanged();
        let mut published = BTreeMap::new();
        self.reconcile(&mut published, self.desired(), id).await?;
        *registered_once = true;
        let revision = self.list(view, &published).await?;

        let (watch_tx, watch_rx) = mpsc::channel(1);
        let prefix = self.prefix().as_bytes().to_vec();
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    range_end: prefix_end(&prefix),
                    key: prefix,
                    start_revision: revision + 1,
                    ..Default::default()
                },
            )),
        };
        let _ = watch_tx.send(create).await;
        let mut watch_client = pb::watch_client::WatchClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE);
        let mut events = self
            .call("watch", watch_client.watch(requests(watch_rx)))
            .await?;
        self.cluster.set_state(State::Connected);

        let mut keep_alive = tokio::time::interval(ttl / 3);
        keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut answered = Instant::now();
        loop {
            tokio::select! {
                () = stopped(stop) => return Err(End::Stopped),
                changed = local_changes.changed() => {
                    if changed.is_err() {
                        return Err(End::Stopped);
                    }
                    local_changes.mark_unchanged();
                    self.reconcile(&mut published, self.desired(), id).await?;
                }
                _ = keep_alive.tick() => {
                    if answered.elapsed() > ttl {
                        return Err(End::Failed(format!("no keep-alive answer in {ttl:?}")));
                    }
                    if ka_tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
                        return Err(End::Failed("keep-alive stream closed".into()));
                    }
                }
                answer = answers.message() => match answer {
                    Ok(Some(answer)) if answer.ttl > 0 => {
                        answered = Instant::now();
                        self.cluster.contacted();
                    }
                    Ok(Some(_)) => {
                        return Err(End::LeaseLost(format!("lease {id:x} expired or was revoked")))
                    }
                    Ok(None) => return Err(End::Failed("keep-alive stream ended".into())),
                    Err(status) => return Err(failed("keep-alive")(status)),
                },
                event = events.message() => match event {
                    Ok(Some(response)) => {
                        self.cluster.contacted();
                        self.apply(response, view, &mut published, id).await?;
                    }
                    Ok(None) => return Err(End::Failed("watch ended".into())),
                    Err(status) => return Err(failed("watch")(status)),
                },
            }
        }
    }

    /// One watch response: the others' changes into the view; a deletion of one of our keys
    /// (a revoked lease, `etcdctl del`) puts it back, or ends the session if the lease is gone.
    async fn apply(
        &self,
        response: pb::WatchResponse,
        view: &mut View,
        published: &mut BTreeMap<Vec<u8>, Vec<u8>>,
        lease: i64,
    ) -> Result<(), End> {
        if response.compact_revision > 0 {
            return Err(End::Resync(format!(
                "watch revision compacted (oldest kept: {})",
                response.compact_revision
            )));
        }
        if response.canceled {
            return Err(End::Resync(format!(
                "watch cancelled ({})",
                response.cancel_reason
            )));
        }
        let mut touched = BTreeSet::new();
        let mut lost = Vec::new();
        for event in response.events {
            let Some(kv) = event.kv else { continue };
            let Some(key) = Key::parse(self.prefix(), &kv.key) else {
                continue;
            };
            let deleted = event.r#type == pb::event::EventType::Delete as i32;
            if key.node == self.node() {
                if deleted && published.contains_key(&kv.key) {
                    lost.push(kv.key);
                }
                continue;
            }
            if deleted {
                touched.insert(view.delete(key));
            } else if let Some(router) = router_of(&key, &kv.value) {
                if view.keys < MAX_REMOTE_KEYS {
                    touched.insert(view.put(key, router));
                }
            } else {
                // Not a value mesh wrote: it stands for no instance.
                touched.insert(view.delete(key));
            }
        }
        view.apply(self.cluster.remote(), touched);
        for key in lost {
            if let Some(value) = published.get(&key).cloned() {
                tracing::info!(
                    key = %String::from_utf8_lossy(&key),
                    "etcd: a key of this node was deleted; putting it back"
                );
                self.put(key, value, lease).await?;
            }
        }
        Ok(())
    }
}

/// The router address in `value`, if it is a value mesh wrote for `key`.
fn router_of(key: &Key, value: &[u8]) -> Option<String> {
    if value.len() > MAX_VALUE {
        return None;
    }
    let value: Value = serde_json::from_slice(value).ok()?;
    if value.node != key.node || value.instance != key.instance {
        return None;
    }
    match value.router.parse::<Address>() {
        Ok(Address::Tcp(hostport)) if hostport.len() <= 253 + 6 => Some(hostport),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_hostile_ones_are_skipped() {
        let key = Key::parse("/mesh/v1/", b"/mesh/v1/services/plugin.echo/b/echo-0").unwrap();
        assert_eq!(
            (
                key.service.as_str(),
                key.node.as_str(),
                key.instance.as_str()
            ),
            ("plugin.echo", "b", "echo-0")
        );
        assert_eq!(
            key.encode("/mesh/v1/"),
            b"/mesh/v1/services/plugin.echo/b/echo-0"
        );
        for bad in [
            &b"/mesh/v1/services/Plugin/b/x"[..],
            b"/mesh/v1/services/plugin.echo/B/x",
            b"/mesh/v1/services/plugin.echo/b/",
            b"/mesh/v1/services/plugin.echo",
            b"/other/services/plugin.echo/b/x",
            b"/mesh/v1/services/plugin.echo/b\xff/x",
        ] {
            assert!(Key::parse("/mesh/v1/", bad).is_none(), "{bad:?}");
        }
        let value = br#"{"node":"b","router":"127.0.0.1:7702","instance":"echo-0"}"#;
        assert_eq!(router_of(&key, value).as_deref(), Some("127.0.0.1:7702"));
        for bad in [
            &br#"{"node":"c","router":"127.0.0.1:7702","instance":"echo-0"}"#[..],
            br#"{"node":"b","router":"unix:/tmp/x.sock","instance":"echo-0"}"#,
            br#"{"node":"b","router":"nowhere","instance":"echo-0"}"#,
            b"not json",
            &[b'{'; 5000],
        ] {
            assert!(router_of(&key, bad).is_none());
        }
    }

    #[test]
    fn the_prefix_range_ends_past_every_key_under_it() {
        assert_eq!(prefix_end(b"/mesh/v1/"), b"/mesh/v10");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[tokio::test]
    async fn the_view_keeps_one_entry_per_service_and_node() {
        let remote = Registry::new();
        let mut view = View::default();
        let key = |i: &str| Key {
            service: "plugin.x".into(),
            node: "b".into(),
            instance: i.into(),
        };
        let mut touched = BTreeSet::new();
        touched.insert(view.put(key("x-0"), "127.0.0.1:1".into()));
        touched.insert(view.put(key("x-1"), "127.0.0.1:1".into()));
        view.apply(&remote, touched);
        let seen = remote.resolve("plugin.x");
        assert_eq!(seen.len(), 1);
        assert_eq!(
            (seen[0].id.as_str(), seen[0].endpoint.as_str()),
            ("b", "http://127.0.0.1:1")
        );
        let touched = [view.delete(key("x-0"))].into();
        view.apply(&remote, touched);
        assert_eq!(remote.resolve("plugin.x").len(), 1, "x-1 is still there");
        view.replace(&remote, Vec::new());
        assert!(remote.resolve("plugin.x").is_empty());
    }

    #[test]
    fn backoff_stays_within_its_bound() {
        for attempt in 0..40 {
            assert!(backoff(attempt) <= MAX_BACKOFF);
        }
    }
}
