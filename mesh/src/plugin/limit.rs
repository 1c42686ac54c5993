//! The plugin's largest message, applied to every service it serves: tonic keeps its limits
//! inside each generated server, so the SDK reads the gRPC framing (a flag byte and a 4-byte
//! length before each message) on the way in and out instead.
//!
//! A request message over the limit fails the call with `RESOURCE_EXHAUSTED` as soon as its
//! length is read, before its bytes are buffered; a response message over it ends the response
//! with that status in the trailers instead of the message. Only message prefixes are read:
//! the cost is a few comparisons per body frame.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::{Status, body::Body};

/// Which way a body goes, for what a message over the limit does.
#[derive(Clone, Copy, Debug)]
enum Direction {
    /// Fails the body: the handler's decoder sees `RESOURCE_EXHAUSTED`.
    Request,
    /// Ends the body with `RESOURCE_EXHAUSTED` trailers.
    Response,
}

/// A body whose messages may be at most `limit` bytes each.
#[derive(Debug)]
pub(crate) struct Limited {
    inner: Body,
    limit: usize,
    direction: Direction,
    framing: Framing,
    /// A response's refusal, sent after the data that came before the message.
    refusal: Option<HeaderMap>,
    /// The body ended early, refused.
    done: bool,
}

impl Limited {
    /// A request body whose messages the handler may decode only up to `limit` bytes each.
    pub(crate) fn request(inner: Body, limit: usize) -> Self {
        Self::new(inner, limit, Direction::Request)
    }

    /// A response body that may carry messages only up to `limit` bytes each.
    pub(crate) fn response(inner: Body, limit: usize) -> Self {
        Self::new(inner, limit, Direction::Response)
    }

    fn new(inner: Body, limit: usize, direction: Direction) -> Self {
        Self {
            inner,
            limit,
            direction,
            framing: Framing::Prefix { read: 0, length: 0 },
            refusal: None,
            done: false,
        }
    }

    fn refused(&self, length: u32) -> Status {
        let what = match self.direction {
            Direction::Request => "request",
            Direction::Response => "response",
        };
        Status::resource_exhausted(format!(
            "{what} message of {length} bytes is larger than this plugin's limit of {} bytes \
             (MESH_MAX_MESSAGE_SIZE, set from `[mesh] max_message_size`)",
            self.limit
        ))
    }
}

impl HttpBody for Limited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(trailers) = this.refusal.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => return Poll::Ready(Some(Ok(frame))),
        };
        let Some((at, length)) = this.framing.scan(&data, this.limit) else {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        };
        this.done = true;
        let status = this.refused(length);
        match this.direction {
            Direction::Request => Poll::Ready(Some(Err(status))),
            Direction::Response => {
                let mut trailers = HeaderMap::new();
                if let Err(status) = status.add_header(&mut trailers) {
                    return Poll::Ready(Some(Err(status)));
                }
                if at == 0 {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                // The messages before the refused one still go out, then the status.
                this.refusal = Some(trailers);
                Poll::Ready(Some(Ok(Frame::data(data.slice(..at)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.refusal.is_none() && (self.done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.done || self.refusal.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

/// Where the body is in its gRPC framing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// Reading a message's 5-byte prefix: `read` bytes of it so far, the length as read.
    Prefix { read: u8, length: u32 },
    /// Passing over a message: this many bytes of it are still to come.
    Payload(u32),
}

impl Framing {
    /// Walks the framing through `data`; returns where in `data` the first message announcing
    /// more than `limit` bytes starts (0 if its prefix began in an earlier frame), and its length.
    fn scan(&mut self, data: &[u8], limit: usize) -> Option<(usize, u32)> {
        let mut at = 0;
        let mut start = 0;
        while at < data.len() {
            match self {
                Framing::Payload(left) => {
                    let step = (*left).min(u32::try_from(data.len() - at).unwrap_or(u32::MAX));
                    at += step as usize;
                    *left -= step;
                    if *left == 0 {
                        *self = Framing::Prefix { read: 0, length: 0 };
                    }
                }
                Framing::Prefix { read, length } => {
                    if *read == 0 {
                        start = at;
                    }
                    // Byte 0 is the compression flag, bytes 1 to 4 the length, big-endian.
                    if *read > 0 {
                        *length = (*length << 8) | u32::from(data[at]);
                    }
                    *read += 1;
                    at += 1;
                    if *read == 5 {
                        let length = *length;
                        if length as usize > limit {
                            return Some((start, length));
                        }
                        *self = match length {
                            0 => Framing::Prefix { read: 0, length: 0 },
                            n => Framing::Payload(n),
                        };
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend(std::iter::repeat_n(7, len as usize));
        bytes
    }

    #[test]
    fn messages_within_the_limit_pass_however_frames_split_them() {
        let stream: Vec<u8> = [message(10), message(0), message(100), message(3)].concat();
        for split in 1..stream.len() {
            let mut framing = Framing::Prefix { read: 0, length: 0 };
            for chunk in stream.chunks(split) {
                assert_eq!(framing.scan(chunk, 100), None, "chunks of {split}");
            }
            assert_eq!(framing, Framing::Prefix { read: 0, length: 0 });
        }
    }

    #[test]
    fn the_first_message_over_the_limit_is_found_where_it_starts() {
        let stream: Vec<u8> = [message(10), message(101), message(3)].concat();
        let mut framing = Framing::Prefix { read: 0, length: 0 };
        assert_eq!(framing.scan(&stream, 100), Some((15, 101)));

        // Its prefix split across frames: it starts in the earlier one.
        let mut framing = Framing::Prefix { read: 0, length: 0 };
        assert_eq!(framing.scan(&stream[..17], 100), None);
        assert_eq!(framing.scan(&stream[17..], 100), Some((0, 101)));
    }
}
