//! Traces across hops, metrics by OTLP and JSON logs: a real `mesh up` exporting to an OTLP
//! collector inside the test, a client in the test exporting its own spans there too, and the
//! parentage of what arrives checked span by span; the calls the metrics count checked
//! against the calls made.

use std::collections::BTreeMap;

use mesh::{Address, Channel, telemetry::TelemetryConfig};
use mesh_proto::echo::v1::{EchoRequest, echo_client::EchoClient};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{KeyValue, any_value},
    metrics::v1::{Metric, NumberDataPoint, metric, number_data_point},
    trace::v1::Span,
};
use serde_json::Value;
use tokio::sync::watch;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

use crate::support::{DEADLINE, Mesh, grpcurl_ok, short_tempdir, write_config};

/// A span as the collector received it, with its resource's service.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    instance: String,
    /// Its resource's attributes.
    resource: Vec<KeyValue>,
    span: Span,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<String> {
        attribute(&self.span.attributes, key)
    }

    /// Every value of the resource attribute `key` (the relay's stamp is one).
    fn resource_values(&self, key: &str) -> Vec<String> {
        self.resource
            .iter()
            .filter(|kv| kv.key == key)
            .map(|kv| attribute(std::slice::from_ref(kv), key).unwrap_or_default())
            .collect()
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// An OTLP/gRPC trace collector on 127.0.0.1:0 that keeps every span it receives.
struct Collector {
    spans: watch::Sender<Vec<Received>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans.resource.unwrap_or_default();
            let service = attribute(&resource.attributes, "service.name").unwrap_or_default();
            let instance =
                attribute(&resource.attributes, "service.instance.id").unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(Received {
                        service: service.clone(),
                        instance: instance.clone(),
                        resource: resource.attributes.clone(),
                        span,
                    });
                }
            }
        }
        self.spans.send_modify(|spans| spans.extend(received));
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts a collector; returns its endpoint and what it received so far.
async fn collector() -> (String, watch::Receiver<Vec<Received>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (spans, received) = watch::channel(Vec::new());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector { spans }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (endpoint, received)
}

/// Waits until the collector holds spans for which `done` holds; returns them.
async fn wait_spans(
    received: &mut watch::Receiver<Vec<Received>>,
    what: &str,
    done: impl Fn(&[Received]) -> bool,
) -> Vec<Received> {
    let waited = tokio::time::timeout(DEADLINE, async {
        received
            .wait_for(|spans| done(spans))
            .await
            .map(|spans| spans.clone())
    })
    .await;
    match waited {
        Ok(Ok(spans)) => spans,
        _ => panic!(
            "{what}: not received within {DEADLINE:?}; received: {:#?}",
            received.borrow()
        ),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn echo(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
    }
}

/// The client's span: its trace and span id, in hex.
fn ids(span: &tracing::Span) -> (String, String) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    (
        format!("{:032x}", span_context.trace_id()),
        format!("{:016x}", span_context.span_id()),
    )
}

/// The span named `name` (`echo.v1.Echo/Echo`) of `service` in trace `trace`.
fn find<'a>(spans: &'a [Received], service: &str, trace: &str, name: &str) -> Option<&'a Received> {
    spans
        .iter()
        .find(|r| r.service == service && hex(&r.span.trace_id) == trace && r.span.name == name)
}

fn assert_rpc(span: &Received, instance: &str) {
    let attributes: BTreeMap<&str, Option<String>> = [
        "rpc.system",
        "rpc.service",
        "rpc.method",
        "rpc.grpc.status_code",
        "mesh.instance",
    ]
    .into_iter()
    .map(|key| (key, span.attribute(key)))
    .collect();
    assert_eq!(
        attributes["rpc.system"].as_deref(),
        Some("grpc"),
        "{span:#?}"
    );
    assert_eq!(
        attributes["rpc.service"].as_deref(),
        Some("echo.v1.Echo"),
        "{span:#?}"
    );
    assert_eq!(
        attributes["rpc.method"].as_deref(),
        Some("Echo"),
        "{span:#?}"
    );
    assert_eq!(
        attributes["rpc.grpc.status_code"].as_deref(),
        Some("0"),
        "{span:#?}"
    );
    assert_eq!(
        attributes["mesh.instance"].as_deref(),
        Some(instance),
        "{span:#?}"
    );
}

