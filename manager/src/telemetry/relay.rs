//! The trace relay: the router serves OTLP's `TraceService/Export` on its Unix socket, and
//! the manager sends each export on to the configured collector.
//!
//! Plugins export to the router (`OTEL_EXPORTER_OTLP_ENDPOINT=unix:<router socket>`), which
//! a sandboxed plugin can reach when it can reach nothing else: no plugin needs TCP, and none
//! learns the collector's address. Who may export is the router's policy (managed plugin
//! instances and those who may control; `mesh_router::policy`).
//!
//! An export is bounded before it is decoded, in this order: its caller takes one of its own
//! slots ([`MAX_EXPORTS_PER_CALLER`]) and one of the relay's ([`MAX_EXPORTS_IN_FLIGHT`]) before
//! its body is read; its body is refused at a length prefix past [`MAX_EXPORT_BYTES`]; its bytes
//! are walked to count its spans ([`MAX_EXPORT_SPANS`]) and what decoding them would allocate
//! ([`MAX_EXPORT_DECODED`], out of the relay's [`RELAY_MEMORY`]) before prost decodes them
//! (`bounds`). Each refusal is `RESOURCE_EXHAUSTED`, counted, and logged once per burst.
//!
//! Every forwarded resource is stamped with the caller's kernel identity (`service.name`,
//! `mesh.plugin`, `mesh.instance`), and every `mesh.*` attribute (and `service.name`) the
//! caller set anywhere else is removed, so a plugin cannot pass its spans off as another's.
//! An export waits on the collector on the manager's runtime, never the router's worker
//! threads, for at most [`EXPORT_TIMEOUT`], holding its slots and memory until it is done.

mod bounds;

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use mesh_router::Caller;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_client::TraceServiceClient,
    },
    common::v1::{AnyValue, KeyValue, any_value},
    trace::v1::ResourceSpans,
};
use tokio::{
    runtime::Handle,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::{
    Request, Response, Status,
    body::Body,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    codegen::BoxFuture,
    server::{NamedService, UnaryService},
    transport::Channel,
};
use tonic_prost::{ProstDecoder, ProstEncoder};

use bounds::{Bounded, Limits};

/// The resource attribute naming the plugin whose instance exported the spans.
pub const PLUGIN_ATTRIBUTE: &str = "mesh.plugin";
/// The resource attribute naming the instance that exported the spans.
pub const INSTANCE_ATTRIBUTE: &str = "mesh.instance";
/// The resource attribute collectors name a service by: on a plugin's spans, its registry
/// name (`plugin.echo`), as the manager sets `OTEL_SERVICE_NAME` for it.
pub const SERVICE_ATTRIBUTE: &str = "service.name";
/// How long one export may wait on the collector.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Exports read, decoded or waiting on the collector at once; more are refused.
pub const MAX_EXPORTS_IN_FLIGHT: usize = 16;
/// Of those, the most one caller (a plugin, all its instances together; a uid) may hold.
pub const MAX_EXPORTS_PER_CALLER: usize = 4;
/// Largest export on the wire (or the router's message limit, if it is smaller).
pub const MAX_EXPORT_BYTES: usize = 4 << 20;
/// Most spans in one export (an SDK's batch is 512 by default).
pub const MAX_EXPORT_SPANS: usize = 10_000;
/// Most that decoding one export may allocate, as its bytes say before it is decoded.
pub const MAX_EXPORT_DECODED: usize = 16 << 20;
/// Most that the exports in flight may hold decoded, all together.
pub const RELAY_MEMORY: usize = 64 << 20;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The relay: its collector and its bounds. [`TraceRelay::into_server`] serves it.
#[derive(Debug, Clone)]
pub struct TraceRelay {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    collector: TraceServiceClient<Channel>,
    runtime: Handle,
    slots: Arc<Semaphore>,
    per_caller: usize,
    /// Slots held by each caller now (no entry: none).
    holders: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    memory: Arc<Semaphore>,
    limits: Limits,
    timeout: Duration,
    refused: AtomicU64,
}

/// The bounds a relay is built with; [`Bounds::default`] holds the constants above.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    in_flight: usize,
    per_caller: usize,
    limits: Limits,
    memory: usize,
    timeout: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            in_flight: MAX_EXPORTS_IN_FLIGHT,
            per_caller: MAX_EXPORTS_PER_CALLER,
            limits: Limits {
                bytes: MAX_EXPORT_BYTES,
                spans: MAX_EXPORT_SPANS,
                decoded: MAX_EXPORT_DECODED,
            },
            memory: RELAY_MEMORY,
            timeout: EXPORT_TIMEOUT,
        }
    }
}

