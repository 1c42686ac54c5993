//! The router's metrics, OpenTelemetry instruments named after the RPC conventions: every
//! forwarded call counted and timed per service × instance × method × status, calls in flight
//! per service × method, connections per class of caller, and calls the router refused by
//! reason.
//!
//! The embedder hands in a [`Meter`] ([`RouterMetrics::new`]); without one (the default) every
//! hook below is one branch on `None`. With one, a call costs two clock reads, a lookup of
//! its label set in read-mostly maps (label sets are made once per service, method, instance
//! and status, then reused: no allocation per call), three atomic adds and one histogram
//! measurement. Calls and calls in flight are the router's own atomics, kept beside their
//! label sets and read by observable instruments when a reader collects; only the duration
//! goes through the SDK per call (it has no observable histogram).
//!
//! Labels come from the wire only where they are bounded: services are the ones registered
//! (the call site passes an upstream's name), methods are kept only when they look like a
//! gRPC path and at most [`MAX_METHODS`] per service (more are counted as `_other`), instance
//! ids come from the registry.

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock, RwLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Instant,
};

use http::{HeaderMap, Response};
use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram, Meter, UpDownCounter},
};

use crate::{
    body::RouterBody,
    cluster::{Cluster, State},
    identity::Class,
};

/// Distinct methods counted per service; calls to more are counted as method `_other`, so
/// that a caller sending made-up paths cannot grow the metrics without bound.
pub const MAX_METHODS: usize = 256;
/// Distinct instances counted per method; more (a huge, churning service) count as `_other`.
const MAX_INSTANCES: usize = 1024;
/// The longest `/package.Service/Method` path kept as labels.
const MAX_PATH: usize = 256;
/// Histogram boundaries of `rpc.server.duration`, in milliseconds: from the router's own
/// tens of microseconds to ten seconds.
const DURATION_BOUNDARIES_MS: &[f64] = &[
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0,
    2500.0, 5000.0, 10000.0,
];
/// gRPC status codes 0 (`OK`) to 16 (`UNAUTHENTICATED`).
const STATUS_CODES: usize = 17;
/// `UNKNOWN`: what an answer without a readable `grpc-status` counts as.
const UNKNOWN: u8 = 2;
/// `CANCELLED`: a call whose caller went away before its answer ended.
const CANCELLED: u8 = 1;

/// Why the router answered a call itself instead of forwarding it (`reason` of
/// `mesh.router.refused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not a gRPC call the router takes, or a bad `mesh-service` header.
    Invalid,
    /// The caller may not call it (`call:` capabilities).
    Policy,
    /// A limit was full (calls in flight, header size).
    Limits,
    /// Its deadline passed before an answer came.
    Deadline,
    /// No instance could take it (unknown service, none ready, none reachable).
    NoInstance,
    /// A new connection over `max_connections`.
    Connections,
}

impl Refusal {
    const ALL: [Refusal; 6] = [
        Refusal::Invalid,
        Refusal::Policy,
        Refusal::Limits,
        Refusal::Deadline,
        Refusal::NoInstance,
        Refusal::Connections,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Policy => "policy",
            Self::Limits => "limits",
            Self::Deadline => "deadline",
            Self::NoInstance => "no_instance",
            Self::Connections => "connections",
        }
    }

    /// The refusal a status the router made itself for a forwarded call stands for.
    fn of_status(code: u8) -> Self {
        match code {
            4 => Self::Deadline,
            7 | 16 => Self::Policy,
            8 => Self::Limits,
            14 => Self::NoInstance,
            _ => Self::Invalid,
        }
    }
}

/// The router's instruments; cheap to clone. [`RouterMetrics::off`] (the default) records
/// nothing and costs a branch per hook.
#[derive(Clone, Default)]
pub struct RouterMetrics {
    inner: Option<Arc<Instruments>>,
}

impl std::fmt::Debug for RouterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterMetrics")
            .field("on", &self.inner.is_some())
            .finish()
    }
}

struct Instruments {
    duration: Histogram<f64>,
    refused: Counter<u64>,
    connections: UpDownCounter<i64>,
    refused_labels: [[KeyValue; 1]; Refusal::ALL.len()],
    class_labels: [[KeyValue; 1]; 3],
    services: Services,
}

