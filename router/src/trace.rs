//! The router's span per forwarded call: a child of the caller's `traceparent`, named and
//! attributed after the OpenTelemetry RPC conventions, with the instance that answered
//! (`mesh.instance`); the forwarded call carries the span's context on, so the plugin's span
//! is its child.
//!
//! While no tracer is installed (`mesh::telemetry::active`) a call costs one atomic load here
//! and its headers go on untouched, a caller's `traceparent` included. A call that is not
//! sampled (`mesh::telemetry::sample`) costs no span either, only its unsampled context sent
//! on when the trace is new here.

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
    let span = match telemetry::sampled_rpc_span(request.uri().path(), "server", parent) {
        Ok(span) => span,
        // Not recorded: no span. A new trace's unsampled context goes on to the instance, so
        // that it does not start a trace of its own; a caller's is in the headers already.
        Err(unsampled) => {
            if unsampled.new {
                telemetry::inject_context(&unsampled.context, request.headers_mut());
            }
            return None;
        }
    };
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use http_body_util::BodyExt;
    use opentelemetry_sdk::{
        error::OTelSdkResult,
        trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter},
    };
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Takes every batch and drops it.
    #[derive(Debug)]
    struct Discard;

    impl SpanExporter for Discard {
        fn export(
            &self,
            _batch: Vec<SpanData>,
        ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
            std::future::ready(Ok(()))
        }
    }

    fn request() -> Request<()> {
        Request::builder()
            .uri("http://plugin.echo/echo.v1.Echo/Echo")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap()
    }

    fn response() -> Response<RouterBody> {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body = http_body_util::StreamBody::new(futures_util::stream::iter([
            Ok::<_, tonic::Status>(http_body::Frame::data(bytes::Bytes::from_static(
                b"\0\0\0\0\x05hello",
            ))),
            Ok(http_body::Frame::trailers(trailers)),
        ]));
        Response::builder()
            .header("content-type", "application/grpc")
            .body(RouterBody::Local(Body::new(body)))
            .unwrap()
    }

    /// What the router's span costs a call (`cargo test --release -p mesh-router --lib --
    /// --ignored --nocapture trace::tests::cost_per_call`): prints, asserts nothing.
    #[test]
    #[ignore]
    fn cost_per_call() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        const CALLS: u32 = 200_000;
        for ratio in [None, Some(1.0), Some(0.01)] {
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(Discard)
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    ratio.unwrap_or(1.0),
                ))))
                .build();
            let subscriber = tracing_subscriber::registry().with(mesh::telemetry::layer(&provider));
            // As `mesh::telemetry::init` does: calls decide first, the SDK's sampler after.
            telemetry::set_sample_ratio(ratio);
            telemetry::set_active(ratio.is_some());
            tracing::subscriber::with_default(subscriber, || {
                runtime.block_on(async {
                    for round in 0..3 {
                        let started = Instant::now();
                        for _ in 0..CALLS {
                            let mut request = request();
                            let call = start(&mut request, "plugin.echo");
                            let response = match call {
                                Some(call) => answer(call, response()),
                                None => response(),
                            };
                            let _ = response.into_body().collect().await;
                        }
                        let ns = started.elapsed().as_nanos() as f64 / f64::from(CALLS);
                        println!("ratio {ratio:?} round {round}: {ns:.0} ns per call");
                    }
                });
            });
            let _ = provider.shutdown();
        }
    }
}
