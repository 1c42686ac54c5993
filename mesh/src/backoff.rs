//! Exponential backoff with jitter, for everything in the mesh that tries again: a client's
//! registry watch, the supervisor's restarts.
//!
//! Without jitter, every client of a router that restarts reconnects at the same instants, in
//! lockstep; jitter spreads them out. Full jitter (anywhere from zero to the delay) spreads
//! them most; equal jitter (half fixed, half random) spreads them while the delay still grows
//! surely.
//!
//! ```
//! use std::time::Duration;
//! use mesh::backoff::{Backoff, Jitter};
//!
//! let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), Jitter::Equal);
//! let third = backoff.delay(2);
//! assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
//! ```

use std::time::Duration;

/// How much of each delay is random.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Anywhere from zero to the delay.
    Full,
    /// Half the delay fixed, half random.
    Equal,
}

/// Delays that double from `base` up to `max`, with [`Jitter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// Delays of `base`, `2 × base`, `4 × base`, … up to `max`, each with `jitter`.
    pub const fn new(base: Duration, max: Duration, jitter: Jitter) -> Self {
        Self { base, max, jitter }
    }

    /// The delay before try number `attempt + 1` (`attempt` 0: the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        let ceiling = self.base.saturating_mul(factor).min(self.max);
        match self.jitter {
            Jitter::Full => ceiling.mul_f64(fastrand::f64()),
            Jitter::Equal => ceiling / 2 + (ceiling / 2).mul_f64(fastrand::f64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_within_their_jitter_and_stop_at_the_ceiling() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for jitter in [Jitter::Full, Jitter::Equal] {
            let backoff = Backoff::new(base, max, jitter);
            for attempt in 0..12 {
                let ceiling = (base * 2u32.pow(attempt)).min(max);
                let floor = match jitter {
                    Jitter::Full => Duration::ZERO,
                    Jitter::Equal => ceiling / 2,
                };
                for _ in 0..50 {
                    let d = backoff.delay(attempt);
                    assert!(d >= floor && d <= ceiling, "{jitter:?} {attempt}: {d:?}");
                }
            }
            assert!(backoff.delay(u32::MAX) <= max);
        }
    }

    #[test]
    fn delays_are_spread_out() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1), Jitter::Full);
        let delays: std::collections::HashSet<Duration> =
            (0..20).map(|_| backoff.delay(0)).collect();
        assert!(delays.len() > 10, "20 clients do not retry in lockstep");
    }
}
