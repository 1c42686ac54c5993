//! The direct path under policy: the manager's end of each instance's private channel
//! (`MESH_CALLERS_FD`, see `mesh::plugin`'s `callers` module for the plugin's end).
//!
//! Each instance gets one end of a `socketpair(AF_UNIX, SOCK_SEQPACKET)` when it starts; the
//! channel has no path, so only that instance (and processes it hands the fd to) can ask on
//! it, and the manager knows the target by the channel alone. For each connection the
//! instance accepts, it passes the caller's pidfd (`SCM_RIGHTS`); the manager reads the host
//! pid from `/proc/self/fdinfo` and names the caller as the router does: the router itself,
//! the owner or root (served without per-call checks), a managed plugin, or another local uid
//! (each call checked by [`CallGate::decide`], the same code as the router path, with the
//! target plugin's service name and the call's `:path`).
//!
//! Whose word is what: the *caller's identity* is the kernel's and the manager's (the pidfd
//! names one process, which the manager looks up itself; nothing the target says changes
//! whom it names), but *that a call happened*, on which connection and with which method, is
//! the target's report, and the pidfd is the one the target chose to pass (of any process it
//! holds a pidfd for: one that ever connected to it, or one it can `pidfd_open`, another
//! plugin's included). So a target can make the log show calls to
//! itself that never happened, from any process, or hide real ones; it cannot reach another
//! target's service (the channel fixes it) or change any other plugin's policy. Its audit
//! lines say so: `via` `direct` and `reported_by` the instance whose channel asked.
//!
//! Everything on the channel is hostile: a message that is too long, truncated, unknown, or
//! carries no fd, several fds, or an fd that is not a pidfd is refused (an answer when the
//! request has an id) and never ends the channel; extra fds are closed.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{Arc, Weak},
};

use mesh::plugin::callers_wire::{self as wire, Reply, Request};
use mesh_router::{Caller, PluginIdentity, Refusal};
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, send, socketpair,
};
use tokio::io::{Interest, unix::AsyncFd};

use super::{CallGate, audit::Via};
use crate::supervisor::{CallerChannels, Supervisor};

/// Connections one instance may have checked per call at once: more than its file descriptor
/// limit allows by default; past it new ones are refused.
const MAX_CONNECTIONS: usize = 4096;

/// Opens and answers the instances' channels.
pub struct DirectGate {
    gate: Arc<CallGate>,
    supervisor: Weak<Supervisor>,
    runtime: tokio::runtime::Handle,
    owner: u32,
}

impl DirectGate {
    /// Answers with `gate`'s decisions, naming plugin processes by `supervisor`. Must be made
    /// on the tokio runtime the channels are served on.
    pub fn new(gate: Arc<CallGate>, supervisor: Weak<Supervisor>) -> Self {
        Self {
            gate,
            supervisor,
            runtime: tokio::runtime::Handle::current(),
            owner: nix::unistd::geteuid().as_raw(),
        }
    }

    /// Whether this kernel can name a peer by pidfd (`SO_PEERPIDFD`, Linux 6.5): without it the
    /// direct path cannot be checked, and `mesh up` says so instead of handing out channels.
    pub fn supported() -> bool {
        use nix::sys::socket::{getsockopt, sockopt::PeerPidfd};
        match std::os::unix::net::UnixStream::pair() {
            Ok((a, _b)) => getsockopt(&a, PeerPidfd).is_ok(),
            Err(_) => false,
        }
    }
}

impl CallerChannels for DirectGate {
    fn open(&self, plugin: &str, instance: &str, service: &str) -> io::Result<OwnedFd> {
        let (mine, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )?;
        let _entered = self.runtime.enter();
        // SAFETY: an OwnedFd keeps its fd open and the same for as long as the AsyncFd owns it.
        #[allow(unsafe_code)]
        let mine = unsafe { AsyncFd::register(mine) }.map_err(|e| e.into_parts().1)?;
        let channel = Channel {
            fd: mine,
            service: service.to_owned(),
            instance: instance.to_owned(),
            gate: self.gate.clone(),
            supervisor: self.supervisor.clone(),
            owner: self.owner,
            tokens: HashMap::new(),
            next: 1,
        };
        let span = tracing::info_span!("callers", plugin = %plugin);
        self.runtime
            .spawn(tracing::Instrument::instrument(channel.serve(), span));
        // The plugin's end: the child clears close-on-exec on it, and it is blocking there.
        nix::fcntl::fcntl(
            &theirs,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )?;
        Ok(theirs)
    }
}

