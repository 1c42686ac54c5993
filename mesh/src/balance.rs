//! Load balancing across the instances of one service.
//!
//! The router keeps one [`Balancer`] per service name and a `mesh::connect` channel keeps one for
//! its service; both feed it the registry's view with [`Balancer::update`]. A call picks an instance
//! by the power of two choices over the fewest calls in flight, on one reused HTTP/2 connection
//! per instance. A call that never left this process (no connection, or the connection refused it
//! before sending) is retried on another instance, and the failing instance sits out a short while.
//! A call that may have reached an instance is never retried here.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use tonic::body::Body;

use crate::{
    Error,
    transport::{self, Address, Sender},
};

/// Attempts per call, the first included, for calls that never reached an instance.
const MAX_ATTEMPTS: usize = 3;
/// How long an instance that refused a connection is passed over while others are available.
const EJECT_FOR: Duration = Duration::from_secs(1);
/// Connecting takes no longer than this (a TCP peer that drops SYNs would otherwise hang calls).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One instance as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) id: String,
    pub(crate) address: Address,
}

/// The instances of one service and a connection to each.
pub(crate) struct Balancer {
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    epoch: Instant,
}

struct Endpoint {
    target: Target,
    sender: ArcSwapOption<Sender>,
    connecting: tokio::sync::Mutex<()>,
    in_flight: AtomicUsize,
    /// Milliseconds after the balancer's epoch until which this endpoint is passed over.
    ejected_until: AtomicU64,
}

impl Balancer {
    pub(crate) fn new(targets: Vec<Target>) -> Self {
        let balancer = Self {
            endpoints: ArcSwap::from_pointee(Vec::new()),
            epoch: Instant::now(),
        };
        balancer.update(targets);
        balancer
    }

    /// Replaces the set of instances; instances already known keep their connection.
    pub(crate) fn update(&self, targets: Vec<Target>) {
        let current = self.endpoints.load();
        let next = targets
            .into_iter()
            .map(|target| {
                current
                    .iter()
                    .find(|e| e.target == target)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(target)))
            })
            .collect();
        self.endpoints.store(Arc::new(next));
    }

    /// How many instances the balancer knows.
    pub(crate) fn len(&self) -> usize {
        self.endpoints.load().len()
    }

    /// Sends `request` to one instance, retrying on another while it has not left this process.
    pub(crate) async fn send(
        &self,
        mut request: Request<Body>,
        service: &str,
    ) -> Result<Response<ResponseBody>, Error> {
        let endpoints = self.endpoints.load_full();
        if endpoints.is_empty() {
            return Err(Error::NoInstance(service.to_owned()));
        }
        let mut tried = Vec::with_capacity(0);
        let mut last_error = None;
        for _ in 0..MAX_ATTEMPTS.min(endpoints.len()) {
            let index = self.pick(&endpoints, &tried);
            tried.push(index);
            let endpoint = &endpoints[index];
            let in_flight = InFlight::new(endpoint.clone());
            let mut sender = match endpoint.sender().await {
                Ok(sender) => sender,
                Err(source) => {
                    self.eject(endpoint);
                    last_error = Some(Error::Connect {
                        address: endpoint.target.address.clone(),
                        source,
                    });
                    continue;
                }
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    endpoint.ejected_until.store(0, Ordering::Relaxed);
                    return Ok(response.map(|body| ResponseBody {
                        inner: body,
                        _in_flight: in_flight,
                    }));
                }
                Err(mut error) => match error.take_message() {
                    // The connection gave the request back unsent: safe to send elsewhere.
                    Some(unsent) => {
                        request = unsent;
                        endpoint.sender.store(None);
                        self.eject(endpoint);
                        last_error = Some(Error::Connect {
                            address: endpoint.target.address.clone(),
                            source: io::Error::other(error.into_error()),
                        });
                    }
                    None => {
                        return Err(Error::Call {
                            address: endpoint.target.address.clone(),
                            source: error.into_error(),
                        });
                    }
                },
            }
        }
        Err(last_error.unwrap_or_else(|| Error::NoInstance(service.to_owned())))
    }

    /// Power of two choices over calls in flight, among instances not yet tried for this call
    /// and not sitting out; if every untried instance sits out, among the untried ones.
    fn pick(&self, endpoints: &[Arc<Endpoint>], tried: &[usize]) -> usize {
        let now = self.now_ms();
        let usable = |i: usize, strict: bool| {
            !tried.contains(&i)
                && (!strict || endpoints[i].ejected_until.load(Ordering::Relaxed) <= now)
        };
        let n = endpoints.len();
        for strict in [true, false] {
            let first_from = |start: usize, skip: Option<usize>| {
                (0..n)
                    .map(|k| (start + k) % n)
                    .find(|&i| usable(i, strict) && Some(i) != skip)
            };
            let Some(a) = first_from(fastrand::usize(..n), None) else {
                continue;
            };
            let Some(b) = first_from(fastrand::usize(..n), Some(a)) else {
                return a;
            };
            let load = |i: usize| endpoints[i].in_flight.load(Ordering::Relaxed);
            return if load(b) < load(a) { b } else { a };
        }
        // Every instance was tried already; the caller never asks for more attempts than that.
        0
    }

    fn eject(&self, endpoint: &Endpoint) {
        let until = self.now_ms() + EJECT_FOR.as_millis() as u64;
        endpoint.ejected_until.store(until, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

impl Endpoint {
    fn new(target: Target) -> Self {
        Self {
            target,
            sender: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            in_flight: AtomicUsize::new(0),
            ejected_until: AtomicU64::new(0),
        }
    }

    /// The open connection, or a new one; concurrent callers share one connection attempt.
    async fn sender(&self) -> io::Result<Sender> {
        if let Some(sender) = self.open_sender() {
            return Ok(sender);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(sender) = self.open_sender() {
            return Ok(sender);
        }
        let sender =
            tokio::time::timeout(CONNECT_TIMEOUT, transport::connect(&self.target.address))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        self.sender.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }

    fn open_sender(&self) -> Option<Sender> {
        let guard = self.sender.load();
        guard
            .as_ref()
            .filter(|s| !s.is_closed())
            .map(|s| (**s).clone())
    }
}

/// Counts a call against its instance until the response body is dropped.
struct InFlight(Arc<Endpoint>);

impl InFlight {
    fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(endpoint)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The body of a response from an instance; the call counts as in flight until it is dropped.
pub struct ResponseBody {
    inner: Incoming,
    _in_flight: InFlight,
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
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
