//! HTTP/2 client connections that the calls waiting on them drive.
//!
//! hyper's client hands every request to its connection's task, and starts one more task per
//! request to send the body; the answer comes back the same way. On a multi-threaded runtime
//! each hand-off may wake another thread, and on a virtual machine a thread woken on an idle
//! core costs tens of microseconds (30 µs on the 2-core VM, see `docs/performance.md`).
//!
//! Here a call opens its stream, sends its body and reads its answer in its own task. The
//! connection still has a task of its own (it answers pings and settings, sends keepalive
//! pings, and reads for calls that sleep). A connection opened with a spin window (opt-in, see
//! [`crate::tuning`]) lets a call that would sleep first poll the connection itself for that
//! window when it is the only call in this process waiting for an answer: a quick answer then
//! arrives without any thread going to sleep; a slow one costs the window in CPU time, after
//! which the call sleeps as before.
//!
//! A call whose answer is dropped while its request is still being sent resets its stream
//! (`RST_STREAM CANCEL`), so the peer learns at once that nobody waits for it.

use std::{
    future::{Future, poll_fn},
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, TryLockError,
        atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Wake, Waker, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{FutureExt, task::AtomicWaker};
use h2::{
    Ping, PingPong, Reason, RecvStream, SendStream,
    client::{Connection, SendRequest},
};
use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{CONNECTION_WINDOW, Keepalive, Options, SendBody, WINDOW, spin_io::SpinIo};
use crate::tuning::{self, Awaiting};

/// Sends calls on one HTTP/2 connection. Clones share the connection.
#[derive(Clone)]
pub(crate) struct Sender {
    send: SendRequest<Bytes>,
    shared: Arc<Shared>,
}

/// Why a call failed, and whether it provably never left this process.
#[derive(Debug)]
pub(crate) struct SendError {
    pub(crate) error: h2::Error,
    /// The connection was closing and never sent the request: safe to send elsewhere.
    pub(crate) unsent: bool,
}

/// Opens HTTP/2 on `stream` and spawns the connection's own task, which sends keepalive pings
/// if `options` ask for them.
pub(crate) async fn handshake<S: Stream + 'static>(
    stream: S,
    options: &Options,
    keepalive: Option<Keepalive>,
) -> io::Result<Sender> {
    let stream: Box<dyn Stream> = Box::new(stream);
    let spinning = Arc::new(AtomicBool::new(false));
    let (send, mut connection) = h2::client::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .enable_push(false)
        .handshake(SpinIo::new(stream, spinning.clone()))
        .await
        .map_err(io::Error::other)?;
    let pinger = keepalive
        .filter(|k| !k.interval.is_zero())
        .and_then(|k| Some(Pinger::new(connection.ping_pong()?, k)));
    let driver = Arc::new(Driver::default());
    let shared = Arc::new(Shared {
        connection: Mutex::new(Some(connection)),
        state: AtomicU8::new(IDLE),
        waker: Waker::from(driver.clone()),
        driver,
        spinning,
        closed: AtomicBool::new(false),
        spin: tuning::effective(options.spin),
        open: AtomicUsize::new(0),
    });
    tokio::spawn(Drive {
        shared: shared.clone(),
        pinger,
    });
    Ok(Sender { send, shared })
}

impl Sender {
    /// Whether the connection has ended; a closed sender sends nothing.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }

