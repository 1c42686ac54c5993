//! The library's error type, and its one mapping to a gRPC status.

use std::{io, path::PathBuf};

use crate::{
    name::InvalidName,
    transport::{Address, CallError, InvalidAddress},
};

/// Errors from connecting to and calling services through the mesh.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The service has no instance to send the call to.
    #[error("no ready instance of {0}")]
    NoInstance(String),
    /// No connection could be made to an instance.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// The instance's address.
        address: Address,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The call failed after it was sent; it may have reached the instance.
    #[error("call to {address} failed: {source}")]
    Call {
        /// The instance's address.
        address: Address,
        /// Why: the stream's error; its gRPC status and HTTP/2 cause are in its `source()` chain.
        #[source]
        source: CallError,
    },
    /// The router could not be reached or refused to resolve.
    #[error(
        "cannot reach the mesh router at {socket}: {source}; is `mesh up` running? \
         (set MESH_SOCKET to its socket, or MESH_ROUTER to a remote router)",
        socket = socket.display()
    )]
    Router {
        /// The router socket tried.
        socket: PathBuf,
        /// What the router (or the connection to it) answered.
        #[source]
        source: tonic::Status,
    },
    /// The service name is not valid.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// The request could not be addressed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A channel was asked to send an `:authority` that is not one.
    #[error("invalid authority {0:?}: expected a service name such as plugin.echo (or host:port)")]
    InvalidAuthority(String),
    /// A transport or in-process service is already registered under this name.
    #[error(
        "{0} is already registered in this process; drop its registration first or pick another name"
    )]
    NameTaken(String),
    /// The environment names a router by something that is not an address.
    #[error("{variable}: {source}")]
    InvalidRouter {
        /// The variable (`MESH_ROUTER`).
        variable: &'static str,
        /// Why its value is not an address.
        #[source]
        source: InvalidAddress,
    },
    /// TLS settings (`MESH_TLS_*`, `https://` in `MESH_ROUTER`) are missing or wrong; the
    /// message names the file or variable and the fix.
    #[error("TLS: {0}")]
    Tls(String),
}

impl Error {
    /// The gRPC status a caller sees for this error.
    pub fn to_status(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            Self::NoInstance(_)
            | Self::Connect { .. }
            | Self::Call { .. }
            | Self::Router { .. } => tonic::Status::unavailable(message),
            Self::InvalidName(_)
            | Self::InvalidRequest(_)
            | Self::InvalidAuthority(_)
            | Self::InvalidRouter { .. }
            | Self::Tls(_) => tonic::Status::invalid_argument(message),
            Self::NameTaken(_) => tonic::Status::already_exists(message),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        error.to_status()
    }
}
