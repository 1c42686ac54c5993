//! Load balancing across the instances of one service.
//!
//! The router keeps one [`Balancer`] per service name and a `mesh::connect` channel keeps one for
//! its service; both feed it the registry's view with [`Balancer::update`]. A call picks an
//! instance by the power of two choices over the fewest calls in flight, on one reused HTTP/2
//! connection per instance.
//!
//! - `endpoint.rs`: an instance's connection, load and passive health (ejection);
//! - `retry.rs`: which methods are idempotent, and which errors prove a call was never processed;
//! - `replay.rs`: the request body an idempotent call keeps so it can be sent again;
//! - `body.rs`: the request and response bodies of a balanced call.
//!
//! A call that never left this process (no connection, or the connection handed it back
//! unsent) is sent to another instance. A call that may have reached an instance is sent again
//! only when its method is idempotent; those calls alone keep their request body (up to
//! 64 KiB, `replay::REPLAY_LIMIT`) and wait for the first frame of the answer before handing it
//! on, so that an instance dying between its headers and its message is retried too.

mod body;
mod endpoint;
mod replay;
mod retry;

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use http_body_util::BodyExt;
use mesh_proto::mesh::v1::Instance;

pub use body::ResponseBody;
pub(crate) use endpoint::Target;
use endpoint::{Clock, Endpoint, Health, InFlight};
use replay::Replay;
use retry::{Failure, Idempotent};

use crate::{
    Error,
    transport::{CallError, Options, RecvBody, SendBody, SendError},
};

/// Attempts per call, the first included.
const MAX_ATTEMPTS: usize = 3;

/// The instances of one service, a connection to each, and which of its methods may be sent
/// twice.
pub struct Balancer {
    current: ArcSwap<Current>,
    clock: Clock,
    /// How new connections behave.
    options: Options,
}

/// One consistent view, swapped whole on every change so a call reads it without a lock.
struct Current {
    endpoints: Vec<Arc<Endpoint>>,
    idempotent: Idempotent,
}

impl Balancer {
    /// A balancer over the registered `instances`, as the router uses it: its calls never
    /// spin (see [`crate::tuning`]); TCP connections send keepalive pings.
    pub fn new(instances: &[Instance]) -> Self {
        Self::with_options(instances, Options::default())
    }

    /// A balancer over `instances` whose connections behave as `options` say.
    pub(crate) fn with_options(instances: &[Instance], options: Options) -> Self {
        let balancer = Self::empty(options);
        balancer.update(instances);
        balancer
    }

    /// A balancer over one fixed target (a router, or one plugin socket); nothing is retried
    /// once sent.
    pub(crate) fn fixed(target: Target, options: Options) -> Self {
        let balancer = Self::empty(options);
        balancer.set(vec![target], Idempotent::default());
        balancer
    }

    fn empty(options: Options) -> Self {
        Self {
            current: ArcSwap::from_pointee(Current {
                endpoints: Vec::new(),
                idempotent: Idempotent::default(),
            }),
            clock: Clock::new(),
            options,
        }
    }

    /// Replaces the set of instances; instances already known keep their connection and health.
    pub fn update(&self, instances: &[Instance]) {
        self.set(targets(instances), Idempotent::of(instances));
    }

    fn set(&self, targets: Vec<Target>, idempotent: Idempotent) {
        let current = self.current.load();
        // Keyed, so that a large service updates in linear time.
        let known: std::collections::HashMap<&Target, &Arc<Endpoint>> =
            current.endpoints.iter().map(|e| (&e.target, e)).collect();
        let endpoints = targets
            .into_iter()
            .map(|target| match known.get(&target) {
                Some(endpoint) => Arc::clone(endpoint),
                None => Arc::new(Endpoint::new(target, self.clock, self.options)),
            })
            .collect();
        self.current.store(Arc::new(Current {
            endpoints,
            idempotent,
        }));
    }

    /// How many instances the balancer knows.
    pub fn len(&self) -> usize {
        self.current.load().endpoints.len()
    }

