//! mTLS on the router's TCP listener: who a TCP client is, from the certificate it presents.
//!
//! Every client must present a certificate that chains to the configured CA (rustls's
//! `WebPkiClientVerifier`, ring's algorithms); a client without one, with one from another CA,
//! or with one outside its validity dates fails the handshake and is never served. The first
//! URI SAN of the certificate (`spiffe://mesh/node/a`, `spiffe://mesh/client/ops`, as
//! `mesh certs` makes them) is the caller's identity; what it may do beyond forwarding calls
//! and reading the registry is its [`Grant`], resolved once, when the handshake ends.
//!
//! A client on this host whose socket a plugin's process holds is that plugin whatever
//! certificate it shows (see `identity`).
//!
//! Handshakes run beside the accept loop, each within the router's `handshake_timeout`, at most
//! `max_connections` at once: a client that stalls its handshake or sends garbage costs one
//! slot for that long, and never holds up the others.

use std::{
    collections::BTreeSet, fmt, future::Future, io, net::SocketAddr, sync::Arc, time::Duration,
};

use rustls::{RootCertStore, ServerConfig, crypto::CryptoProvider, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::{
    Router,
    identity::{self, Caller},
};

/// What a remote caller's certificate identity is granted beyond forwarding calls and reading
/// the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Grant {
    /// Nothing more: the Manager API and registry writes are refused.
    #[default]
    None,
    /// The Manager API and registry writes, as the owner has them (host services stay the
    /// plugins'): `[tls] admins` lists the identities.
    Admin,
    /// Registry writes only (`Register`, `KeepAlive`, `Deregister`), not the Manager API:
    /// `[tls] registry_writers` lists the identities (a service on another machine that
    /// registers itself).
    RegistryWriter,
}

/// The router's TLS server: its certificate, the CA its clients' certificates must chain to,
/// and the identities granted more than forwarding. Cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    admins: Arc<BTreeSet<String>>,
    registry_writers: Arc<BTreeSet<String>>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("admins", &self.admins)
            .field("registry_writers", &self.registry_writers)
            .finish_non_exhaustive()
    }
}

/// Why a TLS configuration could not be made; the message names the part (`ca`, `cert`,
/// `key`) that is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{part}: {message}")]
pub struct TlsError {
    /// `ca`, `cert` or `key`: which of the three is wrong.
    pub part: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn error(part: &'static str, message: impl fmt::Display) -> TlsError {
    TlsError {
        part,
        message: message.to_string(),
    }
}

/// Installs ring as rustls's process-wide crypto provider, if no provider is installed yet.
/// The router builds its own configs with ring explicitly; this is for whatever else in the
/// process (tonic, an exporter) asks rustls for the default, which panics when it cannot tell.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerTls {
    /// A TLS server from PEM text: `ca` (the certificates client certificates must chain to),
    /// `cert` (this router's chain, its own certificate first) and `key` (its private key), and
    /// the identities (URI SANs) granted [`Grant::Admin`].
    pub fn from_pem(
        ca: &[u8],
        cert: &[u8],
        key: &[u8],
        admins: impl IntoIterator<Item = String>,
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for der in certificates("ca", ca)? {
            roots
                .add(der)
                .map_err(|e| error("ca", format!("not a usable CA certificate: {e}")))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| error("ca", e))?;
        let chain = certificates("cert", cert)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
            error(
                "key",
                format!("no private key in it ({e}); expected PEM \"BEGIN PRIVATE KEY\""),
            )
        })?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| error("cert", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| error("key", format!("does not fit the certificate: {e}")))?;
        // gRPC is HTTP/2 only; grpc-go (grpcurl) insists on ALPN.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            admins: Arc::new(admins.into_iter().collect()),
            registry_writers: Arc::default(),
        })
    }

    /// The same server, with the identities (URI SANs) granted [`Grant::RegistryWriter`]; an
    /// identity that is also an admin keeps [`Grant::Admin`].
    pub fn with_registry_writers(mut self, writers: impl IntoIterator<Item = String>) -> Self {
        self.registry_writers = Arc::new(writers.into_iter().collect());
        self
    }

    /// The grant of `identity`.
    pub fn grant(&self, identity: &str) -> Grant {
        if self.admins.contains(identity) {
            Grant::Admin
        } else if self.registry_writers.contains(identity) {
            Grant::RegistryWriter
        } else {
            Grant::None
        }
    }

    /// Runs the handshake on `stream` within `timeout`; the caller is who its certificate says.
    async fn accept(
        &self,
        stream: TcpStream,
        addr: SocketAddr,
        timeout: Duration,
    ) -> io::Result<(TlsStream<TcpStream>, Caller)> {
        let stream = tokio::time::timeout(timeout, self.acceptor.accept(stream))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no TLS handshake within handshake_timeout",
                )
            })??;
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(identity_of);
        let grant = identity.as_deref().map_or(Grant::None, |id| self.grant(id));
        Ok((
            stream,
            Caller::Remote {
                addr,
                identity,
                grant,
            },
        ))
    }
}

