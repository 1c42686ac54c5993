//! The trace relay: the router serves OTLP's `TraceService/Export` on its Unix socket, and
//! the manager sends each export on to the configured collector.
//!
//! Plugins export to the router (`OTEL_EXPORTER_OTLP_ENDPOINT=unix:<router socket>`), which
//! a sandboxed plugin can reach when it can reach nothing else: no plugin needs TCP, and none
//! learns the collector's address. Who may export is the router's policy (managed plugin
//! instances and those who may control; `mesh_router::policy`). Each forwarded resource is
//! stamped with the caller's kernel identity (`mesh.plugin`, `mesh.instance`), replacing what
//! the caller sent, so a plugin cannot pass its spans off as another's. An export waits on
//! the collector on the manager's runtime, never the router's worker threads, for at most
//! [`EXPORT_TIMEOUT`]; past [`MAX_EXPORTS_IN_FLIGHT`] waiting, an export is dropped (answered
//! as rejected, counted and logged) rather than queued.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use mesh_router::Caller;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_client::TraceServiceClient,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
    resource::v1::Resource,
};
use tokio::{runtime::Handle, sync::Semaphore};
use tonic::{Request, Response, Status, transport::Channel};

/// The resource attribute naming the plugin whose instance exported the spans.
pub const PLUGIN_ATTRIBUTE: &str = "mesh.plugin";
/// The resource attribute naming the instance that exported the spans.
pub const INSTANCE_ATTRIBUTE: &str = "mesh.instance";
/// How long one export may wait on the collector.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Exports waiting on the collector at once; more are dropped.
pub const MAX_EXPORTS_IN_FLIGHT: usize = 64;

/// The relay's service, for the router.
#[derive(Debug, Clone)]
pub struct TraceRelay {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    collector: TraceServiceClient<Channel>,
    runtime: Handle,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    timeout: Duration,
    dropped: AtomicU64,
}

impl TraceRelay {
    /// A relay to the OTLP/gRPC collector at `endpoint` (`http://host:port`), dialled on
    /// first use; call it on the runtime the exports should wait on (the manager's).
    pub fn new(endpoint: &str) -> Result<Self, tonic::transport::Error> {
        Self::bounded(endpoint, MAX_EXPORTS_IN_FLIGHT, EXPORT_TIMEOUT)
    }

    /// [`TraceRelay::new`] with other bounds.
    fn bounded(
        endpoint: &str,
        max_in_flight: usize,
        timeout: Duration,
    ) -> Result<Self, tonic::transport::Error> {
        // The export's whole time is bounded once, in `export` (with its own message); the
        // channel only bounds the dial.
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
            .connect_timeout(timeout)
            .connect_lazy();
        Ok(Self {
            inner: Arc::new(Inner {
                collector: TraceServiceClient::new(channel),
                runtime: Handle::current(),
                in_flight: Arc::new(Semaphore::new(max_in_flight)),
                max_in_flight,
                timeout,
                dropped: AtomicU64::new(0),
            }),
        })
    }

    /// The tonic service, for the router, decoding requests of at most `max_message_size`
    /// bytes (larger ones are `RESOURCE_EXHAUSTED` before they reach the relay).
    pub fn into_server(self, max_message_size: usize) -> TraceServiceServer<Self> {
        TraceServiceServer::new(self).max_decoding_message_size(max_message_size)
    }

    /// Exports dropped so far because too many were waiting on the collector.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    fn drop_export(&self, spans: i64) -> ExportTraceServiceResponse {
        let dropped = self.inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // The first, then every power of two: a line per burst, not per export.
        if dropped.is_power_of_two() {
            tracing::warn!(
                dropped,
                "trace relay: {} exports already wait on the collector; an export of {spans} \
                 spans was dropped ({dropped} so far)",
                self.inner.max_in_flight
            );
        }
        ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: spans,
                error_message: "the mesh's trace relay is overloaded: the collector is slow \
                                or unreachable"
                    .to_owned(),
            }),
        }
    }
}

/// Replaces the identity attributes of `resource` with `caller`'s: a plugin's name and
/// instance for a plugin, none for anyone else (so that `mesh.plugin` on a relayed span
/// always comes from the kernel's word).
fn stamp(resource: &mut Resource, caller: &Caller) {
    resource
        .attributes
        .retain(|kv| kv.key != PLUGIN_ATTRIBUTE && kv.key != INSTANCE_ATTRIBUTE);
    if let Caller::Plugin {
        plugin, instance, ..
    } = caller
    {
        let string = |key: &str, value: &str| KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.to_owned())),
            }),
            ..KeyValue::default()
        };
        resource.attributes.push(string(PLUGIN_ATTRIBUTE, plugin));
        resource
            .attributes
            .push(string(INSTANCE_ATTRIBUTE, instance));
    }
}

