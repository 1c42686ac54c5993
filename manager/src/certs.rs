//! `mesh certs`: a development CA and the node and client certificates mTLS needs (rcgen).
//!
//! Identities are URI SANs: `spiffe://mesh/node/NAME` for a router, `spiffe://mesh/client/NAME`
//! for a remote client. The router takes the first URI SAN of a client's certificate as who it
//! is, and `[tls] admins` grants identities the Manager API and registry writes. A node
//! certificate also names `localhost`, `127.0.0.1`, `::1` and every `--host` given, so that
//! clients dialling any of them can check it; it serves and dials (server and client auth).
//!
//! Files, in the directory given (`certs` by default), made 0700: `ca.pem`, the CA's key in a
//! directory of its own (`ca-key/ca.key`, 0700 and 0600), `node-NAME.pem` and `node-NAME.key`,
//! `client-NAME.pem` and `client-NAME.key`. Keys are written 0600. Nothing is overwritten
//! without `force`. This is a development CA; for production use your own PKI.
//!
//! File modes keep other users out, not the owner's own processes: any process of the uid
//! `mesh up` runs as (an unsandboxed plugin included) can read the CA key and mint itself an
//! admin certificate. So the key sits apart, where it can be moved off the machine in one
//! piece once the certificates are made (`mesh certs` reads it again from there, or from
//! `ca.key` beside `ca.pem` as older versions wrote it), `mesh certs init` says so, and
//! `mesh up` warns at start about every private key it finds beside `[tls] ca` other than its
//! own ([`exposed_keys`]).

use std::{
    fs,
    io::{self, Write},
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The CA certificate's file name.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name.
pub const CA_KEY: &str = "ca.key";
/// The directory, beside `ca.pem`, that holds the CA key alone.
pub const CA_KEY_DIR: &str = "ca-key";
/// The CA's subject name (`mesh certs` signs with it; it must not change).
const CA_NAME: &str = "mesh development CA";

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A router: serves TLS and dials other routers (server and client auth).
    Node,
    /// A remote client (client auth only).
    Client,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Client => "client",
        }
    }
}

/// The identity (`spiffe://mesh/node/a`) a certificate of `kind` for `name` carries.
pub fn identity(kind: Kind, name: &str) -> String {
    format!("spiffe://mesh/{}/{name}", kind.word())
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Not before.
    pub from: SystemTime,
    /// Not after.
    pub until: SystemTime,
}