    /// Sends `request` and waits for its answer's headers. The request body is sent from this
    /// task as far as it is ready at once (all of a unary one); the rest of a streaming body
    /// goes on in a task of its own, which resets the stream if the answer is dropped first.
    pub(crate) async fn send<B: SendBody>(
        &self,
        request: Request<B>,
    ) -> Result<Response<RecvBody>, SendError> {
        let mut send = self.send.clone();
        let unsent = |error| SendError {
            error,
            unsent: true,
        };
        // A fresh handle is ready at once unless the connection failed.
        poll_fn(|cx| send.poll_ready(cx)).await.map_err(unsent)?;
        let (head, body) = request.into_parts();
        let end = body.is_end_stream();
        let (mut response, stream) = send
            .send_request(Request::from_parts(head, ()), end)
            .map_err(|error| SendError {
                // A closing connection refuses new streams; malformed headers would fail
                // anywhere.
                unsent: error.is_go_away() || error.is_io(),
                error,
            })?;
        let open = Open::enter(&self.shared);
        let mut cancel = None;
        if !end {
            let mut pipe = Pipe {
                body,
                stream,
                unchecked: 0,
                cancel: None,
            };
            // A unary body is all there: send it now, not from another task.
            if (&mut pipe).now_or_never().is_none() {
                let signal = Arc::new(CancelSignal::default());
                pipe.cancel = Some(signal.clone());
                cancel = Some(CancelOnDrop(signal));
                tokio::spawn(pipe);
            }
        }
        let awaiting = Awaiting::enter();
        let window = self.shared.spin;
        // Spin only within the window from the first wait, however often this is polled.
        let mut spin_until = None;
        let answer = poll_fn(|cx| {
            let until = (!window.is_zero())
                .then(|| *spin_until.get_or_insert_with(|| Instant::now() + window))
                .filter(|_| awaiting.alone());
            self.shared
                .poll_driving(cx, until, |cx| Pin::new(&mut response).poll(cx))
        })
        .await;
        drop(awaiting);
        match answer {
            Ok(response) => Ok(response.map(|stream| RecvBody {
                stream,
                spin_until: (!window.is_zero()).then(|| Instant::now() + window),
                data_done: false,
                open,
                _cancel: cancel,
            })),
            Err(error) => Err(SendError {
                error,
                unsent: false,
            }),
        }
    }
}

/// Counts a call as open on its connection until its answer is dropped: keepalive pings go
/// only on connections with calls to fail, as gRPC clients do (servers may count pings on
/// idle connections as abuse).
struct Open(Arc<Shared>);

impl Open {
    fn enter(shared: &Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::Relaxed);
        Self(shared.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Tells a call's body task that nobody waits for the answer any more.
#[derive(Default)]
struct CancelSignal {
    cancelled: AtomicBool,
    waker: AtomicWaker,
}

impl CancelSignal {
    /// Whether the answer was dropped; registers `cx` to hear of it otherwise. The waker is
    /// registered before the flag is read, and the flag set before the waker is woken, so a
    /// drop between the two is never missed (`AtomicWaker`'s protocol).
    fn poll_cancelled(&self, cx: &mut Context<'_>) -> bool {
        self.waker.register(cx.waker());
        self.cancelled.load(Ordering::Acquire)
    }
}

/// Held with a call's answer: dropping it (the answer dropped, or the call given up before its
/// headers came) has the body task reset the stream.
struct CancelOnDrop(Arc<CancelSignal>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancelled.store(true, Ordering::Release);
        self.0.waker.wake();
    }
}

/// Nobody polls the connection.
const IDLE: u8 = 0;
/// Someone (the connection's task or a spinning call) polls it.
const POLLING: u8 = 1;
/// A spinning call polls it, and the connection's task was woken meanwhile: the call wakes the
/// task again when it lets go.
const POLLING_WANTED: u8 = 2;

/// The connection and who polls it.
struct Shared {
    /// `None` once the connection has ended. Locked only by whoever claimed `state` (and by
    /// the connection task's drop), so the lock is never contended on a call's path.
    connection: Mutex<Option<H2Connection>>,
    /// Who polls the connection ([`IDLE`], [`POLLING`], [`POLLING_WANTED`]); see
    /// [`Shared::claim`] for why one atomic is enough.
    state: AtomicU8,
    /// Wakes the connection's task; every poll of the connection registers this waker, so the
    /// task hears of whatever the connection waits for, whoever polled it.
    waker: Waker,
    driver: Arc<Driver>,
    /// Set while a spinning call polls the connection (reads go to the kernel directly).
    spinning: Arc<AtomicBool>,
    closed: AtomicBool,
    /// How long a lone call polls the connection before it sleeps; zero: never.
    spin: Duration,
    /// Calls open on the connection (sent, answer not yet dropped).
    open: AtomicUsize,
}

/// h2's half of a connection: it reads and writes the socket.
type H2Connection = Connection<SpinIo<Box<dyn Stream>>, Bytes>;

/// The byte streams a connection runs on: sockets, and a custom transport's streams.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {
    /// The socket, which a spinning caller reads directly (`spin_io`); `None` for a stream
    /// that is no socket (it is then read only as Tokio wakes it).
    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>>;
}

