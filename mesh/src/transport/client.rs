//! HTTP/2 client connections that the calls waiting on them drive.
//!
//! hyper's client hands every request to its connection's task, and starts one more task per
//! request to send the body; the answer comes back the same way. On a multi-threaded runtime
//! each hand-off may wake another thread, and on a virtual machine a thread woken on an idle
//! core costs tens of microseconds (30 µs on the 2-core VM, see `docs/performance.md`).
//!
//! Here a call opens its stream, sends its body and reads its answer in its own task. The
//! connection still has a task of its own (it answers pings and settings, and reads for calls
//! that sleep), but a call that would sleep first polls the connection itself for a short
//! while — [`spin`](crate::runtime::set_spin), 100 µs by default — when it is the only call in
//! this process waiting for an answer. A quick answer then arrives without any thread going to
//! sleep; a slow one costs the window in CPU time, after which the call sleeps as before.
//! Calls that wait alongside others never spin: they are not idle, and would only hold up each
//! other.

use std::{
    future::{Future, poll_fn},
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, TryLockError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Wake, Waker, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{FutureExt, task::AtomicWaker};
use h2::{
    Reason, RecvStream, SendStream,
    client::{Connection, SendRequest},
};
use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{CONNECTION_WINDOW, SendBody, WINDOW, spin_io::SpinIo};

/// Environment variable: how long, in microseconds, a lone call polls its connection before it
/// sleeps (`0` turns spinning off). See [`crate::runtime::set_spin`].
pub const MESH_SPIN_US: &str = "MESH_SPIN_US";

/// The spin window when [`MESH_SPIN_US`] is not set, on two cores or more.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(100);

/// The spin window in nanoseconds; `u64::MAX` until it is first read or set.
static SPIN_NANOS: AtomicU64 = AtomicU64::new(u64::MAX);

/// Calls in this process that have sent their request and wait for their answer's headers.
static AWAITING: AtomicUsize = AtomicUsize::new(0);

/// [`DEFAULT_SPIN`], or none on one core.
fn default_spin() -> Duration {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        Duration::ZERO
    } else {
        DEFAULT_SPIN
    }
}

/// Sets how long a call that is the only one waiting in this process polls its connection
/// before it sleeps; zero turns spinning off. Overrides [`MESH_SPIN_US`].
pub fn set_spin(window: Duration) {
    SPIN_NANOS.store(
        window.as_nanos().min(u128::from(u64::MAX - 1)) as u64,
        Ordering::Relaxed,
    );
}

/// The spin window: [`set_spin`]'s, else [`MESH_SPIN_US`]'s, else [`DEFAULT_SPIN`] — or none
/// on a machine (or a CPU quota) of one core, where a spinning caller would only keep the
/// instance it waits for off the CPU.
pub fn spin() -> Duration {
    let nanos = SPIN_NANOS.load(Ordering::Relaxed);
    if nanos != u64::MAX {
        return Duration::from_nanos(nanos);
    }
    let window = spin_from_env();
    set_spin(window);
    window
}

/// The spin window [`MESH_SPIN_US`] asks for, else [`DEFAULT_SPIN`] (none on one core),
/// whatever [`set_spin`] said since.
pub fn spin_from_env() -> Duration {
    let from_env = std::env::var(MESH_SPIN_US)
        .ok()
        .filter(|text| !text.trim().is_empty());
    match from_env
        .as_deref()
        .map(|text| (text, text.trim().parse::<u64>()))
    {
        Some((_, Ok(micros))) => Duration::from_micros(micros),
        Some((text, Err(_))) => {
            let window = default_spin();
            tracing::warn!(
                "{MESH_SPIN_US}={text:?} is not a number of microseconds; using {window:?}"
            );
            window
        }
        None => default_spin(),
    }
}

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

/// Opens HTTP/2 on `stream` and spawns the connection's own task.
pub(crate) async fn handshake<S: Stream + 'static>(stream: S) -> io::Result<Sender> {
    let stream: Box<dyn Stream> = Box::new(stream);
    let spinning = Arc::new(AtomicBool::new(false));
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .enable_push(false)
        .handshake(SpinIo::new(stream, spinning.clone()))
        .await
        .map_err(io::Error::other)?;
    let driver = Arc::new(Driver::default());
    let shared = Arc::new(Shared {
        connection: Mutex::new(Some(connection)),
        waker: Waker::from(driver.clone()),
        driver,
        spinning,
        closed: AtomicBool::new(false),
    });
    tokio::spawn(Drive(shared.clone()));
    Ok(Sender { send, shared })
}

impl Sender {
    /// Whether the connection has ended; a closed sender sends nothing.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }

    /// Sends `request` and waits for its answer's headers. The request body is sent from this
    /// task as far as it is ready at once (all of a unary one); the rest of a streaming body
    /// goes on in a task of its own.
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
        if !end {
            let mut pipe = Pipe {
                body,
                stream,
                unchecked: 0,
            };
            // A unary body is all there: send it now, not from another task.
            if (&mut pipe).now_or_never().is_none() {
                tokio::spawn(pipe);
            }
        }
        let awaiting = Awaiting::enter();
        // Spin only within the window from the first wait, however often this is polled.
        let mut spin_until = None;
        let answer = poll_fn(|cx| {
            let until = *spin_until.get_or_insert_with(|| Instant::now() + spin());
            let until = awaiting.alone().then_some(until);
            self.shared
                .poll_driving(cx, until, |cx| Pin::new(&mut response).poll(cx))
        })
        .await;
        drop(awaiting);
        match answer {
            Ok(response) => Ok(response.map(|stream| RecvBody {
                stream,
                shared: self.shared.clone(),
                spin_until: Instant::now() + spin(),
                data_done: false,
            })),
            Err(error) => Err(SendError {
                error,
                unsent: false,
            }),
        }
    }
}

