//! The router's span per forwarded call: a child of the caller's `traceparent`, named and
//! attributed after the OpenTelemetry RPC conventions, with the instance that answered
//! (`mesh.instance`); the forwarded call carries the span's context on, so the plugin's span
//! is its child.
//!
//! While no tracer is installed (`mesh::telemetry::active`) a call costs one atomic load here
//! and its headers go on untouched, a caller's `traceparent` included.

use http::{Request, Response};
use mesh::{
    balance::AnsweredBy,
    telemetry::{self, CallSpan},
};
use opentelemetry::trace::TraceContextExt;
use tonic::body::Body;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::body::RouterBody;

/// Opens the span of a call to `service`, if a tracer is installed, and puts its context in
/// the request's headers for the instance.
pub(crate) fn start<B>(request: &mut Request<B>, service: &str) -> Option<CallSpan> {
    if !telemetry::active() {
        return None;
    }
    let parent = telemetry::extract(request.headers());
    let span = telemetry::rpc_span(request.uri().path(), "server", parent);
    span.set_attribute("mesh.service", service.to_owned());
    let context = span.context();
    telemetry::inject_context(context.span().span_context(), request.headers_mut());
    Some(CallSpan::new(span))
}

/// Ends `call` with the answer's status (its headers', or its trailers' once streamed) and
/// the instance that answered.
pub(crate) fn answer(call: CallSpan, response: Response<RouterBody>) -> Response<RouterBody> {
    if let Some(AnsweredBy(instance)) = response.extensions().get::<AnsweredBy>() {
        call.span()
            .set_attribute("mesh.instance", instance.to_string());
    }
    call.answer(response)
        .map(|body| RouterBody::Local(Body::new(body)))
}
