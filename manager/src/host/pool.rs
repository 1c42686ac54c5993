//! The host services' own threads, and each plugin's share of them: file operations run here,
//! never on tokio's shared blocking pool (which the router and everything else use), so a
//! plugin that makes them slow — a FUSE mount in its root, a file on a hung network share —
//! costs the other plugins nothing but a queue position.
//!
//! Three bounds, each a constant documented in `docs/security.md` (Host services: bounded per
//! plugin):
//! - [`WORKERS`] threads at most, started when work waits and none is idle, gone after
//!   [`IDLE`] without work;
//! - [`PER_PLUGIN`] operations open per plugin ([`Pool::admit`]): a call over it is refused at
//!   once (RESOURCE_EXHAUSTED, naming the bound), never queued behind its own plugin's work; an
//!   open `ReadFileStream` holds its slot for its life. [`PER_PLUGIN`] is half of [`WORKERS`]:
//!   one plugin never holds every thread;
//! - a deadline on each operation ([`Pool::run`], at most [`OP_DEADLINE`]): the caller is
//!   answered DEADLINE_EXCEEDED when it passes. An operation still waiting for a thread is
//!   dropped and frees its slot; one already running keeps its slot until its system call
//!   returns, because it still holds the thread — otherwise a plugin could re-ask and take
//!   every thread with operations that never return.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;

/// Threads the host services may use at once, all plugins together.
pub const WORKERS: usize = 16;
/// Host operations one plugin may have open at once (a stream counts until it ends).
pub const PER_PLUGIN: usize = WORKERS / 2;
/// The longest a host operation may take, whatever the call's `grpc-timeout` asks.
pub const OP_DEADLINE: Duration = Duration::from_secs(10);
/// How long an idle worker waits for work before its thread ends.
const IDLE: Duration = Duration::from_secs(10);

/// A bounded set of threads for host file operations, with each plugin's share counted.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    workers: usize,
    per_plugin: usize,
    state: Mutex<State>,
    work: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Workers started and not ended.
    threads: usize,
    /// Of those, the ones waiting for work.
    idle: usize,
    /// Operations open per plugin.
    open: HashMap<Arc<str>, usize>,
}

/// One of a plugin's [`PER_PLUGIN`] slots, given back when the last clone is dropped: the
/// call, a stream, and the operations they run on a thread each hold a clone.
#[derive(Clone)]
pub struct Slot {
    _held: Arc<Held>,
}

struct Held {
    pool: Arc<Inner>,
    plugin: Arc<str>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        if let Some(open) = state.open.get_mut(&self.plugin) {
            *open -= 1;
            if *open == 0 {
                state.open.remove(&self.plugin);
            }
        }
    }
}

/// A plugin already has its bound of operations open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "plugin {plugin:?} has {bound} host operations open, its bound (an unfinished \
     ReadFileStream counts until it ends): finish or cancel one, or read its streams"
)]
pub struct Busy {
    /// The plugin refused.
    pub plugin: Arc<str>,
    /// Its bound.
    pub bound: usize,
}

/// Why an operation gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unanswered {
    /// Its deadline passed first: the time it was given.
    #[error("did not finish within {0:?}")]
    Expired(Duration),
    /// It panicked (a bug): its thread carries on with the next one.
    #[error("failed (the host operation panicked)")]
    Panicked,
}

/// A queued operation: it runs only if it still holds its slot when a worker takes it.
struct Job {
    slot: Arc<Mutex<Option<Slot>>>,
    run: Box<dyn FnOnce() + Send>,
}

impl Job {
    fn abandoned(&self) -> bool {
        lock(&self.slot).is_none()
    }
}

/// Gives the slot back if the job has not started when the caller stops waiting (deadline
/// or cancellation); a started job keeps it.
struct Waiting(Arc<Mutex<Option<Slot>>>);