impl TraceRelay {
    /// A relay to the OTLP/gRPC collector at `endpoint` (`http://host:port`), dialled on
    /// first use; call it on the runtime the exports should wait on (the manager's).
    pub fn new(endpoint: &str) -> Result<Self, tonic::transport::Error> {
        Self::bounded(endpoint, Bounds::default())
    }

    fn bounded(endpoint: &str, bounds: Bounds) -> Result<Self, tonic::transport::Error> {
        // The export's whole time is bounded once, in `forward` (with its own message); the
        // channel only bounds the dial.
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
            .connect_timeout(bounds.timeout)
            .connect_lazy();
        Ok(Self {
            inner: Arc::new(Inner {
                collector: TraceServiceClient::new(channel),
                runtime: Handle::current(),
                slots: Arc::new(Semaphore::new(bounds.in_flight)),
                per_caller: bounds.per_caller,
                holders: Arc::default(),
                memory: Arc::new(Semaphore::new(bounds.memory)),
                limits: bounds.limits,
                timeout: bounds.timeout,
                refused: AtomicU64::new(0),
            }),
        })
    }

    /// The service, for the router: exports larger than [`MAX_EXPORT_BYTES`] or
    /// `max_message_size`, whichever is smaller, are refused at their length prefix.
    pub fn into_server(self, max_message_size: usize) -> RelayServer {
        let mut limits = self.inner.limits;
        limits.bytes = limits.bytes.min(max_message_size);
        RelayServer {
            relay: self,
            limits,
        }
    }

    /// Exports refused so far because the relay or their caller was at a bound.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Counts and logs `status` (once per burst: the first, then every power of two).
    fn refuse(&self, status: Status) -> Status {
        let refused = self.inner.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if refused.is_power_of_two() {
            tracing::warn!(
                refused,
                "trace relay: an export was refused ({refused} so far): {}",
                status.message()
            );
        }
        status
    }

    /// Takes a slot of `caller`'s and one of the relay's, before anything of the export is
    /// read; the refusal names the one that is full.
    fn admit(&self, caller: Option<&Caller>) -> Result<Admission, Status> {
        // The router put the caller there after its policy let it through; without one the
        // relay was reached some other way, and refuses.
        let Some(caller) = caller.cloned() else {
            return Err(Status::permission_denied(
                "the trace relay serves callers the router identified only",
            ));
        };
        let key = holder_key(&caller);
        let share = {
            let mut holders = self.inner.holders.lock().unwrap_or_else(|e| e.into_inner());
            let held = holders.entry(key.clone()).or_default();
            if *held >= self.inner.per_caller {
                return Err(self.refuse(Status::resource_exhausted(format!(
                    "the mesh's trace relay already has {} exports of {key} in flight (its \
                     bound): export less often or to a faster collector",
                    self.inner.per_caller
                ))));
            }
            *held += 1;
            Share {
                key,
                holders: self.inner.holders.clone(),
            }
        };
        let Ok(slot) = self.inner.slots.clone().try_acquire_owned() else {
            return Err(self.refuse(Status::resource_exhausted(
                "the mesh's trace relay is overloaded: its exports in flight are at their \
                 bound (the collector is slow or unreachable)",
            )));
        };
        Ok(Admission {
            caller,
            _share: share,
            _slot: slot,
            memory: Mutex::new(None),
        })
    }

    /// Sends `export`, stamped with its caller's identity, to the collector, holding
    /// `admission` until it is done.
    async fn forward(
        &self,
        admission: Arc<Admission>,
        mut export: ExportTraceServiceRequest,
    ) -> Result<ExportTraceServiceResponse, Status> {
        for resource_spans in &mut export.resource_spans {
            stamp(resource_spans, &admission.caller);
        }
        let mut collector = self.inner.collector.clone();
        let timeout = self.inner.timeout;
        let sent = self.inner.runtime.spawn(async move {
            let _held = admission;
            tokio::time::timeout(timeout, collector.export(export)).await
        });
        match sent.await {
            Ok(Ok(Ok(response))) => Ok(response.into_inner()),
            Ok(Ok(Err(status))) => Err(Status::unavailable(format!(
                "the collector refused the export: {}",
                status.message()
            ))),
            Ok(Err(_elapsed)) => Err(Status::unavailable(format!(
                "the collector did not answer within {:?}",
                self.inner.timeout
            ))),
            Err(join) => Err(Status::internal(format!(
                "the relay's export failed: {join}"
            ))),
        }
    }
}

