//! TLS (mTLS) for connections to a remote router: rustls with ring.
//!
//! A [`ClientTls`] holds the CA the router's certificate must chain to and, for mTLS, this
//! client's certificate and key. The router's certificate must name the host dialled (its
//! DNS or IP SAN: `mesh certs node` puts `localhost`, `127.0.0.1` and the names asked for in
//! it), or the name given with [`ClientTls::server_name`].
//!
//! A TLS connection is no plain socket: a spinning caller cannot read it directly (see
//! `spin_io`), so its calls wait on Tokio's poller as calls on custom transports do.

use std::{fmt, io, path::Path, sync::Arc};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;

/// Environment variable: the CA certificate (PEM file) the remote router's certificate must
/// chain to.
pub const MESH_TLS_CA: &str = "MESH_TLS_CA";
/// Environment variable: this client's certificate (PEM file), presented to the router.
pub const MESH_TLS_CERT: &str = "MESH_TLS_CERT";
/// Environment variable: this client's private key (PEM file).
pub const MESH_TLS_KEY: &str = "MESH_TLS_KEY";
/// Environment variable: the name the router's certificate must carry, when it is not the
/// host in `MESH_ROUTER`.
pub const MESH_TLS_SERVER_NAME: &str = "MESH_TLS_SERVER_NAME";

/// TLS settings for connections to a remote router. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

impl Eq for ClientTls {}

/// Why TLS settings could not be made: the file or part, and what is wrong with it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what}: {message}")]
pub struct TlsError {
    what: String,
    message: String,
}

impl TlsError {
    fn new(what: impl Into<String>, message: impl fmt::Display) -> Self {
        Self {
            what: what.into(),
            message: message.to_string(),
        }
    }
}

impl ClientTls {
    /// mTLS from PEM text: the `ca` certificates the router's certificate must chain to, and
    /// this client's certificate chain and private key.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let roots = roots(ca)?;
        let chain = certificates("cert", cert)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
            TlsError::new(
                "key",
                format!("no private key in it ({e}); expected PEM \"BEGIN PRIVATE KEY\""),
            )
        })?;
        let config = builder()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::new("key", format!("does not fit the certificate: {e}")))?;
        Ok(Self::new(config))
    }

    /// TLS without a client certificate (a router that asks for one refuses it).
    pub fn without_client_cert(ca: &[u8]) -> Result<Self, TlsError> {
        let config = builder()?
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth();
        Ok(Self::new(config))
    }

    /// [`ClientTls::from_pem`] from files; errors name the file.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| {
                TlsError::new(
                    format!("{what} {}", path.display()),
                    format!("cannot read: {e}"),
                )
            })
        };
        let (ca_pem, cert_pem, key_pem) = (read("CA", ca)?, read("cert", cert)?, read("key", key)?);
        let named = |error: TlsError, path: &Path| {
            TlsError::new(format!("{} {}", error.what, path.display()), error.message)
        };
        Self::from_pem(&ca_pem, &cert_pem, &key_pem).map_err(|e| match e.what.as_str() {
            "ca" => named(e, ca),
            "cert" => named(e, cert),
            _ => named(e, key),
        })
    }

    /// From [`MESH_TLS_CA`], [`MESH_TLS_CERT`], [`MESH_TLS_KEY`] (and
    /// [`MESH_TLS_SERVER_NAME`]): `None` when none of the three is set; an error when only some
    /// are.
    pub fn from_env() -> Result<Option<Self>, TlsError> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        let (ca, cert, key) = (var(MESH_TLS_CA), var(MESH_TLS_CERT), var(MESH_TLS_KEY));
        let tls = match (ca, cert, key) {
            (None, None, None) => return Ok(None),
            (Some(ca), Some(cert), Some(key)) => {
                Self::from_files(ca.as_ref(), cert.as_ref(), key.as_ref())?
            }
            _ => {
                return Err(TlsError::new(
                    "MESH_TLS_CA, MESH_TLS_CERT, MESH_TLS_KEY",
                    "set all three (the CA, this client's certificate and its key, as \
                     `mesh certs client NAME` writes them) or none",
                ));
            }
        };
        match std::env::var(MESH_TLS_SERVER_NAME) {
            Ok(name) if !name.is_empty() => tls.server_name(&name).map(Some),
            _ => Ok(Some(tls)),
        }
    }

    /// The name the router's certificate must carry (a DNS name or an IP address), instead of
    /// the host dialled.
    pub fn server_name(mut self, name: &str) -> Result<Self, TlsError> {
        let name = ServerName::try_from(name.to_owned()).map_err(|e| {
            TlsError::new(
                format!("server name {name:?}"),
                format!("{e}; give a DNS name or an IP address"),
            )
        })?;
        self.server_name = Some(name);
        Ok(self)
    }

    fn new(mut config: ClientConfig) -> Self {
        config.alpn_protocols = vec![b"h2".to_vec()];
        Self {
            config: Arc::new(config),
            server_name: None,
        }
    }

    /// Opens TLS on `stream`, a connection to `hostport`.
    pub(crate) async fn connect(
        &self,
        hostport: &str,
        stream: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => {
                let host = hostport.rsplit_once(':').map_or(hostport, |(host, _)| host);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                ServerName::try_from(host.to_owned()).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{host:?} is no TLS server name ({e}); set one with MESH_TLS_SERVER_NAME"),
                    )
                })?
            }
        };
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await
    }
}

fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, TlsError> {
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new("TLS", e))
}

fn roots(ca: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for der in certificates("ca", ca)? {
        roots
            .add(der)
            .map_err(|e| TlsError::new("ca", format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn certificates(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(what, format!("unreadable PEM: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::new(
            what,
            "no certificate in it; expected PEM \"BEGIN CERTIFICATE\"",
        ));
    }
    Ok(chain)
}

impl super::client::Stream for tokio_rustls::client::TlsStream<TcpStream> {
    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        // The socket carries ciphertext: reading it directly would bypass TLS.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_pem_names_what_and_the_expected_text() {
        let error = ClientTls::from_pem(b"", b"", b"").unwrap_err();
        assert!(error.to_string().starts_with("ca: "), "{error}");
        assert!(error.to_string().contains("BEGIN CERTIFICATE"), "{error}");
        let error = ClientTls::from_files(
            "/nonexistent/ca.pem".as_ref(),
            "/nonexistent/c.pem".as_ref(),
            "/nonexistent/k.pem".as_ref(),
        )
        .unwrap_err();
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
    }
}