/// Every label set made so far, by service: what the observable instruments report.
type Services = Arc<RwLock<HashMap<String, Arc<ServiceLabels>>>>;

/// The label sets of one service, made as its methods are first called.
struct ServiceLabels {
    service: KeyValue,
    methods: RwLock<HashMap<String, Arc<MethodLabels>>>,
    /// Methods past [`MAX_METHODS`] and paths that are not `/package.Service/Method`.
    other: OnceLock<Arc<MethodLabels>>,
}

/// The label sets of one method: in flight, and per instance and status.
struct MethodLabels {
    /// rpc.system, rpc.service, rpc.method, mesh.service.
    base: [KeyValue; 4],
    /// Calls in flight.
    active: AtomicI64,
    instances: RwLock<Vec<(Arc<str>, Arc<InstanceLabels>)>>,
    /// Calls answered by the router itself (no instance).
    router: Arc<InstanceLabels>,
}

/// One method × instance: a label set per status code, made when first seen.
struct InstanceLabels {
    /// `base` + mesh.instance.
    base: Vec<KeyValue>,
    by_status: [OnceLock<StatusCell>; STATUS_CODES],
}

/// One full label set and its calls.
struct StatusCell {
    labels: Box<[KeyValue]>,
    calls: AtomicU64,
}

impl InstanceLabels {
    fn new(method: &[KeyValue], instance: &str) -> Self {
        let mut base = method.to_vec();
        base.push(KeyValue::new("mesh.instance", instance.to_owned()));
        Self {
            base,
            by_status: Default::default(),
        }
    }

    fn with_status(&self, code: u8) -> &StatusCell {
        let code = usize::from(code).min(STATUS_CODES - 1);
        self.by_status[code].get_or_init(|| {
            let mut labels = self.base.clone();
            labels.push(KeyValue::new("rpc.grpc.status_code", code as i64));
            StatusCell {
                labels: labels.into_boxed_slice(),
                calls: AtomicU64::new(0),
            }
        })
    }
}

impl RouterMetrics {
    /// No metrics: what a router records unless given a meter.
    pub fn off() -> Self {
        Self::default()
    }

    /// The router's instruments on `meter`:
    ///
    /// - `rpc.server.calls` (counter) and `rpc.server.duration` (histogram, ms), labelled
    ///   `rpc.system`, `rpc.service`, `rpc.method`, `mesh.service`, `mesh.instance` (empty
    ///   when the router answered itself) and `rpc.grpc.status_code`; a call is timed from
    ///   when the router took it to the end of its answer;
    /// - `rpc.server.active_requests` (up-down counter): forwarded calls in flight, per
    ///   service and method (the instance is not chosen yet when a call starts);
    /// - `mesh.router.refused` (counter), per `reason`: `invalid`, `policy`, `limits`,
    ///   `deadline`, `no_instance`, `connections`;
    /// - `mesh.router.connections` (up-down counter): client connections open, per `class`
    ///   (`owner`, `local`, `remote`).
    pub fn new(meter: &Meter) -> Self {
        let services = Services::default();
        let calls = services.clone();
        meter
            .u64_observable_counter("rpc.server.calls")
            .with_description("Calls the router took for a service, by instance and status")
            .with_callback(move |observer| {
                each_method(&calls, |method| {
                    let instances = method.instances.read().ok();
                    let instances = instances.iter().flat_map(|l| l.iter().map(|(_, i)| i));
                    for instance in instances.chain([&method.router]) {
                        for cell in instance.by_status.iter().filter_map(OnceLock::get) {
                            observer.observe(cell.calls.load(Ordering::Relaxed), &cell.labels);
                        }
                    }
                });
            })
            .build();
        let active = services.clone();
        meter
            .i64_observable_up_down_counter("rpc.server.active_requests")
            .with_description("Forwarded calls in flight")
            .with_callback(move |observer| {
                each_method(&active, |method| {
                    observer.observe(method.active.load(Ordering::Relaxed), &method.base);
                });
            })
            .build();
        let instruments = Instruments {
            duration: meter
                .f64_histogram("rpc.server.duration")
                .with_unit("ms")
                .with_description("Time from taking a call to the end of its answer")
                .with_boundaries(DURATION_BOUNDARIES_MS.to_vec())
                .build(),
            refused: meter
                .u64_counter("mesh.router.refused")
                .with_description("Calls and connections the router refused, by reason")
                .build(),
            connections: meter
                .i64_up_down_counter("mesh.router.connections")
                .with_description("Client connections open, by class of caller")
                .build(),
            refused_labels: Refusal::ALL.map(|r| [KeyValue::new("reason", r.label())]),
            class_labels: Class::ALL.map(|class| {
                let name = match class {
                    Class::Owner => "owner",
                    Class::Local => "local",
                    Class::Remote => "remote",
                };
                [KeyValue::new("class", name)]
            }),
            services,
        };
        Self {
            inner: Some(Arc::new(instruments)),
        }
    }

