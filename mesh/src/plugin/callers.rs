//! Who calls a plugin on its own socket, and whether they may: the direct path under the same
//! `call:` policy as the router path.
//!
//! `mesh up` hands each instance a private channel to the manager: one end of a
//! `socketpair(AF_UNIX, SOCK_SEQPACKET)`, inherited as the file descriptor named by
//! [`CALLERS_FD`]. Nobody else can open it: it has no path. For each connection the plugin
//! accepts, the SDK takes the peer's pidfd from the kernel (`SO_PEERPIDFD`, which names the
//! process whatever PID namespace either side is in) and passes it to the manager over the
//! channel (`SCM_RIGHTS`); the manager says who that process is, as the router would:
//!
//! - the router itself, the owner's other processes and root: served without a per-call check
//!   (the router checked the calls it forwards already);
//! - a managed plugin's process, or another local uid: each call is asked about (service: this
//!   plugin's name, method: the `:path`), decided and audited by the manager in the same code
//!   as the router path, and refused before the handler runs (`PERMISSION_DENIED` naming the
//!   missing capability, `RESOURCE_EXHAUSTED` over a rate limit);
//! - a process the manager cannot name (it exited, or its pidfd could not be read): every call
//!   on the connection is refused.
//!
//! The manager knows which instance asks by the channel it asks on, so a plugin cannot pass
//! for another, nor lie about its callers beyond replaying decisions about them. Without the
//! channel (a plugin started by hand) the SDK serves every caller, and says so once in its log.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf, unix::AsyncFd},
    net::UnixStream,
    sync::oneshot,
};
use tonic::{Status, body::Body, transport::server::Connected};

/// The variable that names the inherited channel's file descriptor.
pub const CALLERS_FD: &str = "MESH_CALLERS_FD";

/// How long the SDK waits for the manager's answer before refusing.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The channel's messages, shared by the SDK and the manager. Not a public API.
#[doc(hidden)]
pub mod wire {
    /// The largest message either side sends or accepts.
    pub const MAX_MESSAGE: usize = 4096;

    /// A new connection; its peer's pidfd comes with it (`SCM_RIGHTS`).
    pub const HELLO: u8 = 1;
    /// A call on a connection that is checked per call.
    pub const CHECK: u8 = 2;
    /// A connection closed: its token may be forgotten.
    pub const FORGET: u8 = 3;

    /// Answer to [`HELLO`]: serve the connection without asking again.
    pub const ALLOW_ALL: u8 = 0;
    /// Answer to [`HELLO`]: ask about each call with the token given.
    pub const PER_CALL: u8 = 1;
    /// Refused (`PERMISSION_DENIED`), with the reason.
    pub const DENIED: u8 = 2;
    /// Answer to [`CHECK`]: allowed.
    pub const ALLOWED: u8 = 3;
    /// Answer to [`CHECK`]: over a rate limit (`RESOURCE_EXHAUSTED`), with the reason.
    pub const EXHAUSTED: u8 = 4;

