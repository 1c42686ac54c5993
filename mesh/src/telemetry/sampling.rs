//! Sampling decided before a call's span exists, so that a call that is not recorded costs no
//! span at all: at 1 % sampling, 99 calls in 100 pay a header parse and a random number, not
//! a `tracing` span and an OpenTelemetry span builder (about 5 µs and a dozen allocations on
//! the 2-core VM, `cargo test --release -p mesh-router --lib -- --ignored --nocapture
//! trace::tests::cost_per_call`).
//!
//! The decision is the SDK's own parent-based ratio sampler, taken early: a caller's sampled
//! context is recorded, a caller's unsampled one is not (and is carried on as it is, so the
//! hops after this one do not record it either); a new trace is recorded at the ratio
//! [`init`](super::init) installed. A new trace this decides to record is marked in its span's
//! parent context, and the sampler [`init`](super::init) installs records every span so marked:
//! the ratio is applied once, not twice.
//!
//! A program that installed a tracer of its own ([`set_active`](super::set_active)) set no
//! ratio here: its calls' spans are all opened and its sampler decides.

use std::{
    cell::Cell,
    hash::{BuildHasher, RandomState},
    sync::atomic::{AtomicU64, Ordering},
};

use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

/// The ratio of new traces recorded, as `f64` bits; [`UNSET`]: no ratio here, the tracer's
/// sampler decides.
static ROOT_RATIO: AtomicU64 = AtomicU64::new(UNSET);

/// Not an `f64` a ratio can be (a NaN's bits).
const UNSET: u64 = u64::MAX;

/// Sets the ratio of new traces that calls record (0 to 1), or `None` to leave every decision
/// to the installed tracer's sampler. [`init`](super::init) sets it to its config's ratio.
pub fn set_sample_ratio(ratio: Option<f64>) {
    let bits = ratio.map_or(UNSET, |r| r.clamp(0.0, 1.0).to_bits());
    ROOT_RATIO.store(bits, Ordering::Relaxed);
}

fn root_ratio() -> Option<f64> {
    let bits = ROOT_RATIO.load(Ordering::Relaxed);
    (bits != UNSET).then(|| f64::from_bits(bits))
}

/// What a call does about tracing, decided before its span is opened.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Record a span for the call, child of the caller's context (`None`: a new trace).
    Record(Option<SpanContext>),
    /// Record nothing.
    Skip(Unsampled),
}

/// A call that is not recorded. Calls made onward carry `context`, unsampled, so that the next
/// hops do not start a trace of their own.
#[derive(Debug, Clone, PartialEq)]
pub struct Unsampled {
    /// The context to carry on.
    pub context: SpanContext,
    /// Whether `context` is new here (a new trace's, which this hop must send on itself)
    /// rather than the caller's (already in the call's headers).
    pub new: bool,
}

/// Decides whether a call whose caller sent `parent` (its `traceparent`, if any) is recorded.
pub fn sample(parent: Option<SpanContext>) -> Sampling {
    let Some(ratio) = root_ratio() else {
        // A tracer of the program's own: its sampler decides every span.
        return Sampling::Record(parent);
    };
    match parent {
        Some(parent) if parent.is_sampled() => Sampling::Record(Some(parent)),
        Some(parent) => Sampling::Skip(Unsampled {
            context: parent,
            new: false,
        }),
        None => {
            let trace_id = random_u64();
            if records(ratio, trace_id) {
                return Sampling::Record(None);
            }
            let high = u128::from(random_u64()) << 64;
            Sampling::Skip(Unsampled {
                context: SpanContext::new(
                    TraceId::from(high | u128::from(trace_id)),
                    SpanId::from(random_u64() | 1),
                    TraceFlags::NOT_SAMPLED,
                    false,
                    TraceState::NONE,
                ),
                new: true,
            })
        }
    }
}

/// The SDK's trace-id ratio test (`TraceIdRatioBased`) on a trace id's low 64 bits.
fn records(ratio: f64, trace_id_low: u64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    (trace_id_low >> 1) < bound
}