    /// Whether anything is recorded.
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// A call the router refused before it had a service to count it under.
    pub(crate) fn refused(&self, reason: Refusal) {
        if let Some(inner) = &self.inner {
            inner.refused.add(1, &inner.refused_labels[reason as usize]);
        }
    }

    /// A connection of `class` was accepted: counted open until the guard drops.
    pub(crate) fn connection(&self, class: Class) -> Option<ConnectionOpen> {
        let inner = self.inner.as_ref()?;
        inner
            .connections
            .add(1, &inner.class_labels[class as usize]);
        Some(ConnectionOpen {
            inner: inner.clone(),
            class,
        })
    }

    /// A call to `service` (a registered one: its label is kept) for `path` starts.
    pub(crate) fn call(&self, service: &str, path: &str) -> Option<CallMetrics> {
        let inner = self.inner.as_ref()?;
        let method = inner.method(service, path);
        method.active.fetch_add(1, Ordering::Relaxed);
        Some(CallMetrics {
            inner: inner.clone(),
            method,
            instance: None,
            status: None,
            started: Instant::now(),
        })
    }
}

impl Instruments {
    fn method(&self, service: &str, path: &str) -> Arc<MethodLabels> {
        let labels = self.service(service);
        let Some((package_service, method)) = split_path(path) else {
            return labels.other();
        };
        if let Some(found) = labels
            .methods
            .read()
            .ok()
            .and_then(|m| m.get(path).cloned())
        {
            return found;
        }
        let Ok(mut methods) = labels.methods.write() else {
            return labels.other();
        };
        if let Some(found) = methods.get(path) {
            return found.clone();
        }
        if methods.len() >= MAX_METHODS {
            return labels.other();
        }
        let made = Arc::new(MethodLabels::new(
            &labels.service,
            package_service.to_owned(),
            method.to_owned(),
        ));
        methods.insert(path.to_owned(), made.clone());
        made
    }

    fn service(&self, service: &str) -> Arc<ServiceLabels> {
        if let Some(found) = self
            .services
            .read()
            .ok()
            .and_then(|s| s.get(service).cloned())
        {
            return found;
        }
        let mut services = match self.services.write() {
            Ok(services) => services,
            Err(poisoned) => poisoned.into_inner(),
        };
        services
            .entry(service.to_owned())
            .or_insert_with(|| {
                Arc::new(ServiceLabels {
                    service: KeyValue::new("mesh.service", service.to_owned()),
                    methods: RwLock::default(),
                    other: OnceLock::new(),
                })
            })
            .clone()
    }
}

impl ServiceLabels {
    fn other(&self) -> Arc<MethodLabels> {
        self.other
            .get_or_init(|| {
                Arc::new(MethodLabels::new(
                    &self.service,
                    "_other".to_owned(),
                    "_other".to_owned(),
                ))
            })
            .clone()
    }
}

impl MethodLabels {
    fn new(service: &KeyValue, package_service: String, method: String) -> Self {
        let base = [
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", package_service),
            KeyValue::new("rpc.method", method),
            service.clone(),
        ];
        let router = Arc::new(InstanceLabels::new(&base, ""));
        Self {
            base,
            active: AtomicI64::new(0),
            instances: RwLock::default(),
            router,
        }
    }