/// Whose slots an export takes: a plugin's (its instances share them), else a uid's or a
/// remote identity's.
fn holder_key(caller: &Caller) -> Arc<str> {
    match caller {
        Caller::Plugin { plugin, .. } => format!("plugin {plugin}").into(),
        Caller::Owner { uid, .. } | Caller::Local { uid, .. } => format!("uid {uid}").into(),
        Caller::Remote {
            identity: Some(identity),
            ..
        } => format!("client {identity}").into(),
        Caller::Remote { addr, .. } => format!("client {}", addr.ip()).into(),
    }
}

/// What one export holds from before its body is read until the collector answered.
#[derive(Debug)]
struct Admission {
    caller: Caller,
    _share: Share,
    _slot: OwnedSemaphorePermit,
    /// Its share of [`RELAY_MEMORY`], taken once its bytes are counted.
    memory: Mutex<Option<OwnedSemaphorePermit>>,
}

/// One of a caller's slots, given back on drop.
#[derive(Debug)]
struct Share {
    key: Arc<str>,
    holders: Arc<Mutex<HashMap<Arc<str>, usize>>>,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut holders = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = holders.get_mut(&self.key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                holders.remove(&self.key);
            }
        }
    }
}

/// The relay as the router serves it (`TraceService/Export`): each call admitted before its
/// body is read, its body bounded, its bytes counted before they are decoded.
#[derive(Debug, Clone)]
pub struct RelayServer {
    relay: TraceRelay,
    /// The relay's, with the router's message limit applied.
    limits: Limits,
}

impl NamedService for RelayServer {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl tonic::codegen::Service<http::Request<Body>> for RelayServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (relay, limits) = (self.relay.clone(), self.limits);
        Box::pin(async move {
            if request.uri().path() != EXPORT_PATH {
                return Ok(Status::unimplemented(format!(
                    "the trace relay serves {EXPORT_PATH} only"
                ))
                .into_http());
            }
            let admission = match relay.admit(request.extensions().get::<Caller>()) {
                Ok(admission) => Arc::new(admission),
                Err(refused) => return Ok(refused.into_http()),
            };
            let request = request.map(|body| Bounded::new(body, limits.bytes));
            let codec = ExportCodec {
                relay: relay.clone(),
                admission: admission.clone(),
                limits,
            };
            // tonic's own bound too, behind `Bounded`'s: no decode is ever attempted past it.
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(limits.bytes), None);
            Ok(grpc.unary(Export { relay, admission }, request).await)
        })
    }
}

/// One admitted export's handler.
struct Export {
    relay: TraceRelay,
    admission: Arc<Admission>,
}

impl UnaryService<ExportTraceServiceRequest> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<Response<ExportTraceServiceResponse>, Status>;

    fn call(&mut self, request: Request<ExportTraceServiceRequest>) -> Self::Future {
        let (relay, admission) = (self.relay.clone(), self.admission.clone());
        Box::pin(async move {
            relay
                .forward(admission, request.into_inner())
                .await
                .map(Response::new)
        })
    }
}

/// prost's codec, but the decoder counts the message's cost on the wire first.
struct ExportCodec {
    relay: TraceRelay,
    admission: Arc<Admission>,
    limits: Limits,
}

impl Codec for ExportCodec {
    type Encode = ExportTraceServiceResponse;
    type Decode = ExportTraceServiceRequest;
    type Encoder = ProstEncoder<ExportTraceServiceResponse>;
    type Decoder = ExportDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ExportDecoder {
            relay: self.relay.clone(),
            admission: self.admission.clone(),
            limits: self.limits,
            prost: ProstDecoder::new(BufferSettings::default()),
        }
    }
}

struct ExportDecoder {
    relay: TraceRelay,
    admission: Arc<Admission>,
    limits: Limits,
    prost: ProstDecoder<ExportTraceServiceRequest>,
}

