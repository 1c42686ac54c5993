//! Deadlines: a call's `grpc-timeout`, or the router's default call timeout for calls without
//! one. The shorter of the two is what the router enforces and what it passes on in
//! `grpc-timeout`, so the plugin knows it too. When it expires the router answers
//! `DEADLINE_EXCEEDED` — before the answer began, as the whole answer; after, in the trailers —
//! and drops the upstream call, which resets its stream: the cancellation reaches the plugin.
//!
//! Calls without a deadline (no header, no default) pay one header lookup and nothing else.

use std::{future::Future, pin::Pin, task::Context, time::Duration};

use http::{HeaderMap, HeaderValue, header::HeaderName};
use tokio::time::Sleep;

/// The gRPC deadline header.
pub(crate) const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// How the router sets a call's deadline.
#[derive(Debug, Clone, Default)]
pub(crate) struct Deadlines {
    /// The default timeout, and its header value made once.
    default: Option<(Duration, HeaderValue)>,
}

impl Deadlines {
    /// Calls without a `grpc-timeout` get `default` (none if `None` or zero).
    pub(crate) fn new(default: Option<Duration>) -> Self {
        Self {
            default: default.filter(|d| !d.is_zero()).map(|d| (d, encode(d))),
        }
    }

    /// The call's timeout; rewrites its `grpc-timeout` when the default is shorter or the call
    /// had none. A malformed `grpc-timeout` is an error, never "no deadline".
    pub(crate) fn apply(
        &self,
        headers: &mut HeaderMap,
    ) -> Result<Option<Duration>, InvalidTimeout> {
        let asked = asked(headers)?;
        Ok(match (asked, &self.default) {
            (Some(asked), Some((default, _))) if asked <= *default => Some(asked),
            (Some(asked), None) => Some(asked),
            (_, Some((default, value))) => {
                headers.insert(GRPC_TIMEOUT, value.clone());
                Some(*default)
            }
            (None, None) => None,
        })
    }
}

/// A `grpc-timeout` that is not 1 to 8 digits and a unit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "malformed grpc-timeout {0:?}: expected 1 to 8 digits and a unit (H, M, S, m, u, n), such as 250m"
)]
pub(crate) struct InvalidTimeout(String);

impl From<InvalidTimeout> for tonic::Status {
    fn from(error: InvalidTimeout) -> Self {
        // As gRPC servers answer a malformed timeout (grpc-go: INTERNAL).
        tonic::Status::internal(error.to_string())
    }
}

