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
    backoff::{Backoff, Jitter},
    balance::{Balancer, ResponseBody, Target},
    runtime,
    transport::{Address, Keepalive, Options},
    tuning,
};

/// Environment variable naming a remote router (`http://host:7700`); when set, calls go through it.
pub const MESH_ROUTER: &str = "MESH_ROUTER";

/// Environment variable: `0` sends every call through the local router instead of dialing
/// instances' sockets directly. The manager sets it for sandboxed plugins
/// (`sandbox = true`), which cannot reach other plugins' sockets, so that their calls take the
/// router, where their `call:` capabilities are checked.
pub const MESH_DIRECT: &str = "MESH_DIRECT";

/// How long `connect` waits for the router's first answer.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a lost registry watch is retried: jittered, so that the clients of a router that
/// restarts do not all come back at the same instant.
const WATCH_BACKOFF: Backoff = Backoff::new(
    Duration::from_millis(50),
    Duration::from_secs(2),
    Jitter::Full,
);

/// Connects to `service` (`plugin.echo`): in this process if it is registered here
/// ([`crate::inprocess::serve`], [`crate::transport::register`]), else through the router named
/// by the environment:
/// `MESH_ROUTER` if set, else the router socket `MESH_SOCKET` (or its default path). An
/// invalid `MESH_ROUTER` is an error, not a silent fall back to the local router.
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
    Connector::from_env()?.connect(service).await
}

/// Where `connect` finds the router, and how its channels' connections behave;
/// [`Connector::from_env`] reads the environment.
///
/// ```no_run
/// # async fn run() -> Result<(), mesh::Error> {
/// use std::time::Duration;
///
/// // Spin up to 100 µs on each answer (opt-in: lower latency for a core's CPU time).
/// let channel = mesh::Connector::from_env()?
///     .spin(Duration::from_micros(100))
///     .connect("plugin.echo")
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Connector {
    router: RouterAt,
    /// `None`: [`tuning::MESH_SPIN_US`], else no spinning.
    spin: Option<Duration>,
    keepalive: Option<Keepalive>,
}

#[derive(Debug, Clone)]
enum RouterAt {
    /// The router on this machine: resolve through it, dial instances directly.
    Local(PathBuf),
    /// A remote router: send every call through it.
    Remote(Address),
}

