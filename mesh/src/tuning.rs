//! Every latency knob of the mesh in one place: spinning, lingering and busy polling.
//!
//! On a small machine a call's latency is decided by thread wake-ups: a thread woken on an idle
//! core costs about 30 µs on the 2-core VM (`docs/performance-analysis.md`), more than the
//! call's own work. Each knob below trades CPU time for fewer wake-ups. A library must not
//! burn its caller's CPU unasked, so only the router lingers by default; everything else is
//! opt-in.
//!
//! | knob | who sets it | default | what it does | what it costs |
//! |---|---|---|---|---|
//! | client spin | an application: [`Connector::spin`](crate::Connector::spin), or [`MESH_SPIN_US`] in its environment | **off** | a call that is the only one waiting in its process polls its connection for the window before it sleeps, reading the socket directly while Tokio's poller sleeps | up to the window in CPU per call, at low load only; on the 2-core VM +52 % client CPU per call for about 1 µs of median direct, more on routed calls |
//! | router linger | the operator: `[mesh] spin` in the config (else [`MESH_SPIN_US`]), applied with [`set_linger`] | [`DEFAULT_SPIN`] (100 µs) on two cores or more, none on one | a router worker routing one call at a time keeps polling its sockets for the window after each call, so the plugin's answer and the client's next call find it awake | at most the window in CPU per call, only at low load; an idle router sleeps |
//! | busy polling | the operator: `[mesh] busy_poll = true` for router workers; `MESH_BUSY_POLL=1` in a plugin's `env` for SDK plugins ([`busy_poll_from_env`]) | off | the runtime never sleeps ([`busy_poll`]) | one core per worker or plugin, all the time |
//!
//! Rules that hold whatever the settings:
//!
//! - **Only a call alone spins.** A call spins only while it is the only call in its process
//!   waiting for its answer's headers (`Awaiting`): calls waiting together are not idle, and a
//!   spinning call holds its thread, so it would hold the others up.
//! - **A spin gives way.** A spinning call yields its core after every poll and sleeps as soon as
//!   another thread has run on that core (`involuntary_switches`): that thread — often the
//!   very peer it waits for — needs the core more.
//! - **Calls inside the router never spin.** The router's balancers are made without a spin
//!   window, and a call on a runtime that lingers (`lingers_here`) never spins on its own:
//!   the runtime polls while idle without holding up the thread's other calls.
//! - **Nothing spins on one core** (or a one-CPU quota): there a spinning caller only keeps the
//!   process it waits for off the CPU (a routed call took 150 µs spinning, 47 µs not).

use std::{
    cell::RefCell,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use futures_util::task::AtomicWaker;

/// Environment variable: a spin window in microseconds. For an application it turns client
/// spinning on (`0` keeps it off); for `mesh up` it is the router's linger window when the
/// config has no `[mesh] spin` (`0` never lingers).
pub const MESH_SPIN_US: &str = "MESH_SPIN_US";

/// Environment variable: `1` makes plugins built with the SDK busy-poll (see [`busy_poll`]).
pub const MESH_BUSY_POLL: &str = "MESH_BUSY_POLL";

/// The router's linger window unless configured, and the window to opt in to for clients:
/// long enough for a local answer (30–40 µs on the 2-core VM), short enough that a miss costs
/// little.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(100);

/// Whether this machine (or CPU quota) has a core to spare for a spinning thread.
fn has_cores_to_spin() -> bool {
    static CORES: OnceLock<bool> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2)
}

/// What [`MESH_SPIN_US`] asks for, if it is set to a number of microseconds (an unreadable
/// value is logged and ignored).
pub fn spin_from_env() -> Option<Duration> {
    let text = std::env::var(MESH_SPIN_US).ok()?;
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    match text.parse::<u64>() {
        Ok(micros) => Some(Duration::from_micros(micros)),
        Err(_) => {
            tracing::warn!("{MESH_SPIN_US}={text:?} is not a number of microseconds; ignoring it");
            None
        }
    }
}

/// The spin window of a client that did not choose one ([`Connector::spin`](crate::Connector::spin)):
/// [`MESH_SPIN_US`]'s, else none. Read once per process.
pub(crate) fn client_spin() -> Duration {
    static SPIN: OnceLock<Duration> = OnceLock::new();
    *SPIN.get_or_init(|| spin_from_env().unwrap_or(Duration::ZERO))
}

/// A spin window as it applies on this machine: none on one core.
pub(crate) fn effective(window: Duration) -> Duration {
    if has_cores_to_spin() {
        window
    } else {
        Duration::ZERO
    }
}

/// The router's linger window when the config sets none: [`MESH_SPIN_US`]'s, else
/// [`DEFAULT_SPIN`] — none on one core either way.
pub fn linger_from_env() -> Duration {
    effective(spin_from_env().unwrap_or(DEFAULT_SPIN))
}

/// The linger window in nanoseconds; `u64::MAX` until first read or set.
static LINGER_NANOS: AtomicU64 = AtomicU64::new(u64::MAX);

/// Sets how long a runtime set up with [`linger`] keeps polling after [`linger_touch`]; zero
/// never lingers. Read on every call, so it applies at once (a config reload).
pub fn set_linger(window: Duration) {
    LINGER_NANOS.store(
        window.as_nanos().min(u128::from(u64::MAX - 1)) as u64,
        Ordering::Relaxed,
    );
}

/// The linger window: [`set_linger`]'s, else [`linger_from_env`].
pub fn linger_window() -> Duration {
    let nanos = LINGER_NANOS.load(Ordering::Relaxed);
    if nanos != u64::MAX {
        return Duration::from_nanos(nanos);
    }
    let window = linger_from_env();
    set_linger(window);
    window
}