impl Validity {
    /// From an hour ago (clocks differ) for `days` days.
    pub fn days(days: u32) -> Self {
        let now = SystemTime::now();
        Self {
            from: now - Duration::from_secs(3600),
            until: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

/// Why a certificate could not be made; the message names the file and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CertsError(String);

fn fail(message: impl Into<String>) -> CertsError {
    CertsError(message.into())
}

/// A written certificate and key.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM, 0600).
    pub key: PathBuf,
    /// The identity it carries (`None` for the CA).
    pub identity: Option<String>,
}

/// `mesh certs init`: a new CA in `dir`.
pub fn init(dir: &Path, validity: Validity, force: bool) -> Result<Issued, CertsError> {
    prepare_dir(dir)?;
    let key_dir = dir.join(CA_KEY_DIR);
    let (cert, key) = (dir.join(CA_CERT), key_dir.join(CA_KEY));
    refuse_existing(&[&cert, &key, &dir.join(CA_KEY)], force)?;
    prepare_dir(&key_dir)?;
    let key_pair = KeyPair::generate().map_err(|e| fail(format!("cannot make a key: {e}")))?;
    let mut params = ca_params();
    set_validity(&mut params, validity);
    let made = params
        .self_signed(&key_pair)
        .map_err(|e| fail(format!("cannot make the CA certificate: {e}")))?;
    write(&key, key_pair.serialize_pem().as_bytes(), 0o600, force)?;
    write(&cert, made.pem().as_bytes(), 0o644, force)?;
    Ok(Issued {
        cert,
        key,
        identity: None,
    })
}

/// `mesh certs node NAME` / `mesh certs client NAME`: a certificate signed by the CA in `dir`.
/// `hosts` (nodes only) are more DNS names or IP addresses the node is reached by.
pub fn issue(
    dir: &Path,
    kind: Kind,
    name: &str,
    hosts: &[String],
    validity: Validity,
    force: bool,
) -> Result<Issued, CertsError> {
    check_name(name)?;
    let ca_cert = dir.join(CA_CERT);
    // Where init puts it, else beside ca.pem (as older versions wrote it).
    let ca_key = [dir.join(CA_KEY_DIR).join(CA_KEY), dir.join(CA_KEY)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join(CA_KEY_DIR).join(CA_KEY));
    let ca_key_pem = fs::read_to_string(&ca_key).map_err(|e| {
        fail(format!(
            "{}: {e}; make the CA first with `mesh certs init --dir {}`, or bring back the \
             {CA_KEY_DIR} directory you moved away",
            ca_key.display(),
            dir.display()
        ))
    })?;
    if !ca_cert.exists() {
        return Err(fail(format!(
            "{}: missing; make the CA with `mesh certs init --dir {}`",
            ca_cert.display(),
            dir.display()
        )));
    }
    let ca_key_pair = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| fail(format!("{}: not a private key ({e})", ca_key.display())))?;
    let issuer = Issuer::new(ca_params(), ca_key_pair);

    let stem = format!("{}-{name}", kind.word());
    let (cert, key) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    refuse_existing(&[&cert, &key], force)?;
    let id = identity(kind, name);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.as_str());
    params.distinguished_name = dn;
    let uri = id
        .clone()
        .try_into()
        .map_err(|e| fail(format!("{id}: {e}")))?;
    params.subject_alt_names.push(SanType::URI(uri));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    match kind {
        Kind::Node => {
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
            names.extend(hosts.iter().cloned());
            names.dedup();
            for host in names {
                params.subject_alt_names.push(san(&host)?);
            }
        }
        Kind::Client => {
            if !hosts.is_empty() {
                return Err(fail(
                    "--host is for node certificates: a client is known by its identity",
                ));
            }
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    set_validity(&mut params, validity);
    let key_pair = KeyPair::generate().map_err(|e| fail(format!("cannot make a key: {e}")))?;
    let made = params
        .signed_by(&key_pair, &issuer)
        .map_err(|e| fail(format!("cannot sign the certificate: {e}")))?;
    write(&key, key_pair.serialize_pem().as_bytes(), 0o600, force)?;
    write(&cert, made.pem().as_bytes(), 0o644, force)?;
    Ok(Issued {
        cert,
        key,
        identity: Some(id),
    })
}

/// What `mesh certs init` says about the CA key it wrote at `key`.
pub fn ca_key_warning(key: &Path) -> String {
    let uid = nix::unistd::geteuid();
    let dir = key.parent().unwrap_or(key);
    format!(
        "warning: the CA key {} is readable by every process of uid {uid}, unsandboxed plugins \
         included, and with it anyone can mint an admin certificate. Once you have made the \
         node and client certificates, move {} off this machine (or at least out of reach of \
         the uid mesh up runs as) and bring it back only to issue more",
        key.display(),
        dir.display()
    )
}

/// The private keys a process of this uid can read beside the CA certificate `ca` (in its
/// directory and in its `ca-key/`), other than `own` (the node's `[tls] key`, which `mesh up`
/// needs): the CA key, other nodes' and clients' keys. Any of them in a plugin's hands is a
/// certificate it can use (the CA's: any certificate at all), so `mesh up` warns about each.
pub fn exposed_keys(ca: &Path, own: &Path) -> Vec<PathBuf> {
    let Some(dir) = ca.parent() else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let own = fs::canonicalize(own).ok();
    let mut found: Vec<PathBuf> = [dir.to_owned(), dir.join(CA_KEY_DIR)]
        .iter()
        .filter_map(|d| fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
        .filter(|p| fs::canonicalize(p).ok() != own)
        .filter(|p| fs::File::open(p).is_ok())
        .collect();
    found.sort();
    found
}

/// What `mesh up` says about a key [`exposed_keys`] found.
pub fn exposed_warning(key: &Path) -> String {
    format!(
        "private key {} lies beside [tls] ca and every process of this uid can read it, \
         unsandboxed plugins included: a plugin could use it to pass for what it certifies \
         (the CA's key: to mint an admin certificate). Keep only this node's own key here and \
         move the others (the ca-key directory first) off this machine",
        key.display()
    )
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    params.not_before = validity.from.into();
    params.not_after = validity.until.into();
}

fn san(host: &str) -> Result<SanType, CertsError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid {
        return Err(fail(format!(
            "--host {host:?} is neither an IP address nor a DNS name"
        )));
    }
    host.to_owned()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|e| fail(format!("--host {host:?}: {e}")))
}

fn check_name(name: &str) -> Result<(), CertsError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if valid {
        Ok(())
    } else {
        Err(fail(format!(
            "{name:?} is not a name for a certificate: use 1-63 of a-z, 0-9 and -"
        )))
    }
}