    /// Whether the balancer knows no instance (calls fail with [`Error::NoInstance`]).
    pub fn is_empty(&self) -> bool {
        self.current.load().endpoints.is_empty()
    }

    /// Sends `request` to one instance of `service`, and to another when the instance provably
    /// never processed it — the connection handed it back unsent, or the instance refused the
    /// stream (`REFUSED_STREAM`, or a graceful `GOAWAY` below it) — or, for an idempotent
    /// method, after any failure before its answer began.
    ///
    /// The body is kept (up to a limit) until then: an uncontended lock and a header copy per
    /// call, against a call that would otherwise fail while an instance drains. An idempotent
    /// call's answer is handed on only once its first frame is here, since until then it can
    /// still be sent elsewhere if the instance dies.
    pub async fn send<B: SendBody>(
        &self,
        request: Request<B>,
        service: &str,
    ) -> Result<Response<ResponseBody>, Error> {
        let current = self.current.load_full();
        if current.endpoints.is_empty() {
            return Err(Error::NoInstance(service.to_owned()));
        }
        let idempotent = current.idempotent.contains(request.uri().path());
        let (head, body) = request.into_parts();
        let keeper = Replay::new(body);
        let mut tried = Tried::default();
        let mut last_error = None;
        for _ in 0..MAX_ATTEMPTS.min(current.endpoints.len()) {
            // None once the body outgrew the limit or failed: what was sent cannot be re-sent.
            let Some(body) = keeper.again() else { break };
            let index = self.pick(&current.endpoints, &tried);
            tried.push(index);
            let endpoint = &current.endpoints[index];
            let in_flight = InFlight::new(&endpoint.health);
            let sender = match endpoint.sender().await {
                Ok(sender) => sender,
                Err(source) => {
                    last_error = Some(connect_failed(endpoint, source));
                    continue;
                }
            };
            let request = Request::from_parts(head.clone(), body);
            let error = match sender.send(request).await {
                Ok(response) if !idempotent => {
                    keeper.commit();
                    return Ok(answered(response, None, in_flight));
                }
                Ok(response) => {
                    let (parts, mut incoming) = response.into_parts();
                    match incoming.frame().await {
                        Some(Err(error)) => error,
                        first => {
                            keeper.commit();
                            let first = first.map(|f| f.expect("not an error"));
                            let response = Response::from_parts(parts, incoming);
                            return Ok(answered(response, first, in_flight));
                        }
                    }
                }
                Err(SendError {
                    error,
                    unsent: true,
                }) => {
                    last_error = Some(handed_back(endpoint, error));
                    continue;
                }
                Err(SendError { error, .. }) => error,
            };
            let failure = Failure::of(&error);
            if failure == Failure::Failed {
                endpoint.health.failed();
            }
            let error = Error::Call {
                address: endpoint.target.address.clone(),
                source: CallError::new(error),
            };
            let again = match failure {
                Failure::Unprocessed => true,
                Failure::Failed => idempotent,
                Failure::Local => false,
            };
            if !again {
                return Err(error);
            }
            tracing::debug!(instance = %endpoint.target.id, %error, "call failed unanswered; sending it elsewhere");
            last_error = Some(error);
        }
        Err(last_error.unwrap_or_else(|| Error::NoInstance(service.to_owned())))
    }

    /// Power of two choices over calls in flight, among instances not yet tried for this call
    /// and not sitting out; if every untried instance sits out, among the untried ones.
    fn pick(&self, endpoints: &[Arc<Endpoint>], tried: &Tried) -> usize {
        let n = endpoints.len();
        if n == 1 {
            return 0;
        }
        let now = self.clock.now_ms();
        let usable = |i: usize, strict: bool| {
            !tried.contains(i) && (!strict || !endpoints[i].health.is_ejected(now))
        };
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
            let load = |i: usize| endpoints[i].health.load();
            return if load(b) < load(a) { b } else { a };
        }
        // Every instance was tried already; the caller never asks for more attempts than that.
        0
    }
}

