//! Endpoint addresses and HTTP/2 connections to them.
//!
//! One multiplexed HTTP/2 connection per endpoint carries every call to it. Calls drive the
//! connection themselves (`client.rs`): no tonic `Buffer` task, no hyper dispatch task in
//! between.
//!
//! Public here are the router's building blocks — [`Address`], [`SendBody`], [`BoxError`],
//! [`WINDOW`] and [`CONNECTION_WINDOW`] — and [`CallError`], what a failed call's stream
//! reports — and [`Dial`] with [`register`], for a transport of the caller's own (a byte
//! stream of any kind). h2 stays an implementation detail: no h2 type appears in a public
//! signature.

pub(crate) mod client;
mod spin_io;
#[cfg(feature = "tls")]
mod tls;

#[cfg(feature = "tls")]
pub use tls::{
    ClientTls, MESH_TLS_CA, MESH_TLS_CERT, MESH_TLS_KEY, MESH_TLS_SERVER_NAME, TlsError,
};

use std::{fmt, io, path::PathBuf, str::FromStr, time::Duration};

use bytes::Bytes;
use http_body::Body as HttpBody;
use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpStream, UnixStream},
};

pub(crate) use client::{RecvBody, SendError, Sender};

/// Where an instance or a router can be reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// A Unix socket on this machine: `unix:/run/user/1000/mesh/echo-0.sock`.
    Unix(PathBuf),
    /// A TCP address: `http://127.0.0.1:7700`.
    Tcp(String),
    /// A transport of this process's own, registered under this name with [`register`]
    /// (an in-process service, [`crate::inprocess`], or a custom [`Dial`]); printed
    /// `dial:NAME`. Never parsed from text: it means nothing outside this process.
    Dialer(String),
}

/// An address that could not be parsed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid endpoint {0:?}: expected unix:/absolute/path.sock or http://host:port")]
pub struct InvalidAddress(String);

impl FromStr for Address {
    type Err = InvalidAddress;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidAddress(s.to_owned());
        if let Some(path) = s.strip_prefix("unix:") {
            // Accept both unix:/path and unix:///path.
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err(bad());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let hostport = s.strip_prefix("http://").unwrap_or(s);
        let hostport = hostport.strip_suffix('/').unwrap_or(hostport);
        match hostport.rsplit_once(':') {
            // Another scheme (`https://`) is not an address: TLS is the connector's setting.
            _ if hostport.contains("://") => Err(bad()),
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Self::Tcp(hostport.to_owned()))
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(hostport) => write!(f, "http://{hostport}"),
            Self::Dialer(name) => write!(f, "dial:{name}"),
        }
    }
}

/// A boxed error, as hyper takes them from bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body that can be sent on a connection: hyper's `Incoming` (the router forwards it as it
/// came, unboxed) or tonic's `Body` (clients).
pub trait SendBody: HttpBody<Data = Bytes> + Send + Unpin + 'static {
    /// The body's error, boxed.
    fn box_error(error: Self::Error) -> BoxError;
}

impl<B> SendBody for B
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    fn box_error(error: Self::Error) -> BoxError {
        error.into()
    }
}

/// How a client's connections behave: its calls' spin window, keepalive pings, and TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Options {
    /// How long a call alone in its process polls its connection before it sleeps (see
    /// [`crate::tuning`]); zero: never. The router's balancers use none.
    pub(crate) spin: Duration,
    /// Pings on TCP connections; `None` or a zero interval: none. A Unix socket's peer that
    /// dies closes the socket, so those connections need none.
    pub(crate) keepalive: Option<Keepalive>,
    /// TLS on TCP connections; `None`: plaintext.
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<ClientTls>,
}

impl Default for Options {
    /// No spinning, the default keepalive, plaintext.
    fn default() -> Self {
        Self {
            spin: Duration::ZERO,
            keepalive: Some(Keepalive::default()),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

/// HTTP/2 keepalive: a PING every `interval` while calls are open on a connection; a PING
/// unanswered for `timeout` closes the connection and fails its calls. A peer that stops
/// answering (a half-open TCP connection, a host gone) then fails calls within
/// `interval + timeout` instead of hanging them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Keepalive {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

/// Time between keepalive pings on a TCP connection with calls open.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a keepalive ping may go unanswered before the connection is given up.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: KEEPALIVE_INTERVAL,
            timeout: KEEPALIVE_TIMEOUT,
        }
    }
}

/// Opens an HTTP/2 connection to `address`; its calls drive it (see `client.rs`).
pub(crate) async fn connect(address: &Address, options: &Options) -> io::Result<Sender> {
    match address {
        Address::Unix(path) => {
            client::handshake(UnixStream::connect(path).await?, options, None).await
        }
        Address::Tcp(hostport) => {
            let stream = TcpStream::connect(hostport.as_str()).await?;
            // gRPC messages are small and latency-bound: never wait for Nagle.
            stream.set_nodelay(true)?;
            #[cfg(feature = "tls")]
            if let Some(tls) = &options.tls {
                let stream = tls.connect(hostport, stream).await?;
                return client::handshake(stream, options, options.keepalive).await;
            }
            client::handshake(stream, options, options.keepalive).await
        }
        Address::Dialer(name) => {
            let dialer = dialer(name).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no transport registered as {name:?} in this process"),
                )
            })?;
            client::handshake(dialer.dial().await?, options, None).await
        }
    }
}

/// A byte stream a custom transport opens: anything that reads and writes.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection for T {}

/// What [`Dial::dial`] returns.
pub type Dialing = Pin<Box<dyn Future<Output = io::Result<Box<dyn Connection>>> + Send>>;

