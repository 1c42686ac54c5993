//! The bodies of a balanced call: the request as one attempt sends it, and the response that
//! keeps the call counted against its instance until it is dropped.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use super::{endpoint::InFlight, replay::Replay};
use crate::transport::{BoxError, SendBody};

/// A request body as one attempt sends it.
pub(crate) enum RequestBody<B> {
    /// The caller's body as it came: the call is sent once.
    Once(B),
    /// A copy that can be sent again (idempotent methods).
    Replay(Replay<B>),
}

impl<B: SendBody> HttpBody for RequestBody<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Once(body) => Poll::Ready(match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => Some(Ok(frame)),
                Some(Err(error)) => Some(Err(B::box_error(error))),
                None => None,
            }),
            Self::Replay(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Once(body) => body.is_end_stream(),
            Self::Replay(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Once(body) => body.size_hint(),
            Self::Replay(_) => SizeHint::default(),
        }
    }
}

/// The body of a response from an instance; the call counts as in flight until it is dropped,
/// and an error while reading it counts against the instance's health.
pub struct ResponseBody {
    inner: Incoming,
    /// A frame read before the call was handed to the caller (see `Balancer::send`).
    first: Option<Frame<Bytes>>,
    in_flight: InFlight,
}

impl ResponseBody {
    pub(crate) fn new(inner: Incoming, first: Option<Frame<Bytes>>, in_flight: InFlight) -> Self {
        Self {
            inner,
            first,
            in_flight,
        }
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(error))) = &polled {
            // The stream broke after the answer began (instance gone, stream reset).
            if super::retry::Failure::of(error) == super::retry::Failure::Failed {
                self.in_flight.health().failed();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.first {
            None => self.inner.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}
