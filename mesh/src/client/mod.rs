//! `mesh::connect`: a channel to a service by name, usable with any tonic-generated client.
//!
//! On the router's machine the channel follows the registry (`Watch`) and dials the instances'
//! sockets itself: calls take no proxy hop and are balanced across instances. Elsewhere
//! (`MESH_ROUTER=http://host:7700`) it sends every call to that router, which forwards it by name.

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, Uri, uri::Authority};
use mesh_proto::mesh::v1::{WatchRequest, WatchResponse, registry_client::RegistryClient};
use tokio::task::JoinHandle;
use tonic::{Streaming, body::Body};

use crate::{
    Error, ServiceName,
    balance::{Balancer, ResponseBody, Target},
    runtime,
    transport::Address,
};

/// Environment variable naming a remote router (`http://host:7700`); when set, calls go through it.
pub const MESH_ROUTER: &str = "MESH_ROUTER";

/// How long `connect` waits for the router's first answer.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `service` (`plugin.echo`) through the router named by the environment:
/// `MESH_ROUTER` if set, else the router socket `MESH_SOCKET` (or its default path).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use mesh_proto::echo::v1::{EchoRequest, echo_client::EchoClient};
///
/// let channel = mesh::connect("plugin.echo").await?;
/// let mut echo = EchoClient::new(channel);
/// let reply = echo.echo(EchoRequest { message: "hi".into() }).await?;
/// println!("{} answered", reply.get_ref().instance);
/// # Ok(()) }
/// ```
pub async fn connect(service: &str) -> Result<Channel, Error> {
    Connector::from_env().connect(service).await
}

/// Where `connect` finds the router; [`Connector::from_env`] reads the environment.
#[derive(Debug, Clone)]
pub struct Connector {
    router: RouterAt,
}

#[derive(Debug, Clone)]
enum RouterAt {
    /// The router on this machine: resolve through it, dial instances directly.
    Local(PathBuf),
    /// A remote router: send every call through it.
    Remote(Address),
}

impl Connector {
    /// `MESH_ROUTER` if set, else `MESH_SOCKET`, else the default router socket.
    pub fn from_env() -> Self {
        match std::env::var(MESH_ROUTER) {
            Ok(router) if !router.is_empty() => match router.parse() {
                Ok(address) => Self {
                    router: RouterAt::Remote(address),
                },
                Err(error) => {
                    tracing::warn!(%error, "ignoring {MESH_ROUTER}");
                    Self::local(runtime::router_socket())
                }
            },
            _ => Self::local(runtime::router_socket()),
        }
    }

    /// The router listening on the Unix socket `path` (this machine): calls go to instances directly.
    pub fn local(path: impl Into<PathBuf>) -> Self {
        Self {
            router: RouterAt::Local(path.into()),
        }
    }

    /// A router at `address` (`http://host:7700`): every call goes through it.
    pub fn remote(address: Address) -> Self {
        Self {
            router: RouterAt::Remote(address),
        }
    }

    /// A channel to `service`.
    ///
    /// Locally this waits for the registry's current set of instances (it may be empty: calls
    /// then fail with `UNAVAILABLE` until an instance registers) and keeps following it.
    pub async fn connect(&self, service: &str) -> Result<Channel, Error> {
        let name = ServiceName::new(service)?;
        match &self.router {
            RouterAt::Remote(address) => Ok(Channel::to_address(address.clone(), name.as_str())),
            RouterAt::Local(socket) => connect_local(socket, name).await,
        }
    }
}

async fn connect_local(socket: &Path, name: ServiceName) -> Result<Channel, Error> {
    let router = Channel::to_address(Address::Unix(socket.to_owned()), "localhost");
    let unreachable = |source: tonic::Status| Error::Router {
        socket: socket.to_owned(),
        source,
    };
    let mut stream = tokio::time::timeout(RESOLVE_TIMEOUT, watch(&router, &name))
        .await
        .map_err(|_| unreachable(tonic::Status::deadline_exceeded("no answer in 5 s")))?
        .map_err(unreachable)?;
    let first = tokio::time::timeout(RESOLVE_TIMEOUT, stream.message())
        .await
        .map_err(|_| unreachable(tonic::Status::deadline_exceeded("no answer in 5 s")))?
        .map_err(unreachable)?
        .ok_or_else(|| unreachable(tonic::Status::unavailable("the router ended the watch")))?;
    let balancer = Arc::new(Balancer::new(&first.instances));
    let follower = tokio::spawn(follow(
        router,
        name.clone(),
        Arc::downgrade(&balancer),
        stream,
    ));
    Ok(Channel {
        inner: Arc::new(Inner {
            balancer,
            authority: authority(name.as_str()),
            name,
            follower: Some(follower),
        }),
    })
}