    /// A request from the plugin.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Request<'a> {
        /// `[HELLO][id: u64 LE]` + one fd.
        Hello {
            /// Matches the answer.
            id: u64,
        },
        /// `[CHECK][id][token: u64 LE][method, UTF-8]`.
        Check {
            /// Matches the answer.
            id: u64,
            /// The connection's token.
            token: u64,
            /// The gRPC path, `/pkg.Svc/Method`.
            method: &'a str,
        },
        /// `[FORGET][token]`.
        Forget {
            /// The connection's token.
            token: u64,
        },
    }

    impl Request<'_> {
        /// The bytes of the request.
        pub fn encode(&self) -> Vec<u8> {
            let mut out = Vec::with_capacity(32);
            match self {
                Self::Hello { id } => {
                    out.push(HELLO);
                    out.extend_from_slice(&id.to_le_bytes());
                }
                Self::Check { id, token, method } => {
                    out.push(CHECK);
                    out.extend_from_slice(&id.to_le_bytes());
                    out.extend_from_slice(&token.to_le_bytes());
                    out.extend_from_slice(method.as_bytes());
                }
                Self::Forget { token } => {
                    out.push(FORGET);
                    out.extend_from_slice(&token.to_le_bytes());
                }
            }
            out
        }
    }

    fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
    }

    /// Reads a request; `Err` says what is wrong with it.
    pub fn decode_request(bytes: &[u8]) -> Result<Request<'_>, &'static str> {
        if bytes.len() > MAX_MESSAGE {
            return Err("message too long");
        }
        match bytes.first() {
            Some(&HELLO) if bytes.len() == 9 => Ok(Request::Hello {
                id: u64_at(bytes, 1).ok_or("truncated")?,
            }),
            Some(&CHECK) if bytes.len() >= 17 => Ok(Request::Check {
                id: u64_at(bytes, 1).ok_or("truncated")?,
                token: u64_at(bytes, 9).ok_or("truncated")?,
                method: std::str::from_utf8(&bytes[17..]).map_err(|_| "method is not UTF-8")?,
            }),
            Some(&FORGET) if bytes.len() == 9 => Ok(Request::Forget {
                token: u64_at(bytes, 1).ok_or("truncated")?,
            }),
            Some(&(HELLO | CHECK | FORGET)) => Err("wrong length for its kind"),
            Some(_) => Err("unknown kind"),
            None => Err("empty"),
        }
    }

    /// The id of a request too malformed to decode, when it has one, so it can be refused.
    pub fn id_of(bytes: &[u8]) -> Option<u64> {
        match bytes.first() {
            Some(&(HELLO | CHECK)) => u64_at(bytes, 1),
            _ => None,
        }
    }

    /// An answer from the manager: `[id: u64][verdict: u8][token: u64][message, UTF-8]`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Reply {
        /// The request's id.
        pub id: u64,
        /// One of the verdicts above.
        pub verdict: u8,
        /// The connection's token ([`PER_CALL`]), else 0.
        pub token: u64,
        /// The reason of a refusal.
        pub message: String,
    }

    impl Reply {
        /// The bytes of the answer (the message cut to fit [`MAX_MESSAGE`]).
        pub fn encode(&self) -> Vec<u8> {
            let mut out = Vec::with_capacity(17 + self.message.len());
            out.extend_from_slice(&self.id.to_le_bytes());
            out.push(self.verdict);
            out.extend_from_slice(&self.token.to_le_bytes());
            let mut end = self.message.len().min(MAX_MESSAGE - 17);
            while !self.message.is_char_boundary(end) {
                end -= 1;
            }
            out.extend_from_slice(&self.message.as_bytes()[..end]);
            out
        }

        /// Reads an answer.
        pub fn decode(bytes: &[u8]) -> Option<Self> {
            Some(Self {
                id: u64_at(bytes, 0)?,
                verdict: *bytes.get(8)?,
                token: u64_at(bytes, 9)?,
                message: String::from_utf8_lossy(bytes.get(17..)?).into_owned(),
            })
        }
    }
}

/// What the manager said about a connection or a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    AllowAll,
    PerCall(u64),
    Allowed,
    Denied(String),
    Exhausted(String),
}

impl Verdict {
    fn of(reply: wire::Reply) -> Self {
        match reply.verdict {
            wire::ALLOW_ALL => Self::AllowAll,
            wire::PER_CALL => Self::PerCall(reply.token),
            wire::ALLOWED => Self::Allowed,
            wire::EXHAUSTED => Self::Exhausted(reply.message),
            _ => Self::Denied(reply.message),
        }
    }

    fn refusal(&self) -> Option<Status> {
        match self {
            Self::Denied(why) => Some(Status::permission_denied(why.clone())),
            Self::Exhausted(why) => Some(Status::resource_exhausted(why.clone())),
            _ => None,
        }
    }
}

/// The plugin's end of the channel to the manager.
pub(crate) struct Gate {
    fd: AsyncFd<OwnedFd>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Verdict>>>,
    next: AtomicU64,
    closed: AtomicBool,
}

/// Whether this process has a channel, and what is wrong with it if it cannot be used.
pub(crate) enum FromEnv {
    /// Not started by `mesh up` (or by one without the channel).
    Absent,
    /// The channel, ready to use (call [`Gate::start`] on a runtime).
    Present(Arc<Gate>),
}