impl Connector {
    /// `MESH_ROUTER` if set, else `MESH_SOCKET`, else the default router socket (every call
    /// through it if `MESH_DIRECT=0`). Fails if `MESH_ROUTER` is set to something that is
    /// not an address.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_vars(
            std::env::var(MESH_ROUTER).ok().as_deref(),
            std::env::var(MESH_DIRECT).ok().as_deref(),
        )
    }

    /// [`Connector::from_env`], given `MESH_ROUTER`'s and `MESH_DIRECT`'s values.
    fn from_vars(router: Option<&str>, direct: Option<&str>) -> Result<Self, Error> {
        if direct == Some("0") && router.is_none_or(str::is_empty) {
            return Ok(Self::routed(runtime::router_socket()));
        }
        Self::from_router_var(router)
    }

    /// [`Connector::from_env`], given `MESH_ROUTER`'s value.
    fn from_router_var(router: Option<&str>) -> Result<Self, Error> {
        match router {
            Some(router) if !router.is_empty() => {
                router
                    .parse()
                    .map(Self::remote)
                    .map_err(|source| Error::InvalidRouter {
                        variable: MESH_ROUTER,
                        source,
                    })
            }
            _ => Ok(Self::local(runtime::router_socket())),
        }
    }

    /// The router listening on the Unix socket `path` (this machine): calls go to instances directly.
    pub fn local(path: impl Into<PathBuf>) -> Self {
        Self::at(RouterAt::Local(path.into()))
    }

    /// The router listening on the Unix socket `path` (this machine), sending every call
    /// through it rather than to the instances directly: one hop more, and the router's
    /// policy on each call (what a sandboxed plugin gets, see [`MESH_DIRECT`]).
    pub fn routed(path: impl Into<PathBuf>) -> Self {
        Self::at(RouterAt::Remote(Address::Unix(path.into())))
    }

    /// A router at `address` (`http://host:7700`): every call goes through it.
    pub fn remote(address: Address) -> Self {
        Self::at(RouterAt::Remote(address))
    }

    fn at(router: RouterAt) -> Self {
        Self {
            router,
            spin: None,
            keepalive: Some(Keepalive::default()),
        }
    }

    /// Opts in to spinning: a call that is the only one waiting in this process polls its
    /// connection for up to `window` before it sleeps, which saves the thread wake-ups a
    /// quick answer would cost, for up to `window` of CPU time per call. Zero turns it off.
    /// Without this, [`tuning::MESH_SPIN_US`] decides, and its absence means no spinning.
    /// Nothing spins on a one-core machine. See [`crate::tuning`].
    pub fn spin(mut self, window: Duration) -> Self {
        self.spin = Some(window);
        self
    }

    /// HTTP/2 keepalive on TCP connections (to a remote router, or to instances on TCP): a
    /// PING every `interval` while calls are open, and a connection whose PING goes unanswered
    /// for `timeout` is closed, failing its calls. A peer that stops answering then fails
    /// calls within `interval + timeout`. Default: every
    /// [`KEEPALIVE_INTERVAL`](crate::transport::KEEPALIVE_INTERVAL), timeout
    /// [`KEEPALIVE_TIMEOUT`](crate::transport::KEEPALIVE_TIMEOUT); a zero `interval` sends
    /// none. The mesh's router answers any number of PINGs; a server that polices them
    /// (grpc-go allows one per 5 minutes unless configured) may close the connection with
    /// `GOAWAY`: lengthen the interval, or turn pings off, for such a server.
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keepalive = (!interval.is_zero()).then_some(Keepalive { interval, timeout });
        self
    }

    fn options(&self) -> Options {
        Options {
            spin: self.spin.unwrap_or_else(tuning::client_spin),
            keepalive: self.keepalive,
        }
    }

    /// A channel to `service`.
    ///
    /// Locally this waits for the registry's current set of instances (it may be empty: calls
    /// then fail with `UNAVAILABLE` until an instance registers) and keeps following it.
    pub async fn connect(&self, service: &str) -> Result<Channel, Error> {
        let name = ServiceName::new(service)?;
        let options = self.options();
        // Registered in this process (in-process service, custom transport): no router asked.
        if crate::transport::dialer(name.as_str()).is_some() {
            return Ok(Channel::fixed(
                Address::Dialer(name.to_string()),
                authority(name.as_str()),
                options,
            ));
        }
        match &self.router {
            RouterAt::Remote(address) => Ok(Channel::fixed(
                address.clone(),
                authority(name.as_str()),
                options,
            )),
            RouterAt::Local(socket) => connect_local(socket, name, options).await,
        }
    }
}

