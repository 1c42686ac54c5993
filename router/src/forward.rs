//! Accepting HTTP/2 connections and forwarding their calls: the router's own API is served
//! here, every other call goes to an instance of the service it names, with bodies and
//! trailers streamed both ways so flow control holds end to end and a cancelled call resets
//! the upstream stream.
//!
//! A forwarded call costs: one header lookup for its route, one for its deadline, a lock-free
//! map read, two counters (in flight in the router and on the instance) and hyper's own work;
//! with metrics on, what `metrics` records (a branch per hook when off).
//! Request and response bodies pass through unboxed.

use std::{
    convert::Infallible,
    future::Future,
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::watch,
    task::JoinSet,
    time::Instant,
};
use tonic::{
    Status,
    body::Body,
    server::NamedService,
    service::{Routes, RoutesBuilder},
};
use tower::ServiceExt;

use mesh::{plugin::GrpcService, transport};

use crate::{
    Limits, SERVICE_HEADER,
    body::{Forwarded, RouterBody},
    calls::{self, CallPolicy},
    cluster::{Cluster, FORWARDED_HEADER},
    deadline::{self, Deadlines, Expiry},
    grpc::{self, RequestBody},
    identity::{self, Caller, Identify},
    limit::{Admission, Gauge, Handshake, Held, Permit},
    metrics::{Refusal, RouterMetrics},
    peers::{self, Peers, Pick},
    policy,
    registry::{Registry, RegistryService},
    route::{self, Route},
    tls::ServerTls,
    upstream::{Upstream, Upstreams},
};

thread_local! {
    /// Calls this worker thread is routing now, until their answers' headers.
    static HANDLING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts a call in [`HANDLING`] until dropped (answered, or cancelled by its caller).
struct Handling {
    /// No other call was being routed on this thread when this one came.
    alone: bool,
}

impl Handling {
    fn enter() -> Self {
        Self {
            alone: HANDLING.with(|calls| calls.replace(calls.get() + 1)) == 0,
        }
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        HANDLING.with(|calls| calls.set(calls.get() - 1));
    }
}

/// How long a shutting-down router lets open calls finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The mesh router. Cheap to clone; clones serve the same routes.
#[derive(Clone)]
pub struct Router {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    local: Routes,
    upstreams: Arc<Upstreams>,
    deadlines: Deadlines,
    /// Connections and calls in flight, under the router's limits (shared by all threads).
    pub(crate) admission: Arc<Admission>,
    /// The uid trusted besides root: the router's own.
    pub(crate) owner: u32,
    /// Names the managed plugin instance a local peer (Unix, or TCP from this host) belongs
    /// to, once per connection.
    pub(crate) identify: Option<Arc<dyn Identify>>,
    /// Decides which calls a plugin caller may forward; none installed, every call may go.
    call_policy: Option<Arc<dyn CallPolicy>>,
    /// Calls, durations, refusals and connections; off unless the embedder gave a meter.
    metrics: RouterMetrics,
    /// Other nodes' routers, for names with no instance here; none on a single machine.
    peers: Option<Peers>,
    /// mTLS on the TCP listener; `None`: plaintext.
    tls: Option<ServerTls>,
}

/// One client connection: who is on it (fixed at accept time) and its calls.
struct Connection {
    inner: Arc<Inner>,
    caller: Caller,
    /// Forwarded calls in flight on it, within its class's share and the total.
    calls: Arc<Gauge>,
    /// The router's own calls open on it (unbounded: counted for the idle timeout).
    local: Arc<Gauge>,
    /// A call came since the last idle check.
    active: AtomicBool,
}

impl Connection {
    /// No call open, and none came since the last check.
    fn idle(&self) -> bool {
        let active = self.active.swap(false, Ordering::Relaxed);
        !active && self.calls.count() == 0 && self.local.count() == 0
    }
}

/// Builds a [`Router`]: the registry it serves and routes by, extra local services, and its
/// [`Limits`].
pub struct RouterBuilder {
    registry: Registry,
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    descriptors: Vec<&'static [u8]>,
    limits: Limits,
    identify: Option<Arc<dyn Identify>>,
    call_policy: Option<Arc<dyn CallPolicy>>,
    metrics: RouterMetrics,
    cluster: Cluster,
    tls: Option<ServerTls>,
    peer_tls: Option<mesh::transport::ClientTls>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").finish_non_exhaustive()
    }
}