impl Gate {
    /// The channel `mesh up` handed down, taken once per process: a second server in the same
    /// process is refused rather than served unchecked.
    pub(crate) fn from_env() -> Result<FromEnv, String> {
        static TAKEN: AtomicBool = AtomicBool::new(false);
        let Some(value) = std::env::var_os(CALLERS_FD) else {
            return Ok(FromEnv::Absent);
        };
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Err(format!(
                "{CALLERS_FD}: the channel is taken by this process's first server; a plugin \
                 serves once, on PLUGIN_SOCKET"
            ));
        }
        let fd: RawFd = value
            .to_str()
            .and_then(|v| v.parse().ok())
            .filter(|fd| *fd > 2)
            .ok_or_else(|| format!("{CALLERS_FD}={value:?} is not a file descriptor"))?;
        use nix::sys::socket::{SockType, getsockopt, sockopt};
        // Checked before it is owned: an fd that is not our channel is left alone.
        // SAFETY: borrowed only for these checks; the fd is not closed or kept.
        #[allow(unsafe_code)]
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        match getsockopt(&borrowed, sockopt::SockType) {
            Ok(SockType::SeqPacket) => {}
            _ => {
                return Err(format!(
                    "{CALLERS_FD}={fd} is not the manager's channel (a SOCK_SEQPACKET socket)"
                ));
            }
        }
        // SAFETY: the variable names an open socket that mesh up left to this process for this
        // use alone, and TAKEN makes sure only one OwnedFd is ever made of it.
        #[allow(unsafe_code)]
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // The plugin's own children have no use for it.
        nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(|e| format!("{CALLERS_FD}: {e}"))?;
        let flags = nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| format!("{CALLERS_FD}: {e}"))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| format!("{CALLERS_FD}: {e}"))?;
        // SAFETY: an OwnedFd keeps its fd open and the same for as long as the AsyncFd owns it.
        #[allow(unsafe_code)]
        let fd = unsafe { AsyncFd::register(owned) }.map_err(|e| format!("{CALLERS_FD}: {e}"))?;
        Ok(FromEnv::Present(Arc::new(Gate {
            fd,
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        })))
    }

    /// Reads the manager's answers until the channel closes; then every question is refused.
    pub(crate) fn start(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let gate = self.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; wire::MAX_MESSAGE];
            loop {
                let read = gate
                    .fd
                    .async_io(Interest::READABLE, |fd| {
                        nix::sys::socket::recv(
                            fd.as_raw_fd(),
                            &mut buf,
                            nix::sys::socket::MsgFlags::empty(),
                        )
                        .map_err(io::Error::from)
                    })
                    .await;
                match read {
                    Ok(n) if n > 0 => {
                        if let Some(reply) = wire::Reply::decode(&buf[..n]) {
                            let waiter = gate.lock().remove(&reply.id);
                            if let Some(waiter) = waiter {
                                let _ = waiter.send(Verdict::of(reply));
                            }
                        }
                    }
                    _ => break,
                }
            }
            tracing::error!("the manager's channel closed: every call is refused from now on");
            gate.closed.store(true, Ordering::SeqCst);
            gate.lock().clear();
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Verdict>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn send(&self, bytes: &[u8], fd: Option<RawFd>) -> io::Result<()> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let fds = fd.map(|fd| [fd]);
        self.fd
            .async_io(Interest::WRITABLE, |socket| {
                let rights = fds.as_ref().map(|fds| ControlMessage::ScmRights(fds));
                let cmsgs: &[ControlMessage] = match &rights {
                    Some(rights) => std::slice::from_ref(rights),
                    None => &[],
                };
                sendmsg::<()>(
                    socket.as_raw_fd(),
                    &[io::IoSlice::new(bytes)],
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            })
            .await
            .map(drop)
    }

    async fn ask(&self, request: impl FnOnce(u64) -> Vec<u8>, fd: Option<RawFd>) -> Verdict {
        let refused = |why: &str| {
            Verdict::Denied(format!(
                "this plugin cannot check its caller with the manager ({why}); the call is refused"
            ))
        };
        if self.closed.load(Ordering::SeqCst) {
            return refused("its channel is closed");
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, tx);
        if let Err(error) = self.send(&request(id), fd).await {
            self.lock().remove(&id);
            return refused(&error.to_string());
        }
        match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
            Ok(Ok(verdict)) => verdict,
            Ok(Err(_)) => refused("its channel closed"),
            Err(_) => {
                self.lock().remove(&id);
                refused("no answer in 5 s")
            }
        }
    }

    /// Who connected on `stream`, as the manager says.
    pub(crate) async fn hello(&self, stream: &UnixStream) -> Verdict {
        use nix::sys::socket::{getsockopt, sockopt::PeerPidfd};
        let pidfd = match getsockopt(stream, PeerPidfd) {
            Ok(pidfd) => pidfd,
            Err(error) => {
                return Verdict::Denied(format!(
                    "this plugin cannot read its caller's pidfd (SO_PEERPIDFD: {error}); \
                     the call is refused"
                ));
            }
        };
        let raw = pidfd.as_fd().as_raw_fd();
        let verdict = self
            .ask(|id| wire::Request::Hello { id }.encode(), Some(raw))
            .await;
        drop(pidfd);
        verdict
    }

    /// Whether the call of `method` on the connection `token` may run.
    async fn check(&self, token: u64, method: &str) -> Verdict {
        let mut method = method;
        // A path past the channel's bound cannot name any method a capability names.
        if method.len() > wire::MAX_MESSAGE - 17 {
            method = "/";
        }
        self.ask(
            |id| wire::Request::Check { id, token, method }.encode(),
            None,
        )
        .await
    }

    /// The connection `token` closed.
    fn forget(self: &Arc<Self>, token: u64) {
        let gate = self.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = gate
                    .send(&wire::Request::Forget { token }.encode(), None)
                    .await;
            });
        }
    }
}

