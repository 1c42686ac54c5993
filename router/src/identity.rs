//! Who is calling: the kernel's word for it, taken once per connection when it is accepted.
//!
//! On the Unix socket the caller is who `SO_PEERCRED` says connected: a managed plugin
//! instance or a process it started is that [`Caller::Plugin`] (whatever its uid: plugins run
//! as the owner's uid by default, and are still not the owner), as the [`Identify`] lookup the
//! manager installs says from the peer's pid; otherwise the router's own uid and root are the
//! [`Caller::Owner`], any other uid a [`Caller::Local`] user. Over TCP the
//! caller is a [`Caller::Remote`]: an address, and with mTLS the identity its certificate
//! names and what that identity is granted (`tls`). Nothing a caller sends
//! (headers, metadata, fields) changes who it is: the value is fixed before the first byte of
//! HTTP/2 is read, and every call on the connection carries the same one.

use std::{fmt, io, net::SocketAddr, sync::Arc};

use tokio::net::UnixStream;

use crate::tls::Grant;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A managed plugin instance, or a process it started (a descendant of the instance's
    /// process): served as that plugin, never as the owner.
    Plugin {
        /// The plugin's name (`echo`).
        plugin: Arc<str>,
        /// The instance's id (`echo-0`).
        instance: Arc<str>,
        /// The connecting process's pid.
        pid: u32,
        /// Its effective uid.
        uid: u32,
    },
    /// A local process of the router's own uid, or of root: trusted with everything.
    Owner {
        /// Its effective uid (the router's, or 0).
        uid: u32,
        /// Its pid, when the kernel tells it.
        pid: Option<u32>,
    },
    /// A local process of another uid, which the socket's mode let connect.
    Local {
        /// Its effective uid.
        uid: u32,
        /// Its pid, when the kernel tells it.
        pid: Option<u32>,
    },
    /// A TCP client.
    Remote {
        /// Its address.
        addr: SocketAddr,
        /// The identity its client certificate names (its first URI SAN, such as
        /// `spiffe://mesh/client/ops`); `None` on a plaintext listener.
        identity: Option<Arc<str>>,
        /// What that identity is granted beyond forwarding calls and reading the registry.
        grant: Grant,
    },
}

/// A managed plugin instance, as [`Identify`] names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginIdentity {
    /// The plugin's name.
    pub plugin: Arc<str>,
    /// The instance's id.
    pub instance: Arc<str>,
}

/// Says which managed plugin instance, if any, a local process belongs to: the instance whose
/// process it is or descends from. The manager's supervisor implements it; the router asks once
/// per Unix connection, when it is accepted, with the pid `SO_PEERCRED` gave.
pub trait Identify: Send + Sync + 'static {
    /// The instance `pid` is, or descends from; `None` for any other process.
    fn identify(&self, pid: u32) -> Option<PluginIdentity>;
}

impl<F> Identify for F
where
    F: Fn(u32) -> Option<PluginIdentity> + Send + Sync + 'static,
{
    fn identify(&self, pid: u32) -> Option<PluginIdentity> {
        self(pid)
    }
}

impl Caller {
    /// The caller on a Unix connection, from its kernel credentials; `owner` is the uid the
    /// router trusts besides root, `identify` names managed plugin instances.
    pub fn of_unix(
        stream: &UnixStream,
        owner: u32,
        identify: Option<&dyn Identify>,
    ) -> io::Result<Self> {
        let cred = stream.peer_cred()?;
        let (uid, pid) = (cred.uid(), cred.pid().and_then(|p| u32::try_from(p).ok()));
        if let (Some(identify), Some(pid)) = (identify, pid) {
            let found = identify.identify(pid);
            // Checked after the lookup: a process that connected and exited (leaving the
            // connection to a child, say) must not pass for whoever has its pid now, nor for
            // the owner because its plugin ancestry can no longer be read.
            if !still_connected(stream, pid) {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the process that connected (pid {pid}) has exited"),
                ));
            }
            if let Some(found) = found {
                return Ok(Self::Plugin {
                    plugin: found.plugin,
                    instance: found.instance,
                    pid,
                    uid,
                });
            }
        }
        Ok(if uid == owner || uid == 0 {
            Self::Owner { uid, pid }
        } else {
            Self::Local { uid, pid }
        })
    }

    /// Whether this caller is the owner: a local process of the owner's uid, or root.
    pub fn is_owner(&self) -> bool {
        matches!(self, Self::Owner { .. })
    }

    /// Whether this caller is trusted with the Manager API and registry writes: the owner, or
    /// a TCP client whose certificate identity is granted them.
    pub fn may_control(&self) -> bool {
        matches!(
            self,
            Self::Owner { .. }
                | Self::Remote {
                    grant: Grant::Admin,
                    ..
                }
        )
    }

    /// Whether this caller may write the registry (register, keep alive, deregister): those
    /// who may control, and a TCP client granted registry writes alone.
    pub fn may_write_registry(&self) -> bool {
        self.may_control()
            || matches!(
                self,
                Self::Remote {
                    grant: Grant::RegistryWriter,
                    ..
                }
            )
    }

    /// The class whose connection and in-flight limits this caller counts against.
    pub(crate) fn class(&self) -> Class {
        match self {
            // Plugins calling plugins are the mesh's own traffic, counted with the owner's.
            Self::Owner { .. } | Self::Plugin { .. } => Class::Owner,
            Self::Local { .. } => Class::Local,
            Self::Remote { .. } => Class::Remote,
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pid = |pid: &Option<u32>| pid.map(|p| format!(", pid {p}")).unwrap_or_default();
        match self {
            Self::Plugin {
                plugin,
                instance,
                pid,
                ..
            } => write!(f, "plugin {plugin:?} ({instance}, pid {pid})"),
            Self::Owner { uid, pid: p } => write!(f, "the owner (uid {uid}{})", pid(p)),
            Self::Local { uid, pid: p } => write!(f, "local uid {uid}{}", pid(p)),
            Self::Remote {
                addr,
                identity: Some(identity),
                ..
            } => write!(f, "{identity} (TCP client {addr})"),
            Self::Remote { addr, .. } => write!(f, "TCP client {addr}"),
        }
    }
}