impl Decoder for ExportDecoder {
    type Item = ExportTraceServiceRequest;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        use bytes::Buf;
        // tonic buffers a message whole (a `BytesMut`), so its one chunk is all of it.
        if buf.chunk().len() != buf.remaining() {
            return Err(Status::internal(
                "the trace relay was handed an export in pieces; it decodes whole ones only",
            ));
        }
        let inner = &self.relay.inner;
        let cost = bounds::cost(buf.chunk(), &self.limits).map_err(|s| self.relay.refuse(s))?;
        let memory = u32::try_from(cost)
            .ok()
            .and_then(|cost| inner.memory.clone().try_acquire_many_owned(cost).ok())
            .ok_or_else(|| {
                self.relay.refuse(Status::resource_exhausted(
                    "the mesh's trace relay is overloaded: the exports in flight hold all of \
                     its memory (the collector is slow or unreachable)",
                ))
            })?;
        *self
            .admission
            .memory
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(memory);
        self.prost.decode(buf)
    }
}

/// Stamps `resource_spans` with `caller`'s identity. Below the resource (scopes, spans,
/// events, links) every `service.name` and `mesh.*` attribute is removed but `mesh.instance`,
/// which the SDK sets on a server span to name the instance that served it: that one is a
/// plugin's own instance as the kernel says (and removed for anyone else). On the resource, a
/// plugin's `service.name` (`plugin.<name>`), `mesh.plugin` and `mesh.instance` replace
/// whatever it claimed; anyone else (who may control the mesh) keeps its `service.name` but no
/// `mesh.*`. So `mesh.plugin` and `mesh.instance` on a relayed span always come from the
/// kernel's word.
fn stamp(resource_spans: &mut ResourceSpans, caller: &Caller) {
    let claimed = |kv: &KeyValue| kv.key == SERVICE_ATTRIBUTE || kv.key.starts_with("mesh.");
    let own = match caller {
        Caller::Plugin {
            plugin, instance, ..
        } => Some((plugin, instance)),
        _ => None,
    };
    let below = |attributes: &mut Vec<KeyValue>| {
        attributes.retain_mut(|kv| match (kv.key == INSTANCE_ATTRIBUTE, own) {
            (true, Some((_, instance))) => {
                kv.value = Some(string_value(instance));
                true
            }
            _ => !claimed(kv),
        })
    };
    for scope_spans in &mut resource_spans.scope_spans {
        if let Some(scope) = &mut scope_spans.scope {
            below(&mut scope.attributes);
        }
        for span in &mut scope_spans.spans {
            below(&mut span.attributes);
            for event in &mut span.events {
                below(&mut event.attributes);
            }
            for link in &mut span.links {
                below(&mut link.attributes);
            }
        }
    }
    let resource = resource_spans.resource.get_or_insert_default();
    let Some((plugin, instance)) = own else {
        resource
            .attributes
            .retain(|kv| !kv.key.starts_with("mesh."));
        return;
    };
    resource.attributes.retain(|kv| !claimed(kv));
    let string = |key: &str, value: &str| KeyValue {
        key: key.to_owned(),
        value: Some(string_value(value)),
        ..KeyValue::default()
    };
    resource.attributes.extend([
        string(SERVICE_ATTRIBUTE, &format!("plugin.{plugin}")),
        string(PLUGIN_ATTRIBUTE, plugin),
        string(INSTANCE_ATTRIBUTE, instance),
    ]);
}