/// Whether `MESH_BUSY_POLL=1` is set.
pub fn busy_poll_from_env() -> bool {
    std::env::var(MESH_BUSY_POLL).is_ok_and(|v| v == "1")
}

/// Keeps the current thread's runtime from ever going to sleep: a task that yields forever,
/// so the runtime polls its sockets between other tasks instead of parking in `epoll_wait`.
///
/// A call then costs no thread wake-ups on this side (on the 2-core VM a direct call fell
/// from 34 to 17 µs with client and plugin both polling), at the price of one core kept
/// busy while idle. Use it on a single-threaded runtime, on a machine with a core to spare for
/// each polling thread; abort the handle to stop.
pub fn busy_poll() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    })
}

/// Keeps the current thread's runtime polling its sockets, instead of sleeping in
/// `epoll_wait`, for the [`linger_window`] after each [`linger_touch`] on this thread: a server
/// that has just answered a call stays awake for the caller's next one, as Go's scheduler
/// spins before it parks. Idle for longer than the window, it sleeps as any runtime does, so
/// it costs CPU only right after work. For single-threaded runtimes (the router's workers);
/// abort the handle to stop.
pub fn linger() -> tokio::task::JoinHandle<()> {
    let state = Arc::new(Linger {
        since: Instant::now(),
        last: AtomicU64::new(0),
        waker: AtomicWaker::new(),
    });
    LINGER.with(|linger| *linger.borrow_mut() = Some(state.clone()));
    tokio::spawn(async move {
        loop {
            if state.active() {
                // Let a thread waiting for this core run: on a small machine, the plugin this
                // worker waits for (on the 2-core VM, without it calls through the router
                // took 90–170 µs instead of 35–40 in 6 runs of 8).
                std::thread::yield_now();
                tokio::task::yield_now().await;
                continue;
            }
            std::future::poll_fn(|cx| {
                state.waker.register(cx.waker());
                if state.active() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
        }
    })
}

/// Marks work on this thread: a runtime set up with [`linger`] keeps polling for the linger
/// window from now. Does nothing on other threads.
pub fn linger_touch() {
    LINGER.with(|linger| {
        if let Some(state) = linger.borrow().as_ref() {
            state.touch();
        }
    });
}

/// Whether this thread's runtime lingers ([`linger`]): a call waiting here lets the runtime
/// poll, rather than spinning in its own task and holding up the thread's other calls.
pub(crate) fn lingers_here() -> bool {
    LINGER.with(|linger| linger.borrow().is_some())
}

thread_local! {
    static LINGER: RefCell<Option<Arc<Linger>>> = const { RefCell::new(None) };
}

/// When this thread last worked, and its lingering task.
struct Linger {
    since: Instant,
    /// Nanoseconds after `since` of the last touch.
    last: AtomicU64,
    waker: AtomicWaker,
}

impl Linger {
    fn now(&self) -> u64 {
        self.since.elapsed().as_nanos() as u64
    }

    fn touch(&self) {
        self.last.store(self.now(), Ordering::Relaxed);
        self.waker.wake();
    }

    fn active(&self) -> bool {
        let window = linger_window().as_nanos() as u64;
        window > 0 && self.now().saturating_sub(self.last.load(Ordering::Relaxed)) < window
    }
}

/// Calls in this process that have sent their request and wait for their answer's headers.
static AWAITING: AtomicUsize = AtomicUsize::new(0);

/// Counts a call among those waiting for their answer's headers in this process, until
/// dropped: the "alone" test of client spinning.
pub(crate) struct Awaiting;

impl Awaiting {
    pub(crate) fn enter() -> Self {
        AWAITING.fetch_add(1, Ordering::Relaxed);
        Self
    }

    /// Whether this is the only call waiting.
    pub(crate) fn alone(&self) -> bool {
        AWAITING.load(Ordering::Relaxed) == 1
    }

    /// Whether no call waits for its headers (a body read may spin then).
    pub(crate) fn none() -> bool {
        AWAITING.load(Ordering::Relaxed) == 0
    }
}

impl Drop for Awaiting {
    fn drop(&mut self) {
        AWAITING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many times this thread has been switched out while runnable (Linux counts a
/// `sched_yield` that let another thread run as one): a spin that sees it change gives way.
pub(crate) fn involuntary_switches() -> i64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD)
        .map_or(0, |usage| usage.involuntary_context_switches())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_polling_runtime_still_serves_sockets_and_stops_polling_when_asked() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let polling = busy_poll();
            let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
            let echo = tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut byte = [0u8; 1];
                for _ in 0..100 {
                    b.read_exact(&mut byte).await.unwrap();
                    b.write_all(&byte).await.unwrap();
                }
            });
            let round_trips = async {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut byte = [0u8; 1];
                for i in 0..100u8 {
                    a.write_all(&[i]).await.unwrap();
                    a.read_exact(&mut byte).await.unwrap();
                    assert_eq!(byte[0], i);
                }
            };
            tokio::time::timeout(Duration::from_secs(10), round_trips)
                .await
                .expect("sockets are served while the runtime polls");
            echo.await.unwrap();
            polling.abort();
            assert!(polling.await.unwrap_err().is_cancelled());
        });
    }

    #[test]
    fn a_linger_window_set_applies_at_once() {
        set_linger(Duration::from_micros(250));
        assert_eq!(linger_window(), Duration::from_micros(250));
        set_linger(Duration::ZERO);
        assert_eq!(linger_window(), Duration::ZERO);
    }

    #[test]
    fn nothing_spins_on_one_core() {
        let window = effective(DEFAULT_SPIN);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(window.is_zero(), cores < 2);
    }
}