const ECHO: &str = "[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_traced_from_the_client_through_the_router_to_the_plugin() {
    let (endpoint, mut received) = collector().await;
    let dir = short_tempdir();
    write_config(
        &dir,
        // The plugins are handed the SDK's batch delay set below (a clean environment else).
        "env_allow = [\"PATH\", \"OTEL_BSP_*\"]",
        // Ratio 0: the router and the plugin record a call only when its caller's trace is
        // sampled (parent-based), so what arrives is the client's traces and nothing else.
        &format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\nsample_ratio = 0\n\n{ECHO}"),
    );
    let config = dir.path().join("mesh.toml");
    let socket = dir.path().join("run/mesh.sock");
    let mesh = Mesh::launch_with(dir, config, socket.clone(), |command| {
        // Export every 50 ms instead of every 5 s (the SDK reads it), for the plugins too.
        command
            .args(["--log-format", "json"])
            .env("OTEL_BSP_SCHEDULE_DELAY", "50");
    })
    .await;
    let instance = &mesh.wait_instances("plugin.echo", 1).await[0];
    let environ = plugin_env(instance.pid);
    // Plugins export to the trace relay on the router's socket, not to the collector.
    assert_eq!(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some(&format!("unix:{}", mesh.socket.display())),
        "{environ:?}"
    );
    assert!(
        !environ.values().any(|v| v.contains(&endpoint)),
        "the collector's address stays out of plugins: {environ:?}"
    );
    assert_eq!(
        environ.get("OTEL_SERVICE_NAME").map(String::as_str),
        Some("plugin.echo")
    );

    // The test is the client, exporting its own spans to the same collector.
    let mut client = TelemetryConfig::new("e2e-client");
    client.otlp_endpoint = Some(endpoint.clone());
    let provider = mesh::telemetry::provider(&client, &endpoint).unwrap();
    let subscriber = tracing_subscriber::registry().with(mesh::telemetry::layer(&provider));
    let _subscriber = tracing::subscriber::set_default(subscriber);
    mesh::telemetry::set_active(true);

    // A call outside any span: a new trace at the router, sampled at 0, so never exported.
    let router = Channel::to_address(Address::Unix(socket.clone()), "plugin.echo").unwrap();
    EchoClient::new(router)
        .echo(echo("unsampled"))
        .await
        .unwrap();

    // Direct: mesh::connect dials the instance itself.
    let direct = tracing::info_span!("direct call");
    let mut echo_direct = EchoClient::new(mesh.connect("plugin.echo").await);
    let reply = echo_direct
        .echo(echo("direct"))
        .instrument(direct.clone())
        .await
        .unwrap();
    assert_eq!(reply.get_ref().instance, "echo-0");
    let (direct_trace, direct_span) = ids(&direct);

    // Routed: through the router socket, by :authority; the plugin logs inside the call.
    let routed = tracing::info_span!("routed call");
    let router = Channel::to_address(Address::Unix(socket), "plugin.echo").unwrap();
    let mut request = tonic::Request::new(echo("routed"));
    request
        .metadata_mut()
        .insert("x-echo-delay-ms", "1".parse().unwrap());
    EchoClient::new(router)
        .echo(request)
        .instrument(routed.clone())
        .await
        .unwrap();
    let (routed_trace, routed_span) = ids(&routed);
    assert_ne!(direct_trace, routed_trace);
    drop((direct, routed));
    // The client's own spans: flushed off the runtime's threads (the exporter runs on them).
    let flushing = provider.clone();
    tokio::task::spawn_blocking(move || flushing.force_flush())
        .await
        .unwrap()
        .unwrap();

    let spans = wait_spans(&mut received, "client, router and plugin spans", |spans| {
        find(spans, "plugin.echo", &direct_trace, "echo.v1.Echo/Echo").is_some()
            && find(spans, "plugin.echo", &routed_trace, "echo.v1.Echo/Echo").is_some()
            && find(spans, "mesh-router", &routed_trace, "echo.v1.Echo/Echo").is_some()
            && find(spans, "e2e-client", &routed_trace, "routed call").is_some()
    })
    .await;

    // Direct: the client's span is the plugin's parent.
    let plugin = find(&spans, "plugin.echo", &direct_trace, "echo.v1.Echo/Echo").unwrap();
    assert_eq!(hex(&plugin.span.parent_span_id), direct_span, "{plugin:#?}");
    assert_rpc(plugin, "echo-0");
    assert_eq!(plugin.instance, "echo-0");
    assert_eq!(plugin.span.kind, 2, "a server span: {plugin:#?}");
    assert!(
        find(&spans, "mesh-router", &direct_trace, "echo.v1.Echo/Echo").is_none(),
        "a direct call takes no router hop"
    );

    // Routed: client -> router -> plugin.
    let client_span = find(&spans, "e2e-client", &routed_trace, "routed call").unwrap();
    assert_eq!(hex(&client_span.span.span_id), routed_span);
    let router_span = find(&spans, "mesh-router", &routed_trace, "echo.v1.Echo/Echo").unwrap();
    assert_eq!(
        hex(&router_span.span.parent_span_id),
        routed_span,
        "{router_span:#?}"
    );
    assert_rpc(router_span, "echo-0");
    assert!(!router_span.instance.is_empty(), "{router_span:#?}");
    let plugin = find(&spans, "plugin.echo", &routed_trace, "echo.v1.Echo/Echo").unwrap();
    assert_eq!(
        plugin.span.parent_span_id, router_span.span.span_id,
        "the router's span is the plugin's parent: {plugin:#?}"
    );
    assert_rpc(plugin, "echo-0");
    // Health checks (every second) and the exporter's own HTTP/2 stack are not traced, and
    // the unsampled call left nothing.
    for span in spans.iter() {
        let trace = hex(&span.span.trace_id);
        assert!(
            trace == direct_trace || trace == routed_trace,
            "a span of no sampled trace: {span:#?}"
        );
        let name = &span.span.name;
        assert!(
            !name.starts_with("grpc.health")
                && !["Connection", "poll", "send_data"].contains(&name.as_str()),
            "unexpected span {span:#?}"
        );
    }

    // JSON logs: every log line an object; the plugin's line inside the routed call carries
    // its trace and span.
    let line = mesh.wait_line("Echo waiting 1 ms").await;
    let logged: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(logged["target"], "plugin", "{logged}");
    assert_eq!(
        logged["line"]["trace_id"],
        routed_trace.as_str(),
        "{logged}"
    );
    assert_eq!(
        logged["line"]["span_id"],
        hex(&plugin.span.span_id).as_str(),
        "{logged}"
    );
    for line in mesh.output().lines() {
        // stdout's two lines for people ("mesh: router listening on ...") aside.
        if line.starts_with("mesh: ") {
            continue;
        }
        let parsed: Result<Value, _> = serde_json::from_str(line);
        assert!(
            parsed.as_ref().is_ok_and(Value::is_object),
            "not a JSON object: {line}"
        );
    }
    mesh::telemetry::set_active(false);
    let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
}

