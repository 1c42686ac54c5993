//! The router's limits, and the counters that enforce them without a lock or a queue.
//!
//! - connections: each class of caller ([`Class`]: the owner's local connections, other local
//!   users', TCP clients') has its own [`Limits::max_connections`]; over it a new connection
//!   of that class is closed at once (the client sees `UNAVAILABLE`), and the ones open keep
//!   being served. No class can lock another out: whatever TCP clients hold, the owner's CLI
//!   still connects;
//! - a connection must send its HTTP/2 preface within [`Limits::handshake_timeout`], and one
//!   without calls for [`Limits::idle_timeout`] is sent GOAWAY;
//! - streams per connection: [`Limits::max_concurrent_streams`], advertised in HTTP/2 SETTINGS
//!   (a client queues its own streams beyond it);
//! - forwarded calls in flight: at most [`Limits::max_in_flight`] over all connections, at most
//!   [`Limits::max_in_flight_per_connection`] on one, and callers other than the owner hold at
//!   most a share of the whole (TCP clients half, other local users a quarter), so the owner
//!   always has a quarter to itself. Over a limit a call is answered `RESOURCE_EXHAUSTED` at
//!   once, naming the limit, never queued; the router's own API (registry, health) is not
//!   counted, so it keeps answering.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::identity::Class;

/// The router's limits and its default call timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most client connections open at once, for each class of caller apart: the owner's
    /// local connections, other local users', and TCP clients'.
    pub max_connections: usize,
    /// Most concurrent streams (calls) on one client connection.
    pub max_concurrent_streams: u32,
    /// Most forwarded calls in flight at once; more are answered `RESOURCE_EXHAUSTED`.
    pub max_in_flight: usize,
    /// Most forwarded calls in flight on one connection; `None`: a quarter of
    /// `max_in_flight` (at least 1).
    pub max_in_flight_per_connection: Option<usize>,
    /// Deadline for calls that carry no `grpc-timeout`; `None` leaves them without one.
    pub call_timeout: Option<Duration>,
    /// A new connection that has not sent its HTTP/2 preface by then is closed.
    pub handshake_timeout: Duration,
    /// A connection without a call for this long is sent GOAWAY (and closed once its client
    /// lets go); it is checked that often, so it goes after one to two of these.
    pub idle_timeout: Duration,
    /// Largest request header list (names, values and 32 bytes per field, as HTTP/2 counts
    /// it); a larger one is answered `RESOURCE_EXHAUSTED`.
    pub max_header_list_size: u32,
}

/// [`Limits::handshake_timeout`] by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// [`Limits::idle_timeout`] by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// [`Limits::max_header_list_size`] by default: what hyper and gRPC servers use.
pub const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 16 << 10;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_concurrent_streams: 1024,
            max_in_flight: 10_000,
            max_in_flight_per_connection: None,
            call_timeout: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
        }
    }
}

impl Limits {
    /// Calls one connection may have in flight.
    pub fn per_connection(&self) -> usize {
        self.max_in_flight_per_connection
            .unwrap_or(self.max_in_flight / 4)
            .max(1)
    }

    /// Calls every connection of `class` together may have in flight (`None`: only the
    /// total bounds them).
    pub(crate) fn per_class(&self, class: Class) -> Option<usize> {
        match class {
            Class::Owner => None,
            Class::Local => Some((self.max_in_flight / 4).max(1)),
            Class::Remote => Some((self.max_in_flight / 2).max(1)),
        }
    }
}

/// The router's gauges, shared by every worker thread: connections per class of caller,
/// calls in flight in all, per class, and (made per connection) per connection.
#[derive(Debug)]
pub(crate) struct Admission {
    /// The limits these gauges enforce.
    pub(crate) limits: Limits,
    connections: [Arc<Gauge>; 3],
    calls: [Arc<Gauge>; 3],
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Arc<Self> {
        let total = Gauge::new("max_in_flight", limits.max_in_flight);
        let calls = Class::ALL.map(|class| match limits.per_class(class) {
            None => total.clone(),
            Some(share) => Gauge::within(class.share_name(), share, Some(total.clone())),
        });
        let connections = Class::ALL.map(|_| Gauge::new("max_connections", limits.max_connections));
        Arc::new(Self {
            limits,
            connections,
            calls,
        })
    }

    /// A place for a new connection of `class`, or the gauge that is full.
    pub(crate) fn connect(&self, class: Class) -> Result<Permit, Full> {
        self.connections[class as usize].try_acquire()
    }

    /// The gauge of one new connection's calls in flight, within its class's and the total.
    pub(crate) fn connection_calls(&self, class: Class) -> Arc<Gauge> {
        Gauge::within(
            "max_in_flight_per_connection",
            self.limits.per_connection(),
            Some(self.calls[class as usize].clone()),
        )
    }
}

/// A count held below a maximum, and below its parent's: a place in a connection's gauge is
/// also a place in its class's and in the router's.
#[derive(Debug)]
pub(crate) struct Gauge {
    count: AtomicUsize,
    max: usize,
    /// The setting that bounds it, for the refusal.
    name: &'static str,
    parent: Option<Arc<Gauge>>,
}

/// Why a [`Gauge`] gave no place: the one that was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full {
    /// The setting that bounds it (`max_in_flight`).
    pub(crate) name: &'static str,
    /// Its maximum.
    pub(crate) max: usize,
}

