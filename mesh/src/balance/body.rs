//! The body of a balanced call's answer, which keeps the call counted against its instance
//! until it is dropped.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::endpoint::InFlight;
use crate::transport::{CallError, RecvBody};

/// The body of a response from an instance; the call counts as in flight until it is dropped,
/// and an error while reading it counts against the instance's health.
pub struct ResponseBody {
    inner: RecvBody,
    /// A frame read before the call was handed to the caller (see `Balancer::send`).
    first: Option<Frame<Bytes>>,
    in_flight: InFlight,
}

impl ResponseBody {
    pub(crate) fn new(inner: RecvBody, first: Option<Frame<Bytes>>, in_flight: InFlight) -> Self {
        Self {
            inner,
            first,
            in_flight,
        }
    }
}

impl ResponseBody {
    /// The id of the instance that answered (`echo-0`), as the registry names it.
    pub fn instance(&self) -> &str {
        self.in_flight.health().id()
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = CallError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, CallError>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Err(error)) => {
                // The stream broke after the answer began (instance gone, stream reset).
                if super::retry::Failure::of(&error) == super::retry::Failure::Failed {
                    self.in_flight.health().failed();
                }
                Poll::Ready(Some(Err(CallError::new(error))))
            }
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            None => Poll::Ready(None),
        }
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
