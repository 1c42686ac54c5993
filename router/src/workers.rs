//! Thread-per-core serving: each worker thread runs a single-threaded runtime that accepts
//! connections, forwards their calls and owns its own connections to instances.
//!
//! On a work-stealing runtime a forwarded call hops between threads several times (accepting
//! connection, stream task, upstream connection, and back), and on a small machine each hop is
//! a sleeping thread woken up: tens of microseconds. A call here stays on one thread from the
//! client's bytes to the instance's socket and back, as in nginx or Envoy; the kernel spreads
//! connections over the workers, which all accept from the same listening socket.

use std::{io, thread};

use tokio::{
    net::{TcpListener, UnixListener},
    sync::watch,
};

use crate::Router;

/// Router worker threads; [`Workers::join`] waits for them after a shutdown.
#[derive(Debug)]
pub struct Workers {
    threads: Vec<thread::JoinHandle<io::Result<()>>>,
}

impl Router {
    /// Serves `unix` (and `tcp`, if any) on `threads` worker threads until `shutdown` turns
    /// true, each thread with its own single-threaded runtime and instance connections.
    ///
    /// With `busy_poll` each worker polls its sockets instead of sleeping
    /// ([`mesh::tuning::busy_poll`]): no wake-up per call, one core busy per worker.
    pub fn spawn_workers(
        &self,
        threads: usize,
        unix: std::os::unix::net::UnixListener,
        tcp: Option<std::net::TcpListener>,
        shutdown: watch::Receiver<bool>,
        busy_poll: bool,
    ) -> io::Result<Workers> {
        unix.set_nonblocking(true)?;
        if let Some(tcp) = &tcp {
            tcp.set_nonblocking(true)?;
        }
        let mut workers = Workers {
            threads: Vec::new(),
        };
        for index in 0..threads.max(1) {
            let unix = unix.try_clone()?;
            let tcp = tcp.as_ref().map(|t| t.try_clone()).transpose()?;
            let router = self.clone();
            let shutdown = shutdown.clone();
            let thread = thread::Builder::new()
                .name(format!("mesh-router-{index}"))
                .spawn(move || serve(router, unix, tcp, shutdown, busy_poll))?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }
}

fn serve(
    router: Router,
    unix: std::os::unix::net::UnixListener,
    tcp: Option<std::net::TcpListener>,
    shutdown: watch::Receiver<bool>,
    busy_poll: bool,
) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let router = router.for_this_thread();
        let _polling = AbortOnDrop(if busy_poll {
            mesh::tuning::busy_poll()
        } else {
            mesh::tuning::linger()
        });
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let unix = router
            .clone()
            .serve_unix(UnixListener::from_std(unix)?, stopped(shutdown.clone()));
        match tcp {
            None => unix.await,
            Some(tcp) => {
                let tcp = router.serve_tcp(TcpListener::from_std(tcp)?, stopped(shutdown));
                let (unix, tcp) = tokio::join!(unix, tcp);
                unix.and(tcp)
            }
        }
    })
}

impl Workers {
    /// Waits until every worker has finished (after the shutdown signal, once their open
    /// calls are done).
    pub async fn join(self) -> io::Result<()> {
        let threads = self.threads;
        tokio::task::spawn_blocking(move || {
            threads.into_iter().try_for_each(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("a router worker panicked")))
            })
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