impl Stream for tokio::net::UnixStream {
    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(self))
    }
}

impl Stream for tokio::net::TcpStream {
    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(self))
    }
}

impl Stream for dyn super::Connection {
    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

impl<S: Stream + ?Sized> Stream for Box<S> {
    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        (**self).socket()
    }
}

/// The connection's task, as a waker.
#[derive(Default)]
struct Driver {
    waker: AtomicWaker,
}

impl Wake for Driver {
    fn wake(self: Arc<Self>) {
        self.waker.wake();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.waker.wake();
    }
}

/// The connection's own task: polls it whenever woken, until it ends, and sends keepalive pings.
struct Drive {
    shared: Arc<Shared>,
    pinger: Option<Pinger>,
}

impl Drop for Drive {
    /// Ended, or dropped with its runtime: close the connection, so that calls waiting on it
    /// fail (h2 fails its streams) rather than wait for a task that is gone, and the next
    /// call opens a new one.
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl Future for Drive {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.shared.driver.waker.register(cx.waker());
        let open = self.shared.open.load(Ordering::Relaxed) > 0;
        if let Some(pinger) = &mut self.pinger
            && pinger.poll_dead(cx, open)
        {
            tracing::debug!(
                timeout = ?pinger.keepalive.timeout,
                "no answer to a keepalive ping: closing the connection"
            );
            // Dropping it fails its calls (h2 fails every open stream).
            self.shared.close();
            return Poll::Ready(());
        }
        self.shared.poll_connection(true, false)
    }
}

/// Keepalive pings on one connection: one every `interval` while calls are open, and the
/// connection is given up if its answer takes longer than `timeout`.
struct Pinger {
    ping_pong: PingPong,
    keepalive: Keepalive,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// A ping is out, unanswered.
    waiting: bool,
}

impl Pinger {
    fn new(ping_pong: PingPong, keepalive: Keepalive) -> Self {
        Self {
            ping_pong,
            keepalive,
            timer: Box::pin(tokio::time::sleep(keepalive.interval)),
            waiting: false,
        }
    }

    /// Whether the peer failed to answer a ping in time; registers `cx` for the next step.
    fn poll_dead(&mut self, cx: &mut Context<'_>, open: bool) -> bool {
        loop {
            if self.waiting {
                match self.ping_pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => self.waiting = false,
                    // The connection is closing: its own poll reports how.
                    Poll::Ready(Err(_)) => return false,
                    Poll::Pending => return self.timer.as_mut().poll(cx).is_ready(),
                }
                self.rearm(self.keepalive.interval);
                continue;
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if !open {
                // Nothing to fail: look again after another interval.
                self.rearm(self.keepalive.interval);
                continue;
            }
            if self.ping_pong.send_ping(Ping::opaque()).is_err() {
                return false;
            }
            self.waiting = true;
            self.rearm(self.keepalive.timeout);
        }
    }

    fn rearm(&mut self, after: Duration) {
        let at = tokio::time::Instant::now() + after;
        self.timer.as_mut().reset(at);
    }
}

/// The right to poll the connection, released when dropped (even by a panic in h2).
struct Claim<'a> {
    shared: &'a Shared,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        // Release: what this poll did to the connection happens before the next claimer's
        // Acquire. The swap reads the newest state (see `Shared::claim`).
        if self.shared.state.swap(IDLE, Ordering::AcqRel) == POLLING_WANTED {
            self.shared.driver.waker.wake();
        }
    }
}

