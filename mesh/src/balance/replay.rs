//! A request body that can be sent again: what the first attempt read from the caller is kept
//! (up to a cap), so a retry replays it and then reads on where the first attempt stopped.
//!
//! Every call keeps its body this way until its answer's headers arrive: an idempotent call
//! may then be sent again after any failure, any other call only when the instance refused it
//! unprocessed. Copies share one
//! state behind an uncontended lock; only the newest copy (the current attempt) reads from the
//! caller, so an old attempt that hyper has not dropped yet cannot steal a frame. Once a call
//! is answered it is [`Replay::commit`]ted: the buffer is freed and frames pass straight through.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame};

use crate::transport::{BoxError, SendBody};

/// The most a call's request may hold back for a retry: a retry needs every byte sent so far.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// One attempt's copy of a replayable request body.
pub(crate) struct Replay<B> {
    shared: Arc<Mutex<Shared<B>>>,
    /// Which copy this is; only the newest reads from the caller.
    generation: u32,
    /// How many kept chunks this copy has replayed.
    replayed: usize,
    trailers_replayed: bool,
}

struct Shared<B> {
    /// The caller's body, while it has more to give.
    source: Option<B>,
    generation: u32,
    /// What was read from the caller, while the call may still be retried.
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Everything read so far is kept.
    Replayable,
    /// Answered: nothing more is kept.
    Committed,
    /// Over [`REPLAY_LIMIT`], or the caller's body failed: it cannot be sent again.
    Spent,
}