/// A custom transport: opens a new byte stream to the server each time a channel connects (on
/// its first call, and again after a connection is lost). The channel runs HTTP/2 over it.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use mesh::transport::{Connection, Dial, Dialing};
///
/// struct Abstract; // say, a socket in the abstract namespace, or a vsock
/// impl Dial for Abstract {
///     fn dial(&self) -> Dialing {
///         Box::pin(async {
///             let stream = tokio::net::UnixStream::connect("/run/my.sock").await?;
///             Ok(Box::new(stream) as Box<dyn Connection>)
///         })
///     }
/// }
/// let _registered = mesh::transport::register("my.service", Abstract)?;
/// let channel = mesh::connect("my.service").await?; // over Abstract
/// # Ok(()) }
/// ```
pub trait Dial: Send + Sync + 'static {
    /// Opens one connection.
    fn dial(&self) -> Dialing;
}

/// The transports registered in this process, by service name.
static DIALERS: Mutex<BTreeMap<String, Arc<dyn Dial>>> = Mutex::new(BTreeMap::new());

fn dialers() -> std::sync::MutexGuard<'static, BTreeMap<String, Arc<dyn Dial>>> {
    // The map stays consistent whatever panicked while holding it.
    DIALERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The transport registered as `name`, if any.
pub(crate) fn dialer(name: &str) -> Option<Arc<dyn Dial>> {
    dialers().get(name).cloned()
}

/// Registers `dialer` as the way to reach service `name` from this process: from now on
/// [`crate::connect`]`(name)` and [`Address::Dialer`]`(name)` use it, until the returned
/// handle is dropped. Fails if the name is invalid or already registered.
pub fn register(name: &str, dialer: impl Dial) -> Result<Registered, crate::Error> {
    let name = crate::ServiceName::new(name)?.to_string();
    let mut dialers = dialers();
    if dialers.contains_key(&name) {
        return Err(crate::Error::NameTaken(name));
    }
    dialers.insert(name.clone(), Arc::new(dialer));
    Ok(Registered { name })
}

/// A transport registered with [`register`]; dropping it unregisters the name (channels
/// already connected keep their connections).
#[derive(Debug)]
pub struct Registered {
    name: String,
}

impl Registered {
    /// The service name it is registered under.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        dialers().remove(&self.name);
    }
}

/// Why a call's HTTP/2 stream failed: reset by the peer or by this side, or its connection
/// lost. The gRPC status it amounts to (as tonic maps HTTP/2 errors: a reset with `CANCEL` is
/// `CANCELLED`, `REFUSED_STREAM` is `UNAVAILABLE`, …) comes first in its [`source`] chain, so
/// a tonic client reports that code; the HTTP/2 error itself is that status's source.
///
/// [`source`]: std::error::Error::source
pub struct CallError(Box<tonic::Status>);

impl CallError {
    pub(crate) fn new(error: h2::Error) -> Self {
        Self(Box::new(tonic::Status::from_error(Box::new(error))))
    }

    /// The gRPC status this failure amounts to.
    pub fn status(&self) -> &tonic::Status {
        &self.0
    }

    /// The HTTP/2 error, for classifying the failure.
    pub(crate) fn h2(&self) -> Option<&h2::Error> {
        std::error::Error::source(&*self.0)?.downcast_ref()
    }
}

impl fmt::Debug for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CallError").field(&self.to_string()).finish()
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.h2() {
            Some(error) => fmt::Display::fmt(error, f),
            None => f.write_str(self.0.message()),
        }
    }
}

impl std::error::Error for CallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Per-stream flow-control window: large enough that a 4 MiB message needs few round trips,
/// small enough that a slow reader holds a bounded amount in memory.
pub const WINDOW: u32 = 1 << 20;
/// Per-connection window, shared by every stream on the connection.
pub const CONNECTION_WINDOW: u32 = 8 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_error_is_opaque_and_keeps_its_cause_and_status() {
        use std::error::Error as _;
        let error = CallError::new(h2::Error::from(h2::Reason::CANCEL));
        assert_eq!(error.status().code(), tonic::Code::Cancelled);
        let status = error.source().expect("a status");
        let cause = status.source().expect("the HTTP/2 cause");
        assert!(cause.downcast_ref::<h2::Error>().is_some());
        assert_eq!(error.to_string(), cause.to_string());
        // tonic finds the status in the chain, as it does for a bare h2 error.
        let boxed: BoxError = Box::new(CallError::new(h2::Error::from(h2::Reason::REFUSED_STREAM)));
        assert_eq!(
            tonic::Status::from_error(boxed).code(),
            tonic::Code::Unavailable
        );
    }

    #[test]
    fn parses_and_prints_addresses() {
        for (text, printed) in [
            ("unix:/tmp/a.sock", "unix:/tmp/a.sock"),
            ("unix:///tmp/a.sock", "unix:/tmp/a.sock"),
            ("http://127.0.0.1:7700", "http://127.0.0.1:7700"),
            ("127.0.0.1:7700", "http://127.0.0.1:7700"),
            ("http://[::1]:7700/", "http://[::1]:7700"),
        ] {
            let address: Address = text.parse().unwrap();
            assert_eq!(address.to_string(), printed);
        }
        for bad in [
            "unix:relative.sock",
            "http://host",
            "host:port",
            "",
            "https://127.0.0.1:7700",
        ] {
            let err = bad.parse::<Address>().unwrap_err().to_string();
            assert!(err.contains("unix:/absolute/path.sock"), "{err}");
        }
    }
}