impl Router {
    /// A router over `registry`, with the default [`Limits`].
    pub fn builder(registry: Registry) -> RouterBuilder {
        RouterBuilder {
            registry,
            routes: RoutesBuilder::default(),
            names: Vec::new(),
            descriptors: Vec::new(),
            limits: Limits::default(),
            identify: None,
            call_policy: None,
            metrics: RouterMetrics::off(),
            cluster: Cluster::single(),
            tls: None,
            peer_tls: None,
        }
    }

    /// The same router for another thread: same routes, limits and counters, but its own
    /// connections to instances, so that a call is handled start to end on the thread that
    /// accepted it. Call it on that thread's runtime: it follows the registry from there.
    pub fn for_this_thread(&self) -> Router {
        let upstreams = Arc::new(Upstreams::new(self.inner.upstreams.registry().clone()));
        upstreams.follow();
        Router {
            inner: Arc::new(Inner {
                local: self.inner.local.clone(),
                upstreams,
                deadlines: self.inner.deadlines.clone(),
                admission: self.inner.admission.clone(),
                owner: self.inner.owner,
                identify: self.inner.identify.clone(),
                call_policy: self.inner.call_policy.clone(),
                metrics: self.inner.metrics.clone(),
                peers: self.inner.peers.as_ref().map(Peers::for_this_thread),
                tls: self.inner.tls.clone(),
            }),
        }
    }

    /// Serves connections from `listener` until `shutdown` completes, then lets open calls
    /// finish. Each connection's caller is who the kernel says connected (`SO_PEERCRED`).
    pub async fn serve_unix(
        self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let owner = self.inner.owner;
        let identify = self.inner.identify.clone();
        self.serve(
            || async {
                loop {
                    let (stream, _) = listener.accept().await?;
                    // Once per connection: reads a few /proc files when a lookup is installed.
                    match Caller::of_unix(&stream, owner, identify.as_deref()) {
                        Ok(caller) => return Ok((stream, caller)),
                        // Whom the kernel cannot name is not served.
                        Err(error) => tracing::warn!(%error, "no peer credentials; closed"),
                    }
                }
            },
            shutdown,
            false,
        )
        .await
    }

    /// Serves TCP connections from `listener` until `shutdown` completes. A process of this
    /// host is the caller it would be on the Unix socket (a plugin, the owner, another local
    /// user), named by the kernel's socket table ([`Caller::of_tcp`]); a loopback peer it
    /// cannot name is closed. Other callers are [`Caller::Remote`]: they may forward calls
    /// and read the registry; with mTLS ([`RouterBuilder::tls`]) each is who its certificate
    /// says, and may do what that identity is granted.
    pub async fn serve_tcp(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        if let Some(tls) = self.inner.tls.clone() {
            return self.serve_tls(listener, tls, shutdown).await;
        }
        let owner = self.inner.owner;
        let identify = self.inner.identify.clone();
        self.serve(
            || async {
                loop {
                    let (stream, addr) = listener.accept().await?;
                    stream.set_nodelay(true)?;
                    // Once per connection: a read of the socket table, and for a local peer a
                    // walk of its uid's descriptors (see `peer`).
                    match identity::of_tcp_stream(&stream, addr, owner, identify.clone()).await {
                        Ok(Some(caller)) => return Ok((stream, caller)),
                        Ok(None) => {
                            let caller = Caller::Remote {
                                addr,
                                identity: None,
                                grant: crate::tls::Grant::None,
                            };
                            return Ok((stream, caller));
                        }
                        // A process of this host the kernel cannot name is not served: it
                        // must not pass for an anonymous remote client.
                        Err(error) => {
                            tracing::warn!(%addr, %error, "loopback TCP peer not identified; closed");
                        }
                    }
                }
            },
            shutdown,
            true,
        )
        .await
    }