fn string_value(value: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(value.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use opentelemetry_proto::tonic::{
        common::v1::InstrumentationScope,
        resource::v1::Resource,
        trace::v1::{ScopeSpans, Span, span},
    };
    use prost::Message;
    use tonic::codegen::Service;

    fn string(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
            ..KeyValue::default()
        }
    }

    fn values(attributes: &[KeyValue], key: &str) -> Vec<String> {
        attributes
            .iter()
            .filter(|kv| kv.key == key)
            .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// Attributes claiming to be plugin echo, and one of the exporter's own.
    fn claims() -> Vec<KeyValue> {
        vec![
            string(PLUGIN_ATTRIBUTE, "echo"),
            string(INSTANCE_ATTRIBUTE, "echo-0"),
            string("mesh.anything", "x"),
            string(SERVICE_ATTRIBUTE, "echo"),
            string("http.route", "/kept"),
        ]
    }

    fn forged() -> ResourceSpans {
        let span = Span {
            attributes: claims(),
            events: vec![span::Event {
                attributes: claims(),
                ..span::Event::default()
            }],
            links: vec![span::Link {
                attributes: claims(),
                ..span::Link::default()
            }],
            ..Span::default()
        };
        ResourceSpans {
            resource: Some(Resource {
                attributes: claims(),
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    attributes: claims(),
                    ..InstrumentationScope::default()
                }),
                spans: vec![span],
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }
    }

    fn plugin() -> Caller {
        Caller::Plugin {
            plugin: "files".into(),
            instance: "files-0".into(),
            pid: 7,
            uid: 1000,
        }
    }

    /// Every attribute list below the resource is `left`.
    fn assert_below_the_resource(stamped: &ResourceSpans, left: &[KeyValue]) {
        let scope_spans = &stamped.scope_spans[0];
        let span = &scope_spans.spans[0];
        for attributes in [
            &scope_spans.scope.as_ref().unwrap().attributes,
            &span.attributes,
            &span.events[0].attributes,
            &span.links[0].attributes,
        ] {
            assert_eq!(attributes, left);
        }
    }

    #[test]
    fn a_plugins_identity_replaces_what_it_claimed_at_every_level() {
        let mut stamped = forged();
        stamp(&mut stamped, &plugin());
        let resource = &stamped.resource.as_ref().unwrap().attributes;
        assert_eq!(values(resource, SERVICE_ATTRIBUTE), ["plugin.files"]);
        assert_eq!(values(resource, PLUGIN_ATTRIBUTE), ["files"]);
        assert_eq!(values(resource, INSTANCE_ATTRIBUTE), ["files-0"]);
        assert!(values(resource, "mesh.anything").is_empty(), "{resource:?}");
        assert_eq!(values(resource, "http.route"), ["/kept"]);
        assert_eq!(resource.len(), 4, "{resource:?}");
        // The SDK's `mesh.instance` on a span stays, as the kernel names the instance.
        assert_below_the_resource(
            &stamped,
            &[
                string(INSTANCE_ATTRIBUTE, "files-0"),
                string("http.route", "/kept"),
            ],
        );
        // No resource at all: one is made, stamped.
        let mut bare = ResourceSpans::default();
        stamp(&mut bare, &plugin());
        let resource = &bare.resource.as_ref().unwrap().attributes;
        assert_eq!(values(resource, SERVICE_ATTRIBUTE), ["plugin.files"]);
    }

    #[test]
    fn the_owner_keeps_its_service_name_but_no_mesh_attribute() {
        let mut stamped = forged();
        let owner = Caller::Owner {
            uid: 1000,
            pid: None,
        };
        stamp(&mut stamped, &owner);
        let resource = &stamped.resource.as_ref().unwrap().attributes;
        assert_eq!(
            resource,
            &vec![
                string(SERVICE_ATTRIBUTE, "echo"),
                string("http.route", "/kept")
            ]
        );
        assert_below_the_resource(&stamped, &[string("http.route", "/kept")]);
    }

    fn framed(message: &ExportTraceServiceRequest) -> Bytes {
        let encoded = message.encode_to_vec();
        let mut framed = vec![0];
        framed.extend(u32::try_from(encoded.len()).unwrap().to_be_bytes());
        framed.extend(encoded);
        framed.into()
    }

    fn request(body: Body, caller: Option<Caller>) -> http::Request<Body> {
        let mut request = http::Request::post(format!("http://localhost{EXPORT_PATH}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap();
        if let Some(caller) = caller {
            request.extensions_mut().insert(caller);
        }
        request
    }

    fn export(spans: usize) -> http::Request<Body> {
        let message = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span::default(); spans],
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        };
        request(
            Body::new(http_body_util::Full::new(framed(&message))),
            Some(plugin()),
        )
    }

    /// The call's status, from its headers (a refusal) or its trailers.
    async fn status(response: http::Response<Body>) -> Status {
        if let Some(status) = Status::from_header_map(response.headers()) {
            return status;
        }
        let trailers = response
            .into_body()
            .collect()
            .await
            .unwrap()
            .trailers()
            .cloned()
            .unwrap_or_default();
        Status::from_header_map(&trailers).expect("a grpc-status")
    }

    async fn call(server: &mut RelayServer, request: http::Request<Body>) -> Status {
        let Ok(response) = server.call(request).await;
        status(response).await
    }

    /// A relay to a collector that accepts connections (the kernel's backlog) and never
    /// answers.
    fn silent(bounds: Bounds) -> (RelayServer, std::net::TcpListener) {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", silent.local_addr().unwrap());
        let relay = TraceRelay::bounded(&endpoint, bounds).unwrap();
        (relay.into_server(16 << 20), silent)
    }

    async fn wait_until(what: &str, done: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !done() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}"));
    }

    #[tokio::test]
    async fn a_caller_past_its_slots_is_refused_and_another_is_still_admitted() {
        let bounds = Bounds {
            in_flight: 2,
            per_caller: 1,
            timeout: Duration::from_millis(500),
            ..Bounds::default()
        };
        let (mut server, _silent) = silent(bounds);
        let relay = server.relay.clone();
        let waiting = tokio::spawn({
            let mut server = server.clone();
            async move { call(&mut server, export(1)).await }
        });
        wait_until("the first export takes its slot", || {
            relay.inner.slots.available_permits() == 1
        })
        .await;
        // The same plugin again: its own bound, before anything of the body is read.
        let refused = call(&mut server, export(3)).await;
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        assert!(refused.message().contains("plugin files"), "{refused}");
        assert_eq!(relay.refused(), 1);
        // Another caller is admitted meanwhile (and waits on the silent collector too).
        let mut other = export(1);
        other.extensions_mut().insert(Caller::Plugin {
            plugin: "echo".into(),
            instance: "echo-0".into(),
            pid: 8,
            uid: 1000,
        });
        let admitted = call(&mut server, other).await;
        assert_eq!(admitted.code(), tonic::Code::Unavailable, "{admitted}");
        let timed_out = waiting.await.unwrap();
        assert_eq!(timed_out.code(), tonic::Code::Unavailable, "{timed_out}");
        assert!(
            timed_out.message().contains("did not answer"),
            "{timed_out}"
        );
        // Every slot, share and byte is given back once the exports gave up.
        assert_eq!(relay.inner.slots.available_permits(), 2);
        assert_eq!(relay.inner.memory.available_permits(), RELAY_MEMORY);
        assert!(relay.inner.holders.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_full_relay_refuses_before_reading() {
        let bounds = Bounds {
            in_flight: 1,
            timeout: Duration::from_millis(300),
            ..Bounds::default()
        };
        let (mut server, _silent) = silent(bounds);
        let relay = server.relay.clone();
        let waiting = tokio::spawn({
            let mut server = server.clone();
            async move { call(&mut server, export(1)).await }
        });
        wait_until("the first export takes the slot", || {
            relay.inner.slots.available_permits() == 0
        })
        .await;
        let mut other = export(1);
        other.extensions_mut().insert(Caller::Owner {
            uid: 1000,
            pid: None,
        });
        let refused = call(&mut server, other).await;
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        assert!(refused.message().contains("overloaded"), "{refused}");
        waiting.await.unwrap();
    }

    #[tokio::test]
    async fn an_oversized_export_is_refused_at_its_length_prefix() {
        let (mut server, _silent) = silent(Bounds::default());
        // A prefix announcing 16 MiB, then a body that never comes: refused without it.
        let prefix = Bytes::from_static(&[0, 1, 0, 0, 0]);
        use futures_util::StreamExt;
        let body = futures_util::stream::iter([Ok::<_, Status>(hyper::body::Frame::data(prefix))])
            .chain(futures_util::stream::pending());
        let body = Body::new(http_body_util::StreamBody::new(body));
        let refused = tokio::time::timeout(
            Duration::from_secs(10),
            call(&mut server, request(body, Some(plugin()))),
        )
        .await
        .expect("refused without waiting for the body");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        assert!(
            refused.message().contains("at most 4194304 bytes"),
            "{refused}"
        );
        assert_eq!(
            server.relay.inner.slots.available_permits(),
            MAX_EXPORTS_IN_FLIGHT
        );
    }

    #[tokio::test]
    async fn too_many_spans_are_refused_before_they_are_decoded() {
        let (mut server, _silent) = silent(Bounds::default());
        let refused = call(&mut server, export(MAX_EXPORT_SPANS + 1)).await;
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        assert!(refused.message().contains("spans"), "{refused}");
        assert_eq!(server.relay.inner.memory.available_permits(), RELAY_MEMORY);
        assert_eq!(server.relay.refused(), 1);
    }

    #[tokio::test]
    async fn an_export_without_a_caller_is_refused() {
        let (mut server, _silent) = silent(Bounds::default());
        let message = framed(&ExportTraceServiceRequest::default());
        let refused = call(
            &mut server,
            request(Body::new(http_body_util::Full::new(message)), None),
        )
        .await;
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    }
}