/// What a connection's calls see of its caller, in their request extensions.
#[derive(Clone)]
pub(crate) struct DirectCaller {
    verdict: Arc<Verdict>,
    gate: Arc<Gate>,
}

/// A connection accepted under the channel, with the manager's word on its caller.
pub(crate) struct Checked {
    stream: UnixStream,
    caller: DirectCaller,
}

impl Checked {
    pub(crate) async fn accept(gate: Arc<Gate>, stream: UnixStream) -> Self {
        let verdict = gate.hello(&stream).await;
        Self {
            stream,
            caller: DirectCaller {
                verdict: Arc::new(verdict),
                gate,
            },
        }
    }
}

impl Drop for Checked {
    fn drop(&mut self) {
        if let Verdict::PerCall(token) = *self.caller.verdict {
            self.caller.gate.forget(token);
        }
    }
}

impl Connected for Checked {
    type ConnectInfo = DirectCaller;

    fn connect_info(&self) -> DirectCaller {
        self.caller.clone()
    }
}

impl AsyncRead for Checked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Checked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Refuses, before the handler runs, the calls the manager refuses on connections it checks
/// per call, and every call on a connection it refused. Connections accepted without the
/// channel (TCP, a plugin started by hand) carry no [`DirectCaller`] and pass.
#[derive(Clone, Copy, Default)]
pub(crate) struct GuardLayer;

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard { inner }
    }
}

/// See [`GuardLayer`].
#[derive(Clone)]
pub(crate) struct Guard<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> tower::Service<Request<Body>> for Guard<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let caller = request.extensions().get::<DirectCaller>().cloned();
        let verdict = caller.as_ref().map(|c| (*c.verdict).clone());
        match verdict {
            None | Some(Verdict::AllowAll | Verdict::Allowed) => Box::pin(self.inner.call(request)),
            Some(Verdict::PerCall(token)) => {
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let gate = caller.map(|c| c.gate).expect("set with the verdict");
                Box::pin(async move {
                    let answer = gate.check(token, request.uri().path()).await;
                    match answer.refusal() {
                        Some(status) => Ok(status.into_http()),
                        None => inner.call(request).await,
                    }
                })
            }
            Some(refused) => {
                let status = refused
                    .refusal()
                    .unwrap_or_else(|| Status::permission_denied("refused"));
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wire::*;

    #[test]
    fn requests_and_replies_round_trip_and_bad_bytes_are_refused() {
        for request in [
            Request::Hello { id: 7 },
            Request::Check {
                id: 8,
                token: 9,
                method: "/echo.v1.Echo/Echo",
            },
            Request::Forget { token: 10 },
        ] {
            assert_eq!(decode_request(&request.encode()), Ok(request.clone()));
        }
        assert!(decode_request(&[]).is_err());
        assert!(decode_request(&[HELLO, 1, 2]).is_err());
        assert!(decode_request(&[99; 9]).is_err());
        assert!(decode_request(&[CHECK; 16]).is_err());
        let mut bad_utf8 = Request::Check {
            id: 1,
            token: 2,
            method: "",
        }
        .encode();
        bad_utf8.push(0xff);
        assert!(decode_request(&bad_utf8).is_err());
        assert_eq!(id_of(&bad_utf8), Some(1));
        assert!(decode_request(&vec![CHECK; MAX_MESSAGE + 1]).is_err());
        let reply = Reply {
            id: 3,
            verdict: DENIED,
            token: 0,
            message: "é".repeat(MAX_MESSAGE),
        };
        let bytes = reply.encode();
        assert!(bytes.len() <= MAX_MESSAGE);
        let back = Reply::decode(&bytes).unwrap();
        assert_eq!((back.id, back.verdict), (3, DENIED));
        assert!(Reply::decode(&bytes[..10]).is_none());
    }
}