/// The `grpc-timeout` a call asks for, if any.
pub(crate) fn asked(headers: &HeaderMap) -> Result<Option<Duration>, InvalidTimeout> {
    headers
        .get(GRPC_TIMEOUT)
        .map(|value| {
            parse(value.as_bytes()).ok_or_else(|| {
                InvalidTimeout(String::from_utf8_lossy(value.as_bytes()).into_owned())
            })
        })
        .transpose()
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`);
/// `None` when it is malformed.
pub fn parse(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes `timeout` in the finest unit whose value fits in 8 digits (rounded up, so the
/// plugin never sees a shorter deadline than the router enforces).
pub(crate) fn encode(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let (value, unit) = units
        .iter()
        .map(|&(per, unit)| (nanos.div_ceil(per), unit))
        .find(|&(value, _)| value <= MAX)
        .unwrap_or((MAX, 'H'));
    HeaderValue::try_from(format!("{value}{unit}")).expect("digits and a letter")
}

/// A call's deadline, running.
pub(crate) struct Expiry {
    sleep: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl Expiry {
    /// Starts the clock for `timeout`.
    pub(crate) fn start(timeout: Duration) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        }
    }

    /// Whether the deadline passed (registers for a wake-up when it has not).
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.sleep.as_mut().poll(cx).is_ready()
    }

    /// Completes when the deadline passes.
    pub(crate) async fn expired(&mut self) {
        self.sleep.as_mut().await
    }

    /// The status a caller gets when the deadline passed.
    pub(crate) fn status(&self, service: &str) -> tonic::Status {
        tonic::Status::deadline_exceeded(format!(
            "deadline exceeded: {service} did not finish within {:?} (grpc-timeout or the \
             router's call_timeout)",
            self.timeout
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_rejects_the_rest() {
        let cases = [
            ("1H", Some(Duration::from_secs(3600))),
            ("2M", Some(Duration::from_secs(120))),
            ("3S", Some(Duration::from_secs(3))),
            ("250m", Some(Duration::from_millis(250))),
            ("7u", Some(Duration::from_micros(7))),
            ("99999999n", Some(Duration::from_nanos(99_999_999))),
            ("100000000n", None),
            ("", None),
            ("m", None),
            ("5", None),
            ("5x", None),
            ("-5m", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text.as_bytes()), expected, "{text:?}");
        }
    }

    #[test]
    fn encodes_in_the_finest_unit_that_fits_rounding_up() {
        for (timeout, expected) in [
            (Duration::from_millis(250), "250000u"),
            (Duration::from_millis(50), "50000000n"),
            (Duration::from_secs(30), "30000000u"),
            (Duration::from_secs(300), "300000m"),
            (Duration::from_nanos(1_500_000_001), "1500001u"),
            (Duration::from_secs(3 * 86_400), "259200S"),
        ] {
            let value = encode(timeout);
            assert_eq!(value, expected, "{timeout:?}");
            assert!(parse(value.as_bytes()).unwrap() >= timeout);
        }
        assert_eq!(encode(Duration::from_secs(400 * 86_400 * 365)), "3504000H");
    }

    #[test]
    fn the_shorter_deadline_wins_and_is_passed_on() {
        let timeout = |deadlines: &Deadlines, header: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(h) = header {
                headers.insert(GRPC_TIMEOUT, h.parse().unwrap());
            }
            let applied = deadlines.apply(&mut headers).unwrap();
            let passed = headers
                .get(GRPC_TIMEOUT)
                .map(|v| v.to_str().unwrap().to_owned());
            (applied, passed)
        };
        let none = Deadlines::new(None);
        assert_eq!(timeout(&none, None), (None, None));
        assert_eq!(
            timeout(&none, Some("5S")),
            (Some(Duration::from_secs(5)), Some("5S".into()))
        );
        let mut bogus = HeaderMap::new();
        bogus.insert(GRPC_TIMEOUT, "bogus".parse().unwrap());
        let refused = none.apply(&mut bogus).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("malformed grpc-timeout \"bogus\""),
            "{refused}"
        );
        assert_eq!(tonic::Status::from(refused).code(), tonic::Code::Internal);
        assert_eq!(
            timeout(&none, Some("0n")),
            (Some(Duration::ZERO), Some("0n".into())),
            "zero is a deadline that has passed, not none"
        );

        let ten = Deadlines::new(Some(Duration::from_secs(10)));
        assert_eq!(
            timeout(&ten, None),
            (Some(Duration::from_secs(10)), Some("10000000u".into()))
        );
        assert_eq!(
            timeout(&ten, Some("5S")),
            (Some(Duration::from_secs(5)), Some("5S".into()))
        );
        assert_eq!(
            timeout(&ten, Some("1M")),
            (Some(Duration::from_secs(10)), Some("10000000u".into()))
        );
        assert_eq!(
            Deadlines::new(Some(Duration::ZERO))
                .apply(&mut HeaderMap::new())
                .unwrap(),
            None,
            "zero means none"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_expiry_fires_after_its_timeout() {
        let mut expiry = Expiry::start(Duration::from_millis(300));
        let started = tokio::time::Instant::now();
        expiry.expired().await;
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        let status = expiry.status("plugin.echo");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("plugin.echo"), "{status}");
    }
}