impl Gauge {
    /// A gauge of `max` places, bounded by the setting `name`.
    pub(crate) fn new(name: &'static str, max: usize) -> Arc<Self> {
        Self::within(name, max, None)
    }

    /// A gauge whose places are also places in `parent`.
    pub(crate) fn within(name: &'static str, max: usize, parent: Option<Arc<Gauge>>) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            max,
            name,
            parent,
        })
    }

    /// A place under the maximum (and the parents'), or at once the gauge that is full.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Result<Permit, Full> {
        self.take()?;
        Ok(Permit(self.clone()))
    }

    fn take(&self) -> Result<(), Full> {
        if self.count.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return Err(Full {
                name: self.name,
                max: self.max,
            });
        }
        if let Some(parent) = &self.parent
            && let Err(full) = parent.take()
        {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return Err(full);
        }
        Ok(())
    }

    fn give(&self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        if let Some(parent) = &self.parent {
            parent.give();
        }
    }

    /// Places taken now.
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

impl Full {
    /// The answer to a call refused for it.
    pub(crate) fn status(self) -> tonic::Status {
        tonic::Status::resource_exhausted(format!(
            "the router is at its limit of {} calls in flight ({}); retry later",
            self.max, self.name
        ))
    }
}

/// A place in a [`Gauge`] (and its parents), given back when dropped.
#[derive(Debug)]
pub(crate) struct Permit(Arc<Gauge>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.give();
    }
}

/// A body that holds a place until it is dropped: a call counts as open until its answer ends.
pub(crate) struct Held<B> {
    body: B,
    _permit: Permit,
}

impl<B> Held<B> {
    pub(crate) fn new(body: B, permit: Permit) -> Self {
        Self {
            body,
            _permit: permit,
        }
    }
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Held<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The bytes a client sends first: the 24-byte HTTP/2 preface, then a SETTINGS frame's
/// 9-byte header.
const PREFACE_LEN: usize = 24 + 9;

/// A connection's IO that fails with `TimedOut` unless the client's preface arrived in time.
/// Once it has, reads pass straight through.
pub(crate) struct Handshake<S> {
    io: S,
    /// Until the preface is in: the deadline, and the bytes still to come.
    pending: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
}

impl<S> Handshake<S> {
    pub(crate) fn new(io: S, timeout: Duration) -> Self {
        Self {
            io,
            pending: Some((Box::pin(tokio::time::sleep(timeout)), PREFACE_LEN)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Handshake<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some((deadline, missing)) = &mut this.pending else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            *missing = missing.saturating_sub(buf.filled().len() - before);
            if *missing == 0 {
                this.pending = None;
            }
            return read;
        }
        if read.is_pending() && deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within handshake_timeout",
            )));
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Handshake<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_gauge_refuses_at_once_and_frees_places_on_drop() {
        let gauge = Gauge::new("max_in_flight", 2);
        let a = gauge.try_acquire().unwrap();
        let _b = gauge.try_acquire().unwrap();
        assert_eq!(
            gauge.try_acquire().unwrap_err(),
            Full {
                name: "max_in_flight",
                max: 2
            }
        );
        assert!(gauge.try_acquire().is_err(), "a refusal takes no place");
        drop(a);
        assert!(gauge.try_acquire().is_ok());
    }

    #[test]
    fn a_place_counts_in_every_parent_and_the_full_one_is_named() {
        let total = Gauge::new("max_in_flight", 3);
        let class = Gauge::within("tcp share", 2, Some(total.clone()));
        let one = Gauge::within("per connection", 1, Some(class.clone()));
        let other = Gauge::within("per connection", 5, Some(class.clone()));
        let held = one.try_acquire().unwrap();
        assert_eq!(one.try_acquire().unwrap_err().name, "per connection");
        let _second = other.try_acquire().unwrap();
        assert_eq!(other.try_acquire().unwrap_err().name, "tcp share");
        assert_eq!((class.count(), total.count(), other.count()), (2, 2, 1));
        let _owner = total.try_acquire().unwrap();
        assert_eq!(total.try_acquire().unwrap_err().name, "max_in_flight");
        drop(held);
        assert_eq!((one.count(), class.count(), total.count()), (0, 1, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_without_a_preface_is_cut_off_and_one_with_it_is_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let timeout = Duration::from_secs(10);
        let (client, server) = tokio::io::duplex(1024);
        let mut server = Handshake::new(server, timeout);
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 64];
        let error = server.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), timeout);
        drop(client);

        let (mut client, server) = tokio::io::duplex(1024);
        let mut server = Handshake::new(server, timeout);
        client.write_all(&[0u8; PREFACE_LEN]).await.unwrap();
        server.read_exact(&mut buf[..PREFACE_LEN]).await.unwrap();
        tokio::time::sleep(timeout * 2).await;
        client.write_all(b"later").await.unwrap();
        assert_eq!(
            server.read(&mut buf).await.unwrap(),
            5,
            "no deadline after the preface"
        );
    }

    #[test]
    fn shares_leave_the_owner_a_quarter() {
        let limits = Limits::default();
        assert_eq!(limits.per_connection(), 2500);
        let others: usize = [Class::Local, Class::Remote]
            .iter()
            .filter_map(|c| limits.per_class(*c))
            .sum();
        assert!(limits.max_in_flight - others >= limits.max_in_flight / 4);
        let tiny = Limits {
            max_in_flight: 1,
            ..Limits::default()
        };
        assert_eq!(tiny.per_connection(), 1);
        assert_eq!(tiny.per_class(Class::Local), Some(1));
    }
}
