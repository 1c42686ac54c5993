//! In-process services: a tonic service registered under a name inside this process, reached by
//! [`crate::connect`] over an in-memory stream (`tokio::io::duplex`) — for embedding a plugin in
//! its caller, and for tests without sockets.
//!
//! ```no_run
//! # use mesh_proto::echo::v1::{EchoRequest, echo_client::EchoClient, echo_server::{Echo, EchoServer}};
//! # async fn run<E: Echo>(echo: E) -> Result<(), Box<dyn std::error::Error>> {
//! let _served = mesh::inprocess::serve("plugin.echo", EchoServer::new(echo))?;
//! let mut client = EchoClient::new(mesh::connect("plugin.echo").await?); // no socket, no router
//! client.echo(EchoRequest { message: "hi".into() }).await?;
//! # Ok(()) }
//! ```

use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::service::Routes;

use crate::{
    plugin::GrpcService,
    transport::{self, CONNECTION_WINDOW, Connection, Dial, Dialing, Registered, WINDOW},
};

/// Bytes in flight each way between a caller and the service, before writes wait.
const BUFFER: usize = 256 * 1024;

/// Serves `service` under `name` (`plugin.echo`) inside this process until the returned handle
/// is dropped: [`crate::connect`]`(name)` reaches it over an in-memory stream, before any
/// router is asked. Fails if the name is invalid or already taken in this process.
pub fn serve<S: GrpcService>(name: &str, service: S) -> Result<Registered, crate::Error> {
    transport::register(
        name,
        InProcess {
            routes: Routes::new(service),
        },
    )
}

/// Each dial: a fresh in-memory stream, its far end served by the routes on a task of its own.
struct InProcess {
    routes: Routes,
}

impl Dial for InProcess {
    fn dial(&self) -> Dialing {
        let (caller, server) = tokio::io::duplex(BUFFER);
        let service = hyper_util::service::TowerToHyperService::new(self.routes.clone());
        tokio::spawn(async move {
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .serve_connection(TokioIo::new(server), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, "in-process connection ended");
            }
        });
        Box::pin(async move { Ok(Box::new(caller) as Box<dyn Connection>) })
    }
}
