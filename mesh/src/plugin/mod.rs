//! The plugin SDK: serve a gRPC API on the socket the manager hands out, with health and
//! reflection, the mesh's message size limit, and drain on SIGTERM.
//!
//! A plugin with one service needs nothing but [`run`] in its `main` (or [`main!`], which
//! writes that `main`):
//!
//! ```no_run
//! # use mesh_proto::echo::v1::echo_server::{Echo, EchoServer};
//! # fn main_of<E: Echo>(echo: E) -> std::process::ExitCode {
//! mesh::plugin::run(EchoServer::new(echo), mesh_proto::FILE_DESCRIPTOR_SET)
//! # }
//! ```
//!
//! and [`Plugin`] sets up more (several services, health handles, limits):
//!
//! ```no_run
//! # use mesh_proto::echo::v1::echo_server::{Echo, EchoServer};
//! # async fn run<E: Echo>(echo: E) -> Result<(), mesh::plugin::PluginError> {
//! mesh::plugin::Plugin::from_env()?
//!     .add_service(EchoServer::new(echo))
//!     .file_descriptor_set(mesh_proto::FILE_DESCRIPTOR_SET)
//!     .serve()
//!     .await
//! # }
//! ```

mod callers;
mod health;
mod limit;

use std::{convert::Infallible, future::Future, net::SocketAddr, path::PathBuf};

use futures_util::StreamExt;
use http::{Request, Response};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::{body::Body, server::NamedService, service::RoutesBuilder, transport::Server};

use crate::{
    introspection::{Introspection, InvalidDescriptors},
    runtime, transport, tuning,
};
pub use callers::CALLERS_FD;
/// The messages of the callers' channel, for the manager's end of it. Not a public API.
#[doc(hidden)]
pub use callers::wire as callers_wire;
pub use health::Health;

/// A tonic service the SDK, the router and `mesh::inprocess` can serve: what
/// `tonic-build` generates (`EchoServer::new(..)`), or any `tower::Service` shaped like it.
pub trait GrpcService:
    tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcService for S where
    S: tower::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}
use limit::Limited;

/// The socket the plugin must listen on.
pub const PLUGIN_SOCKET: &str = "PLUGIN_SOCKET";
/// Instead of `PLUGIN_SOCKET`, for `transport = "tcp"`: the loopback `host:port` to listen on.
pub const PLUGIN_ADDRESS: &str = "PLUGIN_ADDRESS";
/// The plugin's name in the config (`echo`); it is registered as `plugin.<name>`.
pub const PLUGIN_NAME: &str = "PLUGIN_NAME";
/// This instance's id (`echo-0`).
pub const PLUGIN_INSTANCE: &str = "PLUGIN_INSTANCE";
/// The largest gRPC message, in bytes, the mesh is configured to carry (`[mesh]
/// max_message_size`); read it with [`Plugin::max_message_size`].
pub const MAX_MESSAGE_SIZE_VAR: &str = "MESH_MAX_MESSAGE_SIZE";
/// The largest message when `MESH_MAX_MESSAGE_SIZE` is not set, and the default of `[mesh]
/// max_message_size`: 16 MiB (tonic's own default is 4 MiB, too small for a 4 MiB payload with
/// its framing).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 << 20;

