//! A socket that a spinning caller can read without waiting for Tokio's poller.
//!
//! Tokio learns that a socket has data only when some thread polls `epoll`; until then a read
//! returns `Pending` without asking the kernel. A caller that spins on its answer (see
//! [`super::client`]) keeps its thread from reaching `epoll`, so while it spins, a read that
//! Tokio would leave pending asks the kernel directly.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes one direct read takes: a few small answers, and little of the read buffer to
/// zero first (the kernel's read needs initialised memory).
const DIRECT_READ: usize = 4 * 1024;

/// A stream whose reads go to the kernel directly while its connection is polled by a
/// spinning caller.
pub(crate) struct SpinIo<S> {
    stream: S,
    spinning: Arc<AtomicBool>,
}

impl<S> SpinIo<S> {
    /// Wraps `stream`; `spinning` is set by whoever polls the connection while spinning.
    pub(crate) fn new(stream: S, spinning: Arc<AtomicBool>) -> Self {
        Self { stream, spinning }
    }
}

impl<S: super::client::Stream> AsyncRead for SpinIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if polled.is_ready() || !this.spinning.load(Ordering::Relaxed) {
            return polled;
        }
        let Some(socket) = this.stream.socket() else {
            return polled;
        };
        // Tokio's readiness is stale while the caller spins: ask the kernel. A read that finds
        // nothing leaves Tokio's registration (made just above) as it was.
        let len = buf.remaining().min(DIRECT_READ);
        let unfilled = buf.initialize_unfilled_to(len);
        match nix::unistd::read(socket, unfilled) {
            Ok(n) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => Poll::Pending,
            Err(errno) => Poll::Ready(Err(errno.into())),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SpinIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
