//! A span per call: opened when the call comes (child of the caller's `traceparent`), current
//! while the handler runs, ended with the call's gRPC status once the answer's trailers are
//! sent, or with `CANCELLED` when the caller goes away first.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::{BoxFuture, Either, FutureExt};
use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use opentelemetry::{
    context::{FutureExt as _, WithContext},
    trace::{SpanContext, TraceContextExt},
};
use tonic::body::Body;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::sampling::{RootSampled, Sampling, Unsampled, sample};

/// The target of the spans calls open: the log filter and the exporter's filter know it.
pub const RPC_TARGET: &str = "mesh::rpc";

/// Opens the span of one call to `path` (`/package.Service/Method`), of OpenTelemetry span
/// `kind` (`"server"`, `"client"`), child of `parent` (the caller's context), with the RPC
/// attributes the conventions name. The span is a `tracing` span (target [`RPC_TARGET`],
/// level INFO): enter it, or instrument a future with it, to make it current.
pub fn rpc_span(path: &str, kind: &'static str, parent: Option<SpanContext>) -> tracing::Span {
    let parent =
        parent.map(|parent| opentelemetry::Context::new().with_remote_span_context(parent));
    span_under(path, kind, parent)
}

/// Opens the span of one call to `path`, as [`rpc_span`] does, if the call is recorded
/// ([`sample`]: the caller's decision, else the ratio of new traces): `Err` says what the
/// call's onward calls carry instead. A call that is not recorded costs no span.
pub fn sampled_rpc_span(
    path: &str,
    kind: &'static str,
    parent: Option<SpanContext>,
) -> Result<tracing::Span, Unsampled> {
    match sample(parent) {
        Sampling::Skip(unsampled) => Err(unsampled),
        Sampling::Record(Some(parent)) => Ok(rpc_span(path, kind, Some(parent))),
        // A new trace, decided here: marked so that the sampler does not apply the ratio again.
        Sampling::Record(None) => Ok(span_under(
            path,
            kind,
            Some(opentelemetry::Context::new().with_value(RootSampled)),
        )),
    }
}

fn span_under(
    path: &str,
    kind: &'static str,
    parent: Option<opentelemetry::Context>,
) -> tracing::Span {
    let name = path.strip_prefix('/').unwrap_or(path);
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    // A root unless the caller sent a parent: never a child of whatever span the server's task
    // is in (the router's per-connection span, say).
    let span = tracing::info_span!(
        target: RPC_TARGET,
        parent: None,
        "rpc",
        otel.name = name,
        otel.kind = kind
    );
    if let Some(parent) = parent {
        let _ = span.set_parent(parent);
    }
    span.set_attribute("rpc.system", "grpc");
    span.set_attribute("rpc.service", service.to_owned());
    span.set_attribute("rpc.method", method.to_owned());
    span
}

/// The span of a call in progress; dropped without a status (the caller went away), it ends
/// as `CANCELLED`.
#[derive(Debug)]
pub struct CallSpan {
    span: tracing::Span,
    done: bool,
}

impl CallSpan {
    /// Takes over `span` (from [`rpc_span`]).
    pub fn new(span: tracing::Span) -> Self {
        Self { span, done: false }
    }

    /// The span, to make current or to add attributes to.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Records the call's gRPC status code (`rpc.grpc.status_code`) and marks the span failed
    /// for the codes the conventions count as a server's error.
    pub fn finish(&mut self, code: i32) {
        if self.done {
            return;
        }
        self.done = true;
        self.span
            .set_attribute("rpc.grpc.status_code", i64::from(code));
        // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
        if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
            self.span
                .set_status(opentelemetry::trace::Status::error(format!(
                    "gRPC status {code}"
                )));
        }
    }

    /// Records the status of a trailers-only answer (`grpc-status` in its headers), and
    /// otherwise lets the body record it from its trailers.
    pub fn answer<B>(mut self, response: Response<B>) -> Response<TracedBody<B>> {
        if let Some(code) = grpc_status(response.headers()) {
            self.finish(code);
        } else if !is_grpc(response.headers()) {
            // Not a gRPC answer (an HTTP error from below): UNKNOWN, as a gRPC client sees it.
            self.finish(2);
        }
        response.map(|inner| TracedBody { inner, call: self })
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        // CANCELLED: the answer never finished.
        self.finish(1);
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// An answer's body that records the call's status from its trailers, and ends the span with
/// it.
#[derive(Debug)]
pub struct TracedBody<B> {
    inner: B,
    call: CallSpan,
}

impl<B: HttpBody + Unpin> HttpBody for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.call.finish(code);
                }
            }
            // The stream broke: the caller sees it reset.
            Poll::Ready(Some(Err(_))) => this.call.finish(1),
            // Ended without trailers: no status, UNKNOWN to a gRPC client.
            Poll::Ready(None) => this.call.finish(2),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The plugin SDK's layer: a server span per call, current while the handler runs, for
/// every call but health checks and reflection (polled by the manager every second, they
/// would flood the traces). Costs one atomic load per call while no tracer is installed.
#[derive(Debug, Clone)]
pub(crate) struct TraceLayer {
    instance: Arc<str>,
}

impl TraceLayer {
    pub(crate) fn new(instance: &str) -> Self {
        Self {
            instance: instance.into(),
        }
    }
}

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Traced<S> {
        Traced {
            inner,
            instance: self.instance.clone(),
        }
    }
}

/// A service under [`TraceLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Traced<S> {
    inner: S,
    instance: Arc<str>,
}

fn untraced(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

impl<S> tower::Service<Request<Body>> for Traced<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<
        Either<S::Future, WithContext<S::Future>>,
        BoxFuture<'static, Result<Response<Body>, Infallible>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if !super::active() || untraced(request.uri().path()) {
            return Either::Left(Either::Left(self.inner.call(request)));
        }
        let span = match sampled_rpc_span(
            request.uri().path(),
            "server",
            super::extract(request.headers()),
        ) {
            Ok(span) => span,
            // Not recorded: no span, but the handler's own calls carry the unsampled context,
            // so that the hops after it do not record the call either.
            Err(unsampled) => {
                let context =
                    opentelemetry::Context::new().with_remote_span_context(unsampled.context);
                return Either::Left(Either::Right(
                    self.inner.call(request).with_context(context),
                ));
            }
        };
        span.set_attribute("mesh.instance", self.instance.to_string());
        let call = CallSpan::new(span.clone());
        let answer = self.inner.call(request).instrument(span);
        Either::Right(
            async move {
                let Ok(response) = answer.await;
                Ok(call.answer(response).map(Body::new))
            }
            .boxed(),
        )
    }
}
