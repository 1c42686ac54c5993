//! Who is calling: the kernel's word for it, taken once per connection when it is accepted.
//!
//! On the Unix socket the caller is who `SO_PEERCRED` says connected: a managed plugin
//! instance or a process it started is that [`Caller::Plugin`] (whatever its uid: plugins run
//! as the owner's uid by default, and are still not the owner), as the [`Identify`] lookup the
//! manager installs says from the peer's pid; otherwise the router's own uid and root are the
//! [`Caller::Owner`], any other uid a [`Caller::Local`] user. On the TCP listener a process
//! of this host is the same caller it would be on the Unix socket: the kernel's socket table
//! names its uid and socket, the socket its holders, the holders a plugin or not ([`crate::peer`],
//! [`Caller::of_tcp`]); a loopback peer it cannot name is refused, never served as anonymous.
//! Any other TCP caller is a [`Caller::Remote`]: an address, and with mTLS the identity its
//! certificate names and what that identity is granted (`tls`). Nothing a caller sends
//! (headers, metadata, fields) changes who it is: the value is fixed before the first byte of
//! HTTP/2 is read, and every call on the connection carries the same one.

use std::{fmt, io, net::SocketAddr, sync::Arc};

use tokio::net::{TcpStream, UnixStream};

use crate::{peer, tls::Grant};

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
    /// A TCP client of another host (or, under mTLS, a process of this host that is no
    /// plugin's: who its certificate names).
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

    /// The caller on a TCP connection from `peer` to `local` (this side's address) when it is
    /// a process of this host: `Ok(None)` when the kernel's socket table has no socket of
    /// `peer` connected to `local` and `peer` is not a loopback address (a remote client).
    ///
    /// A local caller is who it would be on the Unix socket: the table gives the socket's uid
    /// and inode, the processes of that uid holding the inode are asked of `identify`, and a
    /// plugin's holder makes the caller that plugin; otherwise the uid decides, as for
    /// `SO_PEERCRED`. Fails (the connection is to be refused) when the peer is loopback but
    /// the kernel no longer lists its socket, when no holder is found, when a holder exited
    /// during the lookup, or when holders belong to two plugins.
    pub fn of_tcp(
        peer: SocketAddr,
        local: SocketAddr,
        owner: u32,
        identify: Option<&dyn Identify>,
    ) -> io::Result<Option<Self>> {
        let socket = match peer::socket_of(peer, local) {
            Ok(socket) => socket,
            // Not a socket of this host: a remote client, unless it claims to be on loopback.
            Err(error)
                if error.kind() == io::ErrorKind::NotFound && !peer::is_loopback(peer.ip()) =>
            {
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        let uid = socket.uid;
        let by_uid = |pid| {
            if uid == owner || uid == 0 {
                Self::Owner { uid, pid }
            } else {
                Self::Local { uid, pid }
            }
        };
        // A socket in TIME_WAIT has no inode: its client has closed it already.
        if socket.inode == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the client socket {peer} is already closed"),
            ));
        }
        let Some(identify) = identify else {
            // No managed plugins: the uid says all.
            return Ok(Some(by_uid(None)));
        };
        if uid != owner && uid != 0 && owner != 0 {
            // A router that is not root starts its plugins as its own uid, and may not read
            // another uid's descriptors: this socket was made by another user's process. (A
            // plugin holding it could only have it from that user, who may call as itself.)
            return Ok(Some(Self::Local { uid, pid: None }));
        }
        let holders = peer::holders(socket.inode, uid)?;
        if holders.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no process of uid {uid} holds the socket of {peer} (it exited, or passed                      the socket on)"
                ),
            ));
        }
        // Whichever holder writes the calls, the kernel cannot say: if any holder is a
        // plugin's process, the connection is that plugin's (the most restricted of them),
        // so that a plugin sharing its socket with another process (after a fork, or passed
        // on) cannot borrow that process's rights. Holders of two plugins would let either
        // call with the other's capabilities: refused.
        let mut plugin: Option<(PluginIdentity, u32)> = None;
        for holder in &holders {
            let Some(found) = identify.identify(holder.pid) else {
                continue;
            };
            match &plugin {
                Some((known, _)) if known.plugin != found.plugin => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "the socket of {peer} is held by processes of plugins {:?} and {:?}",
                            known.plugin, found.plugin
                        ),
                    ));
                }
                Some(_) => {}
                None => plugin = Some((found, holder.pid)),
            }
        }
        // Checked after the lookups, as on the Unix socket: a holder that exited meanwhile
        // may have left its pid to another process, which the lookup then judged instead.
        if !holders.iter().all(peer::Holder::still_running) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("a process holding the socket of {peer} exited during the lookup"),
            ));
        }
        Ok(Some(match plugin {
            Some((found, pid)) => Self::Plugin {
                plugin: found.plugin,
                instance: found.instance,
                pid,
                uid,
            },
            None => by_uid(Some(holders[0].pid)),
        }))
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

    /// The class whose connection and in-flight limits this caller counts against, on the
    /// Unix socket (`over_tcp` false) or the TCP listener. Every TCP connection counts with
    /// TCP clients, whoever the socket table says is on it: whatever is held on the TCP
    /// listener, the owner's CLI on the Unix socket still connects.
    pub(crate) fn class(&self, over_tcp: bool) -> Class {
        if over_tcp {
            return Class::Remote;
        }
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
    /// TCP connections, local processes' included.
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

/// The caller on a TCP connection just accepted from `peer`: [`Caller::of_tcp`], off the
/// accept loop's thread (it reads `/proc`); `Ok(None)` for a remote client.
pub(crate) async fn of_tcp_stream(
    stream: &TcpStream,
    peer: SocketAddr,
    owner: u32,
    identify: Option<Arc<dyn Identify>>,
) -> io::Result<Option<Caller>> {
    let local = stream.local_addr()?;
    tokio::task::spawn_blocking(move || Caller::of_tcp(peer, local, owner, identify.as_deref()))
        .await
        .map_err(io::Error::other)?
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

    /// A loopback connection whose client socket this process holds, and a child (`sleep`)
    /// holding it too when `shared`: (client, server, peer, local, child).
    fn loopback(
        shared: bool,
    ) -> (
        std::net::TcpStream,
        std::net::TcpStream,
        SocketAddr,
        SocketAddr,
        Option<std::process::Child>,
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let local = server.local_addr().unwrap();
        let child = shared.then(|| {
            let fd = std::os::fd::OwnedFd::from(client.try_clone().unwrap());
            std::process::Command::new("sleep")
                .arg("30")
                .stdin(fd)
                .spawn()
                .expect("this test runs sleep")
        });
        (client, server, peer, local, child)
    }

    fn plugin(name: &str) -> Option<PluginIdentity> {
        Some(PluginIdentity {
            plugin: name.into(),
            instance: format!("{name}-0").into(),
        })
    }

    #[test]
    fn a_loopback_tcp_peer_is_who_it_would_be_on_the_unix_socket() {
        let (_client, _server, peer, local, _) = loopback(false);
        let me = std::process::id();
        let nobody = |_: u32| None;
        let caller = Caller::of_tcp(peer, local, own_uid(), Some(&nobody))
            .unwrap()
            .unwrap();
        assert_eq!(
            caller,
            Caller::Owner {
                uid: own_uid(),
                pid: Some(me)
            }
        );
        let files = move |pid: u32| if pid == me { plugin("files") } else { None };
        let caller = Caller::of_tcp(peer, local, own_uid(), Some(&files))
            .unwrap()
            .unwrap();
        assert!(
            matches!(&caller, Caller::Plugin { plugin, pid, .. } if &**plugin == "files" && *pid == me),
            "{caller}"
        );
        // Seen by a router of another uid, without plugins: another local user (or root).
        let other = Caller::of_tcp(peer, local, own_uid().wrapping_add(1), None)
            .unwrap()
            .unwrap();
        assert_eq!(other.is_owner(), own_uid() == 0, "{other}");
    }

    #[test]
    fn a_socket_shared_with_a_plugin_is_the_plugins_and_two_plugins_are_refused() {
        let (_client, _server, peer, local, child) = loopback(true);
        let mut child = child.unwrap();
        let (me, theirs) = (std::process::id(), child.id());
        // The child is a plugin's process, this one is not: the connection is the plugin's.
        let child_only = move |pid: u32| if pid == theirs { plugin("echo") } else { None };
        let caller = Caller::of_tcp(peer, local, own_uid(), Some(&child_only))
            .unwrap()
            .unwrap();
        assert!(
            matches!(&caller, Caller::Plugin { plugin, pid, .. } if &**plugin == "echo" && *pid == theirs),
            "{caller}"
        );
        // Each holder another plugin's: nobody can say whose call it is.
        let both = move |pid: u32| match pid {
            p if p == me => plugin("files"),
            p if p == theirs => plugin("echo"),
            _ => None,
        };
        let refused = Caller::of_tcp(peer, local, own_uid(), Some(&both)).unwrap_err();
        assert!(refused.to_string().contains("plugins"), "{refused}");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_loopback_peer_the_kernel_does_not_list_is_refused_and_a_remote_one_is_remote() {
        let (client, server, peer, local, _) = loopback(false);
        let nobody = |_: u32| None;
        // The client closes before it is identified: no process holds its socket any more.
        drop(client);
        let refused = Caller::of_tcp(peer, local, own_uid(), Some(&nobody)).unwrap_err();
        assert!(
            refused.to_string().contains("closed") || refused.to_string().contains("holds"),
            "{refused}"
        );
        drop(server);
        // No such socket at all: refused on loopback, a remote client elsewhere.
        let local: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(Caller::of_tcp("127.0.0.9:1".parse().unwrap(), local, own_uid(), None).is_err());
        assert!(
            Caller::of_tcp(
                "[::1]:1".parse().unwrap(),
                "[::1]:9".parse().unwrap(),
                own_uid(),
                None
            )
            .is_err()
        );
        let remote = Caller::of_tcp(
            "192.0.2.7:40000".parse().unwrap(),
            "192.0.2.1:7700".parse().unwrap(),
            own_uid(),
            Some(&nobody),
        );
        assert_eq!(remote.unwrap(), None);
    }
}