impl<B: SendBody> Replay<B> {
    /// Wraps `source`; the result is the first attempt's copy.
    pub(crate) fn new(source: B) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source: Some(source),
                generation: 0,
                chunks: Vec::new(),
                len: 0,
                trailers: None,
                state: State::Replayable,
            })),
            generation: 0,
            replayed: 0,
            trailers_replayed: false,
        }
    }

    /// A copy for the next attempt, if everything sent so far is still kept.
    pub(crate) fn again(&self) -> Option<Self> {
        let mut shared = self.lock();
        if shared.state != State::Replayable {
            return None;
        }
        shared.generation += 1;
        Some(Self {
            shared: self.shared.clone(),
            generation: shared.generation,
            replayed: 0,
            trailers_replayed: false,
        })
    }

    /// The call was answered and will not be sent again: stop keeping what it sends.
    pub(crate) fn commit(&self) {
        let mut shared = self.lock();
        shared.state = State::Committed;
        shared.chunks = Vec::new();
        shared.trailers = None;
    }

    fn lock(&self) -> MutexGuard<'_, Shared<B>> {
        // Every change under the lock is one step: a panic elsewhere leaves it consistent.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<B: SendBody> HttpBody for Replay<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut shared = this.shared.lock().unwrap_or_else(|e| e.into_inner());
        if this.generation != shared.generation {
            // A newer attempt owns the caller's body; this one's stream is dead anyway.
            return Poll::Ready(None);
        }
        if shared.state == State::Replayable
            && let Some(chunk) = shared.chunks.get(this.replayed)
        {
            this.replayed += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        let Some(source) = shared.source.as_mut() else {
            // The caller's body ended: replay its trailers, if it had any.
            if !this.trailers_replayed {
                this.trailers_replayed = true;
                if let Some(trailers) = shared.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.source = None;
                this.trailers_replayed = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                shared.source = None;
                shared.state = State::Spent;
                shared.chunks = Vec::new();
                Poll::Ready(Some(Err(B::box_error(error))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if shared.state == State::Replayable {
                    let kept = shared.chunks.len();
                    shared.keep(&frame);
                    if shared.state == State::Replayable && shared.chunks.len() > kept {
                        this.replayed += 1;
                    }
                }
                if frame.is_trailers() {
                    shared.source = None;
                    this.trailers_replayed = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    /// Exact, not merely safe: hyper ends the stream on the last data frame only when this
    /// says so, and otherwise sends an extra empty DATA frame — which h2 servers count as
    /// abuse past 100 per connection (GOAWAY `ENHANCE_YOUR_CALM`).
    fn is_end_stream(&self) -> bool {
        let shared = self.lock();
        if self.generation != shared.generation {
            return true;
        }
        let replayed_all =
            shared.state != State::Replayable || self.replayed >= shared.chunks.len();
        replayed_all
            && match &shared.source {
                Some(source) => source.is_end_stream(),
                None => self.trailers_replayed || shared.trailers.is_none(),
            }
    }
}

impl<B> Shared<B> {
    fn keep(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            if data.is_empty() {
                return;
            }
            if self.len + data.len() > REPLAY_LIMIT {
                self.state = State::Spent;
                self.chunks = Vec::new();
                return;
            }
            self.len += data.len();
            self.chunks.push(data.clone());
        } else if let Some(trailers) = frame.trailers_ref() {
            self.trailers = Some(trailers.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    type Source = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
    >;

    fn source(frames: Vec<Frame<Bytes>>) -> Source {
        StreamBody::new(futures_util::stream::iter(
            frames.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }

    fn trailers() -> HeaderMap {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-end", "yes".parse().unwrap());
        trailers
    }

    async fn read_all(mut body: Replay<Source>) -> (Vec<Bytes>, Option<HeaderMap>) {
        let mut data = Vec::new();
        let mut end = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(chunk) => data.push(chunk),
                Err(frame) => end = frame.into_trailers().ok(),
            }
        }
        (data, end)
    }

    #[tokio::test]
    async fn a_retry_replays_what_was_sent_then_reads_on() {
        let mut first = Replay::new(source(vec![
            Frame::data(Bytes::from_static(b"one")),
            Frame::data(Bytes::from_static(b"two")),
            Frame::trailers(trailers()),
        ]));
        // The first attempt reads one chunk, then fails.
        let chunk = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(chunk, "one");
        let second = first.again().expect("still replayable");
        assert!(
            first.frame().await.is_none(),
            "the old attempt no longer reads"
        );
        let (data, end) = read_all(second).await;
        assert_eq!(data, ["one", "two"]);
        assert_eq!(end, Some(trailers()));
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_replays_whole_with_its_trailers() {
        let first = Replay::new(source(vec![
            Frame::data(Bytes::from_static(b"only")),
            Frame::trailers(trailers()),
        ]));
        let keep = first.again().unwrap();
        let stale = read_all(first).await;
        assert_eq!(stale, (vec![], None), "a superseded copy yields nothing");

        let (data, end) = read_all(keep.again().unwrap()).await;
        assert_eq!(data, ["only"]);
        assert_eq!(end, Some(trailers()));
        // The caller's body is used up: every later copy replays it from what was kept.
        let again = keep.again().unwrap();
        assert!(!again.is_end_stream());
        let (data, end) = read_all(again).await;
        assert_eq!(data, ["only"]);
        assert_eq!(end, Some(trailers()));
    }

    #[tokio::test]
    async fn it_knows_its_end_so_no_empty_frame_follows_the_last() {
        let mut first = Replay::new(http_body_util::Full::new(Bytes::from_static(b"msg")));
        assert!(!first.is_end_stream());
        first.frame().await.unwrap().unwrap();
        assert!(
            first.is_end_stream(),
            "the source is done after its one chunk"
        );
        let again = first.again().unwrap();
        assert!(!again.is_end_stream(), "a new copy has a chunk to replay");
        assert!(first.is_end_stream(), "a superseded copy is over");
        let mut again = again;
        let chunk = again.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(chunk, "msg");
        assert!(again.is_end_stream());
    }

    #[tokio::test]
    async fn over_the_limit_it_cannot_be_sent_again() {
        let big = Bytes::from(vec![7u8; REPLAY_LIMIT]);
        let mut first = Replay::new(source(vec![
            Frame::data(Bytes::from_static(b"x")),
            Frame::data(big.clone()),
        ]));
        first.frame().await.unwrap().unwrap();
        assert!(first.again().is_some(), "one byte is kept");
        let mut first = first.again().unwrap();
        first.frame().await.unwrap().unwrap();
        let chunk = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(
            chunk.len(),
            REPLAY_LIMIT,
            "frames still flow past the limit"
        );
        assert!(first.again().is_none(), "but are no longer kept");
    }

    #[tokio::test]
    async fn committed_it_keeps_nothing() {
        let mut first = Replay::new(source(vec![
            Frame::data(Bytes::from_static(b"a")),
            Frame::data(Bytes::from_static(b"b")),
        ]));
        first.commit();
        let (data, _) = {
            let mut data = Vec::new();
            while let Some(frame) = first.frame().await {
                data.push(frame.unwrap().into_data().unwrap());
            }
            (data, ())
        };
        assert_eq!(data, ["a", "b"]);
        assert!(first.shared.lock().unwrap().chunks.is_empty());
        assert!(first.again().is_none());
    }
}