impl Shared {
    /// Claims the right to poll the connection, or, for the connection's task (`driver`)
    /// finding a call polling it, asks that call to wake the task when it lets go.
    ///
    /// Why no wake-up is lost: the task's `POLLING → POLLING_WANTED` and the call's release
    /// (`swap(IDLE)` in [`Claim`]'s drop) are read-modify-writes of the same atomic, and the
    /// memory model puts all writes to one atomic in a single modification order in which
    /// every read-modify-write reads the value just before its own. So either the task's
    /// compare-exchange comes first, and the release reads `POLLING_WANTED` and wakes the task;
    /// or the release comes first, and the task's compare-exchange fails, reads `IDLE`, and the
    /// task claims the connection itself. No ordering between two different locations is
    /// relied on (the old `try_lock` plus a separate `wanted` flag needed one that `Release`
    /// and `Acquire` do not promise).
    fn claim(&self, driver: bool) -> Option<Claim<'_>> {
        let mut current = self.state.load(Ordering::Relaxed);
        loop {
            let next = match current {
                IDLE => POLLING,
                POLLING if driver => POLLING_WANTED,
                _ => return None,
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) if next == POLLING => return Some(Claim { shared: self }),
                Ok(_) => return None,
                Err(actual) => current = actual,
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<H2Connection>> {
        self.connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops the connection (h2 fails its open streams) and marks it closed.
    fn close(&self) {
        *self.lock() = None;
        self.closed.store(true, Ordering::Relaxed);
    }

    /// Polls the connection once, unless someone else is; `Ready` once it has ended.
    fn poll_connection(&self, driver: bool, spinning: bool) -> Poll<()> {
        let Some(claim) = self.claim(driver) else {
            return Poll::Pending;
        };
        let mut guard = match self.connection.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // Only the connection task's drop locks without a claim: it is closing it.
            Err(TryLockError::WouldBlock) => return Poll::Pending,
        };
        let Some(connection) = guard.as_mut() else {
            return Poll::Ready(());
        };
        self.spinning.store(spinning, Ordering::Relaxed);
        let polled = Pin::new(connection).poll(&mut Context::from_waker(&self.waker));
        self.spinning.store(false, Ordering::Relaxed);
        match polled {
            Poll::Ready(result) => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection closed");
                }
                *guard = None;
                self.closed.store(true, Ordering::Relaxed);
                drop(guard);
                drop(claim);
                // Let the connection's task see the end and finish.
                if !driver {
                    self.driver.waker.wake();
                }
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Polls `target` (a stream's answer or body) with `cx`. When it is not ready, polls the
    /// connection from this task until it is, or until `spin_until` if any.
    fn poll_driving<T>(
        &self,
        cx: &mut Context<'_>,
        spin_until: Option<Instant>,
        mut target: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        // A runtime that lingers polls while idle, without holding up its other tasks.
        let Some(until) = spin_until.filter(|_| !tuning::lingers_here()) else {
            return target(cx);
        };
        if Instant::now() >= until {
            return target(cx);
        }
        // While spinning, the stream's waker is a no-op: the connection, polled here, would
        // otherwise wake this very task, which would then be polled again for nothing.
        let mut quiet = Context::from_waker(Waker::noop());
        if let Poll::Ready(value) = target(&mut quiet) {
            return Poll::Ready(value);
        }
        let switches = tuning::involuntary_switches();
        loop {
            let ended = self.poll_connection(false, true).is_ready();
            if let Poll::Ready(value) = target(&mut quiet) {
                return Poll::Ready(value);
            }
            if ended || Instant::now() >= until {
                break;
            }
            // Let a thread waiting for this core run: on a small machine, the very instance
            // (or router) this call waits for. On the 2-core VM it halves the p99 of a call
            // through the router (105–130 µs against 217–243 in 6 runs each) for 1–3 µs of
            // median on a direct call.
            std::thread::yield_now();
            // Another thread did run on this core: it needs the core more than this spin
            // does (often the very peer this call waits for), so sleep. On the 2-core VM this
            // took the slow rounds of calls through the router from ~90 µs to 62–85 and their
            // p99 from 137–498 µs to 116–167 (5 runs each), the direct call unchanged.
            if tuning::involuntary_switches() != switches {
                break;
            }
        }
        // Sleep: register the real waker.
        target(cx)
    }
}

/// Sends a request body on its stream, as fast as the peer's flow control lets it.
struct Pipe<B> {
    body: B,
    stream: SendStream<Bytes>,
    /// Bytes handed to h2 without waiting for flow-control capacity; see [`UNCHECKED`].
    unchecked: usize,
    /// Set once the pipe runs in a task of its own: tells it the answer was dropped.
    cancel: Option<Arc<CancelSignal>>,
}

/// How much of a body is sent before waiting for flow-control capacity. A new stream has none
/// until the connection is next polled (h2 opens streams there); without this allowance a
/// unary request would wait for another task to poll the connection before it could be sent.
/// It bounds what h2 buffers beyond the peer's window, as hyper's one-chunk allowance does.
const UNCHECKED: usize = 64 * 1024;

impl<B: SendBody> Future for Pipe<B> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            // The instance reset the stream (it answered early, or went away): stop.
            if this.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            // Nobody waits for the answer: tell the peer to stop, rather than keep a stream
            // open that only the caller's request body still holds.
            if let Some(cancel) = &this.cancel
                && cancel.poll_cancelled(cx)
            {
                this.stream.send_reset(Reason::CANCEL);
                return Poll::Ready(());
            }
            // Past the allowance, read no more from the caller than the peer has room for.
            if this.unchecked >= UNCHECKED {
                this.stream.reserve_capacity(1);
                if this.stream.capacity() == 0 {
                    match ready!(this.stream.poll_capacity(cx)) {
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => return Poll::Ready(()),
                    }
                }
                this.unchecked = 0;
            }
            let frame = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    tracing::debug!(error = %B::box_error(error), "request body failed");
                    this.stream.send_reset(Reason::CANCEL);
                    return Poll::Ready(());
                }
                None => {
                    let _ = this.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    this.unchecked += data.len();
                    let end = this.body.is_end_stream();
                    // An empty DATA frame that does not end the stream says nothing, and h2
                    // servers close connections that receive more than 100 of them.
                    if data.is_empty() && !end {
                        continue;
                    }
                    if this.stream.send_data(data, end).is_err() || end {
                        return Poll::Ready(());
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = this.stream.send_trailers(trailers);
                    }
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// The body of an answer: its messages, then its trailers.
pub(crate) struct RecvBody {
    stream: RecvStream,
    /// The spin window from the headers' arrival, if the connection spins: a body that
    /// follows within it is part of the same answer (a unary message and its trailers); one
    /// that does not is a stream, waited for asleep.
    spin_until: Option<Instant>,
    data_done: bool,
    /// Counts the call as open on its connection, and holds the connection.
    open: Open,
    /// Resets the stream when the answer is dropped while the request is still being sent.
    _cancel: Option<CancelOnDrop>,
}

impl RecvBody {
    fn spin_until(&self) -> Option<Instant> {
        self.spin_until.filter(|_| Awaiting::none())
    }
}

impl std::fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBody").finish_non_exhaustive()
    }
}

impl HttpBody for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        let spin = this.spin_until();
        if !this.data_done {
            let stream = &mut this.stream;
            match ready!(
                this.open
                    .0
                    .poll_driving(cx, spin, |cx| stream.poll_data(cx))
            ) {
                Some(Ok(data)) => {
                    // Reading it frees as much of the window for the instance to send more.
                    let _ = stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.data_done = true,
            }
        }
        let stream = &mut this.stream;
        let trailers: Option<HeaderMap> = ready!(
            this.open
                .0
                .poll_driving(cx, spin, |cx| stream.poll_trailers(cx))
        )?;
        Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio::net::{UnixListener, UnixStream};

    use super::*;

    /// An HTTP/2 server on `path` that answers each request with its body and a trailer
    /// counting its bytes; it hangs up on a request to `/hang-up`.
    fn serve_echo(path: &Path) {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut connection = h2::server::handshake(socket).await.unwrap();
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        if request.uri().path() == "/hang-up" {
                            return;
                        }
                        tokio::spawn(async move {
                            let mut body = request.into_body();
                            let mut received = Vec::new();
                            while let Some(chunk) = body.data().await {
                                let chunk = chunk.unwrap();
                                let _ = body.flow_control().release_capacity(chunk.len());
                                received.extend_from_slice(&chunk);
                            }
                            let mut send = respond.send_response(Response::new(()), false).unwrap();
                            let mut trailers = HeaderMap::new();
                            trailers.insert("x-bytes", received.len().into());
                            send.send_data(received.into(), false).unwrap();
                            send.send_trailers(trailers).unwrap();
                        });
                    }
                });
            }
        });
    }

    /// Fails a test that hangs (a lost wake-up) instead of hanging the test run.
    async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), future)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within 30 s"))
    }

    async fn connect(path: &Path) -> Sender {
        handshake(
            UnixStream::connect(path).await.unwrap(),
            &Options::default(),
            None,
        )
        .await
        .unwrap()
    }

    /// A connection whose lone calls spin on their answers (the hand-off under test).
    async fn connect_spinning(path: &Path) -> Sender {
        let options = Options {
            spin: Duration::from_micros(100),
            ..Options::default()
        };
        handshake(UnixStream::connect(path).await.unwrap(), &options, None)
            .await
            .unwrap()
    }

    /// Sends `body` to `path` on `sender`; the answer's body and its `x-bytes` trailer.
    async fn call<B: SendBody>(sender: &Sender, uri: &str, body: B) -> (Bytes, usize) {
        let request = Request::post(uri).body(body).unwrap();
        let answer = async {
            let response = sender.send(request).await.unwrap();
            response.into_body().collect().await.unwrap()
        };
        let collected = within(uri, answer).await;
        let bytes = collected.trailers().unwrap()["x-bytes"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        (collected.to_bytes(), bytes)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_alone_and_together_share_one_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo.sock");
        serve_echo(&path);
        let sender = connect_spinning(&path).await;

        // One at a time: each call is alone, and drives the connection itself.
        for n in 0..200 {
            let message = Bytes::from(format!("call {n}"));
            let (answer, bytes) = call(&sender, "http://t/alone", Full::new(message.clone())).await;
            assert_eq!((answer, bytes), (message.clone(), message.len()));
        }
        // Many at once from several tasks: whoever polls the connection, every call is
        // answered (a lost wake-up would hang one).
        let tasks: Vec<_> = (0..32)
            .map(|task| {
                let sender = sender.clone();
                tokio::spawn(async move {
                    for n in 0..50 {
                        let message = Bytes::from(format!("task {task} call {n}"));
                        let (answer, _) =
                            call(&sender, "http://t/together", Full::new(message.clone())).await;
                        assert_eq!(answer, message);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert!(!sender.is_closed());
    }

    /// An HTTP/2 server on `path` that answers each request's headers at once (when `answer`)
    /// or never, then reports how the request's stream ended: `Ok` for a clean end, the
    /// reset's reason otherwise.
    fn serve_until_reset(
        path: &Path,
        answer: bool,
    ) -> tokio::sync::mpsc::UnboundedReceiver<Result<(), Option<Reason>>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut connection = h2::server::handshake(socket).await.unwrap();
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _send = answer.then(|| respond.send_response(Response::new(()), false));
                    let mut body = request.into_body();
                    let ended = loop {
                        match body.data().await {
                            Some(Ok(chunk)) => {
                                let _ = body.flow_control().release_capacity(chunk.len());
                            }
                            Some(Err(error)) => break Err(error.reason()),
                            None => break Ok(()),
                        }
                    };
                    let _ = tx.send(ended);
                });
            }
        });
        rx
    }

    /// A request body that sends one chunk and then stays open until `rx`'s sender is dropped.
    fn open_body(rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>) -> impl SendBody {
        let first = futures_util::stream::iter([Bytes::from_static(b"first")]);
        let rest = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let frames =
            futures_util::StreamExt::map(futures_util::StreamExt::chain(first, rest), |b| {
                Ok::<_, std::convert::Infallible>(Frame::data(b))
            });
        StreamBody::new(frames)
    }

    #[tokio::test]
    async fn dropping_an_answer_while_the_request_streams_resets_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reset.sock");
        let mut ended = serve_until_reset(&path, true);
        let sender = connect(&path).await;
        let (more, rx) = tokio::sync::mpsc::unbounded_channel();
        let request = Request::post("http://t/chat").body(open_body(rx)).unwrap();
        let response = within("headers", sender.send(request)).await.unwrap();
        // The caller gives up on the answer but still holds its request stream open.
        drop(response);
        let outcome = within("the reset", ended.recv()).await.unwrap();
        assert_eq!(outcome, Err(Some(Reason::CANCEL)));
        drop(more);
        assert!(
            !sender.is_closed(),
            "a reset ends the stream, not the connection"
        );
    }

    #[tokio::test]
    async fn giving_up_before_the_answer_came_resets_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reset.sock");
        let mut ended = serve_until_reset(&path, false);
        let sender = connect(&path).await;
        let (_more, rx) = tokio::sync::mpsc::unbounded_channel();
        let request = Request::post("http://t/chat").body(open_body(rx)).unwrap();
        // No answer comes: the caller's deadline drops the call while it waits for headers.
        let waited = tokio::time::timeout(Duration::from_millis(50), sender.send(request)).await;
        assert!(waited.is_err(), "the server never answers");
        let outcome = within("the reset", ended.recv()).await.unwrap();
        assert_eq!(outcome, Err(Some(Reason::CANCEL)));
    }

    #[tokio::test]
    async fn a_peer_that_stops_answering_fails_calls_within_the_keepalive_bound() {
        // A TCP peer that accepts and then never reads nor writes: a half-open connection as
        // the client sees it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
            drop(socket);
        });
        let keepalive = Keepalive {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(200),
        };
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let sender = handshake(stream, &Options::default(), Some(keepalive))
            .await
            .unwrap();
        let request = Request::post("http://t/x")
            .body(Full::new(Bytes::from_static(b"anyone?")))
            .unwrap();
        let started = Instant::now();
        let error = within("the keepalive", sender.send(request))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(!error.unsent, "it was sent: {error:?}");
        // interval + timeout, and some slack for a loaded machine.
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert!(sender.is_closed());
        silent.abort();
    }

    #[tokio::test]
    async fn a_peer_that_answers_pings_keeps_its_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo.sock");
        serve_echo(&path);
        let keepalive = Keepalive {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(2000),
        };
        let stream = UnixStream::connect(&path).await.unwrap();
        let sender = handshake(stream, &Options::default(), Some(keepalive))
            .await
            .unwrap();
        // A call open across several pings: each is answered, the connection stays.
        let (more, rx) = tokio::sync::mpsc::unbounded_channel();
        let request = Request::post("http://t/slow").body(open_body(rx)).unwrap();
        let call = tokio::spawn({
            let sender = sender.clone();
            async move { sender.send(request).await.map(|r| r.into_body()) }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!sender.is_closed(), "pings were answered");
        drop(more);
        let body = within("the answer", call).await.unwrap().unwrap();
        let collected = within("the body", body.collect()).await.unwrap();
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"first"));
    }

    #[tokio::test]
    async fn a_streamed_body_beyond_the_window_is_sent_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo.sock");
        serve_echo(&path);
        let sender = connect(&path).await;

        // 4 MiB in 64 KiB chunks: past the unchecked allowance and the 1 MiB stream window,
        // so the rest is sent as the server reads.
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..64u8)
            .map(|n| Ok(Frame::data(Bytes::from(vec![n; 64 * 1024]))))
            .collect();
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        let (answer, bytes) = call(&sender, "http://t/big", body).await;
        assert_eq!(bytes, 4 << 20);
        assert_eq!(answer.len(), 4 << 20);
        assert!(
            answer
                .chunks(64 * 1024)
                .enumerate()
                .all(|(n, c)| c.iter().all(|&b| b == n as u8))
        );
    }

    #[tokio::test]
    async fn a_connection_whose_runtime_is_gone_fails_its_calls_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo.sock");
        serve_echo(&path);
        // Connected on a runtime that then shuts down, taking the connection's task with it.
        let sender = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async { connect(&path).await })
            }
        })
        .await
        .unwrap();
        assert!(sender.is_closed());
        let request = Request::post("http://t/x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let error = within("orphan", sender.send(request)).await.unwrap_err();
        assert!(error.unsent, "{error:?}");
    }

    #[tokio::test]
    async fn a_connection_the_peer_closed_sends_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo.sock");
        serve_echo(&path);
        let sender = connect(&path).await;
        let request = Request::post("http://t/hang-up")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let error = within("hang-up", sender.send(request)).await.unwrap_err();
        assert!(!error.unsent, "it was sent: {error:?}");

        let deadline = Instant::now() + Duration::from_secs(5);
        while !sender.is_closed() {
            assert!(Instant::now() < deadline, "the connection never closed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let request = Request::post("http://t/again")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let error = within("again", sender.send(request)).await.unwrap_err();
        assert!(error.unsent, "a closed connection sends nothing: {error:?}");
    }
}