/// Why a plugin could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The manager's variables are missing: the program was not started by `mesh up`.
    #[error(
        "{} not set: this program is a mesh plugin and `mesh up` starts it. To run it by hand: \
         PLUGIN_SOCKET=/tmp/{example}.sock PLUGIN_NAME={example} PLUGIN_INSTANCE={example}-dev {program}, \
         then `grpcurl -plaintext -unix -authority localhost /tmp/{example}.sock list`",
        missing.join(", "),
        example = "echo",
        program = program()
    )]
    MissingEnv {
        /// The variables that are not set.
        missing: Vec<&'static str>,
    },
    /// The socket could not be bound.
    #[error(transparent)]
    Socket(#[from] runtime::SocketError),
    /// `PLUGIN_ADDRESS` is not a loopback `host:port`.
    #[error(
        "PLUGIN_ADDRESS={0:?}: a plugin serves TCP on loopback only; give an address such as 127.0.0.1:7701 or [::1]:7701"
    )]
    Address(String),
    /// The TCP address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Tcp {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A file descriptor set given for reflection could not be read.
    #[error(transparent)]
    Reflection(#[from] InvalidDescriptors),
    /// The manager's channel for checking callers ([`CALLERS_FD`]) is not usable.
    #[error("{0}; it is set by mesh up: unset it to run the plugin by hand")]
    Callers(String),
    /// The server failed.
    #[error("serving failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Writes a plugin's `fn main` that serves one service with [`run`] and the descriptors
/// `mesh-build` wrote for the crate (`mesh::file_descriptor_set!()`), for reflection:
///
/// ```ignore
/// mesh::include_proto!("hello.v1");
///
/// mesh::plugin::main!(hello_server::HelloServer::new(Hello));
/// ```
pub use crate::__plugin_main as main;

/// The whole `main` of a plugin with one service: reads the manager's variables
/// ([`Plugin::from_env`]), installs logging and tracing ([`Plugin::init_telemetry`], unless a
/// `tracing` subscriber is already installed), serves `service` with health and reflection (`descriptors`, such as
/// `mesh::file_descriptor_set!()`) on a multi-threaded tokio runtime until SIGTERM or SIGINT,
/// then drains ([`Plugin::serve`]).
///
/// Returns the exit status: success after a drain, 64 (EX_USAGE) when the variables are
/// missing, failure otherwise, with one line on stderr saying why.
pub fn run<S: GrpcService>(service: S, descriptors: &'static [u8]) -> std::process::ExitCode {
    use std::process::ExitCode;
    let plugin = match Plugin::from_env() {
        Ok(plugin) => plugin,
        Err(error) => {
            eprintln!("{}: {error}", program());
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{}: cannot start the async runtime: {error}", program());
            return ExitCode::FAILURE;
        }
    };
    // Logging and the tracer, unless the program installed a subscriber of its own.
    #[cfg(feature = "otlp")]
    let _telemetry = if tracing::dispatcher::has_been_set() {
        None
    } else {
        let _entered = runtime.enter();
        plugin.init_telemetry()
    };
    let served = runtime.block_on(
        plugin
            .add_service(service)
            .file_descriptor_set(descriptors)
            .serve(),
    );
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}: {error}", program());
            ExitCode::FAILURE
        }
    }
}

fn program() -> String {
    std::env::args().next().unwrap_or_else(|| "PLUGIN".into())
}

/// Where a plugin serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket (`PLUGIN_SOCKET`): the default.
    Unix(PathBuf),
    /// A loopback TCP address (`PLUGIN_ADDRESS`, for `transport = "tcp"`).
    Tcp(SocketAddr),
}

impl Listen {
    /// A TCP address to listen on, refused unless it is loopback: a plugin trusts whoever
    /// reaches it, so it never listens where another machine could.
    pub fn tcp(address: &str) -> Result<Self, PluginError> {
        match address.parse::<SocketAddr>() {
            Ok(parsed) if parsed.ip().is_loopback() => Ok(Self::Tcp(parsed)),
            _ => Err(PluginError::Address(address.to_owned())),
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(address) => write!(f, "http://{address}"),
        }
    }
}

/// A plugin being set up: its identity, its services and their descriptors.
pub struct Plugin {
    listen: Listen,
    name: String,
    instance: String,
    max_message_size: usize,
    routes: RoutesBuilder,
    introspection: Introspection,
    services: Vec<&'static str>,
    health: Health,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("listen", &self.listen)
            .field("name", &self.name)
            .field("instance", &self.instance)
            .field("max_message_size", &self.max_message_size)
            .field("services", &self.services)
            .finish_non_exhaustive()
    }
}

/// A client of the host services (`mesh.v1.Host`: files under the plugin's root, the host's
/// environment) on the router socket, `MESH_SOCKET`. The router knows the plugin by its
/// process, so there is nothing to present; each call is checked against its capabilities.
///
/// ```no_run
/// # async fn run() -> Result<(), tonic::Status> {
/// use mesh_proto::mesh::v1::ReadFileRequest;
/// let file = mesh::plugin::host()
///     .read_file(ReadFileRequest { path: "reports/a.txt".into() })
///     .await?
///     .into_inner();
/// # let _ = file; Ok(())
/// # }
/// ```
pub fn host() -> mesh_proto::mesh::v1::host_client::HostClient<crate::Channel> {
    mesh_proto::mesh::v1::host_client::HostClient::new(crate::Channel::to_server(
        crate::Address::Unix(crate::runtime::router_socket()),
    ))
}