/// A random `u64`: SipHash of a per-thread counter under a per-thread random key (std's
/// `RandomState`, seeded from the OS), so no generator crate and no lock.
fn random_u64() -> u64 {
    thread_local! {
        static STATE: (RandomState, Cell<u64>) = (RandomState::new(), Cell::new(0));
    }
    STATE.with(|(key, counter)| {
        let n = counter.get().wrapping_add(1);
        counter.set(n);
        key.hash_one(n)
    })
}

/// Marks a new trace that [`sample`] decided to record, in its first span's parent context:
/// the sampler [`init`](super::init) installs records it without applying the ratio again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RootSampled;

#[cfg(test)]
mod tests {
    use super::*;

    fn context(sampled: bool) -> SpanContext {
        SpanContext::new(
            TraceId::from(7u128),
            SpanId::from(9u64),
            if sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::NOT_SAMPLED
            },
            true,
            TraceState::NONE,
        )
    }

    // One test for everything that reads the process-wide ratio: tests run in parallel.
    #[test]
    fn the_callers_decision_wins_and_new_traces_follow_the_ratio() {
        set_sample_ratio(Some(0.0));
        assert_eq!(
            sample(Some(context(true))),
            Sampling::Record(Some(context(true)))
        );
        assert_eq!(
            sample(Some(context(false))),
            Sampling::Skip(Unsampled {
                context: context(false),
                new: false
            })
        );
        for _ in 0..1000 {
            match sample(None) {
                Sampling::Skip(Unsampled { context, new }) => {
                    assert!(new && context.is_valid() && !context.is_sampled());
                }
                other => panic!("ratio 0 recorded a new trace: {other:?}"),
            }
        }
        set_sample_ratio(Some(1.0));
        for _ in 0..1000 {
            assert_eq!(sample(None), Sampling::Record(None));
        }
        set_sample_ratio(Some(0.25));
        let recorded = (0..20_000)
            .filter(|_| matches!(sample(None), Sampling::Record(None)))
            .count();
        assert!(
            (4_000..6_000).contains(&recorded),
            "{recorded} of 20 000 new traces recorded at 25 %"
        );
        // The plugin SDK's layer, on a call that is not recorded: no span, and the handler's own
        // calls carry the unsampled context on, the caller's or a new trace's.
        set_sample_ratio(Some(0.0));
        super::super::set_active(true);
        let onward = |parent: Option<&str>| {
            use tower::{Layer, Service};
            let handler = tower::service_fn(|_: http::Request<tonic::body::Body>| async {
                let mut headers = http::HeaderMap::new();
                super::super::inject(&mut headers);
                let mut response = http::Response::new(tonic::body::Body::empty());
                if let Some(sent) = headers.get(super::super::TRACEPARENT) {
                    response.headers_mut().insert("sent", sent.clone());
                }
                Ok::<_, std::convert::Infallible>(response)
            });
            let mut traced = super::super::TraceLayer::new("echo-0").layer(handler);
            let mut request = http::Request::builder().uri("/echo.v1.Echo/Echo");
            if let Some(parent) = parent {
                request = request.header(super::super::TRACEPARENT, parent);
            }
            let call = traced.call(request.body(tonic::body::Body::empty()).unwrap());
            let Ok(response) = futures_util::FutureExt::now_or_never(call).expect("answered");
            response
                .headers()
                .get("sent")
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let callers = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(onward(Some(callers)).as_deref(), Some(callers));
        let new = onward(None).expect("a new trace's context is sent on");
        assert!(
            new.starts_with("00-") && new.ends_with("-00") && new.len() == 55,
            "{new}"
        );
        assert_ne!(onward(None), Some(new), "each new trace has its own id");
        super::super::set_active(false);

        // No ratio here: the installed tracer decides, so every span is opened.
        set_sample_ratio(None);
        assert_eq!(sample(None), Sampling::Record(None));
        assert_eq!(
            sample(Some(context(false))),
            Sampling::Record(Some(context(false)))
        );
    }

    #[test]
    fn the_ratio_test_is_the_sdks() {
        assert!(records(1.0, u64::MAX));
        assert!(!records(0.0, 0));
        assert!(records(0.5, (1 << 63) - 1));
        assert!(!records(0.5, 1 << 63));
    }

    #[test]
    fn random_numbers_differ() {
        let drawn: std::collections::HashSet<u64> = (0..1000).map(|_| random_u64()).collect();
        assert_eq!(drawn.len(), 1000);
    }
}
