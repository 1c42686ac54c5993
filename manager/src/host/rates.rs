//! Rate limits on calls to a plugin, set on the target's `[[plugin]]` table: `rate_limit`
//! bounds the calls of all callers together, `caller_rate_limit` those of each caller
//! (a plugin by its name, a local process by its uid, a TCP client by its address). Both are
//! GCRA limits (governor): `"50/s"` allows 50 calls a second on average with a burst of 50,
//! `"50/s burst 10"` the same average in bursts of at most 10.
//!
//! Checked per call on the router path and on the direct path; over a limit a call is refused
//! at once with `RESOURCE_EXHAUSTED` naming the limit and the setting to change. A reload
//! applies changed limits from the next call (a changed limit starts with a full burst; an
//! unchanged one keeps its state).

use std::{
    collections::HashMap,
    fmt,
    num::NonZeroU32,
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

/// The most callers one plugin's `caller_rate_limit` tracks before it forgets those whose
/// state is back to a full burst: a flood of TCP clients cannot grow it without bound.
const TRACKED_CALLERS: usize = 10_000;

/// A rate: `COUNT/UNIT` (`s`, `m`, `h`), optionally ` burst N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Calls per unit.
    pub count: NonZeroU32,
    /// The unit.
    pub per: Duration,
    /// The most calls at once.
    pub burst: NonZeroU32,
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let usage = || {
            format!(
                "{text:?} is not a rate: write COUNT/UNIT, UNIT one of s, m, h, optionally \
                 followed by \" burst N\", such as \"100/s\" or \"600/m burst 20\""
            )
        };
        let mut words = text.split_whitespace();
        let rate = words.next().ok_or_else(usage)?;
        let burst = match (words.next(), words.next(), words.next()) {
            (None, _, _) => None,
            (Some("burst"), Some(n), None) => Some(n),
            _ => return Err(usage()),
        };
        let (count, unit) = rate.split_once('/').ok_or_else(usage)?;
        let per = match unit {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(usage()),
        };
        let bound = |n: &str, what: &str| -> Result<NonZeroU32, String> {
            n.parse::<u32>()
                .ok()
                .filter(|n| (1..=1_000_000_000).contains(n))
                .and_then(NonZeroU32::new)
                .ok_or_else(|| format!("{text:?}: the {what} must be 1 to 1000000000"))
        };
        let count = bound(count, "count")?;
        let burst = match burst {
            Some(n) => bound(n, "burst")?,
            None => count,
        };
        Ok(Self { count, per, burst })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            60 => "m",
            3600 => "h",
            _ => "s",
        };
        write!(f, "{}/{unit}", self.count)?;
        if self.burst != self.count {
            write!(f, " burst {}", self.burst)?;
        }
        Ok(())
    }
}

impl Rate {
    fn quota(&self) -> Quota {
        // per / count is at least 1 ns (count ≤ 10⁹, per ≥ 1 s), so with_period cannot fail.
        Quota::with_period(self.per / self.count.get())
            .unwrap_or_else(|| Quota::per_second(self.count))
            .allow_burst(self.burst)
    }
}

/// The limits of one target plugin.
struct Target {
    plugin: String,
    all: Option<(Rate, Arc<DefaultDirectRateLimiter>)>,
    each: Option<(Rate, Arc<DefaultKeyedRateLimiter<String>>)>,
}

/// Every plugin's limits, by service name (`plugin.echo`); read lock-free per call.
#[derive(Default)]
pub struct RateLimits {
    current: ArcSwap<HashMap<String, Arc<Target>>>,
    changing: Mutex<()>,
}

