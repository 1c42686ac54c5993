//! The plugin SDK: serve a gRPC API on the socket the manager hands out, with health and
//! reflection, and drain on SIGTERM.
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

use std::{convert::Infallible, future::Future, path::PathBuf};

use http::{Request, Response};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{body::Body, server::NamedService, service::RoutesBuilder, transport::Server};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{runtime, transport, tuning};

/// The socket the plugin must listen on.
pub const PLUGIN_SOCKET: &str = "PLUGIN_SOCKET";
/// The plugin's name in the config (`echo`); it is registered as `plugin.<name>`.
pub const PLUGIN_NAME: &str = "PLUGIN_NAME";
/// This instance's id (`echo-0`).
pub const PLUGIN_INSTANCE: &str = "PLUGIN_INSTANCE";
/// The largest gRPC message, in bytes, the mesh is configured to carry (`[mesh]
/// max_message_size`); read it with [`Plugin::max_message_size`].
pub const MAX_MESSAGE_SIZE_VAR: &str = "MESH_MAX_MESSAGE_SIZE";
/// The largest message when `MESH_MAX_MESSAGE_SIZE` is not set: 16 MiB (tonic's own default
/// is 4 MiB, too small for a 4 MiB payload with its framing).
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
    #[error("invalid file descriptor set for reflection: {0}")]
    Reflection(String),
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
    services: Vec<&'static str>,
    descriptors: Vec<&'static [u8]>,
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
            services: Vec::new(),
            descriptors: Vec::new(),
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
    /// tonic keeps the decoding limit inside each generated server (4 MiB unless told), so the
    /// SDK cannot raise it for you: apply it to each service you add.
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

    /// Sets the largest message (see [`Plugin::max_message_size`]).
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
        self.routes.add_service(service);
        self
    }

    /// Adds an encoded `FileDescriptorSet` that describes the services, for reflection.
    pub fn file_descriptor_set(mut self, encoded: &'static [u8]) -> Self {
        self.descriptors.push(encoded);
        self
    }

    /// Serves until SIGTERM or SIGINT, then reports `NOT_SERVING`, finishes the calls in
    /// flight and removes the socket.
    ///
    /// SIGUSR1 reports `NOT_SERVING` without stopping (maintenance: the manager takes the
    /// instance out of routing, and restarts it if it stays so), SIGUSR2 `SERVING` again.
    pub async fn serve(self) -> Result<(), PluginError> {
        let mut term =
            signal(SignalKind::terminate()).map_err(|source| socket_io(&self.socket, source))?;
        let mut int =
            signal(SignalKind::interrupt()).map_err(|source| socket_io(&self.socket, source))?;
        let mut usr1 = signal(SignalKind::user_defined1())
            .map_err(|source| socket_io(&self.socket, source))?;
        let mut usr2 = signal(SignalKind::user_defined2())
            .map_err(|source| socket_io(&self.socket, source))?;
        let maintenance = |health: HealthReporter, services: Vec<&'static str>| async move {
            loop {
                let status = tokio::select! {
                    _ = usr1.recv() => ServingStatus::NotServing,
                    _ = usr2.recv() => ServingStatus::Serving,
                };
                tracing::info!(?status, "health set by signal");
                for service in &services {
                    health.set_service_status(*service, status).await;
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
        self.serve_inner(
            shutdown,
            None::<fn(HealthReporter, Vec<&'static str>) -> std::future::Ready<()>>,
        )
        .await
    }

    async fn serve_inner<M, F>(
        mut self,
        shutdown: impl Future<Output = ()>,
        maintenance: Option<M>,
    ) -> Result<(), PluginError>
    where
        M: FnOnce(HealthReporter, Vec<&'static str>) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = runtime::bind(&self.socket)?;
        let (health, health_service) = tonic_health::server::health_reporter();
        let (reflection_v1, reflection_v1alpha) =
            crate::reflection::services(&self.descriptors, &self.services)
                .map_err(|e| PluginError::Reflection(e.to_string()))?;
        self.routes
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);

        // Only this server answers health checks, so SERVING cannot be seen before it serves.
        let statuses: Vec<&'static str> = self.services.iter().copied().chain([""]).collect();
        for service in &statuses {
            health
                .set_service_status(*service, ServingStatus::Serving)
                .await;
        }
        let maintenance = maintenance.map(|m| tokio::spawn(m(health.clone(), statuses.clone())));
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
            for service in &statuses {
                health
                    .set_service_status(*service, ServingStatus::NotServing)
                    .await;
            }
        };
        let served = Server::builder()
            .initial_stream_window_size(transport::WINDOW)
            .initial_connection_window_size(transport::CONNECTION_WINDOW)
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