/// The identity a (verified) certificate names: its first URI SAN.
fn identity_of(der: &CertificateDer<'_>) -> Option<Arc<str>> {
    let cert = webpki::EndEntityCert::try_from(der).ok()?;
    cert.valid_uri_names().next().map(Arc::from)
}

/// Every certificate in `pem`; none is an error.
fn certificates(part: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(part, format!("unreadable PEM: {e}")))?;
    if chain.is_empty() {
        return Err(error(
            part,
            "no certificate in it; expected PEM \"BEGIN CERTIFICATE\"",
        ));
    }
    Ok(chain)
}

impl Router {
    /// Serves mTLS connections from `listener` until `shutdown` completes: each client's
    /// handshake within `handshake_timeout`, then HTTP/2 as on any connection, with the
    /// caller its certificate names.
    pub(crate) async fn serve_tls(
        &self,
        listener: TcpListener,
        tls: ServerTls,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let limits = &self.inner.admission.limits;
        let timeout = limits.handshake_timeout;
        // Handshakes in progress at once: a flood of clients that never finish theirs fills
        // this, not the router's memory.
        let handshakes = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let (done, handshaken) = mpsc::channel(64);
        let (owner, identify) = (self.inner.owner, self.inner.identify.clone());
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok(slot) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let (stream, addr) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%error, "TCP_NODELAY");
                }
                let tls = tls.clone();
                let done = done.clone();
                let identify = identify.clone();
                tokio::spawn(async move {
                    match tls.accept(stream, addr, timeout).await {
                        Ok((stream, caller)) => {
                            // A process of this host that the socket table names as a plugin's
                            // is that plugin, certificate or not: a plugin able to read a
                            // client certificate must not escape its `call:` capabilities
                            // with it. Any other caller is who its certificate names.
                            let local =
                                identity::of_tcp_stream(stream.get_ref().0, addr, owner, identify)
                                    .await;
                            let caller = match local {
                                Ok(Some(plugin @ Caller::Plugin { .. })) => plugin,
                                Ok(_) => caller,
                                Err(error) => {
                                    tracing::warn!(%addr, %error, "loopback TCP peer not identified; closed");
                                    drop(slot);
                                    return;
                                }
                            };
                            let _ = done.send((stream, caller)).await;
                        }
                        // Not a client of this mesh (no certificate, another CA, expired,
                        // garbage): nothing to serve, little to say.
                        Err(error) => tracing::debug!(%addr, %error, "TLS handshake failed"),
                    }
                    drop(slot);
                });
            }
        });
        let _acceptor = AbortOnDrop(acceptor);
        // Only the accept loop takes from it: the lock is never contended.
        let handshaken = tokio::sync::Mutex::new(handshaken);
        self.serve(
            || async {
                handshaken.lock().await.recv().await.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::BrokenPipe, "TLS acceptor stopped")
                })
            },
            shutdown,
            true,
        )
        .await
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_names_the_part_and_what_is_expected() {
        let error = ServerTls::from_pem(b"", b"", b"", []).unwrap_err();
        assert_eq!(error.part, "ca");
        assert!(error.to_string().contains("BEGIN CERTIFICATE"), "{error}");
        let garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let error = ServerTls::from_pem(garbage, b"", b"", []).unwrap_err();
        assert_eq!(error.part, "ca", "{error}");
    }
}
