//! Endpoint addresses and HTTP/2 connections to them.
//!
//! One multiplexed HTTP/2 connection per endpoint carries every call to it. Calls drive the
//! connection themselves ([`client`]): no tonic `Buffer` task, no hyper dispatch task in
//! between.

pub(crate) mod client;
mod spin_io;

use std::{fmt, io, path::PathBuf, str::FromStr};

use bytes::Bytes;
use http_body::Body as HttpBody;
use tokio::net::{TcpStream, UnixStream};

pub(crate) use client::{RecvBody, SendError, Sender};

/// Where an instance or a router can be reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// A Unix socket on this machine: `unix:/run/user/1000/mesh/echo-0.sock`.
    Unix(PathBuf),
    /// A TCP address: `http://127.0.0.1:7700`.
    Tcp(String),
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

/// Opens an HTTP/2 connection to `address`; its calls drive it (see [`client`]).
pub(crate) async fn connect(address: &Address) -> io::Result<Sender> {
    match address {
        Address::Unix(path) => client::handshake(UnixStream::connect(path).await?).await,
        Address::Tcp(hostport) => {
            let stream = TcpStream::connect(hostport.as_str()).await?;
            // gRPC messages are small and latency-bound: never wait for Nagle.
            stream.set_nodelay(true)?;
            client::handshake(stream).await
        }
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
        for bad in ["unix:relative.sock", "http://host", "host:port", ""] {
            let err = bad.parse::<Address>().unwrap_err().to_string();
            assert!(err.contains("unix:/absolute/path.sock"), "{err}");
        }
    }
}