    fn instance(&self, id: &str) -> Arc<InstanceLabels> {
        let find = |list: &[(Arc<str>, Arc<InstanceLabels>)]| {
            list.iter()
                .find(|(known, _)| &**known == id)
                .map(|(_, labels)| labels.clone())
        };
        if let Some(found) = self.instances.read().ok().and_then(|l| find(&l)) {
            return found;
        }
        let Ok(mut list) = self.instances.write() else {
            return self.router.clone();
        };
        if let Some(found) = find(&list) {
            return found;
        }
        let id = if list.len() >= MAX_INSTANCES {
            "_other"
        } else {
            id
        };
        let made = Arc::new(InstanceLabels::new(&self.base, id));
        list.push((Arc::from(id), made.clone()));
        made
    }
}

/// Calls `f` with every method label set of every service (when a reader collects).
fn each_method(services: &Services, mut f: impl FnMut(&MethodLabels)) {
    let Ok(services) = services.read() else {
        return;
    };
    for service in services.values() {
        if let Ok(methods) = service.methods.read() {
            methods.values().for_each(|m| f(m));
        }
        if let Some(other) = service.other.get() {
            f(other);
        }
    }
}

/// `/package.Service/Method` → (`package.Service`, `Method`), if it is one.
fn split_path(path: &str) -> Option<(&str, &str)> {
    if path.len() > MAX_PATH {
        return None;
    }
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let fine = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    };
    (fine(service) && fine(method)).then_some((service, method))
}

/// The gRPC status in `headers` (an answer's or its trailers'), if they carry one.
fn status_of(headers: &HeaderMap) -> Option<u8> {
    let value = headers.get("grpc-status")?.as_bytes();
    let code = std::str::from_utf8(value).ok()?.parse::<u8>().ok()?;
    Some(if usize::from(code) < STATUS_CODES {
        code
    } else {
        UNKNOWN
    })
}

/// Counts a connection open until dropped.
pub(crate) struct ConnectionOpen {
    inner: Arc<Instruments>,
    class: Class,
}

impl Drop for ConnectionOpen {
    fn drop(&mut self) {
        let labels = &self.inner.class_labels[self.class as usize];
        self.inner.connections.add(-1, labels);
    }
}

/// One forwarded call being measured: recorded once, when dropped (with the answer's body, or
/// at once for an answer the router made itself).
pub(crate) struct CallMetrics {
    inner: Arc<Instruments>,
    method: Arc<MethodLabels>,
    /// Who answered; `None`: the router itself.
    instance: Option<Arc<InstanceLabels>>,
    status: Option<u8>,
    started: Instant,
}

impl CallMetrics {
    /// Takes the answer: an instance's has its status in its headers (trailers-only) or
    /// later in its trailers ([`CallMetrics::trailers`]); the router's own ends the call now
    /// and counts as a refusal.
    pub(crate) fn answered(mut self, mut response: Response<RouterBody>) -> Response<RouterBody> {
        self.status = status_of(response.headers());
        match response.body_mut() {
            RouterBody::Forwarded(forwarded) if forwarded.instance().is_some() => {
                let id = forwarded.instance().unwrap_or_default();
                self.instance = Some(self.method.instance(id));
                forwarded.measure(self);
            }
            _ => {
                let code = self.status.unwrap_or(UNKNOWN);
                self.inner.refused.add(
                    1,
                    &self.inner.refused_labels[Refusal::of_status(code) as usize],
                );
            }
        }
        response
    }

    /// The answer's trailers went by.
    pub(crate) fn trailers(&mut self, trailers: &HeaderMap) {
        if let Some(code) = status_of(trailers) {
            self.status = Some(code);
        }
    }

    /// The answer ended without trailers (the status, if any, was in its headers).
    pub(crate) fn ended(&mut self) {
        if self.status.is_none() {
            self.status = Some(UNKNOWN);
        }
    }
}