/// The instances a balancer can dial; ones with unreadable endpoints are skipped (the registry
/// validates endpoints, so this only guards against a future backend that does not).
fn targets(instances: &[Instance]) -> Vec<Target> {
    instances
        .iter()
        .filter_map(|instance| match instance.endpoint.parse() {
            Ok(address) => Some(Target {
                id: instance.id.clone(),
                address,
            }),
            Err(error) => {
                tracing::warn!(service = %instance.service, instance = %instance.id, %error, "skipping instance");
                None
            }
        })
        .collect()
}

/// The instances (by index) one call has tried: at most [`MAX_ATTEMPTS`], kept inline.
#[derive(Default)]
struct Tried([usize; MAX_ATTEMPTS], usize);

impl Tried {
    fn push(&mut self, index: usize) {
        if self.1 < MAX_ATTEMPTS {
            self.0[self.1] = index;
            self.1 += 1;
        }
    }

    fn contains(&self, index: usize) -> bool {
        self.0[..self.1].contains(&index)
    }
}

/// A gRPC answer of `UNAVAILABLE` with no body (trailers-only): the instance says it cannot
/// serve, which counts against its health like a failed call.
fn is_unavailable(response: &Response<RecvBody>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|status| status.as_bytes() == b"14")
}

/// In an answer's extensions while a tracer is installed ([`crate::telemetry::active`]): the
/// id of the instance that answered (`echo-0`), for the router's span.
#[derive(Debug, Clone)]
pub struct AnsweredBy(pub Arc<str>);

fn answered(
    mut response: Response<RecvBody>,
    first: Option<http_body::Frame<bytes::Bytes>>,
    in_flight: InFlight,
) -> Response<ResponseBody> {
    record(in_flight.health(), &response);
    if crate::telemetry::active() {
        response
            .extensions_mut()
            .insert(AnsweredBy(in_flight.health().id.clone()));
    }
    response.map(|body| ResponseBody::new(body, first, in_flight))
}

fn record(health: &Health, response: &Response<RecvBody>) {
    if is_unavailable(response) {
        health.failed();
    } else {
        health.succeeded();
    }
}

fn connect_failed(endpoint: &Endpoint, source: std::io::Error) -> Error {
    endpoint.health.eject();
    Error::Connect {
        address: endpoint.target.address.clone(),
        source,
    }
}

