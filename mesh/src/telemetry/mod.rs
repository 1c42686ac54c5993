//! Traces across hops: W3C trace context (`traceparent`, `tracestate`) carried by every call,
//! the server span the plugin SDK opens per call, and (with the `otlp` feature, on by default)
//! installing a tracer that exports to an OpenTelemetry collector plus the log formats.
//!
//! Nothing here costs a call anything until a tracer is installed ([`init`], or
//! [`set_active`] by a program that installs its own): until then a call pays one relaxed
//! atomic load, and headers pass through untouched — a `traceparent` a caller sent still
//! reaches the next hop, since the router forwards headers as they are.
//!
//! Spans are `tracing` spans bridged by `tracing-opentelemetry`, named and attributed after
//! the OpenTelemetry RPC conventions: name `package.Service/Method`, `rpc.system = grpc`,
//! `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, and `mesh.instance` (the instance
//! that answered).

mod propagate;
mod sampling;
mod server;

#[cfg(feature = "otlp")]
mod install;
#[cfg(feature = "otlp")]
mod json;

use std::sync::atomic::{AtomicBool, Ordering};

pub use propagate::{TRACEPARENT, TRACESTATE, extract, inject, inject_context};
pub use sampling::{Sampling, Unsampled, sample, set_sample_ratio};
pub(crate) use server::TraceLayer;
pub use server::{CallSpan, RPC_TARGET, TracedBody, rpc_span, sampled_rpc_span};

#[cfg(feature = "otlp")]
pub use install::{
    LogFormat, MESH_LOG_FORMAT, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME,
    OTEL_TRACES_SAMPLER_ARG, Telemetry, TelemetryConfig, TelemetryError, UNIX_ENDPOINT, init,
    layer, parse_ratio, provider,
};

/// Whether a tracer is installed, so calls open spans and carry their context.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Whether calls open spans and carry trace context: true once [`init`] installed a tracer
/// (or [`set_active`] said one is).
#[inline]
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// Says that a tracer is installed (a `tracing-opentelemetry` layer on the global
/// subscriber), for a program that sets up its own instead of calling [`init`]: from then on
/// `mesh::connect` channels send the current span's context and the plugin SDK opens a span
/// per call.
pub fn set_active(active: bool) {
    ACTIVE.store(active, Ordering::Relaxed);
}

/// The trace and span id of the current span, in hex (`(trace_id, span_id)`), if it belongs
/// to a trace: what JSON log lines carry.
pub fn current_ids() -> Option<(String, String)> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !active() {
        return None;
    }
    let span = tracing::Span::current();
    if span.is_none() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| {
        (
            format!("{:032x}", span_context.trace_id()),
            format!("{:016x}", span_context.span_id()),
        )
    })
}