/// Counts a call among those waiting for their answer's headers in this process.
struct Awaiting;

impl Awaiting {
    fn enter() -> Self {
        AWAITING.fetch_add(1, Ordering::Relaxed);
        Self
    }

    /// Whether this is the only call waiting.
    fn alone(&self) -> bool {
        AWAITING.load(Ordering::Relaxed) == 1
    }
}

impl Drop for Awaiting {
    fn drop(&mut self) {
        AWAITING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection and who polls it.
struct Shared {
    /// `None` once the connection has ended. Whoever holds the lock polls it: the connection's
    /// task, or a spinning call.
    connection: Mutex<Option<H2Connection>>,
    /// Wakes the connection's task; every poll of the connection registers this waker, so the
    /// task hears of whatever the connection waits for, whoever polled it.
    waker: Waker,
    driver: Arc<Driver>,
    /// Set while a spinning call polls the connection (reads go to the kernel directly).
    spinning: Arc<AtomicBool>,
    closed: AtomicBool,
}

/// h2's half of a connection: it reads and writes the socket.
type H2Connection = Connection<SpinIo<Box<dyn Stream>>, Bytes>;

/// The socket types a connection runs on.
pub(crate) trait Stream: AsyncRead + AsyncWrite + std::os::fd::AsFd + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + std::os::fd::AsFd + Unpin + Send> Stream for S {}

/// The connection's task, as a waker.
#[derive(Default)]
struct Driver {
    waker: AtomicWaker,
    /// The task was woken while a call held the connection: poll again once it lets go.
    wanted: AtomicBool,
}

impl Wake for Driver {
    fn wake(self: Arc<Self>) {
        self.waker.wake();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.waker.wake();
    }
}

/// The connection's own task: polls it whenever woken, until it ends.
struct Drive(Arc<Shared>);

impl Drop for Drive {
    /// Ended, or dropped with its runtime: close the connection, so that calls waiting on it
    /// fail (h2 fails its streams) rather than wait for a task that is gone, and the next
    /// call opens a new one.
    fn drop(&mut self) {
        let mut connection = match self.0.connection.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *connection = None;
        self.0.closed.store(true, Ordering::Relaxed);
    }
}

impl Future for Drive {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.driver.waker.register(cx.waker());
        self.0.poll_connection(true, false)
    }
}

impl Shared {
    /// Polls the connection once, unless someone else is; `Ready` once it has ended.
    fn poll_connection(&self, driver: bool, spinning: bool) -> Poll<()> {
        let mut guard = match self.connection.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) if driver => {
                // A spinning call holds it: ask it to wake this task when it lets go, then
                // check that it has not let go already.
                self.driver.wanted.store(true, Ordering::SeqCst);
                match self.connection.try_lock() {
                    Ok(guard) => {
                        self.driver.wanted.store(false, Ordering::SeqCst);
                        guard
                    }
                    Err(_) => return Poll::Pending,
                }
            }
            Err(TryLockError::WouldBlock) => return Poll::Pending,
        };
        let Some(connection) = guard.as_mut() else {
            return Poll::Ready(());
        };
        self.spinning.store(spinning, Ordering::Relaxed);
        let polled = Pin::new(connection).poll(&mut Context::from_waker(&self.waker));
        self.spinning.store(false, Ordering::Relaxed);
        let ended = match polled {
            Poll::Ready(result) => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection closed");
                }
                *guard = None;
                self.closed.store(true, Ordering::Relaxed);
                // Let the connection's task see the end and finish.
                if !driver {
                    self.driver.waker.wake();
                }
                true
            }
            Poll::Pending => false,
        };
        drop(guard);
        if !driver && self.driver.wanted.swap(false, Ordering::SeqCst) {
            self.driver.waker.wake();
        }
        if ended {
            Poll::Ready(())
        } else {
            Poll::Pending
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
        let Some(until) = spin_until.filter(|_| !crate::runtime::lingers_here()) else {
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
        let switches = involuntary_switches();
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
            if involuntary_switches() != switches {
                break;
            }
        }
        // Sleep: register the real waker.
        target(cx)
    }
}

/// How many times this thread has been switched out while runnable (Linux counts a
/// `sched_yield` that let another thread run as one).
fn involuntary_switches() -> i64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD)
        .map_or(0, |usage| usage.involuntary_context_switches())
}

/// Sends a request body on its stream, as fast as the peer's flow control lets it.
struct Pipe<B> {
    body: B,
    stream: SendStream<Bytes>,
    /// Bytes handed to h2 without waiting for flow-control capacity; see [`UNCHECKED`].
    unchecked: usize,
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
    shared: Arc<Shared>,
    /// The spin window from the headers' arrival: a body that follows within it is part of
    /// the same answer (a unary message and its trailers); one that does not is a stream,
    /// waited for asleep.
    spin_until: Instant,
    data_done: bool,
}

impl RecvBody {
    fn spin_until(&self) -> Option<Instant> {
        (AWAITING.load(Ordering::Relaxed) == 0).then_some(self.spin_until)
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
                this.shared
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
            this.shared
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
        handshake(UnixStream::connect(path).await.unwrap())
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
        let sender = connect(&path).await;

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
