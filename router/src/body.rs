//! The body of the router's answer: its own services' (tonic's boxed body), or a forwarded one
//! as the instance sends it — not boxed, holding the call's place under the in-flight limit
//! and cut off at the call's deadline.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;

use mesh::{ResponseBody, ServiceName, transport::BoxError};

use crate::{deadline::Expiry, limit::Permit, metrics::CallMetrics};

/// The body of a response from the router.
// Not boxed: a forwarded answer is the common case, and boxing it would cost an allocation
// per call to save a few bytes on the router's own answers.
#[allow(clippy::large_enum_variant)]
pub(crate) enum RouterBody {
    /// Made by the router (its own services, errors).
    Local(Body),
    /// Streamed from an instance.
    Forwarded(Forwarded),
}

/// A forwarded answer.
pub(crate) struct Forwarded {
    /// `None` once the deadline cut it off.
    inner: Option<ResponseBody>,
    deadline: Option<(Expiry, ServiceName)>,
    _permit: Permit,
    /// Recorded when the answer ends or is dropped (metrics on).
    metrics: Option<CallMetrics>,
}

impl Forwarded {
    pub(crate) fn new(
        inner: ResponseBody,
        deadline: Option<(Expiry, ServiceName)>,
        permit: Permit,
    ) -> Self {
        Self {
            inner: Some(inner),
            deadline,
            _permit: permit,
            metrics: None,
        }
    }

    /// The instance that answered, as the registry names it.
    pub(crate) fn instance(&self) -> Option<&str> {
        self.inner.as_ref().map(ResponseBody::instance)
    }

    /// Records `metrics` as the answer goes by: its status from the trailers, its duration
    /// when it ends or is dropped.
    pub(crate) fn measure(&mut self, metrics: CallMetrics) {
        self.metrics = Some(metrics);
    }
}

impl HttpBody for RouterBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Local(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Forwarded(forwarded) => forwarded.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Local(body) => body.is_end_stream(),
            Self::Forwarded(forwarded) => {
                forwarded.inner.as_ref().is_none_or(HttpBody::is_end_stream)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Local(body) => body.size_hint(),
            Self::Forwarded(forwarded) => forwarded
                .inner
                .as_ref()
                .map_or_else(SizeHint::default, HttpBody::size_hint),
        }
    }
}

impl Forwarded {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = self.poll_inner(cx);
        if let Some(metrics) = &mut self.metrics {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        metrics.trailers(trailers);
                    }
                }
                Poll::Ready(None) => metrics.ended(),
                _ => {}
            }
        }
        polled
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some((expiry, service)) = &mut self.deadline
            && expiry.poll_expired(cx)
        {
            // Dropping the instance's stream resets it: the plugin learns the call is over.
            self.inner = None;
            let mut trailers = http::HeaderMap::new();
            let added = expiry.status(service.as_str()).add_header(&mut trailers);
            return Poll::Ready(Some(
                added
                    .map(|()| Frame::trailers(trailers))
                    .map_err(Into::into),
            ));
        }
        Pin::new(inner).poll_frame(cx).map_err(Into::into)
    }
}

/// An empty body, so that `Status::into_http` builds the router's error answers directly.
impl Default for RouterBody {
    fn default() -> Self {
        Self::Local(Body::default())
    }
}