impl Plugin {
    /// Reads `PLUGIN_SOCKET` (or `PLUGIN_ADDRESS`, a loopback `host:port`, for the TCP
    /// transport), `PLUGIN_NAME` and `PLUGIN_INSTANCE`; the error lists the missing ones and
    /// shows how to run the plugin by hand.
    pub fn from_env() -> Result<Self, PluginError> {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        let listen = match (var(PLUGIN_SOCKET), var(PLUGIN_ADDRESS)) {
            (Some(socket), _) => Some(Listen::Unix(socket.into())),
            (None, Some(address)) => Some(Listen::tcp(&address)?),
            (None, None) => None,
        };
        let (name, instance) = (var(PLUGIN_NAME), var(PLUGIN_INSTANCE));
        match (listen, name, instance) {
            (Some(listen), Some(name), Some(instance)) => {
                let plugin = Self::listening(listen, name, instance);
                Ok(
                    match var(MAX_MESSAGE_SIZE_VAR).and_then(|v| v.parse().ok()) {
                        Some(size) => plugin.with_max_message_size(size),
                        None => plugin,
                    },
                )
            }
            (listen, name, instance) => Err(PluginError::MissingEnv {
                missing: [
                    (PLUGIN_SOCKET, listen.is_none()),
                    (PLUGIN_NAME, name.is_none()),
                    (PLUGIN_INSTANCE, instance.is_none()),
                ]
                .into_iter()
                .filter_map(|(var, missing)| missing.then_some(var))
                .collect(),
            }),
        }
    }

    /// A plugin serving on the Unix socket `socket` as instance `instance` of plugin `name`.
    pub fn new(
        socket: impl Into<PathBuf>,
        name: impl Into<String>,
        instance: impl Into<String>,
    ) -> Self {
        Self::listening(Listen::Unix(socket.into()), name, instance)
    }