    pub(crate) async fn serve<F, Fut, S>(
        &self,
        mut accept: F,
        shutdown: impl Future<Output = ()>,
        over_tcp: bool,
    ) -> io::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = io::Result<(S, Caller)>>,
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = &self.inner.admission.limits;
        let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http.initial_stream_window_size(transport::WINDOW)
            .initial_connection_window_size(transport::CONNECTION_WINDOW)
            .max_concurrent_streams(limits.max_concurrent_streams)
            // h2 answers a bare 431 past its own limit: keep that well above the router's,
            // which answers with a gRPC status (see `grpc`).
            .max_header_list_size(
                limits
                    .max_header_list_size
                    .saturating_mul(4)
                    .max(HARD_HEADER_LIST_SIZE),
            );
        let (stopping, stop) = watch::channel(false);
        let mut connections = JoinSet::new();
        let mut refused_logged: Option<Instant> = None;
        tokio::pin!(shutdown);
        // One accept at a time, kept across the loop's turns: an accept may be past the
        // kernel's (a TCP peer being identified) when another connection ends, and dropping
        // it then would drop the connection it holds.
        let accepting = accept();
        tokio::pin!(accepting);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                accepted = &mut accepting => accepted,
            };
            accepting.set(accept());
            let (stream, caller) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: log, breathe, keep serving what is open.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let class = caller.class(over_tcp);
            let permit = match self.inner.admission.connect(class) {
                Ok(permit) => permit,
                Err(full) => {
                    self.inner.metrics.refused(Refusal::Connections);
                    // Closed at once: the client sees UNAVAILABLE now rather than a hang.
                    if refused_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        refused_logged = Some(Instant::now());
                        tracing::warn!(
                            "refusing {}: {} are open ({})",
                            class.name(),
                            full.max,
                            full.name
                        );
                    }
                    drop(stream);
                    continue;
                }
            };
            let counted = self.inner.metrics.connection(class);
            let connection = Arc::new(Connection {
                inner: self.inner.clone(),
                caller,
                calls: self.inner.admission.connection_calls(class),
                local: Gauge::new("calls open", usize::MAX),
                active: AtomicBool::new(false),
            });
            let served = connection.clone();
            let service = hyper::service::service_fn(move |request| {
                let connection = served.clone();
                async move { Ok::<_, Infallible>(connection.inner.handle(&connection, request).await) }
            });
            let io = Handshake::new(stream, limits.handshake_timeout);
            let conn = http.serve_connection(TokioIo::new(io), service);
            let idle_timeout = limits.idle_timeout;
            let mut stop = stop.clone();
            // A debug span, so that with the default filter it costs nothing per poll.
            let span = tracing::debug_span!("connection", caller = %connection.caller);
            connections.spawn(tracing::Instrument::instrument(
                async move {
                    tokio::pin!(conn);
                    let mut idle =
                        tokio::time::interval_at(Instant::now() + idle_timeout, idle_timeout);
                    let mut closing = false;
                    loop {
                        tokio::select! {
                            ended = conn.as_mut() => {
                                if let Err(error) = ended {
                                    tracing::debug!(%error, "router connection ended");
                                }
                                break;
                            }
                            _ = stop.wait_for(|stop| *stop), if !closing => {
                                closing = true;
                                conn.as_mut().graceful_shutdown();
                            }
                            _ = idle.tick(), if !closing => if connection.idle() {
                                tracing::debug!("closing an idle connection");
                                closing = true;
                                conn.as_mut().graceful_shutdown();
                            }
                        }
                    }
                    drop(permit);
                    drop(counted);
                },
                span,
            ));
        }
        // Open calls may finish; a stream that never ends (a client's watch, a chat) must not
        // hold the shutdown forever.
        let _ = stopping.send(true);
        let drained = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
            tracing::warn!("calls still open after {DRAIN_TIMEOUT:?} of draining; closing them");
            connections.shutdown().await;
        }
        Ok(())
    }
}

/// The header list h2 itself accepts, at least: past it, h2 answers HTTP 431 before the
/// router sees the call, and past a quarter more its CONTINUATION guard closes the whole
/// connection (ENHANCE_YOUR_CALM). Everything between the router's own limit and this one is
/// answered per call with `RESOURCE_EXHAUSTED` (see `grpc`). 16 times the default limit, and
/// far above what real clients send (grpc-java refuses more than 8 KiB of metadata, grpc-go's
/// and hyper's defaults are 16 KiB): what a stream may hold in memory until the router refuses
/// it is bounded by this times `max_concurrent_streams`.
const HARD_HEADER_LIST_SIZE: u32 = 256 << 10;

impl Inner {
    async fn handle(
        &self,
        connection: &Connection,
        request: Request<Incoming>,
    ) -> Response<RouterBody> {
        // A worker serving one call at a time stays awake for the next one (see
        // `mesh::tuning::linger`); under load it has work enough, and lingering would only take
        // CPU time from the clients and plugins beside it.
        let handling = Handling::enter();
        if handling.alone {
            mesh::tuning::linger_touch();
        }
        let response = self.route(connection, request).await;
        if handling.alone {
            mesh::tuning::linger_touch();
        }
        response
    }

