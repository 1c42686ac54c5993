//! The router: serves the mesh API and forwards every other call to an instance of the service
//! it names.
//!
//! - [`route`] decides where a call goes (`mesh-service` header, else `:authority`);
//! - [`upstream`] keeps one balancer per service, following the registry;
//! - this module accepts HTTP/2 connections and forwards calls, bodies and trailers streamed
//!   both ways, so flow control holds end to end and a cancelled call resets the upstream stream.

mod route;
mod upstream;

use std::{convert::Infallible, future::Future, io, sync::Arc};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
};
use tonic::{
    Status,
    body::Body,
    server::NamedService,
    service::{Routes, RoutesBuilder},
};
use tower::ServiceExt;

pub use route::SERVICE_HEADER;
pub(crate) use upstream::targets;

use crate::{
    ServiceName,
    registry::{Registry, RegistryService},
    transport,
};
use route::Route;
use upstream::Upstreams;

/// The mesh router. Cheap to clone; clones serve the same routes.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    local: Routes,
    upstreams: Arc<Upstreams>,
}

/// Builds a [`Router`]: the registry it serves and routes by, and extra local services.
pub struct RouterBuilder {
    registry: Registry,
    routes: RoutesBuilder,
    names: Vec<&'static str>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").finish_non_exhaustive()
    }
}

impl Router {
    /// A router over `registry`.
    pub fn builder(registry: Registry) -> RouterBuilder {
        RouterBuilder {
            registry,
            routes: RoutesBuilder::default(),
            names: Vec::new(),
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
            .initial_connection_window_size(transport::CONNECTION_WINDOW);
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                () = &mut shutdown => break,
                accepted = accept() => match accepted {
                    Ok(stream) => stream,
                    Err(error) => {
                        // EMFILE and friends: log, breathe, keep serving what is open.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
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
            });
        }
        graceful.shutdown().await;
        Ok(())
    }
}

impl Inner {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        match route::route(&request) {
            Route::Local => match self.local.clone().oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            },
            Route::Service(service) => self.forward(service, request).await,
            Route::Invalid(error) => {
                Status::invalid_argument(format!("{SERVICE_HEADER} header: {error}")).into_http()
            }
        }
    }

    async fn forward(&self, service: ServiceName, request: Request<Incoming>) -> Response<Body> {
        let Some(balancer) = self.upstreams.get(&service) else {
            return self.unknown(&service).into_http();
        };
        match balancer
            .send(request.map(Body::new), service.as_str())
            .await
        {
            Ok(response) => response.map(Body::new),
            Err(error) => error.to_status().into_http(),
        }
    }

    fn unknown(&self, service: &ServiceName) -> Status {
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
        let (health, health_service) = tonic_health::server::health_reporter();
        let registry_server = RegistryService::new(self.registry.clone()).into_server();
        let mut names = std::mem::take(&mut self.names);
        names.push(<mesh_proto::mesh::v1::registry_server::RegistryServer<RegistryService> as NamedService>::NAME);
        // The router is ready once it is built: it answers as soon as it accepts.
        for name in names.iter().copied().chain([""]) {
            health
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        let (reflection_v1, reflection_v1alpha) =
            crate::reflection::services(&[mesh_proto::FILE_DESCRIPTOR_SET], &names)
                .expect("the bundled descriptors are valid");
        self.routes
            .add_service(registry_server)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let upstreams = Arc::new(Upstreams::default());
        upstreams.follow(self.registry);
        Router {
            inner: Arc::new(Inner {
                local: self.routes.routes().prepare(),
                upstreams,
            }),
        }
    }
}