impl RateLimits {
    /// Sets the limits `(plugin, service, rate_limit, caller_rate_limit)` (at start and on
    /// reload): a limit whose rate is unchanged keeps its state.
    pub fn configure<'a>(
        &self,
        plugins: impl IntoIterator<Item = (&'a str, &'a str, Option<Rate>, Option<Rate>)>,
    ) {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load();
        let mut next = HashMap::new();
        for (plugin, service, all, each) in plugins {
            if all.is_none() && each.is_none() {
                continue;
            }
            let old = old.get(service);
            let target = Target {
                plugin: plugin.to_owned(),
                all: all.map(|rate| match old.and_then(|o| o.all.as_ref()) {
                    Some((kept, limiter)) if *kept == rate => (rate, limiter.clone()),
                    _ => (rate, Arc::new(governor::RateLimiter::direct(rate.quota()))),
                }),
                each: each.map(|rate| match old.and_then(|o| o.each.as_ref()) {
                    Some((kept, limiter)) if *kept == rate => (rate, limiter.clone()),
                    _ => (rate, Arc::new(governor::RateLimiter::keyed(rate.quota()))),
                }),
            };
            next.insert(service.to_owned(), Arc::new(target));
        }
        self.current.store(Arc::new(next));
    }

    /// Whether `caller` (as [`caller_key`] names it) may call `service` now; the refusal
    /// names the limit and the setting to change.
    ///
    /// [`caller_key`]: crate::host::calls::caller_key
    pub fn check(&self, service: &str, caller: &str) -> Result<(), String> {
        self.check_with(service, || caller.to_owned())
    }

    /// [`RateLimits::check`], naming the caller only when `service` has a per-caller limit:
    /// a call to a service without one (most calls) allocates nothing here.
    pub fn check_with(&self, service: &str, caller: impl FnOnce() -> String) -> Result<(), String> {
        let current = self.current.load();
        let Some(target) = current.get(service) else {
            return Ok(());
        };
        let plugin = &target.plugin;
        if let Some((rate, limiter)) = &target.each {
            if limiter.len() > TRACKED_CALLERS {
                limiter.retain_recent();
            }
            let caller = caller();
            if limiter.check_key(&caller).is_err() {
                return Err(format!(
                    "{caller} is over {service}'s caller_rate_limit of {rate}; raise \
                     caller_rate_limit in the [[plugin]] table of {plugin:?}, or call less often"
                ));
            }
        }
        if let Some((rate, limiter)) = &target.all
            && limiter.check().is_err()
        {
            return Err(format!(
                "{service} is over its rate_limit of {rate} (all callers together); raise \
                 rate_limit in the [[plugin]] table of {plugin:?}, or call less often"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_bad_ones_say_how_to_write_them() {
        let rate: Rate = "5/s".parse().unwrap();
        assert_eq!((rate.count.get(), rate.burst.get()), (5, 5));
        assert_eq!(rate.to_string(), "5/s");
        let rate: Rate = "600/m burst 20".parse().unwrap();
        assert_eq!(rate.per, Duration::from_secs(60));
        assert_eq!(rate.to_string(), "600/m burst 20");
        for bad in [
            "",
            "5",
            "5/d",
            "0/s",
            "-1/s",
            "5/s burst",
            "5/s burst 0",
            "5/s x 2",
            "1000000001/s",
        ] {
            let error = bad.parse::<Rate>().unwrap_err();
            assert!(
                error.contains("COUNT/UNIT") || error.contains("1 to"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn over_the_limit_is_refused_and_others_are_unaffected() {
        let limits = RateLimits::default();
        let five: Rate = "5/h burst 5".parse().unwrap();
        let ten: Rate = "10/h".parse().unwrap();
        limits.configure([("echo", "plugin.echo", Some(ten), Some(five))]);
        let passed = (0..20).filter(|_| limits.check("plugin.echo", "plugin a").is_ok());
        assert_eq!(passed.count(), 5);
        let error = limits.check("plugin.echo", "plugin a").unwrap_err();
        assert!(error.contains("caller_rate_limit of 5/h"), "{error}");
        // Another caller has its own burst, until all callers together reach 10.
        assert_eq!(
            (0..20)
                .filter(|_| limits.check("plugin.echo", "uid 7").is_ok())
                .count(),
            5
        );
        let error = limits.check("plugin.echo", "uid 8").unwrap_err();
        assert!(error.contains("rate_limit of 10/h (all callers"), "{error}");
        // Another service is not limited.
        assert!(limits.check("plugin.other", "plugin a").is_ok());
        // A reload that keeps a rate keeps its state; one that changes it starts over.
        limits.configure([("echo", "plugin.echo", Some(ten), Some(five))]);
        assert!(limits.check("plugin.echo", "plugin a").is_err());
        limits.configure([("echo", "plugin.echo", Some(ten), Some(ten))]);
        let error = limits.check("plugin.echo", "plugin a").unwrap_err();
        assert!(error.contains("rate_limit of 10/h (all callers"), "{error}");
        limits.configure([("echo", "plugin.echo", None, Some(ten))]);
        assert!(limits.check("plugin.echo", "plugin a").is_ok());
        limits.configure([("echo", "plugin.echo", None, None)]);
        assert!((0..100).all(|_| limits.check("plugin.echo", "plugin a").is_ok()));
    }
}