/// One instance's channel.
struct Channel {
    fd: AsyncFd<OwnedFd>,
    /// The target: the instance's plugin's service name, fixed by the channel.
    service: String,
    /// The instance the channel was opened for: whose word a decision on it is.
    instance: String,
    gate: Arc<CallGate>,
    supervisor: Weak<Supervisor>,
    owner: u32,
    /// Connections checked per call, by token.
    tokens: HashMap<u64, Caller>,
    next: u64,
}

/// One message as received.
struct Received {
    bytes: Vec<u8>,
    truncated: bool,
    fds: Vec<OwnedFd>,
}

impl Channel {
    async fn serve(mut self) {
        let mut refused = 0u64;
        loop {
            let received = self.fd.async_io(Interest::READABLE, receive).await;
            let message = match received {
                // An empty message is the other end closing (SOCK_SEQPACKET).
                Ok(message) if message.bytes.is_empty() && !message.truncated => break,
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, "callers' channel failed; calls on it are refused");
                    break;
                }
            };
            if let Err(why) = self.handle(message).await {
                refused += 1;
                // A flood of garbage is the plugin's own doing: note it, not every time.
                if refused.is_power_of_two() {
                    tracing::warn!(refused, "malformed request on the callers' channel: {why}");
                }
            }
        }
    }

    /// Answers one message; `Err` for a malformed one (answered too, when it has an id).
    async fn handle(&mut self, message: Received) -> Result<(), String> {
        let Received {
            bytes,
            truncated,
            mut fds,
        } = message;
        let malformed = |why: String| (wire::id_of(&bytes), why);
        let outcome = if truncated {
            Err(malformed(format!(
                "longer than {} bytes",
                wire::MAX_MESSAGE
            )))
        } else {
            match wire::decode_request(&bytes) {
                Err(why) => Err(malformed(why.into())),
                Ok(Request::Hello { id }) => match (fds.pop(), fds.is_empty()) {
                    (Some(pidfd), true) => Ok(Some(self.hello(id, &pidfd))),
                    _ => Err((Some(id), "a HELLO carries exactly one pidfd".into())),
                },
                Ok(_) if !fds.is_empty() => {
                    Err(malformed("only a HELLO carries a file descriptor".into()))
                }
                Ok(Request::Check { id, token, method }) => Ok(Some(self.check(id, token, method))),
                Ok(Request::Forget { token }) => {
                    self.tokens.remove(&token);
                    Ok(None)
                }
            }
        };
        drop(fds);
        match outcome {
            Ok(Some(reply)) => {
                self.reply(reply).await;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err((id, why)) => {
                if let Some(id) = id {
                    self.reply(denied(id, format!("refused by the manager: {why}")))
                        .await;
                }
                Err(why)
            }
        }
    }

    async fn reply(&self, reply: Reply) {
        let bytes = reply.encode();
        let sent = self
            .fd
            .async_io(Interest::WRITABLE, |fd| {
                send(fd.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
            })
            .await;
        if let Err(error) = sent {
            tracing::debug!(%error, "cannot answer on the callers' channel");
        }
    }

    /// Who the process behind `pidfd` is, as the router would name it.
    fn hello(&mut self, id: u64, pidfd: &OwnedFd) -> Reply {
        let caller = match self.identify(pidfd) {
            Ok(caller) => caller,
            Err(why) => {
                return denied(
                    id,
                    format!("the caller could not be identified ({why}); the call is refused"),
                );
            }
        };
        let per_call = match &caller {
            // The router checked what it forwards; the owner and root are trusted.
            Caller::Owner { .. } => false,
            Caller::Plugin { .. } | Caller::Local { .. } => true,
            Caller::Remote { .. } => true,
        };
        if !per_call {
            return Reply {
                id,
                verdict: wire::ALLOW_ALL,
                token: 0,
                message: String::new(),
            };
        }
        if self.tokens.len() >= MAX_CONNECTIONS {
            return denied(
                id,
                format!(
                    "{} has {MAX_CONNECTIONS} connections checked per call open; the call is \
                     refused",
                    self.service
                ),
            );
        }
        let token = self.next;
        self.next += 1;
        self.tokens.insert(token, caller);
        Reply {
            id,
            verdict: wire::PER_CALL,
            token,
            message: String::new(),
        }
    }

    fn identify(&self, pidfd: &OwnedFd) -> Result<Caller, String> {
        identify(pidfd, self.owner, |pid| {
            self.supervisor.upgrade().and_then(|s| s.identify(pid))
        })
    }

    fn check(&self, id: u64, token: u64, method: &str) -> Reply {
        let Some(caller) = self.tokens.get(&token) else {
            return denied(id, "refused by the manager: unknown connection".into());
        };
        let via = Via::Direct {
            reported_by: &self.instance,
        };
        let (verdict, message) = match self.gate.decide(caller, &self.service, method, via) {
            Ok(()) => (wire::ALLOWED, String::new()),
            Err(Refusal::Denied(why)) => (wire::DENIED, why),
            Err(Refusal::Exhausted(why)) => (wire::EXHAUSTED, why),
        };
        Reply {
            id,
            verdict,
            token: 0,
            message,
        }
    }
}

/// Who the process behind `pidfd` is: the manager itself (the router), a plugin as `find`
/// names its pid, else the owner or another local uid.
fn identify(
    pidfd: &OwnedFd,
    owner: u32,
    find: impl FnOnce(u32) -> Option<PluginIdentity>,
) -> Result<Caller, String> {
    let pid = pid_of(pidfd.as_raw_fd())?;
    if pid == std::process::id() {
        // The router itself (forwarding, health checks): the owner.
        return Ok(Caller::Owner {
            uid: owner,
            pid: Some(pid),
        });
    }
    let uid = uid_of(pid)?;
    let found = find(pid);
    // The lookups read /proc by number: the pidfd must still name that process, else the
    // number may be someone else's by now.
    if pid_of(pidfd.as_raw_fd())? != pid {
        return Err("the caller exited".into());
    }
    Ok(match found {
        Some(found) => Caller::Plugin {
            plugin: found.plugin,
            instance: found.instance,
            pid,
            uid,
        },
        None if uid == owner || uid == 0 => Caller::Owner {
            uid,
            pid: Some(pid),
        },
        None => Caller::Local {
            uid,
            pid: Some(pid),
        },
    })
}

fn denied(id: u64, message: String) -> Reply {
    Reply {
        id,
        verdict: wire::DENIED,
        token: 0,
        message,
    }
}

/// Receives one message, its truncation, and the fds it carried (owned, so they are closed).
fn receive(fd: &OwnedFd) -> io::Result<Received> {
    let mut buf = vec![0u8; wire::MAX_MESSAGE + 1];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let message = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    if let Ok(cmsgs) = message.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                for raw in received {
                    // SAFETY: the kernel just installed these fds in this process for us.
                    #[allow(unsafe_code)]
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
    }
    let truncated = message
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
        || message.bytes > wire::MAX_MESSAGE;
    let len = message.bytes.min(wire::MAX_MESSAGE);
    buf.truncate(len);
    Ok(Received {
        bytes: buf,
        truncated,
        fds,
    })
}

/// The host pid a pidfd names, from `/proc/self/fdinfo`; an error for any other kind of fd
/// and for a process that has exited.
fn pid_of(fd: RawFd) -> Result<u32, String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| format!("cannot read the fd: {e}"))?;
    if !link.to_string_lossy().contains("pidfd") {
        return Err(format!("not a pidfd but {}", link.display()));
    }
    let pid = mesh_router::pidfd_pid(fd).map_err(|e| format!("cannot read the pidfd: {e}"))?;
    u32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| "the caller exited".into())
}

