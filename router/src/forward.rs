//! Accepting HTTP/2 connections and forwarding their calls: the router's own API is served
//! here, every other call goes to an instance of the service it names, with bodies and
//! trailers streamed both ways so flow control holds end to end and a cancelled call resets
//! the upstream stream.
//!
//! A forwarded call costs: one header lookup for its route, one for its deadline, a lock-free
//! map read, two counters (in flight in the router and on the instance) and hyper's own work.
//! Request and response bodies pass through unboxed.

use std::{convert::Infallible, future::Future, io, sync::Arc, time::Duration};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    time::Instant,
};
use tonic::{
    Status,
    body::Body,
    server::NamedService,
    service::{Routes, RoutesBuilder},
};
use tower::ServiceExt;

use mesh::transport;

use crate::{
    Limits, SERVICE_HEADER,
    body::{Forwarded, RouterBody},
    deadline::{Deadlines, Expiry},
    limit::Gauge,
    registry::{Registry, RegistryService},
    route::{self, Route},
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
    /// Forwarded calls in flight.
    in_flight: Arc<Gauge>,
    /// Client connections open, over all listeners.
    connections: Arc<Gauge>,
    max_concurrent_streams: u32,
}

/// Builds a [`Router`]: the registry it serves and routes by, extra local services, and its
/// [`Limits`].
pub struct RouterBuilder {
    registry: Registry,
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    limits: Limits,
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
            limits: Limits::default(),
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
                in_flight: self.inner.in_flight.clone(),
                connections: self.inner.connections.clone(),
                max_concurrent_streams: self.inner.max_concurrent_streams,
            }),
        }
    }

    /// Serves connections from `listener` until `shutdown` completes, then lets open calls finish.
    pub async fn serve_unix(
        self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        self.serve(
            || async { listener.accept().await.map(|(s, _)| s) },
            shutdown,
        )
        .await
    }

    /// Serves TCP connections from `listener` until `shutdown` completes.
    pub async fn serve_tcp(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        self.serve(
            || async {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                Ok(stream)
            },
            shutdown,
        )
        .await
    }

    async fn serve<F, Fut, S>(
        &self,
        mut accept: F,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = io::Result<S>>,
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http.initial_stream_window_size(transport::WINDOW)
            .initial_connection_window_size(transport::CONNECTION_WINDOW)
            .max_concurrent_streams(self.inner.max_concurrent_streams);
        let mut refused_logged: Option<Instant> = None;
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                () = &mut shutdown => break,
                accepted = accept() => match accepted {
                    Ok(stream) => stream,
                    Err(error) => {
                        // EMFILE and friends: log, breathe, keep serving what is open.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(permit) = self.inner.connections.try_acquire() else {
                // Closed at once: the client sees UNAVAILABLE now rather than a hang.
                if refused_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    refused_logged = Some(Instant::now());
                    tracing::warn!(
                        "refusing connections: {} are open (max_connections)",
                        self.inner.connections.max()
                    );
                }
                drop(stream);
                continue;
            };
            let inner = self.inner.clone();
            let service = hyper::service::service_fn(move |request| {
                let inner = inner.clone();
                async move { Ok::<_, Infallible>(inner.handle(request).await) }
            });
            let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "router connection ended");
                }
                drop(permit);
            });
        }
        // Open calls may finish; a stream that never ends (a client's watch, a chat) must not
        // hold the shutdown forever.
        if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("calls still open after {DRAIN_TIMEOUT:?} of draining; closing them");
        }
        Ok(())
    }
}

impl Inner {
    async fn handle(&self, request: Request<Incoming>) -> Response<RouterBody> {
        // A worker serving one call at a time stays awake for the next one (see
        // `mesh::tuning::linger`); under load it has work enough, and lingering would only take
        // CPU time from the clients and plugins beside it.
        let handling = Handling::enter();
        if handling.alone {
            mesh::tuning::linger_touch();
        }
        let response = self.route(request).await;
        if handling.alone {
            mesh::tuning::linger_touch();
        }
        response
    }

    async fn route(&self, request: Request<Incoming>) -> Response<RouterBody> {
        let upstream = match route::route(&request) {
            Route::Local => {
                let response = match self.local.clone().oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                return response.map(RouterBody::Local);
            }
            Route::Service(service) => match self.upstreams.get(service) {
                Some(upstream) => upstream,
                None => return self.unknown(service).into_http(),
            },
            Route::Invalid(error) => {
                return Status::invalid_argument(format!("{SERVICE_HEADER} header: {error}"))
                    .into_http();
            }
        };
        self.forward(upstream, request).await
    }

    async fn forward(
        &self,
        upstream: Arc<Upstream>,
        mut request: Request<Incoming>,
    ) -> Response<RouterBody> {
        let Some(permit) = self.in_flight.try_acquire() else {
            return Status::resource_exhausted(format!(
                "the router is at its limit of {} calls in flight (max_in_flight); retry later",
                self.in_flight.max()
            ))
            .into_http();
        };
        let service = upstream.name.as_str();
        let Some(timeout) = self.deadlines.apply(request.headers_mut()) else {
            return match upstream.balancer.send(request, service).await {
                Ok(response) => {
                    response.map(|body| RouterBody::Forwarded(Forwarded::new(body, None, permit)))
                }
                Err(error) => error.to_status().into_http(),
            };
        };
        let mut expiry = Expiry::start(timeout);
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

    fn unknown(&self, service: &str) -> Status {
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
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Builds the router and starts following the registry (needs a Tokio runtime).
    pub async fn build(mut self) -> Router {
        let registry_server = RegistryService::new(self.registry.clone()).into_server();
        let introspection = mesh::introspection::Introspection::new()
            .file_descriptor_set(mesh_proto::FILE_DESCRIPTOR_SET)
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
                in_flight: Gauge::new(limits.max_in_flight),
                connections: Gauge::new(limits.max_connections),
                max_concurrent_streams: limits.max_concurrent_streams,
            }),
        }
    }
}
