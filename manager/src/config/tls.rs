//! `[tls]`: mTLS on the router's TCP listener, and when plaintext TCP is allowed.
//!
//! ```toml
//! [tls]
//! ca = "certs/ca.pem"            # client (and peer node) certificates must chain to it
//! cert = "certs/node-a.pem"      # this router's certificate (mesh certs node a)
//! key = "certs/node-a.key"
//! admins = ["spiffe://mesh/client/ops"]   # may use the Manager API and registry writes
//! registry_writers = ["spiffe://mesh/client/billing"]   # registry writes only
//! ```
//!
//! Paths are relative to the config file. Without `[tls]`, `listen` must be a loopback
//! address unless `[mesh] allow_plaintext = true`.

use std::{
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use super::{Config, ConfigError, File};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    ca: Option<Spanned<PathBuf>>,
    cert: Option<Spanned<PathBuf>>,
    key: Option<Spanned<PathBuf>>,
    #[serde(default)]
    admins: Vec<Spanned<String>>,
    #[serde(default)]
    registry_writers: Vec<Spanned<String>>,
}

/// `[tls]`, validated: the files exist and make a usable TLS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The CA certificate(s), PEM: client certificates must chain to it.
    pub ca: PathBuf,
    /// This router's certificate chain, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// Certificate identities (URI SANs) granted the Manager API and registry writes.
    pub admins: Vec<String>,
    /// Certificate identities granted registry writes alone (register, keep alive,
    /// deregister their own instances), not the Manager API.
    pub registry_writers: Vec<String>,
}

impl TlsConfig {
    /// Reads the files into the router's TLS server; an error names the file and the fix.
    pub fn server(&self) -> Result<mesh_router::ServerTls, String> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| {
                format!(
                    "[tls] {what} = {}: cannot read it ({e}); make certificates with `mesh certs` \
                     (see docs/operations.md) or fix the path (relative to the config file)",
                    path.display()
                )
            })
        };
        let (ca, cert, key) = (
            read("ca", &self.ca)?,
            read("cert", &self.cert)?,
            read("key", &self.key)?,
        );
        mesh_router::ServerTls::from_pem(&ca, &cert, &key, self.admins.iter().cloned())
            .map(|server| server.with_registry_writers(self.registry_writers.iter().cloned()))
            .map_err(|e| {
                let path = match e.part {
                    "ca" => &self.ca,
                    "cert" => &self.cert,
                    _ => &self.key,
                };
                format!("[tls] {} = {}: {}", e.part, path.display(), e.message)
            })
    }
}

impl TlsConfig {
    /// The same files as a client's TLS settings: this node's certificate presented to the
    /// routers it dials (node certificates serve and dial), checked against the same CA.
    pub fn client(&self) -> Result<mesh::transport::ClientTls, String> {
        mesh::transport::ClientTls::from_files(&self.ca, &self.cert, &self.key)
            .map_err(|e| format!("[tls]: {e}"))
    }
}

/// Whether `addr` reaches only this machine.
fn loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