    async fn route(
        &self,
        connection: &Connection,
        mut request: Request<Incoming>,
    ) -> Response<RouterBody> {
        connection.active.store(true, Ordering::Relaxed);
        if let Err(refusal) = grpc::check(
            &request,
            self.admission.limits.max_header_list_size as usize,
        ) {
            self.metrics.refused(Refusal::Invalid);
            return *refusal;
        }
        let (upstream, remote) = match route::route(&request) {
            Route::Local => return self.local(connection, request).await,
            Route::Service(service) => {
                // Before the lookup: a plugin refused a service learns nothing of it.
                let policy = self.call_policy.as_ref();
                let method = request.uri().path();
                if let Err(status) = calls::check(policy, &connection.caller, service, method) {
                    self.metrics.refused(Refusal::Policy);
                    return status.into_http();
                }
                match peers::pick(
                    &self.upstreams,
                    self.peers.as_ref(),
                    service,
                    request.headers(),
                ) {
                    Pick::Local(upstream) => (upstream, false),
                    Pick::Remote(upstream) => (upstream, true),
                    Pick::Nowhere => {
                        self.metrics.refused(Refusal::NoInstance);
                        return self.unknown(service, request.headers()).into_http();
                    }
                }
            }
            Route::Invalid(error) => {
                self.metrics.refused(Refusal::Invalid);
                return Status::invalid_argument(format!("{SERVICE_HEADER} header: {error}"))
                    .into_http();
            }
        };
        // The connection's share first, then its class's, then the router's: the refusal
        // names the one that is full.
        let permit = match connection.calls.try_acquire() {
            Ok(permit) => permit,
            Err(full) => {
                self.metrics.refused(Refusal::Limits);
                return full.status().into_http();
            }
        };
        if remote && let Some(peers) = &self.peers {
            peers.mark(request.headers_mut());
        }
        let metered = self
            .metrics
            .call(upstream.name.as_str(), request.uri().path());
        let traced = crate::trace::start(&mut request, upstream.name.as_str());
        let response = self.forward(upstream, permit, request).await;
        // Metrics first: they read the instance's body, which the span then wraps.
        let response = match metered {
            Some(call) => call.answered(response),
            None => response,
        };
        match traced {
            Some(call) => crate::trace::answer(call, response),
            None => response,
        }
    }

    /// The router's own services, as far as the caller may use them (`policy`), with the
    /// caller in the request's extensions for them.
    async fn local(
        &self,
        connection: &Connection,
        mut request: Request<Incoming>,
    ) -> Response<RouterBody> {
        if let Err(status) = policy::check(&connection.caller, request.uri().path()) {
            return status.into_http();
        }
        if let Err(error) = deadline::asked(request.headers()) {
            return Status::from(error).into_http();
        }
        let Ok(open) = connection.local.try_acquire() else {
            return Status::resource_exhausted("too many calls open on this connection")
                .into_http();
        };
        request.extensions_mut().insert(connection.caller.clone());
        let response = match self.local.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        response.map(|body| RouterBody::Local(Body::new(Held::new(body, open))))
    }

    async fn forward(
        &self,
        upstream: Arc<Upstream>,
        permit: Permit,
        mut request: Request<Incoming>,
    ) -> Response<RouterBody> {
        let service = upstream.name.as_str();
        let timeout = match self.deadlines.apply(request.headers_mut()) {
            Ok(timeout) => timeout,
            Err(error) => return Status::from(error).into_http(),
        };
        let request = request.map(RequestBody::new);
        let Some(timeout) = timeout else {
            return match upstream.balancer.send(request, service).await {
                Ok(response) => {
                    response.map(|body| RouterBody::Forwarded(Forwarded::new(body, None, permit)))
                }
                Err(error) => error.to_status().into_http(),
            };
        };
        let mut expiry = Expiry::start(timeout);
        if timeout.is_zero() {
            // Expired before it came: never sent.
            return expiry.status(service).into_http();
        }
        // The deadline first: a call polled after it passed is DEADLINE_EXCEEDED, even if an
        // answer (the plugin's own timeout, say) arrives while the call is polled.
        let sent = tokio::select! {
            biased;
            () = expiry.expired() => None,
            sent = upstream.balancer.send(request, service) => Some(sent),
        };
        match sent {
            // Dropping the call resets its stream: the cancellation reaches the plugin.
            None => expiry.status(service).into_http(),
            Some(Err(error)) => error.to_status().into_http(),
            Some(Ok(response)) => {
                let deadline = Some((expiry, upstream.name.clone()));
                response.map(|body| RouterBody::Forwarded(Forwarded::new(body, deadline, permit)))
            }
        }
    }