/// Callers whose connections and calls are counted apart, so that no class can lock out
/// another: whatever TCP clients do, the owner's CLI still connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// The owner's uid and root, on the Unix socket.
    Owner = 0,
    /// Other local uids, on the Unix socket.
    Local = 1,
    /// TCP clients.
    Remote = 2,
}

impl Class {
    /// Every class, in index order.
    pub(crate) const ALL: [Class; 3] = [Class::Owner, Class::Local, Class::Remote];

    /// The share of `max_in_flight` that bounds this class's calls, for refusals.
    pub(crate) fn share_name(self) -> &'static str {
        match self {
            Self::Owner => "max_in_flight",
            Self::Local => "other local users' share: a quarter of max_in_flight",
            Self::Remote => "TCP clients' share: half of max_in_flight",
        }
    }

    /// What the class is called in messages and logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Owner => "the owner's local connections",
            Self::Local => "other local users' connections",
            Self::Remote => "TCP connections",
        }
    }
}

/// Whether the process that connected is still alive as `pid`: by its pidfd
/// (`SO_PEERPIDFD`, which pins the process itself, so a recycled pid cannot pass for it) where
/// the kernel has it, else by `/proc/<pid>` existing.
fn still_connected(stream: &UnixStream, pid: u32) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerPidfd};
    use std::os::fd::AsRawFd;
    match getsockopt(stream, PeerPidfd) {
        Ok(pidfd) => pidfd_pid(pidfd.as_raw_fd()).is_ok_and(|p| p == i64::from(pid)),
        Err(_) => std::path::Path::new(&format!("/proc/{pid}")).exists(),
    }
}

/// The pid the pidfd `fd` names, in this process's PID namespace, from its
/// `/proc/self/fdinfo` `Pid:` line: `-1` once the process has exited (and `0` when it lives
/// in a namespace this one cannot see).
pub fn pidfd_pid(fd: std::os::fd::RawFd) -> std::io::Result<i64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no Pid: line: not a pidfd"))
}

/// The router's effective uid: the owner it trusts besides root.
pub(crate) fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_unix_peer_is_known_by_its_uid() {
        let (a, _b) = UnixStream::pair().unwrap();
        let me = own_uid();
        let caller = Caller::of_unix(&a, me, None).unwrap();
        assert!(caller.is_owner(), "{caller}");
        assert!(matches!(caller, Caller::Owner { uid, pid: Some(_) } if uid == me));
        // The same process seen by a router that trusts another uid: only root is owner too.
        let caller = Caller::of_unix(&a, me.wrapping_add(1), None).unwrap();
        assert_eq!(caller.is_owner(), me == 0, "{caller}");
    }

    #[tokio::test]
    async fn a_process_the_lookup_names_is_that_plugin_and_not_the_owner() {
        let (a, _b) = UnixStream::pair().unwrap();
        let me = std::process::id();
        let identify = move |pid: u32| {
            (pid == me).then(|| PluginIdentity {
                plugin: "files".into(),
                instance: "files-0".into(),
            })
        };
        let caller = Caller::of_unix(&a, own_uid(), Some(&identify)).unwrap();
        assert!(!caller.is_owner(), "{caller}");
        assert!(
            matches!(&caller, Caller::Plugin { plugin, instance, pid, .. }
                if &**plugin == "files" && &**instance == "files-0" && *pid == me),
            "{caller}"
        );
        let nobody = |_: u32| None;
        assert!(
            Caller::of_unix(&a, own_uid(), Some(&nobody))
                .unwrap()
                .is_owner()
        );
    }

    #[tokio::test]
    async fn a_peer_that_exited_after_connecting_is_nobody() {
        // A child connects and exits before the connection is accepted: its pid names no
        // process now (or another one later), so the connection is not served at all.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let connected = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
            ])
            .arg(&path)
            .status();
        let Ok(status) = connected else {
            panic!("this test needs python3 to connect from a process that then exits");
        };
        assert!(status.success());
        let (stream, _) = listener.accept().await.unwrap();
        let nobody = |_: u32| None;
        let refused = Caller::of_unix(&stream, own_uid(), Some(&nobody)).unwrap_err();
        assert!(refused.to_string().contains("exited"), "{refused}");
        // Without a plugin lookup (a router with no managed plugins) nothing changes.
        assert!(Caller::of_unix(&stream, own_uid(), None).is_ok());
    }
}