impl Drop for Waiting {
    fn drop(&mut self) {
        let slot = lock(&self.0).take();
        drop(slot);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing run under these locks can panic halfway through a change.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for Pool {
    fn default() -> Self {
        Self::new(WORKERS, PER_PLUGIN)
    }
}

impl Pool {
    /// A pool of at most `workers` threads, `per_plugin` operations open per plugin.
    pub fn new(workers: usize, per_plugin: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                workers: workers.max(1),
                per_plugin: per_plugin.max(1),
                state: Mutex::default(),
                work: Condvar::new(),
            }),
        }
    }

    /// One of `plugin`'s slots, or [`Busy`] at once when it has its bound open.
    pub fn admit(&self, plugin: &Arc<str>) -> Result<Slot, Busy> {
        let mut state = self.inner.lock();
        let open = state.open.entry(plugin.clone()).or_default();
        if *open >= self.inner.per_plugin {
            return Err(Busy {
                plugin: plugin.clone(),
                bound: self.inner.per_plugin,
            });
        }
        *open += 1;
        Ok(Slot {
            _held: Arc::new(Held {
                pool: self.inner.clone(),
                plugin: plugin.clone(),
            }),
        })
    }

    /// Runs `op` on one of the pool's threads under `slot`, answering by `deadline`.
    pub async fn run<T: Send + 'static>(
        &self,
        slot: Slot,
        deadline: Instant,
        op: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Unanswered> {
        let started = Instant::now();
        let (answer, answered) = tokio::sync::oneshot::channel();
        let held = Arc::new(Mutex::new(Some(slot)));
        let waiting = Waiting(held.clone());
        let job = Job {
            slot: held.clone(),
            run: Box::new(move || {
                let Some(slot) = lock(&held).take() else {
                    return; // abandoned while queued
                };
                let _ = answer.send(op());
                drop(slot);
            }),
        };
        self.inner.push(job);
        let result = tokio::time::timeout_at(deadline, answered).await;
        drop(waiting);
        match result {
            Ok(Ok(value)) => Ok(value),
            // The job ended without answering: it still held its slot, so it ran.
            Ok(Err(_)) => Err(Unanswered::Panicked),
            Err(_) => {
                // The time it was given, to the millisecond: what a person reads.
                let given = deadline.saturating_duration_since(started);
                let millis = given.as_micros().div_ceil(1000);
                Err(Unanswered::Expired(Duration::from_millis(millis as u64)))
            }
        }
    }

    /// Threads started and not ended (for tests and figures).
    pub fn threads(&self) -> usize {
        self.inner.lock().threads
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn push(self: &Arc<Self>, job: Job) {
        let mut state = self.lock();
        // Jobs whose callers gave up while every thread was busy: drop them rather than let
        // the queue grow with them.
        if state.jobs.len() >= self.workers {
            state.jobs.retain(|job| !job.abandoned());
        }
        state.jobs.push_back(job);
        // More work waiting than idle workers to take it: one more thread, up to the bound.
        if state.jobs.len() > state.idle && state.threads < self.workers {
            let pool = self.clone();
            let spawned = std::thread::Builder::new()
                .name("mesh-host-io".into())
                .spawn(move || pool.work());
            if spawned.is_ok() {
                state.threads += 1;
            } else if state.threads == 0 {
                // No thread at all: the caller's deadline answers it.
                tracing::error!("host services: cannot start a worker thread");
            }
        }
        self.work.notify_one();
    }

    fn work(&self) {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                drop(state);
                // A panicking operation must not take its thread (and the count of threads)
                // with it; its caller learns of it by the answer that never comes.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job.run));
                state = self.lock();
                continue;
            }
            state.idle += 1;
            let (next, waited) = self
                .work
                .wait_timeout(state, IDLE)
                .unwrap_or_else(|e| e.into_inner());
            state = next;
            state.idle -= 1;
            if waited.timed_out() && state.jobs.is_empty() {
                state.threads -= 1;
                return;
            }
        }
    }
}

/// A gRPC service whose answers hold the [`Slot`] their handler put in the response's
/// extensions until the answer's body is sent or dropped: an answer the client does not read
/// (a 4 MiB `ReadFile`, an endless stream) keeps counting against its plugin's bound, so a
/// plugin cannot pile up unread answers in the manager's memory past its bound.
#[derive(Clone)]
pub struct Bounded<S> {
    inner: S,
}

impl<S> Bounded<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Bounded<S> {
    const NAME: &'static str = S::NAME;
}

type HttpResponse = http::Response<tonic::body::Body>;

impl<S> tonic::codegen::Service<http::Request<tonic::body::Body>> for Bounded<S>
where
    S: tonic::codegen::Service<
            http::Request<tonic::body::Body>,
            Response = HttpResponse,
            Error = Infallible,
        >,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = futures_util::future::Map<
        S::Future,
        fn(Result<HttpResponse, Infallible>) -> Result<HttpResponse, Infallible>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        use futures_util::FutureExt;
        let answer: fn(Result<HttpResponse, Infallible>) -> Result<HttpResponse, Infallible> =
            |answer| answer.map(hold);
        self.inner.call(request).map(answer)
    }
}