async fn watch(
    router: &Channel,
    name: &ServiceName,
) -> Result<Streaming<WatchResponse>, tonic::Status> {
    let request = WatchRequest {
        service: name.to_string(),
    };
    Ok(RegistryClient::new(router.clone())
        .watch(request)
        .await?
        .into_inner())
}

/// Applies every change of `name` to the balancer until the channel is dropped. If the router
/// goes away the known instances stay in use (they may well be alive) and the watch is retried.
async fn follow(
    router: Channel,
    name: ServiceName,
    balancer: std::sync::Weak<Balancer>,
    mut stream: Streaming<WatchResponse>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        while let Ok(Some(update)) = stream.message().await {
            let Some(balancer) = balancer.upgrade() else {
                return;
            };
            balancer.update(&update.instances);
            backoff = Duration::from_millis(50);
        }
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            if balancer.strong_count() == 0 {
                return;
            }
            match watch(&router, &name).await {
                Ok(next) => {
                    stream = next;
                    break;
                }
                Err(error) => {
                    tracing::debug!(service = %name, %error, "registry watch failed; retrying")
                }
            }
        }
    }
}

fn authority(name: &str) -> Authority {
    // Service names and "localhost" are valid authorities by construction.
    name.parse().expect("a service name is a valid authority")
}

/// A channel to one service, balanced across its instances; give it to any tonic client.
///
/// Cheap to clone: clones share connections and the registry watch, which stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Channel {
    inner: Arc<Inner>,
}

struct Inner {
    balancer: Arc<Balancer>,
    authority: Authority,
    name: ServiceName,
    follower: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(follower) = &self.follower {
            follower.abort();
        }
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("service", &self.inner.name)
            .field("instances", &self.inner.balancer.len())
            .finish()
    }
}

impl Channel {
    /// A channel to the one endpoint at `address`, sending `authority` (a service name for a
    /// router, `localhost` for a plugin's own socket). Connects on first use.
    pub fn to_address(address: Address, authority: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                balancer: Arc::new(Balancer::fixed(Target {
                    id: address.to_string(),
                    address,
                })),
                authority: authority
                    .parse()
                    .unwrap_or_else(|_| self::authority("localhost")),
                name: ServiceName::new(authority)
                    .unwrap_or_else(|_| ServiceName::new("localhost").expect("a valid name")),
                follower: None,
            }),
        }
    }

    /// How many instances this channel can reach now.
    pub fn instances(&self) -> usize {
        self.inner.balancer.len()
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, tonic::Status>> + Send + 'static>>;

/// Errors come back as a [`tonic::Status`] (so a tonic client reports `UNAVAILABLE`, not
/// `UNKNOWN`), whose source is the [`Error`].
impl tower::Service<Request<Body>> for Channel {
    type Response = Response<ResponseBody>;
    type Error = tonic::Status;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), tonic::Status>> {
        // Readiness is per instance and per call: the balancer picks when the call is made.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        let mut parts = std::mem::take(request.uri_mut()).into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(inner.authority.clone());
        match Uri::from_parts(parts) {
            Ok(uri) => *request.uri_mut() = uri,
            Err(error) => {
                let error = Error::InvalidRequest(error.to_string());
                return Box::pin(async move { Err(status(error)) });
            }
        }
        Box::pin(async move {
            inner
                .balancer
                .send(request, inner.name.as_str())
                .await
                .map_err(status)
        })
    }
}

fn status(error: Error) -> tonic::Status {
    let mut status = error.to_status();
    status.set_source(Arc::new(error));
    status
}