#[tokio::test]
async fn telemetry_off_exports_nothing_and_logs_without_trace_ids() {
    let (endpoint, received) = collector().await;
    let dir = short_tempdir();
    // No [telemetry]: off, whatever the collector listening nearby.
    write_config(&dir, "", ECHO);
    let config = dir.path().join("mesh.toml");
    let socket = dir.path().join("run/mesh.sock");
    let mesh = Mesh::launch_with(dir, config, socket.clone(), |command| {
        command
            .args(["--log-format", "json"])
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    })
    .await;
    mesh.wait_instances("plugin.echo", 1).await;
    let router = Channel::to_address(Address::Unix(socket), "plugin.echo").unwrap();
    let mut request = tonic::Request::new(echo("untraced"));
    request
        .metadata_mut()
        .insert("x-echo-delay-ms", "1".parse().unwrap());
    // A caller's traceparent starts nothing where no tracer is installed: no span, so no
    // trace ids on the plugin's line inside the call.
    request.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    EchoClient::new(router).echo(request).await.unwrap();
    let line = mesh.wait_line("Echo waiting 1 ms").await;
    let logged: Value = serde_json::from_str(&line).unwrap();
    assert!(logged["line"].is_object(), "{logged}");
    assert!(logged["line"].get("trace_id").is_none(), "{logged}");
    assert!(!mesh.output().contains("trace_id"), "{}", mesh.output());
    // The plugin was handed no endpoint, so nothing in the mesh exports.
    let instance = &mesh.wait_instances("plugin.echo", 1).await[0];
    let environ = plugin_env(instance.pid);
    assert!(
        !environ.contains_key("OTEL_EXPORTER_OTLP_ENDPOINT"),
        "{environ:?}"
    );
    assert!(!environ.contains_key("OTEL_SERVICE_NAME"), "{environ:?}");
    assert_eq!(
        environ.get("MESH_LOG_FORMAT").map(String::as_str),
        Some("json")
    );
    drop(endpoint);
    assert!(received.borrow().is_empty());
}

