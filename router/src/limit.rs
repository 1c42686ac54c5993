//! The router's limits, and the counters that enforce them without a lock or a queue.
//!
//! - connections: over [`Limits::max_connections`] a new connection is closed at once (the
//!   client sees `UNAVAILABLE`), and the ones open keep being served;
//! - streams per connection: [`Limits::max_concurrent_streams`], advertised in HTTP/2 SETTINGS
//!   (a client queues its own streams beyond it);
//! - forwarded calls in flight, over all connections: over [`Limits::max_in_flight`] a call is
//!   answered `RESOURCE_EXHAUSTED` at once, never queued; the router's own API (registry,
//!   health) is not counted, so it keeps answering.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

/// The router's limits and its default call timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most client connections open at once, over all listeners.
    pub max_connections: usize,
    /// Most concurrent streams (calls) on one client connection.
    pub max_concurrent_streams: u32,
    /// Most forwarded calls in flight at once; more are answered `RESOURCE_EXHAUSTED`.
    pub max_in_flight: usize,
    /// Deadline for calls that carry no `grpc-timeout`; `None` leaves them without one.
    pub call_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_concurrent_streams: 1024,
            max_in_flight: 10_000,
            call_timeout: None,
        }
    }
}

/// A count held below a maximum.
#[derive(Debug)]
pub(crate) struct Gauge {
    count: AtomicUsize,
    max: usize,
}

impl Gauge {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            max,
        })
    }

    /// A place under the maximum, or `None` at once when there is none.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        if self.count.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Permit(self.clone()))
    }

    /// The maximum.
    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

/// A place in a [`Gauge`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Permit(Arc<Gauge>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_gauge_refuses_at_once_and_frees_places_on_drop() {
        let gauge = Gauge::new(2);
        let a = gauge.try_acquire().unwrap();
        let _b = gauge.try_acquire().unwrap();
        assert!(gauge.try_acquire().is_none());
        assert!(gauge.try_acquire().is_none(), "a refusal takes no place");
        drop(a);
        assert!(gauge.try_acquire().is_some());
    }
}
