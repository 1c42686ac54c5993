//! A plugin mesh for gRPC services.
//!
//! Plugins are small gRPC servers; the manager (`mesh up`) starts them, and the router keeps a
//! registry of logical names (`plugin.echo`). Clients reach a healthy instance by name:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_proto::echo::v1::{EchoRequest, echo_client::EchoClient};
//!
//! let mut echo = EchoClient::new(mesh::connect("plugin.echo").await?);
//! let reply = echo.echo(EchoRequest { message: "hello".into() }).await?;
//! assert_eq!(reply.get_ref().message, "hello");
//! # Ok(()) }
//! ```
//!
//! - [`connect`] and [`Channel`]: a balanced channel to a service, for any tonic client;
//! - [`plugin`]: the SDK plugin authors serve with;
//! - [`introspection`]: health and server reflection, as plugins and the router serve them;
//! - [`runtime`]: where sockets live, and binding them safely;
//! - [`tuning`]: every latency knob — client spinning (opt-in), the router's linger, busy
//!   polling — with its default and its cost;
//! - [`backoff`]: exponential backoff with jitter, for whatever tries again;
//! - [`labels`]: the registry labels with a meaning to the mesh;
//! - [`balance`] and [`transport`]: the balancer and HTTP/2 client under every [`Channel`],
//!   which the router (the `mesh-router` crate, not linked by applications) forwards with too.

pub mod backoff;
pub mod balance;
mod client;
mod error;
pub mod introspection;
pub mod labels;
mod name;
pub mod plugin;
pub mod runtime;
pub mod transport;
pub mod tuning;

pub use balance::ResponseBody;
pub use client::{Channel, Connector, MESH_ROUTER, connect};
pub use error::Error;
pub use name::{InvalidName, ServiceName};
pub use transport::{Address, CallError, InvalidAddress};