/// A process's environment, from /proc.
fn plugin_env(pid: u32) -> BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|&b| b == 0)
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            let (key, value) = entry.split_once('=')?;
            Some((key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// One metric as the collector received it: its resource's service and instance, and the
/// metric itself.
#[derive(Debug, Clone)]
struct ReceivedMetric {
    service: String,
    instance: String,
    metric: Metric,
}

/// An OTLP/gRPC metrics collector on 127.0.0.1:0 that keeps every export it receives.
struct MetricsCollector {
    exports: watch::Sender<Vec<Vec<ReceivedMetric>>>,
}

#[tonic::async_trait]
impl MetricsService for MetricsCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut export = Vec::new();
        for resource_metrics in request.into_inner().resource_metrics {
            let resource = resource_metrics.resource.unwrap_or_default();
            let service = attribute(&resource.attributes, "service.name").unwrap_or_default();
            let instance =
                attribute(&resource.attributes, "service.instance.id").unwrap_or_default();
            for scope in resource_metrics.scope_metrics {
                for metric in scope.metrics {
                    export.push(ReceivedMetric {
                        service: service.clone(),
                        instance: instance.clone(),
                        metric,
                    });
                }
            }
        }
        self.exports.send_modify(|exports| exports.push(export));
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts a metrics collector; returns its endpoint and the exports received so far.
async fn metrics_collector() -> (String, watch::Receiver<Vec<Vec<ReceivedMetric>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (exports, received) = watch::channel(Vec::new());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(MetricsCollector { exports }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (endpoint, received)
}

/// What one export says about `name`, over the data points whose attributes include all of
/// `labels`: the sum of their values (counters, gauges) or of their counts (histograms);
/// `None` when no such point is in the export.
fn exported(export: &[ReceivedMetric], name: &str, labels: &[(&str, &str)]) -> Option<i64> {
    let matches = |attributes: &[KeyValue]| {
        labels
            .iter()
            .all(|(key, value)| attribute(attributes, key).as_deref() == Some(*value))
    };
    let number = |p: &NumberDataPoint| match p.value {
        Some(number_data_point::Value::AsInt(i)) => i,
        Some(number_data_point::Value::AsDouble(d)) => d as i64,
        None => 0,
    };
    let mut found = None;
    for received in export.iter().filter(|r| r.metric.name == name) {
        let values: Vec<i64> = match &received.metric.data {
            Some(metric::Data::Sum(sum)) => sum
                .data_points
                .iter()
                .filter(|p| matches(&p.attributes))
                .map(number)
                .collect(),
            Some(metric::Data::Gauge(gauge)) => gauge
                .data_points
                .iter()
                .filter(|p| matches(&p.attributes))
                .map(number)
                .collect(),
            Some(metric::Data::Histogram(histogram)) => histogram
                .data_points
                .iter()
                .filter(|p| matches(&p.attributes))
                .map(|p| p.count as i64)
                .collect(),
            _ => Vec::new(),
        };
        if !values.is_empty() {
            *found.get_or_insert(0) += values.iter().sum::<i64>();
        }
    }
    found
}

/// Waits until the collector received an export for which `done` holds; returns it.
async fn wait_export(
    received: &mut watch::Receiver<Vec<Vec<ReceivedMetric>>>,
    what: &str,
    done: impl Fn(&[ReceivedMetric]) -> bool,
) -> Vec<ReceivedMetric> {
    let waited = tokio::time::timeout(DEADLINE, async {
        received
            .wait_for(|exports| exports.iter().any(|e| done(e)))
            .await
            .map(|exports| exports.iter().find(|e| done(e)).cloned().unwrap())
    })
    .await;
    match waited {
        Ok(Ok(export)) => export,
        _ => panic!(
            "{what}: not received within {DEADLINE:?}; the last export: {:#?}",
            received.borrow().last()
        ),
    }
}

/// The router's `service.instance.id`: `<hostname>-<pid>` of `mesh up`.
fn router_instance(mesh: &Mesh) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    format!("{}-{}", host.trim(), mesh.pid())
}

/// `mesh up` with router metrics exported to `endpoint` every `interval`; sampling at 0 so
/// that no trace is exported there.
async fn mesh_exporting_metrics(endpoint: &str, interval: &str) -> Mesh {
    let dir = short_tempdir();
    write_config(
        &dir,
        "",
        &format!(
            "[telemetry]\nmetrics = true\notlp_endpoint = \"{endpoint}\"\n\
             metrics_interval = \"{interval}\"\nsample_ratio = 0\n\n{ECHO}"
        ),
    );
    let config = dir.path().join("mesh.toml");
    let socket = dir.path().join("run/mesh.sock");
    Mesh::launch_with(dir, config, socket, |command| {
        command
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_METRIC_EXPORT_INTERVAL");
    })
    .await
}

/// Makes `n` routed calls to plugin.echo.
async fn routed_calls(mesh: &Mesh, n: usize) {
    let router = Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    let mut echo_client = EchoClient::new(router);
    for i in 0..n {
        echo_client.echo(echo(&format!("call {i}"))).await.unwrap();
    }
}

const ECHO_CALLS: [(&str, &str); 3] = [
    ("mesh.service", "plugin.echo"),
    ("mesh.instance", "echo-0"),
    ("rpc.grpc.status_code", "0"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exported_by_otlp_per_instance_with_the_routers_resource() {
    let (endpoint, mut received) = metrics_collector().await;
    let mesh = mesh_exporting_metrics(&endpoint, "200ms").await;
    mesh.wait_instances("plugin.echo", 1).await;
    const N: i64 = 7;
    routed_calls(&mesh, N as usize).await;

    let export = wait_export(&mut received, "an export counting every call", |export| {
        exported(export, "rpc.server.calls", &ECHO_CALLS) == Some(N)
    })
    .await;
    // The same calls, timed: the histogram counts them too, by method.
    let by_method = [
        ("rpc.service", "echo.v1.Echo"),
        ("rpc.method", "Echo"),
        ECHO_CALLS[0],
        ECHO_CALLS[1],
    ];
    assert_eq!(
        exported(&export, "rpc.server.duration", &by_method),
        Some(N),
        "{export:#?}"
    );
    // The supervisor's, in the same export: one ready instance of one desired.
    let echo_plugin = [("plugin", "echo")];
    assert_eq!(
        exported(&export, "mesh.supervisor.ready_instances", &echo_plugin),
        Some(1),
        "{export:#?}"
    );
    assert_eq!(
        exported(&export, "mesh.supervisor.desired_instances", &echo_plugin),
        Some(1),
        "{export:#?}"
    );
    // Every metric under the router's resource, as its traces.
    let instance = router_instance(&mesh);
    for metric in &export {
        assert_eq!(
            (metric.service.as_str(), metric.instance.as_str()),
            ("mesh-router", instance.as_str()),
            "{metric:#?}"
        );
    }
    // Exports go on: a later call shows in a later one.
    routed_calls(&mesh, 1).await;
    wait_export(&mut received, "an export with the later call", |export| {
        exported(export, "rpc.server.calls", &ECHO_CALLS) == Some(N + 1)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_metrics_are_exported_when_mesh_up_stops() {
    let (endpoint, received) = metrics_collector().await;
    // An hour between exports: only the one at exit can carry the calls.
    let mut mesh = mesh_exporting_metrics(&endpoint, "1h").await;
    mesh.wait_instances("plugin.echo", 1).await;
    const N: i64 = 4;
    routed_calls(&mesh, N as usize).await;
    let status = mesh.stop_with(nix::sys::signal::Signal::SIGTERM).await;
    assert!(status.success(), "{status:?}: {}", mesh.output());
    // The exit waited for the collector's answer, so the export is in.
    let exports = received.borrow().clone();
    assert!(
        exports
            .iter()
            .any(|e| exported(e, "rpc.server.calls", &ECHO_CALLS) == Some(N)),
        "no export at exit counted the {N} calls: {exports:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_does_not_hold_up_the_exit() {
    // Connections queue on this listener, and nothing ever reads them: the exporter's
    // handshake hangs.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let mut mesh = mesh_exporting_metrics(&endpoint, "1h").await;
    mesh.wait_instances("plugin.echo", 1).await;
    routed_calls(&mesh, 1).await;
    // Within the support's deadline, or it panics.
    let status = mesh.stop_with(nix::sys::signal::Signal::SIGTERM).await;
    assert!(status.success(), "{status:?}: {}", mesh.output());
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_calling_a_plugin_carries_the_trace_on() {
    let (endpoint, mut received) = collector().await;
    let dir = short_tempdir();
    let root = dir.path().join("files");
    // The demo's file lister, whose Survey calls plugin.echo through mesh::connect, in its
    // kernel sandbox (no TCP: it exports through the router's trace relay), claiming in its
    // resource to be echo-0 (the SDK reads OTEL_RESOURCE_ATTRIBUTES).
    let plugins = crate::files_plugin::demo_plugins(&root);
    assert!(plugins.contains("sandbox = true"), "{plugins}");
    let plugins = plugins.replace(
        "sandbox = true",
        "sandbox = true\nenv = { OTEL_RESOURCE_ATTRIBUTES = \"mesh.plugin=echo,mesh.instance=echo-0\" }",
    );
    write_config(
        &dir,
        // The plugins are handed the SDK's batch delay set below (a clean environment else).
        "env_allow = [\"PATH\", \"OTEL_BSP_*\"]",
        &format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\nsample_ratio = 0\n\n{plugins}"),
    );
    let config = dir.path().join("mesh.toml");
    let socket = dir.path().join("run/mesh.sock");
    let mesh = Mesh::launch_with(dir, config, socket.clone(), |command| {
        command.env("OTEL_BSP_SCHEDULE_DELAY", "50");
    })
    .await;
    mesh.wait_state("files", "files-0", "ready").await;
    mesh.wait_state("echo", "echo-0", "ready").await;
    mesh.wait_state("echo", "echo-1", "ready").await;

    // The caller: a sampled trace of its own, given as W3C traceparent (ratio 0 elsewhere, so
    // only this trace is recorded).
    let trace = "5e1f0c2a9b7d4e6f8a0b1c2d3e4f5a6b";
    let caller = "1a2b3c4d5e6f7081";
    let socket_text = socket.display().to_string();
    let traceparent = format!("traceparent: 00-{trace}-{caller}-01");
    let reply = grpcurl_ok(&[
        "-unix",
        "-authority",
        "plugin.files",
        "-H",
        &traceparent,
        "-d",
        r#"{"dir":"docs"}"#,
        &socket_text,
        "files.v1.Files/Survey",
    ]);
    let reply: Value = serde_json::from_str(&reply).unwrap();
    let echo_instance = reply["echoInstance"].as_str().unwrap().to_owned();
    assert!(echo_instance.starts_with("echo-"), "{reply}");

    let spans = wait_spans(&mut received, "router, files and echo spans", |spans| {
        find(spans, "mesh-router", trace, "files.v1.Files/Survey").is_some()
            && find(spans, "plugin.files", trace, "files.v1.Files/Survey").is_some()
            && find(spans, "plugin.echo", trace, "echo.v1.Echo/Echo").is_some()
    })
    .await;
    // caller -> router -> files
    let router = find(&spans, "mesh-router", trace, "files.v1.Files/Survey").unwrap();
    assert_eq!(hex(&router.span.parent_span_id), caller, "{router:#?}");
    let files = find(&spans, "plugin.files", trace, "files.v1.Files/Survey").unwrap();
    assert_eq!(
        files.span.parent_span_id, router.span.span_id,
        "the router's span is files' parent: {files:#?}"
    );
    assert_eq!(files.instance, "files-0");
    // The relay stamped files' spans with the kernel's word for who sent them, over the
    // forged claim.
    assert_eq!(
        files.resource_values("mesh.plugin"),
        ["files"],
        "{files:#?}"
    );
    assert_eq!(
        files.resource_values("mesh.instance"),
        ["files-0"],
        "{files:#?}"
    );
    // files -> (the router, if its call took that path) -> echo
    let echo = find(&spans, "plugin.echo", trace, "echo.v1.Echo/Echo").unwrap();
    assert_eq!(echo.instance, echo_instance, "{echo:#?}");
    assert_rpc(echo, &echo_instance);
    assert_eq!(echo.resource_values("mesh.plugin"), ["echo"], "{echo:#?}");
    assert_eq!(
        echo.resource_values("mesh.instance"),
        [echo_instance.as_str()],
        "{echo:#?}"
    );
    // The router's own spans go to the collector directly, unstamped.
    assert!(
        router.resource_values("mesh.plugin").is_empty(),
        "{router:#?}"
    );
    match find(&spans, "mesh-router", trace, "echo.v1.Echo/Echo") {
        Some(hop) => {
            assert_eq!(hop.span.parent_span_id, files.span.span_id, "{hop:#?}");
            assert_eq!(echo.span.parent_span_id, hop.span.span_id, "{echo:#?}");
        }
        None => assert_eq!(
            echo.span.parent_span_id, files.span.span_id,
            "files' span is echo's parent on the direct path: {echo:#?}"
        ),
    }
    // One trace, nothing else: the host calls files made on the way (list, read, write) go
    // to the router's own API, which is not traced.
    for span in spans.iter() {
        assert_eq!(hex(&span.span.trace_id), trace, "{span:#?}");
    }
}

/// Just enough of OTLP's trace service for grpcurl to send an export with a named span and a
/// resource attribute the same way for every caller (uid 65534 included), whatever the
/// router's reflection answers it.
const TRACE_PROTO: &str = r#"syntax = "proto3";
package opentelemetry.proto.collector.trace.v1;
message AnyValue { oneof value { string string_value = 1; } }
message KeyValue { string key = 1; AnyValue value = 2; }
message Resource { repeated KeyValue attributes = 1; }
message Span { bytes trace_id = 1; bytes span_id = 2; string name = 5; }
message ScopeSpans { repeated Span spans = 2; }
message ResourceSpans { Resource resource = 1; repeated ScopeSpans scope_spans = 2; }
message ExportTraceServiceRequest { repeated ResourceSpans resource_spans = 1; }
message ExportTraceServiceResponse {}
service TraceService { rpc Export(ExportTraceServiceRequest) returns (ExportTraceServiceResponse); }
"#;

/// An export of one span named `name` whose resource claims to be plugin echo's.
fn forged_export(name: &str) -> String {
    // Trace and span ids as proto3 JSON bytes (base64).
    format!(
        r#"{{"resourceSpans":[{{"resource":{{"attributes":[{{"key":"mesh.plugin","value":{{"stringValue":"echo"}}}}]}},"scopeSpans":[{{"spans":[{{"traceId":"AAECAwQFBgcICQoLDA0ODw==","spanId":"AAECAwQFBgc=","name":"{name}"}}]}}]}}]}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_relay_refuses_other_users_and_strips_claimed_identities() {
    let (endpoint, mut received) = collector().await;
    let public = crate::security::public_dir();
    let socket = public.path().join("mesh.sock");
    let mut mesh = crate::support::Mesh::start_with(
        &format!(
            "socket = \"{}\"\nsocket_mode = \"0666\"\n",
            socket.display()
        ),
        &format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\n\n{ECHO}"),
    )
    .await;
    mesh.socket = socket.clone();
    mesh.wait_instances("plugin.echo", 1).await;
    let proto = public.path().join("trace.proto");
    std::fs::write(&proto, TRACE_PROTO).unwrap();
    std::fs::set_permissions(&proto, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let grpcurl = crate::security::grpcurl_for_others(public.path());
    let import = public.path().display().to_string();
    let sock = socket.display().to_string();
    let export = |name: &str| -> Vec<String> {
        [
            "-plaintext",
            "-unix",
            "-authority",
            "localhost",
            "-import-path",
            &import,
            "-proto",
            "trace.proto",
            "-d",
            &forged_export(name),
            &sock,
            "opentelemetry.proto.collector.trace.v1.TraceService/Export",
        ]
        .map(str::to_owned)
        .to_vec()
    };

    // The router's reflection describes the relay.
    let described = crate::support::grpcurl_ok(&[
        "-unix",
        "-authority",
        "localhost",
        &sock,
        "describe",
        "opentelemetry.proto.collector.trace.v1.TraceService",
    ]);
    assert!(described.contains("rpc Export"), "{described}");

    // Another uid, whom the socket's mode lets connect: refused, nothing reaches the collector.
    let args = export("sent-by-nobody");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = crate::security::as_nobody(&grpcurl, &args, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an export as uid 65534 was accepted");
    assert!(
        err.contains("PermissionDenied") && err.contains("relays traces"),
        "{err}"
    );

    // The owner may export through the relay; its claim to be plugin echo is removed.
    let args = export("sent-by-owner");
    let out = std::process::Command::new(&grpcurl)
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spans = wait_spans(&mut received, "the owner's span", |spans| {
        spans.iter().any(|r| r.span.name == "sent-by-owner")
    })
    .await;
    let owners = spans
        .iter()
        .find(|r| r.span.name == "sent-by-owner")
        .unwrap();
    assert!(
        owners.resource_values("mesh.plugin").is_empty(),
        "{owners:#?}"
    );
    // The refused export came before the owner's on the same path: it never arrived.
    assert!(
        !spans.iter().any(|r| r.span.name == "sent-by-nobody"),
        "{spans:#?}"
    );
}

/// The peak resident memory of process `pid` so far (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

/// A length-delimited protobuf field `number` holding `payload`.
fn field(number: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 12);
    let mut varint = |mut value: u64| loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    };
    varint((number << 3) | 2);
    varint(payload.len() as u64);
    out.extend_from_slice(payload);
    out
}

/// An encoded `ExportTraceServiceRequest` of about `bytes` bytes of empty spans (2 bytes
/// each on the wire: the attack that grew the manager by 2 GB with 16 MB).
fn empty_spans(bytes: usize) -> bytes::Bytes {
    let spans = [0x12u8, 0x00].repeat(bytes / 2);
    field(1, &field(2, &spans)).into()
}

/// One `TraceService/Export` call of `message` over `io` (plain HTTP/2); its grpc-status and
/// grpc-message.
async fn export_raw(io: tokio::net::UnixStream, message: bytes::Bytes) -> (i32, String) {
    let (client, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(
        "http://localhost/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    )
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    let mut framed = vec![0u8];
    framed.extend(u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&message);
    // Queued whole: the connection sends it as the router's window allows, or stops when the
    // router answers first.
    let _ = body.send_data(framed.into(), true);
    let response = tokio::time::timeout(DEADLINE, response)
        .await
        .expect("the relay answers")
        .unwrap();
    let status = |headers: &http::HeaderMap| {
        let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
        let message = headers
            .get("grpc-message")
            .map(|m| String::from_utf8_lossy(m.as_bytes()).replace("%20", " "))
            .unwrap_or_default();
        Some((code, message))
    };
    if let Some(answer) = status(response.headers()) {
        return answer;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        if let Ok(chunk) = chunk {
            let _ = body.flow_control().release_capacity(chunk.len());
        }
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    status(&trailers).expect("a grpc-status in the trailers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_export_of_tiny_spans_is_refused_before_it_is_decoded() {
    const RESOURCE_EXHAUSTED: i32 = 8;
    let (endpoint, mut received) = collector().await;
    let dir = short_tempdir();
    let (spy, socket) = crate::admin::spy_plugin(dir.path(), "spy");
    let mesh = Mesh::start_with(
        "",
        &format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\n\n{spy}{ECHO}"),
    )
    .await;
    mesh.wait_line("spy: listening").await;
    mesh.wait_instances("plugin.echo", 1).await;
    mesh.wait_instances("plugin.spy", 1).await;
    let before = peak_rss_kib(mesh.pid());

    // 16 MB of empty spans from inside plugin spy: refused at the length prefix.
    let (code, message) = export_raw(
        crate::admin::spy(&socket, "unix").await,
        empty_spans(16 << 20),
    )
    .await;
    assert_eq!(code, RESOURCE_EXHAUSTED, "{message}");
    assert!(message.contains("at most 4194304 bytes"), "{message}");

    // Just under the size limit (two million empty spans), eight at once: each refused by its
    // count before it is decoded, or by the plugin's own bound before it is read.
    let under = empty_spans((4 << 20) - 64);
    let floods: Vec<_> = (0..8)
        .map(|_| {
            let (socket, under) = (socket.clone(), under.clone());
            tokio::spawn(async move {
                export_raw(crate::admin::spy(&socket, "unix").await, under).await
            })
        })
        .collect();
    // Meanwhile, another plugin's routed call is answered within its deadline.
    let router = Channel::to_address(Address::Unix(mesh.socket.clone()), "plugin.echo").unwrap();
    let reply = tokio::time::timeout(DEADLINE, EchoClient::new(router).echo(echo("during")))
        .await
        .expect("echo answers during the flood")
        .unwrap();
    assert_eq!(reply.into_inner().message, "during");
    for flood in floods {
        let (code, message) = flood.await.unwrap();
        assert_eq!(code, RESOURCE_EXHAUSTED, "{message}");
        assert!(
            message.contains("10000 spans") || message.contains("exports of plugin spy"),
            "{message}"
        );
    }
    let after = peak_rss_kib(mesh.pid());
    eprintln!(
        "trace relay flood: manager VmHWM {before} KiB before, {after} KiB after (+{} KiB)",
        after - before
    );
    assert!(
        after - before < 64 << 10,
        "the manager's peak grew from {before} KiB to {after} KiB"
    );

    // A small export of the spy's, claiming echo's identity at every level, is relayed as the
    // spy's; echo's own spans (of the call above) arrive as echo's.
    let claims = || {
        ["service.name", "mesh.plugin"]
            .map(|key| KeyValue {
                key: key.into(),
                value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                    value: Some(any_value::Value::StringValue("echo".into())),
                }),
                ..KeyValue::default()
            })
            .to_vec()
    };
    let small = ExportTraceServiceRequest {
        resource_spans: vec![opentelemetry_proto::tonic::trace::v1::ResourceSpans {
            resource: Some(opentelemetry_proto::tonic::resource::v1::Resource {
                attributes: claims(),
                ..Default::default()
            }),
            scope_spans: vec![opentelemetry_proto::tonic::trace::v1::ScopeSpans {
                spans: vec![Span {
                    trace_id: vec![7; 16],
                    span_id: vec![7; 8],
                    name: "small-from-spy".into(),
                    attributes: claims(),
                    ..Span::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let (code, message) = export_raw(
        crate::admin::spy(&socket, "unix").await,
        prost::Message::encode_to_vec(&small).into(),
    )
    .await;
    assert_eq!(code, 0, "{message}");
    let spans = wait_spans(
        &mut received,
        "the spy's export and echo's spans",
        |spans| {
            spans.iter().any(|r| r.span.name == "small-from-spy")
                && spans.iter().any(|r| r.service == "plugin.echo")
        },
    )
    .await;
    let small = spans
        .iter()
        .find(|r| r.span.name == "small-from-spy")
        .unwrap();
    assert_eq!(small.service, "plugin.spy", "{small:#?}");
    assert_eq!(small.resource_values("mesh.plugin"), ["spy"], "{small:#?}");
    assert_eq!(small.resource_values("service.name"), ["plugin.spy"]);
    assert!(small.span.attributes.is_empty(), "{small:#?}");
}
