//! W3C trace context in HTTP/2 headers: `traceparent` read strictly (it comes off the wire),
//! written for the next hop.

use std::str::FromStr;

use http::{HeaderMap, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};

/// The W3C header carrying the parent span: `00-<trace id>-<span id>-<flags>`.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header carrying vendors' trace state, passed along with `traceparent`.
pub const TRACESTATE: &str = "tracestate";

/// Longest `tracestate` taken (the W3C limit is 32 members of at most 256 bytes; 512 bytes is
/// what the spec asks every hop to keep at least).
const MAX_TRACESTATE: usize = 512;

/// The remote parent a request's headers name, if its `traceparent` is valid. Anything else
/// (malformed, all-zero ids, version `ff`, uppercase hex) is no parent: the call starts a
/// new trace, as the W3C spec says.
pub fn extract(headers: &HeaderMap) -> Option<SpanContext> {
    let parent = headers.get(TRACEPARENT)?.to_str().ok()?;
    let (trace_id, span_id, flags) = parse_traceparent(parent)?;
    let state = headers
        .get(TRACESTATE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= MAX_TRACESTATE)
        .and_then(|v| TraceState::from_str(v).ok())
        .unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, flags, true, state))
}

fn parse_traceparent(value: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let mut parts = value.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    let lower_hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    // Version 00 has exactly four fields; a later version may add some after them.
    if !lower_hex(version, 2) || version == "ff" || (version == "00" && rest.is_some()) {
        return None;
    }
    if !lower_hex(trace_id, 32) || !lower_hex(span_id, 16) || !lower_hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    (trace_id != TraceId::INVALID && span_id != SpanId::INVALID).then_some((
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
    ))
}

/// Writes `span_context` as the request's `traceparent` (and `tracestate`), replacing what
/// was there; an invalid context writes nothing.
pub fn inject_context(span_context: &SpanContext, headers: &mut HeaderMap) {
    if !span_context.is_valid() {
        return;
    }
    let parent = format!(
        "00-{:032x}-{:016x}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags() & TraceFlags::SAMPLED
    );
    if let Ok(mut value) = HeaderValue::from_str(&parent) {
        // New on every call: not worth a place in HPACK's table, where it would push out the
        // headers every call repeats (path, content-type, the service).
        value.set_sensitive(true);
        headers.insert(TRACEPARENT, value);
    }
    let state = span_context.trace_state().header();
    match HeaderValue::from_str(&state) {
        Ok(value) if !state.is_empty() => {
            headers.insert(TRACESTATE, value);
        }
        _ => {
            headers.remove(TRACESTATE);
        }
    }
}

/// Writes the current `tracing` span's context into `headers`, when a tracer is installed
/// ([`super::active`]) and the span belongs to a trace; otherwise leaves them as they are.
/// `mesh::connect` channels do this for every call.
#[inline]
pub fn inject(headers: &mut HeaderMap) {
    if super::active() {
        inject_current(headers);
    }
}

fn inject_current(headers: &mut HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::Span::current();
    if span.is_none() {
        // No span: a call that is not recorded (its context is the current OpenTelemetry
        // context, unsampled), or no call at all (no context, nothing sent).
        opentelemetry::Context::map_current(|context| {
            inject_context(context.span().span_context(), headers);
        });
        return;
    }
    let context = span.context();
    inject_context(context.span().span_context(), headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(parent: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_str(parent).unwrap());
        headers
    }

    #[test]
    fn a_valid_traceparent_round_trips() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut with_state = headers(parent);
        with_state.insert(TRACESTATE, HeaderValue::from_static("vendor=abc"));
        let context = extract(&with_state).expect("valid");
        assert!(context.is_remote() && context.is_sampled());
        assert_eq!(
            format!("{:032x}", context.trace_id()),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut out = HeaderMap::new();
        inject_context(&context, &mut out);
        assert_eq!(out[TRACEPARENT], parent);
        assert_eq!(out[TRACESTATE], "vendor=abc");
        // Unsampled stays unsampled.
        let unsampled = extract(&headers(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        ))
        .unwrap();
        assert!(!unsampled.is_sampled());
    }

    #[test]
    fn a_hostile_or_malformed_traceparent_is_no_parent() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47366-0f067aa0ba902b7-01",
        ] {
            assert!(extract(&headers(bad)).is_none(), "{bad:?} taken");
        }
        // A later version may carry more fields.
        assert!(
            extract(&headers(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later"
            ))
            .is_some()
        );
        // An oversized tracestate is dropped, not the parent.
        let mut big = headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        big.insert(
            TRACESTATE,
            HeaderValue::from_str(&format!("a={}", "x".repeat(600))).unwrap(),
        );
        let context = extract(&big).unwrap();
        assert!(context.trace_state().header().is_empty());
    }

    #[test]
    fn nothing_is_injected_without_a_tracer() {
        let mut out = HeaderMap::new();
        inject(&mut out);
        assert!(out.is_empty());
    }
}