impl Drop for CallMetrics {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed().as_secs_f64() * 1000.0;
        // Dropped before its end: its caller went away (or reset it).
        let code = self.status.unwrap_or(CANCELLED);
        let instance = self.instance.as_ref().unwrap_or(&self.method.router);
        let cell = instance.with_status(code);
        cell.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.duration.record(elapsed, &cell.labels);
        self.method.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The cluster's state as observable instruments on `meter`, read when a reader collects
/// (nothing between scrapes); for a node of many (the embedded registry has nothing to show):
///
/// - `mesh.registry.reachable` (gauge): 1 while the backend is connected to its store (this
///   node's instances published, the others' followed), 0 while connecting or unreachable;
/// - `mesh.registry.since_contact` (gauge, seconds): since the store last answered; absent
///   before its first answer;
/// - `mesh.registry.reregistrations` (counter): times this node's instances were registered
///   again under a new lease (an expired or revoked lease, a store that lost its data);
/// - `mesh.registry.remote_services` (gauge, per `node`): services each other node serves
///   in this node's view;
/// - `mesh.registry.remote_nodes` (gauge, per `service`): other nodes serving each service.
///
/// Every series carries `backend` (`etcd`). Node and service names come from the view, whose
/// keys the backend checked (and bounded) as it read them.
pub fn observe_cluster(meter: &Meter, cluster: &Cluster) {
    if cluster.this_node().is_none() {
        return;
    }
    let backend = || [KeyValue::new("backend", cluster.status().kind)];
    let reachable = cluster.clone();
    let labels = backend();
    meter
        .u64_observable_gauge("mesh.registry.reachable")
        .with_description("1 while the registry backend is connected to its store, else 0")
        .with_callback(move |observer| {
            let connected = reachable.status().state == State::Connected;
            observer.observe(u64::from(connected), &labels);
        })
        .build();
    let contact = cluster.clone();
    let labels = backend();
    meter
        .f64_observable_gauge("mesh.registry.since_contact")
        .with_unit("s")
        .with_description("Seconds since the registry's store last answered")
        .with_callback(move |observer| {
            if let Some(since) = contact.since_contact() {
                observer.observe(since.as_secs_f64(), &labels);
            }
        })
        .build();
    let again = cluster.clone();
    let labels = backend();
    meter
        .u64_observable_counter("mesh.registry.reregistrations")
        .with_description("Times this node's instances were registered again under a new lease")
        .with_callback(move |observer| observer.observe(again.status().reregistrations, &labels))
        .build();
    let view = cluster.clone();
    let kind = cluster.status().kind;
    meter
        .u64_observable_gauge("mesh.registry.remote_services")
        .with_description("Services each other node serves, in this node's view")
        .with_callback(move |observer| {
            let mut per_node: HashMap<String, u64> = HashMap::new();
            for (_, nodes) in view.remote().list() {
                for node in nodes.iter() {
                    *per_node.entry(node.id.clone()).or_default() += 1;
                }
            }
            for (node, services) in per_node {
                observer.observe(
                    services,
                    &[KeyValue::new("backend", kind), KeyValue::new("node", node)],
                );
            }
        })
        .build();
    let view = cluster.clone();
    meter
        .u64_observable_gauge("mesh.registry.remote_nodes")
        .with_description("Other nodes serving each service, in this node's view")
        .with_callback(move |observer| {
            for (service, nodes) in view.remote().list() {
                observer.observe(
                    nodes.len() as u64,
                    &[
                        KeyValue::new("backend", kind),
                        KeyValue::new("service", service.to_string()),
                    ],
                );
            }
        })
        .build();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_grpc_paths_become_labels() {
        assert_eq!(
            split_path("/echo.v1.Echo/Echo"),
            Some(("echo.v1.Echo", "Echo"))
        );
        for bad in [
            "",
            "/",
            "/a",
            "//b",
            "/a/",
            "/a/b/c",
            "/a b/c",
            "/a/\u{e9}",
            &format!("/a/{}", "x".repeat(300)),
        ] {
            assert_eq!(split_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn methods_past_the_cap_share_one_label_set() {
        let provider = opentelemetry::global::meter("test");
        let metrics = RouterMetrics::new(&provider);
        let inner = metrics.inner.as_ref().unwrap();
        for i in 0..MAX_METHODS + 10 {
            inner.method("plugin.echo", &format!("/a.B/M{i}"));
        }
        let last = inner.method("plugin.echo", "/a.B/Another");
        assert_eq!(last.base[2].value.as_str(), "_other");
        let first = inner.method("plugin.echo", "/a.B/M0");
        assert_eq!(first.base[2].value.as_str(), "M0");
        assert_eq!(
            inner.service("plugin.echo").methods.read().unwrap().len(),
            MAX_METHODS
        );
    }

    /// A meter on a real SDK provider read by Prometheus, as `mesh up` has it.
    fn sdk() -> (
        RouterMetrics,
        prometheus::Registry,
        opentelemetry_sdk::metrics::SdkMeterProvider,
    ) {
        use opentelemetry::metrics::MeterProvider as _;
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .unwrap();
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_reader(exporter)
            .build();
        (
            RouterMetrics::new(&provider.meter("test")),
            registry,
            provider,
        )
    }

    fn text(registry: &prometheus::Registry) -> String {
        use prometheus::Encoder as _;
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_call_is_counted_once_under_its_instance_and_status() {
        let (metrics, registry, _provider) = sdk();
        for (instance, status) in [
            (Some("echo-0"), Some(0)),
            (Some("echo-0"), Some(0)),
            (Some("echo-1"), Some(5)),
            (None, None),
        ] {
            let mut call = metrics.call("plugin.echo", "/echo.v1.Echo/Echo").unwrap();
            call.instance = instance.map(|id| call.method.instance(id));
            call.status = status;
        }
        metrics.refused(Refusal::Policy);
        let text = text(&registry);
        let line = |labels: &str| {
            text.lines()
                .find(|l| l.starts_with("rpc_server_calls_total{") && l.contains(labels))
                .unwrap_or_else(|| panic!("{labels} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            line(
                "mesh_instance=\"echo-0\",mesh_service=\"plugin.echo\",rpc_grpc_status_code=\"0\",rpc_method=\"Echo\",rpc_service=\"echo.v1.Echo\""
            ),
            "2"
        );
        assert_eq!(
            line(
                "mesh_instance=\"echo-1\",mesh_service=\"plugin.echo\",rpc_grpc_status_code=\"5\""
            ),
            "1"
        );
        // Dropped before an answer: its caller went away.
        assert_eq!(
            line("mesh_instance=\"\",mesh_service=\"plugin.echo\",rpc_grpc_status_code=\"1\""),
            "1"
        );
        assert!(
            text.contains(
                "mesh_router_refused_total{reason=\"policy\",otel_scope_name=\"test\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("rpc_server_active_requests{mesh_service=\"plugin.echo\",rpc_method=\"Echo\",rpc_service=\"echo.v1.Echo\",rpc_system=\"grpc\",otel_scope_name=\"test\"} 0"), "{text}");
    }

    /// What metrics cost a call (`cargo test --release -p mesh-router -- --ignored
    /// --nocapture cost_per_call`): prints, asserts nothing; mesh-bench's (h) − (c) is the
    /// figure that counts.
    #[test]
    #[ignore]
    fn cost_per_call() {
        let (metrics, _registry, _provider) = sdk();
        const CALLS: u32 = 1_000_000;
        // Time on the CPU, not wall time: the machine may be busy with other work.
        let on_cpu_ns = || -> f64 {
            std::fs::read_to_string("/proc/thread-self/schedstat")
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(f64::NAN)
        };
        for round in 0..3 {
            let started = Instant::now();
            let cpu = on_cpu_ns();
            for i in 0..CALLS {
                let mut call = metrics.call("plugin.echo", "/echo.v1.Echo/Echo").unwrap();
                call.instance =
                    Some(
                        call.method
                            .instance(if i % 2 == 0 { "echo-0" } else { "echo-1" }),
                    );
                call.status = Some(0);
            }
            let ns = started.elapsed().as_nanos() as f64 / f64::from(CALLS);
            let cpu = (on_cpu_ns() - cpu) / f64::from(CALLS);
            println!(
                "round {round}: {cpu:.0} ns on the CPU ({ns:.0} ns wall) per call with metrics on"
            );
        }
    }

    #[test]
    fn statuses_come_from_grpc_status() {
        let mut headers = HeaderMap::new();
        assert_eq!(status_of(&headers), None);
        headers.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(status_of(&headers), Some(5));
        headers.insert("grpc-status", "99".parse().unwrap());
        assert_eq!(status_of(&headers), Some(UNKNOWN));
        headers.insert("grpc-status", "x".parse().unwrap());
        assert_eq!(status_of(&headers), None);
    }
}