/// The connection gave the request back unsent: it is closing. Safe to send elsewhere.
fn handed_back(endpoint: &Endpoint, error: h2::Error) -> Error {
    endpoint.disconnect();
    endpoint.health.eject();
    Error::Connect {
        address: endpoint.target.address.clone(),
        source: std::io::Error::other(error),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, path::Path};

    use bytes::Bytes;
    use h2::Reason;
    use http_body_util::Full;
    use tokio::net::UnixListener;

    use super::*;
    use crate::labels;

    /// How a test instance treats every call.
    #[derive(Clone, Copy)]
    enum Behaviour {
        /// Answers, naming itself in `x-instance`.
        Answer(&'static str),
        /// Resets the stream with this reason.
        Reset(Reason),
    }

    /// An HTTP/2 server on `path` (h2 directly, to send any reset).
    fn serve(path: &Path, behaviour: Behaviour) {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut connection = h2::server::handshake(socket).await.unwrap();
                    while let Some(Ok((_request, mut respond))) = connection.accept().await {
                        match behaviour {
                            Behaviour::Reset(reason) => respond.send_reset(reason),
                            Behaviour::Answer(id) => {
                                let response = Response::builder()
                                    .header("x-instance", id)
                                    .body(())
                                    .unwrap();
                                let mut body = respond.send_response(response, false).unwrap();
                                body.send_data(Bytes::from_static(b"ok"), true).unwrap();
                            }
                        }
                    }
                });
            }
        });
    }

    fn instance(id: &str, path: &Path, idempotent: &str) -> Instance {
        Instance {
            service: "test.svc".into(),
            id: id.into(),
            endpoint: format!("unix:{}", path.display()),
            labels: HashMap::from([(labels::IDEMPOTENT.to_owned(), idempotent.to_owned())]),
        }
    }

    async fn call(balancer: &Balancer, method: &str) -> Result<&'static str, Error> {
        let request = Request::post(format!("http://test.svc{method}"))
            .body(Full::new(Bytes::from_static(b"request")))
            .unwrap();
        let response = balancer.send(request, "test.svc").await?;
        let id = response.headers()["x-instance"].to_str().unwrap();
        Ok(if id == "a" { "a" } else { "b" })
    }

    /// Instance `a` behaves as told, `b` answers; `T/Idem` is idempotent.
    fn pair(dir: &Path, a: Behaviour) -> Balancer {
        let (path_a, path_b) = (dir.join("a.sock"), dir.join("b.sock"));
        serve(&path_a, a);
        serve(&path_b, Behaviour::Answer("b"));
        Balancer::new(&[
            instance("a", &path_a, "T/Idem"),
            instance("b", &path_b, "T/Idem"),
        ])
    }

    fn health_of(balancer: &Balancer, id: &str) -> Arc<Health> {
        let current = balancer.current.load();
        let endpoint = current
            .endpoints
            .iter()
            .find(|e| e.target.id == id)
            .unwrap();
        endpoint.health.clone()
    }

    #[tokio::test]
    async fn calls_refused_unprocessed_go_elsewhere_whatever_the_method() {
        let dir = tempfile::tempdir().unwrap();
        let balancer = pair(dir.path(), Behaviour::Reset(Reason::REFUSED_STREAM));
        for _ in 0..20 {
            assert_eq!(call(&balancer, "/T/Idem").await.unwrap(), "b");
        }
        // A refused stream was never processed: any method is sent again, idempotent or not.
        for _ in 0..40 {
            assert_eq!(call(&balancer, "/T/Other").await.unwrap(), "b");
        }
        assert!(
            !health_of(&balancer, "a").is_ejected(balancer.clock.now_ms()),
            "a refusal is not the instance failing"
        );
    }

    #[tokio::test]
    async fn a_call_that_may_have_been_processed_is_not_sent_again_unless_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let balancer = pair(dir.path(), Behaviour::Reset(Reason::INTERNAL_ERROR));
        let mut failed = 0;
        for _ in 0..40 {
            match call(&balancer, "/T/Other").await {
                Ok(id) => assert_eq!(id, "b"),
                Err(error) => {
                    assert_eq!(error.to_status().code(), tonic::Code::Unavailable);
                    failed += 1;
                }
            }
        }
        // Until a is ejected (five failures in a row), P2C picks it about half the time.
        assert!(failed > 0, "a reset after sending fails the call");
    }

    #[tokio::test]
    async fn five_failed_calls_in_a_row_eject_an_instance() {
        let dir = tempfile::tempdir().unwrap();
        let balancer = pair(dir.path(), Behaviour::Reset(Reason::INTERNAL_ERROR));
        // Idempotent calls fail over to b, and each failure on a counts against it.
        let mut calls = 0;
        while !health_of(&balancer, "a").is_ejected(balancer.clock.now_ms()) {
            assert_eq!(call(&balancer, "/T/Idem").await.unwrap(), "b");
            calls += 1;
            assert!(calls < 1000, "a was never ejected");
        }
        // Ejected, a is passed over: calls that would fail on it now all reach b.
        for _ in 0..20 {
            assert_eq!(call(&balancer, "/T/Other").await.unwrap(), "b");
        }
    }

    #[tokio::test]
    async fn an_instance_that_cannot_be_reached_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let path_b = dir.path().join("b.sock");
        serve(&path_b, Behaviour::Answer("b"));
        let balancer: Balancer = Balancer::new(&[
            instance("a", &dir.path().join("nobody.sock"), ""),
            instance("b", &path_b, ""),
        ]);
        for _ in 0..20 {
            assert_eq!(call(&balancer, "/T/Other").await.unwrap(), "b");
        }
        assert!(health_of(&balancer, "a").is_ejected(balancer.clock.now_ms()));
    }
}