fn prepare_dir(dir: &Path) -> Result<(), CertsError> {
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(fail(format!(
            "{}: exists and is not a directory; pick another --dir",
            dir.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail(format!("{}: cannot create it: {e}", dir.display()))),
        Err(e) => Err(fail(format!("{}: {e}", dir.display()))),
    }
}

fn refuse_existing(paths: &[&Path], force: bool) -> Result<(), CertsError> {
    if force {
        return Ok(());
    }
    match paths.iter().find(|p| fs::symlink_metadata(p).is_ok()) {
        Some(path) => Err(fail(format!(
            "{}: already exists; pass --force to replace it (certificates signed with the \
             old one stop working if it is the CA)",
            path.display()
        ))),
        None => Ok(()),
    }
}

/// Writes `contents` to `path` with `mode`; with `force` an existing file is replaced (never
/// written through: a symlink there is removed, not followed).
fn write(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<(), CertsError> {
    let failed = |e: io::Error| fail(format!("{}: cannot write it: {e}", path.display()));
    if force {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed(e)),
        }
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(failed)?;
    // The umask may have taken bits away; never added any.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(failed)?;
    file.write_all(contents).map_err(failed)?;
    file.sync_all().map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn makes_a_ca_and_certificates_the_router_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let ca = init(&certs, Validity::days(30), false).unwrap();
        assert_eq!(fs::metadata(&ca.key).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&certs).unwrap().mode() & 0o777, 0o700);
        // The CA key apart, in a directory of its own, and not beside ca.pem.
        assert_eq!(ca.key, certs.join(CA_KEY_DIR).join(CA_KEY));
        assert_eq!(
            fs::metadata(certs.join(CA_KEY_DIR)).unwrap().mode() & 0o777,
            0o700
        );
        assert!(!certs.join(CA_KEY).exists());
        assert!(ca_key_warning(&ca.key).contains("unsandboxed plugins"));
        let again = init(&certs, Validity::days(30), false).unwrap_err();
        assert!(again.to_string().contains("--force"), "{again}");
        let node = issue(
            &certs,
            Kind::Node,
            "a",
            &["node-a.example".into()],
            Validity::days(1),
            false,
        )
        .unwrap();
        assert_eq!(node.identity.as_deref(), Some("spiffe://mesh/node/a"));
        assert_eq!(fs::metadata(&node.key).unwrap().mode() & 0o777, 0o600);
        let read = |p: &Path| fs::read(p).unwrap();
        let server = mesh_router::ServerTls::from_pem(
            &read(&ca.cert),
            &read(&node.cert),
            &read(&node.key),
            [],
        );
        assert!(server.is_ok(), "{:?}", server.err());
        // A node's [tls] files serve and dial.
        let node_tls = crate::config::TlsConfig {
            ca: ca.cert.clone(),
            cert: node.cert.clone(),
            key: node.key.clone(),
            admins: Vec::new(),
            registry_writers: Vec::new(),
        };
        assert!(node_tls.server().is_ok() && node_tls.client().is_ok());
        let client = issue(&certs, Kind::Client, "ops", &[], Validity::days(1), false).unwrap();
        assert!(
            mesh::transport::ClientTls::from_pem(
                &read(&ca.cert),
                &read(&client.cert),
                &read(&client.key)
            )
            .is_ok()
        );
        let error = issue(&certs, Kind::Client, "Ops!", &[], Validity::days(1), false).unwrap_err();
        assert!(error.to_string().contains("a-z"), "{error}");
        let error = issue(
            &dir.path().join("none"),
            Kind::Client,
            "x",
            &[],
            Validity::days(1),
            false,
        )
        .unwrap_err();
        assert!(error.to_string().contains("mesh certs init"), "{error}");

        // mesh up's check: every key beside [tls] ca but the node's own is reported.
        assert_eq!(
            exposed_keys(&ca.cert, &node.key),
            [ca.key.clone(), client.key.clone()]
        );
        // Moved away: the CA key is no longer found, and no certificate can be issued
        // until it is back.
        let away = dir.path().join("offline");
        fs::rename(certs.join(CA_KEY_DIR), &away).unwrap();
        assert_eq!(
            exposed_keys(&ca.cert, &node.key),
            std::slice::from_ref(&client.key)
        );
        let error = issue(&certs, Kind::Client, "y", &[], Validity::days(1), false).unwrap_err();
        assert!(error.to_string().contains("bring back"), "{error}");
        // A CA key left beside ca.pem by an older version is still used, and reported.
        fs::rename(away.join(CA_KEY), certs.join(CA_KEY)).unwrap();
        issue(&certs, Kind::Client, "y", &[], Validity::days(1), false).unwrap();
        assert!(exposed_keys(&ca.cert, &node.key).contains(&certs.join(CA_KEY)));
        assert!(exposed_warning(&certs.join(CA_KEY)).contains("admin certificate"));
    }
}