async fn connect_local(
    socket: &Path,
    name: ServiceName,
    options: Options,
) -> Result<Channel, Error> {
    let router = Channel::to_server(Address::Unix(socket.to_owned()));
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
    let balancer = Arc::new(Balancer::with_options(&first.instances, options));
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
    let mut attempt = 0;
    loop {
        while let Ok(Some(update)) = stream.message().await {
            let Some(balancer) = balancer.upgrade() else {
                return;
            };
            balancer.update(&update.instances);
            attempt = 0;
        }
        loop {
            tokio::time::sleep(WATCH_BACKOFF.delay(attempt)).await;
            attempt = attempt.saturating_add(1);
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

/// A service name's authority.
fn authority(name: &str) -> Authority {
    // Service names (`[a-z0-9-]` segments joined by dots) and "localhost" are valid
    // authorities by construction.
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
    /// Sent with every call; also the service named in errors.
    authority: Authority,
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
            .field("service", &self.inner.authority.as_str())
            .field("instances", &self.inner.balancer.len())
            .finish()
    }
}

impl Channel {
    /// A channel to the one endpoint at `address` — a router, which forwards each call to the
    /// service `authority` names (`plugin.echo`) — sending `authority` as every call's
    /// `:authority`. Connects on first use. Fails if `authority` is not a valid HTTP
    /// authority. Its calls spin only if [`tuning::MESH_SPIN_US`] says so (for more, use
    /// [`Connector::remote`]).
    pub fn to_address(address: Address, authority: &str) -> Result<Self, Error> {
        let parsed = authority
            .parse::<Authority>()
            .ok()
            // `Authority` accepts `user@host`; a call cannot carry user info.
            .filter(|a| !a.as_str().contains('@'))
            .ok_or_else(|| Error::InvalidAuthority(authority.to_owned()))?;
        Ok(Self::fixed(
            address,
            parsed,
            Options {
                spin: tuning::client_spin(),
                ..Options::default()
            },
        ))
    }

    /// A channel to the gRPC server at `address` itself — a plugin's socket, or the router's
    /// own API (registry, Manager, health) — sending `:authority localhost`. Its calls never
    /// spin.
    pub fn to_server(address: Address) -> Self {
        Self::fixed(address, authority("localhost"), Options::default())
    }

    fn fixed(address: Address, authority: Authority, options: Options) -> Self {
        let target = Target {
            id: address.to_string(),
            address,
        };
        Self {
            inner: Arc::new(Inner {
                balancer: Arc::new(Balancer::fixed(target, options)),
                authority,
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
        // The caller's trace goes along, once a tracer is installed.
        crate::telemetry::inject(request.headers_mut());
        Box::pin(async move {
            inner
                .balancer
                .send(request, inner.authority.as_str())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_authority_is_an_error_not_localhost() {
        let address: Address = "unix:/tmp/mesh.sock".parse().unwrap();
        for bad in [
            "",
            "not an authority",
            "plugin echo",
            "user@plugin.echo",
            "a/b",
        ] {
            match Channel::to_address(address.clone(), bad) {
                Err(Error::InvalidAuthority(named)) => assert_eq!(named, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        for good in ["plugin.echo", "localhost", "127.0.0.1:7700"] {
            let channel = Channel::to_address(address.clone(), good).unwrap();
            assert_eq!(channel.inner.authority.as_str(), good);
        }
        let error = Channel::to_address(address, "x y").unwrap_err();
        assert_eq!(error.to_status().code(), tonic::Code::InvalidArgument);
        assert!(error.to_string().contains("\"x y\""), "{error}");
    }

    #[test]
    fn an_invalid_mesh_router_is_an_error_not_the_local_router() {
        let error = Connector::from_router_var(Some("router.example")).unwrap_err();
        let message = error.to_string();
        assert!(message.starts_with("MESH_ROUTER: "), "{message}");
        assert!(message.contains("http://host:port"), "{message}");
        assert!(matches!(error, Error::InvalidRouter { .. }), "{error:?}");

        let remote = Connector::from_router_var(Some("http://127.0.0.1:7700")).unwrap();
        assert!(
            matches!(remote.router, RouterAt::Remote(Address::Tcp(ref a)) if a == "127.0.0.1:7700")
        );
        for unset in [None, Some("")] {
            let local = Connector::from_router_var(unset).unwrap();
            assert!(matches!(local.router, RouterAt::Local(_)), "{unset:?}");
        }
        // MESH_DIRECT=0: through the local router socket; other values change nothing.
        let routed = Connector::from_vars(None, Some("0")).unwrap();
        assert!(
            matches!(routed.router, RouterAt::Remote(Address::Unix(ref p)) if *p == runtime::router_socket())
        );
        for direct in [None, Some("1"), Some("")] {
            let local = Connector::from_vars(None, direct).unwrap();
            assert!(matches!(local.router, RouterAt::Local(_)), "{direct:?}");
        }
        let remote = Connector::from_vars(Some("http://127.0.0.1:7700"), Some("0")).unwrap();
        assert!(matches!(remote.router, RouterAt::Remote(Address::Tcp(_))));
    }

    #[tokio::test]
    async fn a_remote_router_that_stops_answering_fails_calls_within_the_keepalive_bound() {
        use mesh_proto::echo::v1::{EchoRequest, echo_client::EchoClient};
        // Accepts, then never reads nor answers: a half-open connection as the client sees it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: Address = listener.local_addr().unwrap().to_string().parse().unwrap();
        let silent = tokio::spawn(async move {
            let _socket = listener.accept().await.unwrap();
            std::future::pending::<()>().await
        });
        let channel = Connector::remote(address)
            .keepalive(Duration::from_millis(100), Duration::from_millis(200))
            .connect("plugin.echo")
            .await
            .unwrap();
        let mut echo = EchoClient::new(channel);
        let call = echo.echo(EchoRequest {
            message: "anyone?".into(),
        });
        let started = std::time::Instant::now();
        let status = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .expect("the call fails within the keepalive bound instead of hanging")
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        silent.abort();
    }

    #[test]
    fn spinning_is_opt_in() {
        let connector = Connector::local("/tmp/mesh.sock");
        assert_eq!(connector.options().spin, tuning::client_spin());
        let spinning = connector.clone().spin(Duration::from_micros(100));
        assert_eq!(spinning.options().spin, Duration::from_micros(100));
        assert_eq!(connector.options().keepalive, Some(Keepalive::default()));
        assert_eq!(
            connector
                .keepalive(Duration::ZERO, Duration::ZERO)
                .options()
                .keepalive,
            None
        );
    }
}