impl File<'_> {
    /// `[tls]`: the three files (checked now, so that `mesh up` and `mesh reload` say what is
    /// wrong before anything starts) and the admins.
    pub(super) fn tls(&self, table: Spanned<RawTls>) -> Result<TlsConfig, ConfigError> {
        let table_span = table.span();
        let raw = table.into_inner();
        let path = |field: &str, value: &Option<Spanned<PathBuf>>| {
            match value {
            Some(value) => self.path_value(field, value),
            None => Err(self.at(
                Some(table_span.clone()),
                format!(
                    "[tls] needs {field} = \"FILE\" (ca, cert and key: the CA, this router's \
                     certificate and its key; `mesh certs init` and `mesh certs node NAME` make them)"
                ),
            )),
        }
        };
        let tls = TlsConfig {
            ca: path("ca", &raw.ca)?,
            cert: path("cert", &raw.cert)?,
            key: path("key", &raw.key)?,
            admins: Vec::new(),
            registry_writers: Vec::new(),
        };
        let identities = |field: &str, list: &[Spanned<String>]| {
            let mut ids = Vec::with_capacity(list.len());
            for entry in list {
                let id = entry.get_ref();
                if !valid_identity(id) {
                    return Err(self.at(
                        Some(entry.span()),
                        format!(
                            "{field}: {id:?} is not a certificate identity; write the URI SAN \
                             of a client certificate, such as \"spiffe://mesh/client/ops\""
                        ),
                    ));
                }
                ids.push(id.clone());
            }
            Ok(ids)
        };
        let tls = TlsConfig {
            admins: identities("admins", &raw.admins)?,
            registry_writers: identities("registry_writers", &raw.registry_writers)?,
            ..tls
        };
        // Which field to point at: the one the error names.
        let span_of = |message: &str| -> Option<Range<usize>> {
            let field = [("[tls] ca", &raw.ca), ("[tls] cert", &raw.cert)]
                .into_iter()
                .find(|(name, _)| message.starts_with(&format!("{name} =")))
                .map_or(&raw.key, |(_, field)| field);
            field.as_ref().map(|f| f.span())
        };
        tls.server()
            .map_err(|message| self.at(span_of(&message), message))?;
        Ok(tls)
    }

    /// Plaintext TCP on an address other machines reach needs `allow_plaintext = true`.
    pub(super) fn check_plaintext(
        &self,
        config: &Config,
        allow_plaintext: Option<&Spanned<bool>>,
        listen_span: Option<Range<usize>>,
    ) -> Result<(), ConfigError> {
        let allowed = allow_plaintext.is_some_and(|a| *a.get_ref());
        match config.listen {
            Some(addr) if config.tls.is_none() && !loopback(&addr) && !allowed => Err(self.at(
                listen_span,
                format!(
                    "listen = \"{addr}\" would serve plaintext TCP to other machines, whose \
                     callers nothing identifies; add a [tls] table (ca, cert, key: see `mesh certs`), \
                     listen on 127.0.0.1, or set allow_plaintext = true in [mesh] to accept the risk"
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// A URI as a certificate's SAN holds one: `scheme://rest`, printable, no spaces.
fn valid_identity(id: &str) -> bool {
    id.split_once("://").is_some_and(|(scheme, rest)| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            && !rest.is_empty()
    }) && id.chars().all(|c| c.is_ascii_graphic())
        && id.len() <= 2048
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/mesh/mesh.toml"), text)
    }

    #[test]
    fn plaintext_beyond_loopback_needs_allow_plaintext() {
        let error =
            parse("[mesh]\nruntime_dir = \"/tmp/r\"\nlisten = \"0.0.0.0:7700\"\n").unwrap_err();
        assert_eq!(error.line, Some(3), "{error}");
        let message = error.to_string();
        assert!(message.starts_with("/etc/mesh/mesh.toml:3: "), "{message}");
        assert!(
            message.contains("[tls]") && message.contains("allow_plaintext = true"),
            "{message}"
        );
        assert!(parse("[mesh]\nruntime_dir = \"/tmp/r\"\nlisten = \"0.0.0.0:7700\"\nallow_plaintext = true\n").is_ok());
        assert!(parse("[mesh]\nruntime_dir = \"/tmp/r\"\nlisten = \"127.0.0.1:0\"\n").is_ok());
        assert!(parse("[mesh]\nruntime_dir = \"/tmp/r\"\nlisten = \"[::1]:0\"\n").is_ok());
    }

    #[test]
    fn tls_errors_name_the_line_and_the_file() {
        let error =
            parse("[mesh]\nruntime_dir = \"/tmp/r\"\n[tls]\nca = \"ca.pem\"\n").unwrap_err();
        assert!(error.to_string().contains("needs cert"), "{error}");
        let error = parse(
            "[mesh]\nruntime_dir = \"/tmp/r\"\n[tls]\nca = \"missing-ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        )
        .unwrap_err();
        assert_eq!(error.line, Some(4), "{error}");
        assert!(
            error.to_string().contains("/etc/mesh/missing-ca.pem")
                && error.to_string().contains("mesh certs"),
            "{error}"
        );
        let error = parse("[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\nadmins = [\"ops\"]\n")
            .unwrap_err();
        assert_eq!(error.line, Some(5), "{error}");
        assert!(error.to_string().contains("spiffe://"), "{error}");
        let error = parse(
            "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\nregistry_writers = [\"billing\"]\n",
        )
        .unwrap_err();
        assert_eq!(error.line, Some(5), "{error}");
        assert!(
            error.to_string().contains("registry_writers: \"billing\"")
                && error.to_string().contains("spiffe://"),
            "{error}"
        );
    }

    #[test]
    fn identities_are_uris() {
        for good in ["spiffe://mesh/client/ops", "urn+x://a"] {
            assert!(valid_identity(good), "{good}");
        }
        for bad in ["ops", "://x", "spiffe://", "spiffe://a b", ""] {
            assert!(!valid_identity(bad), "{bad}");
        }
    }
}
