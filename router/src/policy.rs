//! Who may call what on the router itself, as data checked in one place.
//!
//! Every caller may read: the registry's Resolve, List and Watch, health, reflection. Everything
//! else the router serves — the Manager API, registry writes, and any method not listed here —
//! is control, for the [`Caller::Owner`] and TCP clients whose certificate identity is granted
//! it ([`Grant::Admin`](crate::Grant), `[tls] admins`). The OTLP trace relay (`TraceService/
//! Export`, served where the manager installs it) is for managed plugin instances and those
//! who may control. Forwarded calls are not checked here
//! (a plugin's `call:` capabilities are `calls`'s). The check reads the caller fixed at accept
//! time and the path; nothing else from the request.

use tonic::Status;

use crate::identity::Caller;

/// What a call to the router's own services does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reads state anyone who can connect may see.
    Read,
    /// Changes the mesh, or reads what only its owner may see (logs).
    Control,
    /// Writes the registry: control, or granted alone (`[tls] registry_writers`).
    RegistryWrite,
    /// Host services (`mesh.v1.Host`): for plugin callers only, whose capabilities the
    /// service checks per call.
    Host,
    /// The OTLP trace relay: for plugin callers (whose spans the relay stamps with their
    /// identity) and callers who may control; never other users.
    Telemetry,
}

/// The prefix of every host-service method.
const HOST: &str = "/mesh.v1.Host/";