/// Moves the response's [`Slot`] into its body.
fn hold(mut response: HttpResponse) -> HttpResponse {
    use http_body_util::BodyExt;
    match response.extensions_mut().remove::<Slot>() {
        // The closure owns the slot: it lives exactly as long as the body.
        Some(slot) => response.map(|body| {
            tonic::body::Body::new(body.map_frame(move |frame| {
                let _held = &slot;
                frame
            }))
        }),
        None => response,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn plugin(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn a_plugin_over_its_bound_is_refused_at_once_and_others_are_not() {
        let pool = Pool::new(4, 2);
        let (a, b) = (plugin("a"), plugin("b"));
        let first = pool.admit(&a).unwrap();
        let second = pool.admit(&a).unwrap();
        let busy = pool.admit(&a).err().unwrap();
        assert_eq!(busy.bound, 2);
        assert!(
            busy.to_string()
                .contains("plugin \"a\" has 2 host operations open")
        );
        // Another plugin's share is its own.
        let other = pool.admit(&b).unwrap();
        assert_eq!(pool.run(other, soon(), || 7).await.unwrap(), 7);
        // A clone (a stream's read) holds the same slot; the last drop frees it.
        let clone = first.clone();
        drop(first);
        assert!(pool.admit(&a).is_err());
        drop(clone);
        let third = pool.admit(&a).unwrap();
        drop((second, third));
        assert!(!pool.inner.lock().open.contains_key(&a));
        // b's slot is dropped by the worker after it answered: wait for it, bounded.
        let _ = admitted(&pool, &b).await;
        for _ in 0..500 {
            if pool.inner.lock().open.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("slots still open: {:?}", pool.inner.lock().open);
    }

    /// Waits (polling, bounded) until `plugin` can be admitted again.
    async fn admitted(pool: &Pool, plugin: &Arc<str>) -> Slot {
        for _ in 0..500 {
            if let Ok(slot) = pool.admit(plugin) {
                return slot;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("plugin {plugin} never got a slot back");
    }

    // Real time, not paused: the operations run on real threads, and a paused clock would
    // jump to the deadline while they run.
    #[tokio::test]
    async fn a_blocked_operation_answers_at_its_deadline_and_keeps_its_slot_until_it_returns() {
        let pool = Pool::new(2, 1);
        let a = plugin("a");
        let (release, blocked) = mpsc::channel::<()>();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(200);
        let expired = pool
            .run(pool.admit(&a).unwrap(), deadline, move || blocked.recv())
            .await
            .unwrap_err();
        assert_eq!(expired, Unanswered::Expired(Duration::from_millis(200)));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // Still on its thread: the plugin cannot start another in its place.
        assert!(pool.admit(&a).is_err());
        // Others are served by the other thread meanwhile.
        let b = plugin("b");
        assert_eq!(pool.run(pool.admit(&b).unwrap(), soon(), || 1).await, Ok(1));
        release.send(()).unwrap();
        drop(admitted(&pool, &a).await);
    }

    #[tokio::test]
    async fn an_operation_waiting_for_a_thread_is_dropped_at_its_deadline_and_frees_its_slot() {
        let pool = Pool::new(1, 1);
        let (a, b) = (plugin("a"), plugin("b"));
        let (release, blocked) = mpsc::channel::<()>();
        let (started, on_thread) = tokio::sync::oneshot::channel::<()>();
        // `a` holds the one thread.
        let holder = tokio::spawn({
            let pool = pool.clone();
            let slot = pool.admit(&a).unwrap();
            async move {
                pool.run(slot, soon(), move || {
                    started.send(()).unwrap();
                    blocked.recv()
                })
                .await
            }
        });
        on_thread.await.unwrap();
        // `b` waits for it, and gives up at its deadline: never run, its slot free at once.
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let deadline = Instant::now() + Duration::from_millis(100);
        let expired = pool
            .run(pool.admit(&b).unwrap(), deadline, move || {
                flag.store(true, std::sync::atomic::Ordering::SeqCst)
            })
            .await;
        assert_eq!(
            expired,
            Err(Unanswered::Expired(Duration::from_millis(100)))
        );
        let again = pool.admit(&b).expect("the queued operation's slot is free");
        release.send(()).unwrap();
        assert!(holder.await.unwrap().is_ok());
        // The abandoned job is skipped when the thread comes to it.
        assert_eq!(pool.run(again, soon(), || 3).await, Ok(3));
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_cancelled_call_frees_its_queued_slot() {
        let pool = Pool::new(1, 1);
        let (a, b) = (plugin("a"), plugin("b"));
        let (release, blocked) = mpsc::channel::<()>();
        let (started, on_thread) = tokio::sync::oneshot::channel::<()>();
        let slot = pool.admit(&a).unwrap();
        let holder = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.run(slot, soon(), move || {
                    started.send(()).unwrap();
                    blocked.recv()
                })
                .await
            }
        });
        on_thread.await.unwrap();
        // The client goes away while `b`'s call waits: the call's future is dropped.
        let waiting = pool.run(pool.admit(&b).unwrap(), soon(), || ());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), waiting)
                .await
                .is_err()
        );
        assert!(pool.admit(&b).is_ok());
        release.send(()).unwrap();
        assert!(holder.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_panicking_operation_frees_its_slot_and_its_thread_serves_on() {
        let pool = Pool::new(1, 1);
        let a = plugin("a");
        let panicked = pool
            .run(pool.admit(&a).unwrap(), soon(), || -> i32 {
                panic!("a bug")
            })
            .await;
        assert_eq!(panicked, Err(Unanswered::Panicked));
        let slot = admitted(&pool, &a).await;
        assert_eq!(pool.run(slot, soon(), || 5).await, Ok(5));
        assert_eq!(pool.threads(), 1);
    }

    #[tokio::test]
    async fn threads_are_bounded_however_much_is_asked() {
        let pool = Pool::new(3, 100);
        let a = plugin("a");
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..50 {
            let (pool, slot) = (pool.clone(), pool.admit(&a).unwrap());
            calls.spawn(async move { pool.run(slot, soon(), move || i).await });
        }
        let mut sum = 0;
        while let Some(done) = calls.join_next().await {
            sum += done.unwrap().unwrap();
        }
        assert_eq!(sum, (0..50).sum::<i32>());
        assert!(pool.threads() <= 3, "{}", pool.threads());
    }
}