    fn unknown(&self, service: &str, headers: &http::HeaderMap) -> Status {
        if let Some(peers) = &self.peers {
            let node = peers.node();
            if let Some(from) = headers.get(FORWARDED_HEADER) {
                let from = String::from_utf8_lossy(from.as_bytes());
                return Status::unavailable(format!(
                    "service {service:?} has no instance on node {node} (forwarded by {from}; \
                     a forwarded call is never forwarded again)"
                ));
            }
            return Status::unavailable(format!(
                "service {service:?} has no instance on node {node} nor on any other node \
                 this router knows of; list services with `mesh status`"
            ));
        }
        let names = self.upstreams.names();
        let known = if names.is_empty() {
            "none is registered".to_owned()
        } else {
            format!("registered: {}", names.join(", "))
        };
        Status::unavailable(format!(
            "unknown service {service:?} ({known}); list services with `mesh status` or \
             `grpcurl -plaintext -authority localhost ... mesh.v1.Registry/List`"
        ))
    }
}

impl RouterBuilder {
    /// Sets the router's limits and default call timeout.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Serves `service` on the router itself (next to the registry, health and reflection).
    pub fn add_service<S: GrpcService>(mut self, service: S) -> Self {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Describes services added with [`RouterBuilder::add_service`] that `mesh.v1`'s
    /// descriptors do not (an encoded `FileDescriptorSet`), for reflection.
    pub fn describe(mut self, encoded: &'static [u8]) -> Self {
        self.descriptors.push(encoded);
        self
    }

    /// Installs the lookup that names managed plugin instances by pid: a Unix peer it names is
    /// a [`Caller::Plugin`], asked once when its connection is accepted.
    pub fn identify(mut self, identify: impl Identify) -> Self {
        self.identify = Some(Arc::new(identify));
        self
    }

    /// Installs the check of calls a [`Caller::Plugin`] forwards through the router (its
    /// `call:` capabilities), asked per call; other callers are not checked.
    pub fn call_policy(mut self, policy: impl CallPolicy) -> Self {
        self.call_policy = Some(Arc::new(policy));
        self
    }

    /// Records the router's metrics ([`RouterMetrics::new`] on the embedder's meter); without
    /// this, nothing is recorded.
    pub fn metrics(mut self, metrics: RouterMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Makes this router one node of many: calls for names with no instance here go to the
    /// other nodes in `cluster`'s view (see [`crate::cluster`]).
    pub fn cluster(mut self, cluster: Cluster) -> Self {
        self.cluster = cluster;
        self
    }

    /// Serves the TCP listener with mTLS: every client must present a certificate of `tls`'s
    /// CA, and is the identity it names (see [`ServerTls`]).
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Dials other nodes' routers with mTLS: `tls` presents this node's certificate and
    /// checks theirs against the CA (see [`crate::cluster`]). Without it, node-to-node calls
    /// are plaintext, which the manager allows on loopback only unless told otherwise.
    pub fn peer_tls(mut self, tls: mesh::transport::ClientTls) -> Self {
        self.peer_tls = Some(tls);
        self
    }

    /// Builds the router and starts following the registry (needs a Tokio runtime).
    pub async fn build(mut self) -> Router {
        let registry_server = RegistryService::new(self.registry.clone())
            .with_cluster(self.cluster.clone())
            .into_server();
        let introspection = self.descriptors.iter().fold(
            mesh::introspection::Introspection::new()
                .file_descriptor_set(mesh_proto::FILE_DESCRIPTOR_SET),
            |introspection, encoded| introspection.file_descriptor_set(encoded),
        );
        let introspection = introspection
            .services(self.names.iter().copied())
            .service(<mesh_proto::mesh::v1::registry_server::RegistryServer<RegistryService> as NamedService>::NAME);
        self.routes.add_service(registry_server);
        // The router is ready once it is built: it answers as soon as it accepts.
        introspection
            .add_to(&mut self.routes)
            .await
            .expect("the bundled descriptors are valid");
        let upstreams = Arc::new(Upstreams::new(self.registry));
        upstreams.follow();
        let limits = self.limits;
        Router {
            inner: Arc::new(Inner {
                local: self.routes.routes().prepare(),
                upstreams,
                deadlines: Deadlines::new(limits.call_timeout),
                admission: Admission::new(limits),
                owner: identity::own_uid(),
                identify: self.identify,
                call_policy: self.call_policy,
                metrics: self.metrics,
                peers: Peers::new(&self.cluster, self.peer_tls),
                tls: self.tls,
            }),
        }
    }
}
