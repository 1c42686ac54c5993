//! The mesh router and its registry: what `mesh up` runs, and what applications and plugins
//! never link.
//!
//! The router keeps a [`registry`] of logical names (`plugin.echo`) and forwards every call it
//! receives to a healthy instance of the service the call names, over Unix sockets or TCP. Its
//! layers, one per file:
//!
//! - `identity`: who is calling ([`Caller`]), from the kernel, once per connection;
//! - [`peer`]: who holds the other end of a loopback TCP connection (the kernel's socket
//!   table, then the processes holding the socket);
//! - `grpc`: what is a gRPC call the router takes (POST, `application/grpc`, header list);
//! - `tls`: mTLS on the TCP listener: a client's certificate names who it is
//!   ([`ServerTls`]);
//! - `policy`: who may call what on the router itself (the Manager API and registry writes
//!   are the owner's, and granted certificate identities');
//! - `calls`: whether a forwarded call may go, by the embedder's policy: a plugin's `call:`
//!   capabilities, every caller's rate limits ([`CallPolicy`]);
//! - `route`: where a call goes (the `mesh-service` header, else `:authority`);
//! - `upstream`: one balancer (`mesh::balance`) per service, following the registry;
//! - `peers`: other nodes' routers, for names with no instance here ([`cluster`]);
//! - `deadline`: `grpc-timeout` and the default call timeout;
//! - `limit`: connections, handshakes, idle connections and calls in flight under their
//!   [`Limits`];
//! - `metrics`: calls, durations, refusals and connections as OpenTelemetry instruments
//!   ([`RouterMetrics`], off unless the embedder hands in a meter);
//! - `trace`: a span per forwarded call, child of the caller's, carried on to the instance;
//! - `body`: the answer's body, the router's own or an instance's streamed through;
//! - `forward`: accepting connections and forwarding calls ([`Router`]);
//! - `workers`: thread-per-core serving ([`Workers`]).
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use mesh_router::{Router, registry::Registry};
//!
//! let router = Router::builder(Registry::new()).build().await;
//! let listener = mesh::runtime::bind("/tmp/mesh-demo/mesh.sock".as_ref()).unwrap();
//! router.serve_unix(listener, std::future::pending()).await
//! # }
//! ```

mod body;
mod calls;
pub mod cluster;
mod deadline;
mod forward;
mod grpc;
mod identity;
mod limit;
mod metrics;
pub mod peer;
mod peers;
mod policy;
pub mod registry;
mod route;
mod tls;
mod trace;
mod upstream;
mod workers;

pub use calls::{CallPolicy, Refusal};
pub use deadline::parse as parse_grpc_timeout;
pub use forward::{Router, RouterBuilder};
pub use identity::{Caller, Identify, PluginIdentity, pidfd_pid};
pub use limit::{
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_HEADER_LIST_SIZE, Limits,
};
pub use metrics::{MAX_METHODS, RouterMetrics, observe_cluster};
pub use route::SERVICE_HEADER;
pub use tls::{Grant, ServerTls, TlsError, install_default_provider};
pub use workers::Workers;