/// The effective uid of `pid`, from `/proc/<pid>/status`.
fn uid_of(pid: u32) -> Result<u32, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| "the caller exited".to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
        .ok_or_else(|| "cannot read the caller's uid".into())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::sys::socket::{ControlMessage, getsockopt, sendmsg, setsockopt, sockopt};

    use super::*;
    use crate::{
        host::{Audit, Policies, RateLimits, cost::per_call},
        supervisor::{Process, ancestor_in},
    };

    /// A child process to be a caller, and a pidfd for it (`pidfd_open(2)`).
    fn child() -> (std::process::Child, OwnedFd) {
        let child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = nix::libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd (or -1), which is ours.
        #[allow(unsafe_code)]
        let pidfd = unsafe {
            let fd = nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0);
            assert!(fd >= 0, "pidfd_open: {}", io::Error::last_os_error());
            OwnedFd::from_raw_fd(RawFd::try_from(fd).unwrap())
        };
        (child, pidfd)
    }

    /// `find` as the supervisor answers it: the plugin whose instance process is `anchor`.
    fn plugin_at(anchor: Process) -> impl Fn(u32) -> Option<PluginIdentity> {
        let anchors = [(anchor, ())];
        move |pid| {
            ancestor_in(pid, &anchors).map(|()| PluginIdentity {
                plugin: "files".into(),
                instance: "files-0".into(),
            })
        }
    }

    #[test]
    fn a_pidfd_names_its_process_a_plugin_when_it_descends_from_one_and_not_once_it_exits() {
        let me = nix::unistd::geteuid().as_raw();
        let (mut child, pidfd) = child();
        let pid = child.id();
        let caller = identify(&pidfd, me, plugin_at(Process::of(pid).unwrap())).unwrap();
        assert!(
            matches!(&caller, Caller::Plugin { plugin, pid: p, .. } if &**plugin == "files" && *p == pid),
            "{caller:?}"
        );
        // A descendant of the instance's process (here: the child of this one) is that plugin too.
        let parent = Process::of(std::process::id()).unwrap();
        let caller = identify(&pidfd, me, plugin_at(parent)).unwrap();
        assert!(matches!(caller, Caller::Plugin { .. }), "{caller:?}");
        // Nobody's: known by its uid (this one's, so the owner); another uid is not the owner.
        let nobody = Process {
            pid: u32::MAX,
            start: 0,
        };
        let caller = identify(&pidfd, me, plugin_at(nobody)).unwrap();
        assert!(
            matches!(caller, Caller::Owner { uid, .. } if uid == me),
            "{caller:?}"
        );
        let caller = identify(&pidfd, me.wrapping_add(1), plugin_at(nobody)).unwrap();
        assert_eq!(
            matches!(caller, Caller::Local { .. }),
            me != 0,
            "{caller:?}"
        );
        // Once it has exited, its pidfd names nobody, even if its pid is reused.
        child.kill().unwrap();
        child.wait().unwrap();
        let error = identify(&pidfd, me, plugin_at(nobody)).unwrap_err();
        assert!(error.contains("exited"), "{error}");
    }

    /// What the direct path costs once per connection, naming the caller from its pidfd
    /// (`cargo test --release -p mesh-manager --lib -- --ignored --nocapture cost_per_call`):
    /// prints, asserts nothing. Each call on the connection then costs one `CallGate::decide`
    /// (`calls.rs`'s `cost_per_call`) plus the round trip to the manager on the channel.
    #[test]
    #[ignore]
    fn cost_per_connection() {
        const CALLS: u32 = 2_000;
        let me = nix::unistd::geteuid().as_raw();
        let (mut child, pidfd) = child();
        let pid = child.id();
        let mut depth = 0;
        let mut up = pid;
        while let Some(p) = Process::of(up) {
            depth += 1;
            up = std::fs::read_to_string(format!("/proc/{}/stat", p.pid))
                .ok()
                .and_then(|s| s[s.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok())
                .unwrap_or(0);
            if up <= 1 {
                break;
            }
        }
        println!("the direct path, per connection (median of 5 batches):");
        per_call(
            "pid_of: the host pid a pidfd names (readlink, fdinfo)",
            CALLS,
            |_| {
                assert_eq!(pid_of(pidfd.as_raw_fd()), Ok(pid));
            },
        );
        per_call("uid_of: the caller's uid (/proc/PID/status)", CALLS, |_| {
            assert_eq!(uid_of(pid), Ok(me));
        });
        let find = plugin_at(Process::of(pid).unwrap());
        per_call(
            "identify: an instance's own process (found at once)",
            CALLS,
            |_| {
                assert!(matches!(
                    identify(&pidfd, me, &find),
                    Ok(Caller::Plugin { .. })
                ));
            },
        );
        let find = plugin_at(Process {
            pid: u32::MAX,
            start: 0,
        });
        let what = format!("identify: not a plugin ({depth} processes up to init)");
        per_call(&what, CALLS, |_| {
            assert!(matches!(
                identify(&pidfd, me, &find),
                Ok(Caller::Owner { .. })
            ));
        });
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The plugin's end, as a hostile plugin would use it.
    struct PluginEnd(OwnedFd);

    impl PluginEnd {
        fn send(&self, bytes: &[u8], fds: &[RawFd]) {
            let rights = [ControlMessage::ScmRights(fds)];
            let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
            sendmsg::<()>(
                self.0.as_raw_fd(),
                &[io::IoSlice::new(bytes)],
                cmsgs,
                MsgFlags::empty(),
                None,
            )
            .unwrap();
        }

        fn reply(&self) -> Reply {
            let mut buf = vec![0u8; wire::MAX_MESSAGE];
            let n = nix::sys::socket::recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty())
                .expect("an answer within the timeout");
            Reply::decode(&buf[..n]).expect("a well-formed answer")
        }

        fn ask(&self, bytes: &[u8], fds: &[RawFd]) -> Reply {
            self.send(bytes, fds);
            self.reply()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_channel_refuses_garbage_and_keeps_answering() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Arc::new(Audit::open(dir.path().join("audit.log"), 1 << 20).unwrap());
        let gate = Arc::new(CallGate::new(
            Arc::new(Policies::default()),
            Arc::new(RateLimits::default()),
            audit,
        ));
        let direct = DirectGate::new(gate, Weak::new());
        let end = PluginEnd(direct.open("echo", "echo-0", "plugin.echo").unwrap());
        setsockopt(
            &end.0,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(5, 0),
        )
        .unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let my_pidfd = getsockopt(&a, sockopt::PeerPidfd).unwrap();
        let my_pidfd = my_pidfd.as_fd().as_raw_fd();
        let hello = |id| Request::Hello { id }.encode();

        let blocking = tokio::task::spawn_blocking(move || {
            let denied = |reply: Reply, id: u64, says: &str| {
                assert_eq!((reply.id, reply.verdict), (id, wire::DENIED), "{reply:?}");
                assert!(reply.message.contains(says), "{says}: {reply:?}");
            };
            // Oversized: refused by the id its first bytes carry.
            let mut long = vec![wire::CHECK];
            long.extend_from_slice(&7u64.to_le_bytes());
            long.resize(3 * wire::MAX_MESSAGE, b'x');
            denied(end.ask(&long, &[]), 7, "longer than");
            // Truncated, unknown or empty-bodied: nothing to answer, and the channel goes on.
            end.send(&[wire::HELLO, 1, 2], &[]);
            end.send(&[99; 9], &[]);
            end.send(&[wire::FORGET, 1], &[]);
            // A HELLO with no fd, two fds, or an fd that is not a pidfd.
            denied(end.ask(&hello(1), &[]), 1, "exactly one pidfd");
            denied(
                end.ask(&hello(2), &[my_pidfd, my_pidfd]),
                2,
                "exactly one pidfd",
            );
            let (pipe, _w) = nix::unistd::pipe().unwrap();
            denied(end.ask(&hello(3), &[pipe.as_raw_fd()]), 3, "not a pidfd");
            // A CHECK on a connection never announced, or carrying an fd.
            let check = |id, token| {
                Request::Check {
                    id,
                    token,
                    method: "/echo.v1.Echo/Echo",
                }
                .encode()
            };
            denied(end.ask(&check(4, 99), &[]), 4, "unknown connection");
            denied(
                end.ask(&check(5, 99), &[my_pidfd]),
                5,
                "only a HELLO carries",
            );
            // Bad UTF-8 in the method.
            let mut bad = check(6, 1);
            bad.push(0xff);
            denied(end.ask(&bad, &[]), 6, "UTF-8");
            // Still answering: this process (the manager itself) is the router: no checks.
            let reply = end.ask(&hello(8), &[my_pidfd]);
            assert_eq!((reply.id, reply.verdict), (8, wire::ALLOW_ALL), "{reply:?}");
        });
        blocking.await.unwrap();
    }
}