    /// A plugin serving on `listen` as instance `instance` of plugin `name`.
    pub fn listening(listen: Listen, name: impl Into<String>, instance: impl Into<String>) -> Self {
        Self {
            listen,
            name: name.into(),
            instance: instance.into(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            routes: RoutesBuilder::default(),
            introspection: Introspection::new(),
            services: Vec::new(),
            health: Health::new(),
        }
    }

    /// Installs logging and, when the manager handed the plugin an OTLP endpoint
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`), a tracer exporting this instance's spans as service
    /// `plugin.<name>` (or `OTEL_SERVICE_NAME`), instance `PLUGIN_INSTANCE`: what [`run`]
    /// does before serving. Log lines are text without timestamps (the manager stamps the
    /// lines it captures), or JSON when `MESH_LOG_FORMAT=json`. Keep the value until the
    /// plugin exits: dropping it sends the spans still buffered.
    ///
    /// Returns `None`, with a line on stderr, when a subscriber is already installed or the
    /// endpoint is malformed; the plugin then serves without exporting. Call it inside a Tokio
    /// runtime.
    #[cfg(feature = "otlp")]
    pub fn init_telemetry(&self) -> Option<crate::telemetry::Telemetry> {
        let mut config =
            crate::telemetry::TelemetryConfig::from_env(format!("plugin.{}", self.name));
        config.instance_id = Some(self.instance.clone());
        config.captured = !std::io::IsTerminal::is_terminal(&std::io::stderr());
        match crate::telemetry::init(&config) {
            Ok(telemetry) => Some(telemetry),
            Err(error) => {
                eprintln!("{}: telemetry off: {error}", program());
                None
            }
        }
    }

    /// Where the plugin serves.
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// The plugin's name (`echo`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This instance's id (`echo-0`).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The largest message the mesh carries (`MESH_MAX_MESSAGE_SIZE`, else 16 MiB).
    ///
    /// [`Plugin::serve`] holds every service to it, both ways: a request message over it fails
    /// its call with `RESOURCE_EXHAUSTED`, and so does a response message. tonic also keeps its
    /// own decoding limit inside each generated server, 4 MiB unless told (over it, tonic
    /// answers `OUT_OF_RANGE`), which the SDK cannot raise for you: for messages over 4 MiB,
    /// give the limit to each service you add.
    ///
    /// ```no_run
    /// # use mesh_proto::echo::v1::echo_server::{Echo, EchoServer};
    /// # fn run<E: Echo>(plugin: mesh::plugin::Plugin, echo: E) -> mesh::plugin::Plugin {
    /// let limit = plugin.max_message_size();
    /// plugin.add_service(
    ///     EchoServer::new(echo)
    ///         .max_decoding_message_size(limit)
    ///         .max_encoding_message_size(limit),
    /// )
    /// # }
    /// ```
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// Sets the largest message, in bytes (see [`Plugin::max_message_size`]).
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Serves a tonic service; health reports it `SERVING` once the plugin serves.
    pub fn add_service<S: GrpcService>(mut self, service: S) -> Self {
        self.services.push(S::NAME);
        self.introspection = self.introspection.service(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Adds an encoded `FileDescriptorSet` that describes the services, for reflection.
    pub fn file_descriptor_set(mut self, encoded: &'static [u8]) -> Self {
        self.introspection = self.introspection.file_descriptor_set(encoded);
        self
    }

    /// A handle on what the plugin's health service reports, so that the plugin can say it is
    /// `NOT_SERVING` (and `SERVING` again) itself; see [`Health`].
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Serves until SIGTERM or SIGINT, then reports `NOT_SERVING`, finishes the calls in
    /// flight and removes the socket.
    ///
    /// SIGUSR1 reports `NOT_SERVING` without stopping (maintenance: the manager takes the
    /// instance out of routing, and restarts it if it stays so), SIGUSR2 `SERVING` again; the
    /// plugin itself can do the same through [`Plugin::health`].
    pub async fn serve(self) -> Result<(), PluginError> {
        let signals = |kind| signal(kind).map_err(|source| self.io(source));
        let mut term = signals(SignalKind::terminate())?;
        let mut int = signals(SignalKind::interrupt())?;
        let mut usr1 = signals(SignalKind::user_defined1())?;
        let mut usr2 = signals(SignalKind::user_defined2())?;
        let health = self.health();
        let maintenance = async move {
            loop {
                tokio::select! {
                    _ = usr1.recv() => {
                        tracing::info!("NOT_SERVING, set by SIGUSR1");
                        health.set_not_serving().await;
                    }
                    _ = usr2.recv() => {
                        tracing::info!("SERVING, set by SIGUSR2");
                        health.set_serving().await;
                    }
                }
            }
        };
        self.serve_inner(
            async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            },
            Some(maintenance),
        )
        .await
    }

    /// Serves until `shutdown` completes, then drains as [`Plugin::serve`] does.
    pub async fn serve_with_shutdown(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), PluginError> {
        self.serve_inner(shutdown, None::<std::future::Pending<()>>)
            .await
    }

    async fn serve_inner(
        mut self,
        shutdown: impl Future<Output = ()>,
        maintenance: Option<impl Future<Output = ()> + Send + 'static>,
    ) -> Result<(), PluginError> {
        let gate = match &self.listen {
            Listen::Unix(_) => match callers::Gate::from_env().map_err(PluginError::Callers)? {
                callers::FromEnv::Present(gate) => Some(gate),
                callers::FromEnv::Absent => {
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        tracing::warn!(
                            "{CALLERS_FD} not set (not started by mesh up): callers on this \
                             socket are served without checking their call: capabilities"
                        )
                    });
                    None
                }
            },
            Listen::Tcp(_) => None,
        };
        let mut accepting = None;
        let incoming = match (&self.listen, gate) {
            (Listen::Unix(path), Some(gate)) => {
                let listener = runtime::bind(path)?;
                let answers = gate.start();
                let (tx, mut rx) = tokio::sync::mpsc::channel(64);
                let accept = tokio::spawn(async move {
                    loop {
                        match listener.accept().await {
                            Ok((stream, _)) => {
                                let (gate, tx) = (gate.clone(), tx.clone());
                                // Concurrently: one slow answer must not hold up other callers.
                                tokio::spawn(async move {
                                    let checked = callers::Checked::accept(gate, stream).await;
                                    let _ = tx.send(Ok::<_, std::io::Error>(checked)).await;
                                });
                            }
                            Err(error) => {
                                // Out of file descriptors, say: wait a little, keep serving.
                                tracing::warn!(%error, "accept failed");
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            }
                        }
                    }
                });
                accepting = Some((accept, answers));
                Incoming::Checked(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed())
            }
            (Listen::Unix(path), None) => {
                Incoming::Unix(UnixListenerStream::new(runtime::bind(path)?))
            }
            (Listen::Tcp(address), _) => Incoming::Tcp(TcpListenerStream::new(
                tokio::net::TcpListener::bind(address)
                    .await
                    .map_err(|source| PluginError::Tcp {
                        address: *address,
                        source,
                    })?,
            )),
        };
        // Only this server answers health checks, so SERVING cannot be seen before it serves.
        let reporter = self.introspection.add_to(&mut self.routes).await?;
        self.health.start(reporter, self.services.clone()).await;
        let maintenance = maintenance.map(tokio::spawn);
        // Opt-in: the manager's config sets MESH_BUSY_POLL=1 in the plugin's env.
        let polling = tuning::busy_poll_from_env().then(tuning::busy_poll);
        tracing::info!(
            listen = %self.listen,
            instance = %self.instance,
            services = ?self.services,
            "serving"
        );
        let draining = async {
            shutdown.await;
            tracing::info!(instance = %self.instance, "draining");
            self.health.set_not_serving().await;
        };
        let limit = self.max_message_size;
        let limits = tower::ServiceBuilder::new()
            .map_request(move |request: Request<Body>| {
                request.map(|body| Body::new(Limited::request(body, limit)))
            })
            .map_response(move |response: Response<Body>| {
                response.map(|body| Limited::response(body, limit))
            });
        // A server span per call, once a tracer is installed (`mesh::telemetry`).
        let limits = limits.layer(crate::telemetry::TraceLayer::new(&self.instance));
        let server = Server::builder()
            .initial_stream_window_size(transport::WINDOW)
            .initial_connection_window_size(transport::CONNECTION_WINDOW)
            .layer(limits.layer(callers::GuardLayer))
            .add_routes(self.routes.routes());
        let served = match incoming {
            Incoming::Unix(incoming) => {
                server
                    .serve_with_incoming_shutdown(incoming, draining)
                    .await
            }
            Incoming::Tcp(incoming) => {
                server
                    .serve_with_incoming_shutdown(incoming, draining)
                    .await
            }
            Incoming::Checked(incoming) => {
                server
                    .serve_with_incoming_shutdown(incoming, draining)
                    .await
            }
        };
        if let Some((accept, answers)) = accepting {
            accept.abort();
            answers.abort();
        }
        if let Some(maintenance) = maintenance {
            maintenance.abort();
        }
        if let Some(polling) = polling {
            polling.abort();
        }
        if let Listen::Unix(path) = &self.listen {
            let _ = std::fs::remove_file(path);
        }
        served?;
        Ok(())
    }

    /// An I/O error while setting up, naming where the plugin serves.
    fn io(&self, source: std::io::Error) -> PluginError {
        match &self.listen {
            Listen::Unix(path) => PluginError::Socket(runtime::SocketError::Io {
                path: path.to_owned(),
                source,
            }),
            Listen::Tcp(address) => PluginError::Tcp {
                address: *address,
                source,
            },
        }
    }
}

/// The connections a plugin accepts.
enum Incoming {
    Unix(UnixListenerStream),
    Tcp(TcpListenerStream),
    /// Unix connections whose callers the manager names ([`callers`]).
    Checked(futures_util::stream::BoxStream<'static, std::io::Result<callers::Checked>>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_address_must_be_loopback() {
        for good in ["127.0.0.1:7701", "[::1]:7701", "127.0.0.2:0"] {
            assert!(
                matches!(Listen::tcp(good), Ok(Listen::Tcp(_))),
                "{good} refused"
            );
        }
        for bad in [
            "0.0.0.0:7701",
            "10.0.0.1:7701",
            "[::]:7701",
            "localhost:7701",
            "7701",
        ] {
            let error = Listen::tcp(bad).expect_err(bad).to_string();
            assert!(error.contains("loopback only"), "{bad}: {error}");
        }
    }
}