fn span_count(request: &ExportTraceServiceRequest) -> i64 {
    let spans: usize = request
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum();
    i64::try_from(spans).unwrap_or(i64::MAX)
}

#[tonic::async_trait]
impl TraceService for TraceRelay {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        // The router put the caller there after its policy let it through; without one the
        // relay was reached some other way, and refuses.
        let Some(caller) = request.extensions().get::<Caller>().cloned() else {
            return Err(Status::permission_denied(
                "the trace relay serves callers the router identified only",
            ));
        };
        let mut export = request.into_inner();
        for resource_spans in &mut export.resource_spans {
            stamp(resource_spans.resource.get_or_insert_default(), &caller);
        }
        let Ok(permit) = self.inner.in_flight.clone().try_acquire_owned() else {
            return Ok(Response::new(self.drop_export(span_count(&export))));
        };
        let mut collector = self.inner.collector.clone();
        let timeout = self.inner.timeout;
        let sent = self.inner.runtime.spawn(async move {
            let _permit = permit;
            tokio::time::timeout(timeout, collector.export(export)).await
        });
        match sent.await {
            Ok(Ok(Ok(response))) => Ok(Response::new(response.into_inner())),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn value(resource: &Resource, key: &str) -> Vec<String> {
        resource
            .attributes
            .iter()
            .filter(|kv| kv.key == key)
            .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_callers_identity_replaces_what_it_claimed() {
        let forged = || Resource {
            attributes: vec![
                KeyValue {
                    key: PLUGIN_ATTRIBUTE.into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue("echo".into())),
                    }),
                    ..KeyValue::default()
                },
                KeyValue {
                    key: INSTANCE_ATTRIBUTE.into(),
                    ..KeyValue::default()
                },
            ],
            ..Resource::default()
        };
        let mut resource = forged();
        let plugin = Caller::Plugin {
            plugin: "files".into(),
            instance: "files-0".into(),
            pid: 7,
            uid: 1000,
        };
        stamp(&mut resource, &plugin);
        assert_eq!(value(&resource, PLUGIN_ATTRIBUTE), ["files"]);
        assert_eq!(value(&resource, INSTANCE_ATTRIBUTE), ["files-0"]);
        assert_eq!(resource.attributes.len(), 2, "{resource:?}");
        let mut resource = forged();
        stamp(
            &mut resource,
            &Caller::Owner {
                uid: 1000,
                pid: None,
            },
        );
        assert!(resource.attributes.is_empty(), "{resource:?}");
    }

    #[tokio::test]
    async fn a_silent_collector_times_out_and_exports_past_the_bound_are_dropped() {
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
        // Accepts connections (the kernel's backlog) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", silent.local_addr().unwrap());
        let relay = TraceRelay::bounded(&endpoint, 1, Duration::from_millis(300)).unwrap();
        let export = |spans: usize| {
            let mut request = Request::new(ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans: vec![Span::default(); spans],
                        ..ScopeSpans::default()
                    }],
                    ..ResourceSpans::default()
                }],
            });
            request.extensions_mut().insert(Caller::Plugin {
                plugin: "files".into(),
                instance: "files-0".into(),
                pid: 7,
                uid: 1000,
            });
            request
        };
        let waiting = tokio::spawn({
            let relay = relay.clone();
            async move { relay.export(export(1)).await }
        });
        // Wait until the first export holds the one slot.
        let held = tokio::time::timeout(Duration::from_secs(10), async {
            while relay.inner.in_flight.available_permits() > 0 {
                tokio::task::yield_now().await;
            }
        });
        held.await.expect("the first export takes the slot");
        let dropped = relay.export(export(3)).await.unwrap().into_inner();
        let partial = dropped.partial_success.expect("answered as rejected");
        assert_eq!(partial.rejected_spans, 3);
        assert!(partial.error_message.contains("overloaded"), "{partial:?}");
        assert_eq!(relay.dropped(), 1);
        let timed_out = waiting.await.unwrap().unwrap_err();
        assert_eq!(timed_out.code(), tonic::Code::Unavailable, "{timed_out}");
        // The slot is free again once the export gave up.
        assert_eq!(relay.inner.in_flight.available_permits(), 1);
        drop(silent);
    }

    #[tokio::test]
    async fn an_export_without_a_caller_is_refused() {
        let relay = TraceRelay::new("http://127.0.0.1:9").unwrap();
        let refused = relay
            .export(Request::new(ExportTraceServiceRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    }
}
