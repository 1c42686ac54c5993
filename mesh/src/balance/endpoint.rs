//! One instance as the balancer sees it: its connection, its calls in flight, and whether it
//! sits out after failures (passive health).
//!
//! Health is learnt from calls, never probed: a connection that cannot be made ejects the
//! instance at once; [`FAILURES_TO_EJECT`] failed calls in a row eject it too. An ejected
//! instance is passed over for [`EJECT_FOR`] while others are available; after that one more
//! failure ejects it again, and one success forgets its failures.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use tokio::time::Instant;

use crate::transport::{self, Address, Options, Sender};

/// How long an ejected instance is passed over while others are available.
pub(crate) const EJECT_FOR: Duration = Duration::from_secs(1);
/// Failed calls in a row that eject an instance.
pub(crate) const FAILURES_TO_EJECT: u32 = 5;
/// Connecting takes no longer than this (a TCP peer that drops SYNs would otherwise hang calls).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One instance as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Target {
    pub(crate) id: String,
    pub(crate) address: Address,
}

/// A clock in milliseconds since the balancer was made, cheap to read and to store atomically
/// (Tokio's, so tests can pause it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock(Instant);

impl Clock {
    pub(crate) fn new() -> Self {
        Self(Instant::now())
    }

    pub(crate) fn now_ms(self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// An instance and its connection.
pub(crate) struct Endpoint {
    pub(crate) target: Target,
    sender: ArcSwapOption<Sender>,
    connecting: tokio::sync::Mutex<()>,
    pub(crate) health: Arc<Health>,
    options: Options,
}

impl Endpoint {
    pub(crate) fn new(target: Target, clock: Clock, options: Options) -> Self {
        Self {
            health: Arc::new(Health {
                instance: format!("{} ({})", target.id, target.address),
                id: target.id.as_str().into(),
                clock,
                in_flight: AtomicUsize::new(0),
                failures: AtomicU32::new(0),
                ejected_until: AtomicU64::new(0),
            }),
            target,
            sender: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            options,
        }
    }

    /// The open connection, or a new one; concurrent callers share one connection attempt.
    pub(crate) async fn sender(&self) -> io::Result<Sender> {
        if let Some(sender) = self.open_sender() {
            return Ok(sender);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(sender) = self.open_sender() {
            return Ok(sender);
        }
        let sender = tokio::time::timeout(
            CONNECT_TIMEOUT,
            transport::connect(&self.target.address, &self.options),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        self.sender.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }

    fn open_sender(&self) -> Option<Sender> {
        let guard = self.sender.load();
        guard
            .as_ref()
            .filter(|s| !s.is_closed())
            .map(|s| (**s).clone())
    }

    /// Forgets the connection (it handed a request back: it is closing).
    pub(crate) fn disconnect(&self) {
        self.sender.store(None);
    }
}

/// What calls taught about one instance: its load and whether it sits out.
pub(crate) struct Health {
    /// `id (address)`, for logs.
    instance: String,
    /// The instance's id alone (`echo-0`), for the answer's [`super::AnsweredBy`].
    pub(crate) id: Arc<str>,
    clock: Clock,
    in_flight: AtomicUsize,
    /// Failed calls since the last success.
    failures: AtomicU32,
    /// Milliseconds (on `clock`) until which the instance is passed over.
    ejected_until: AtomicU64,
}

impl Health {
    /// The instance's id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Calls in flight on this instance now.
    pub(crate) fn load(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the instance sits out at `now_ms`.
    pub(crate) fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms
    }

    /// Passes the instance over for [`EJECT_FOR`].
    pub(crate) fn eject(&self) {
        let until = self.clock.now_ms() + EJECT_FOR.as_millis() as u64;
        self.ejected_until.store(until, Ordering::Relaxed);
    }

    /// A call got its answer: the instance is healthy. Reads before writing, so that the
    /// common case (already healthy) does not dirty a cache line other cores read.
    pub(crate) fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejected_until.load(Ordering::Relaxed) != 0 {
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }

    /// A call failed in a way that may be the instance's fault; ejects it after
    /// [`FAILURES_TO_EJECT`] in a row. Returns whether this failure ejected it.
    pub(crate) fn failed(&self) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < FAILURES_TO_EJECT {
            return false;
        }
        // Once ejected, the next failure (after the time out) ejects it again at once.
        self.failures
            .store(FAILURES_TO_EJECT - 1, Ordering::Relaxed);
        self.eject();
        tracing::debug!(instance = %self.instance, "ejected after {FAILURES_TO_EJECT} failed calls in a row");
        true
    }
}

/// Counts a call against its instance until dropped (with the response body, for a call that
/// got one).
pub(crate) struct InFlight(Arc<Health>);

impl InFlight {
    pub(crate) fn new(health: &Arc<Health>) -> Self {
        health.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(health.clone())
    }

    pub(crate) fn health(&self) -> &Health {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Arc<Health> {
        let endpoint = Endpoint::new(
            Target {
                id: "echo-0".into(),
                address: "unix:/tmp/echo-0.sock".parse().unwrap(),
            },
            Clock::new(),
            Options::default(),
        );
        endpoint.health
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_and_a_success_forgets_them() {
        let health = health();
        let now = || health.clock.now_ms();
        for _ in 0..FAILURES_TO_EJECT - 1 {
            assert!(!health.failed());
        }
        health.succeeded();
        for _ in 0..FAILURES_TO_EJECT - 1 {
            assert!(!health.failed(), "a success started the count over");
        }
        assert!(!health.is_ejected(now()));
        assert!(health.failed(), "the fifth failure in a row ejects");
        assert!(health.is_ejected(now()));

        tokio::time::advance(EJECT_FOR + Duration::from_millis(1)).await;
        assert!(!health.is_ejected(now()), "ejection ends");
        assert!(health.failed(), "one more failure ejects again");
        health.succeeded();
        assert!(!health.is_ejected(now()), "a success readmits");
        assert!(!health.failed());
    }

    #[test]
    fn in_flight_counts_until_dropped() {
        let health = health();
        let a = InFlight::new(&health);
        let b = InFlight::new(&health);
        assert_eq!(health.load(), 2);
        drop(a);
        drop(b);
        assert_eq!(health.load(), 0);
    }
}