/// The OTLP trace export the manager relays to the configured collector.
pub(crate) const TRACE_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Methods every caller may use. Anything not here is [`Access::Control`].
const READ: &[&str] = &[
    "/mesh.v1.Registry/Resolve",
    "/mesh.v1.Registry/List",
    "/mesh.v1.Registry/Watch",
    "/mesh.v1.Registry/Backend",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The registry's writes: control, which a certificate identity may also be granted alone.
const REGISTRY_WRITE: &[&str] = &[
    "/mesh.v1.Registry/Register",
    "/mesh.v1.Registry/KeepAlive",
    "/mesh.v1.Registry/Deregister",
];

/// What calling `path` on the router does.
pub(crate) fn access(path: &str) -> Access {
    if READ.contains(&path) {
        Access::Read
    } else if REGISTRY_WRITE.contains(&path) {
        Access::RegistryWrite
    } else if path.starts_with(HOST) {
        Access::Host
    } else if path == TRACE_EXPORT {
        Access::Telemetry
    } else {
        Access::Control
    }
}

/// Whether `caller` may call `path` on the router; the refusal says why and what would do.
pub(crate) fn check(caller: &Caller, path: &str) -> Result<(), Status> {
    match (access(path), caller) {
        (Access::Read, _) | (Access::Host | Access::Telemetry, Caller::Plugin { .. }) => {
            return Ok(());
        }
        (Access::Control | Access::Telemetry, caller) if caller.may_control() => return Ok(()),
        (Access::RegistryWrite, caller) if caller.may_write_registry() => return Ok(()),
        (Access::Telemetry, _) => {
            return Err(Status::permission_denied(format!(
                "{path} is refused to {caller}: the mesh relays traces of its managed plugin \
                 instances (known by their kernel credentials) and of its owner only; export \
                 to your own collector instead"
            )));
        }
        (Access::Host, _) => {
            return Err(Status::permission_denied(format!(
                "{path} is refused to {caller}: host services are served to managed plugin \
                 instances (and processes they start) only, known by their kernel credentials"
            )));
        }
        (Access::Control | Access::RegistryWrite, _) => {}
    }
    Err(Status::permission_denied(match caller {
        Caller::Remote { identity: None, .. } => format!(
            "{path} is refused over TCP without mTLS: the Manager API and registry writes are \
             served on the Unix socket to the owner's uid, and over TCP only to a client \
             certificate identity listed in [tls] admins"
        ),
        Caller::Remote {
            identity: Some(identity),
            ..
        } => format!(
            "{path} is refused to {identity}: the Manager API and registry writes over TCP are \
             for the certificate identities in the router's [tls] admins (registry writes \
             alone: [tls] registry_writers), and it is not one"
        ),
        Caller::Plugin { .. } => format!(
            "{path} is refused to {caller}: plugins may call other plugins, host services and \
             read the registry; the Manager API and registry writes are the mesh owner's"
        ),
        _ => format!(
            "{path} is refused to {caller}: the Manager API and registry writes are for the \
             mesh's owner (uid {}) and root only; other users may call plugins and read the \
             registry",
            crate::identity::own_uid()
        ),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_controls_and_everyone_reads() {
        let owner = Caller::Owner {
            uid: 1000,
            pid: None,
        };
        let local = Caller::Local {
            uid: 65534,
            pid: Some(7),
        };
        let remote = Caller::Remote {
            addr: "127.0.0.1:5000".parse().unwrap(),
            identity: None,
            grant: crate::Grant::None,
        };
        let node = Caller::Remote {
            addr: "127.0.0.1:5001".parse().unwrap(),
            identity: Some("spiffe://mesh/node/b".into()),
            grant: crate::Grant::None,
        };
        let admin = Caller::Remote {
            addr: "127.0.0.1:5002".parse().unwrap(),
            identity: Some("spiffe://mesh/client/ops".into()),
            grant: crate::Grant::Admin,
        };
        for path in [
            "/mesh.v1.Manager/Stop",
            "/mesh.v1.Manager/Scale",
            "/mesh.v1.Manager/Logs",
            "/mesh.v1.Registry/Register",
            "/mesh.v1.Registry/KeepAlive",
            "/mesh.v1.Registry/Deregister",
            "/mesh.v1.Something/New",
            "/mesh.v1.Registry/List/../Register",
        ] {
            assert!(check(&owner, path).is_ok(), "{path}");
            let denied = check(&local, path).unwrap_err();
            assert_eq!(denied.code(), tonic::Code::PermissionDenied);
            assert!(denied.message().contains("owner"), "{denied}");
            let denied = check(&remote, path).unwrap_err();
            assert!(denied.message().contains("mTLS"), "{denied}");
            let denied = check(&node, path).unwrap_err();
            assert_eq!(denied.code(), tonic::Code::PermissionDenied);
            assert!(
                denied.message().contains("spiffe://mesh/node/b")
                    && denied.message().contains("admins"),
                "{denied}"
            );
            assert!(check(&admin, path).is_ok(), "{path}");
        }
        let plugin = Caller::Plugin {
            plugin: "files".into(),
            instance: "files-0".into(),
            pid: 7,
            uid: 1000,
        };
        for path in READ {
            assert!(check(&local, path).is_ok(), "{path}");
            assert!(check(&remote, path).is_ok(), "{path}");
            assert!(check(&plugin, path).is_ok(), "{path}");
        }
        for path in ["/mesh.v1.Manager/Stop", "/mesh.v1.Registry/Register"] {
            let denied = check(&plugin, path).unwrap_err();
            assert!(denied.message().contains("plugins may"), "{denied}");
        }
        assert!(check(&plugin, "/mesh.v1.Host/ReadFile").is_ok());
        // Registry writes alone: the three write methods, nothing else that is control.
        let writer = Caller::Remote {
            addr: "127.0.0.1:5003".parse().unwrap(),
            identity: Some("spiffe://mesh/client/billing".into()),
            grant: crate::Grant::RegistryWriter,
        };
        for path in REGISTRY_WRITE {
            assert!(check(&writer, path).is_ok(), "{path}");
            assert!(check(&admin, path).is_ok(), "{path}");
            assert!(
                check(&node, path)
                    .unwrap_err()
                    .message()
                    .contains("registry_writers")
            );
        }
        for path in [
            "/mesh.v1.Manager/Stop",
            "/mesh.v1.Manager/Logs",
            "/mesh.v1.Something/New",
            "/mesh.v1.Registry/List/../Register",
            "/mesh.v1.Registry/Register/",
        ] {
            let denied = check(&writer, path).unwrap_err();
            assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{path}");
        }
        for caller in [&owner, &local, &remote, &admin, &writer] {
            let denied = check(caller, "/mesh.v1.Host/ReadFile").unwrap_err();
            assert_eq!(denied.code(), tonic::Code::PermissionDenied);
            assert!(denied.message().contains("plugin"), "{denied}");
        }
        // The trace relay: plugins and those who control, never other users.
        for caller in [&plugin, &owner, &admin] {
            assert!(check(caller, TRACE_EXPORT).is_ok(), "{caller}");
        }
        for caller in [&local, &remote, &node] {
            let denied = check(caller, TRACE_EXPORT).unwrap_err();
            assert_eq!(denied.code(), tonic::Code::PermissionDenied);
            assert!(denied.message().contains("relays traces"), "{denied}");
        }
    }
}
