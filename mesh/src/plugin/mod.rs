//! The plugin SDK: serve a gRPC API on the socket the manager hands out, with health and
//! reflection, the mesh's message size limit, and drain on SIGTERM.
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

mod health;
mod limit;

use std::{convert::Infallible, future::Future, path::PathBuf};

use http::{Request, Response};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{body::Body, server::NamedService, service::RoutesBuilder, transport::Server};

use crate::{
    introspection::{Introspection, InvalidDescriptors},
    runtime, transport, tuning,
};
pub use health::Health;
use limit::Limited;

/// The socket the plugin must listen on.
pub const PLUGIN_SOCKET: &str = "PLUGIN_SOCKET";
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
    /// A file descriptor set given for reflection could not be read.
    #[error(transparent)]
    Reflection(#[from] InvalidDescriptors),
    /// The server failed.
    #[error("serving failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn program() -> String {
    std::env::args().next().unwrap_or_else(|| "PLUGIN".into())
}

/// A plugin being set up: its identity, its services and their descriptors.
pub struct Plugin {
    socket: PathBuf,
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
            .field("socket", &self.socket)
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
    /// Reads `PLUGIN_SOCKET`, `PLUGIN_NAME` and `PLUGIN_INSTANCE`; the error lists the missing
    /// ones and shows how to run the plugin by hand.
    pub fn from_env() -> Result<Self, PluginError> {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        let (socket, name, instance) = (var(PLUGIN_SOCKET), var(PLUGIN_NAME), var(PLUGIN_INSTANCE));
        match (socket, name, instance) {
            (Some(socket), Some(name), Some(instance)) => {
                let plugin = Self::new(socket, name, instance);
                Ok(
                    match var(MAX_MESSAGE_SIZE_VAR).and_then(|v| v.parse().ok()) {
                        Some(size) => plugin.with_max_message_size(size),
                        None => plugin,
                    },
                )
            }
            (socket, name, instance) => Err(PluginError::MissingEnv {
                missing: [
                    (PLUGIN_SOCKET, socket.is_none()),
                    (PLUGIN_NAME, name.is_none()),
                    (PLUGIN_INSTANCE, instance.is_none()),
                ]
                .into_iter()
                .filter_map(|(var, missing)| missing.then_some(var))
                .collect(),
            }),
        }
    }

    /// A plugin serving on `socket` as instance `instance` of plugin `name`.
    pub fn new(
        socket: impl Into<PathBuf>,
        name: impl Into<String>,
        instance: impl Into<String>,
    ) -> Self {
        Self {
            socket: socket.into(),
            name: name.into(),
            instance: instance.into(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            routes: RoutesBuilder::default(),
            introspection: Introspection::new(),
            services: Vec::new(),
            health: Health::new(),
        }
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
        let mut term =
            signal(SignalKind::terminate()).map_err(|source| socket_io(&self.socket, source))?;
        let mut int =
            signal(SignalKind::interrupt()).map_err(|source| socket_io(&self.socket, source))?;
        let mut usr1 = signal(SignalKind::user_defined1())
            .map_err(|source| socket_io(&self.socket, source))?;
        let mut usr2 = signal(SignalKind::user_defined2())
            .map_err(|source| socket_io(&self.socket, source))?;
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
        let listener = runtime::bind(&self.socket)?;
        // Only this server answers health checks, so SERVING cannot be seen before it serves.
        let reporter = self.introspection.add_to(&mut self.routes).await?;
        self.health.start(reporter, self.services.clone()).await;
        let maintenance = maintenance.map(tokio::spawn);
        // Opt-in: the manager's config sets MESH_BUSY_POLL=1 in the plugin's env.
        let polling = tuning::busy_poll_from_env().then(tuning::busy_poll);
        tracing::info!(
            socket = %self.socket.display(),
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
        let served = Server::builder()
            .initial_stream_window_size(transport::WINDOW)
            .initial_connection_window_size(transport::CONNECTION_WINDOW)
            .layer(limits)
            .add_routes(self.routes.routes())
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), draining)
            .await;
        if let Some(maintenance) = maintenance {
            maintenance.abort();
        }
        if let Some(polling) = polling {
            polling.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
        served?;
        Ok(())
    }
}

fn socket_io(path: &std::path::Path, source: std::io::Error) -> PluginError {
    PluginError::Socket(runtime::SocketError::Io {
        path: path.to_owned(),
        source,
    })
}
