//! Installing the process's logging and, when an OTLP endpoint is configured, its tracer:
//! one global `tracing` subscriber with a log layer (text or JSON lines on stderr) and an
//! OpenTelemetry layer that exports by OTLP/gRPC in batches.

use std::time::Duration;

use opentelemetry::{
    KeyValue,
    trace::{Link, SpanKind, TraceContextExt, TraceId, TraceState, TracerProvider as _},
};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{Sampler, SamplingDecision, SamplingResult, SdkTracerProvider, ShouldSample},
};

use super::sampling::RootSampled;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{LevelFilter, Targets},
    layer::SubscriberExt,
};

/// The standard variable naming the collector (`http://127.0.0.1:4317`), or a Unix socket
/// that serves OTLP/gRPC ([`UNIX_ENDPOINT`]`/path`: the router's trace relay, which the
/// manager hands its plugins).
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The scheme of an OTLP endpoint that is a Unix socket: `unix:/run/mesh/mesh.sock` (gRPC's
/// own name for one; `unix:///run/mesh/mesh.sock` is read the same).
pub const UNIX_ENDPOINT: &str = "unix:";
/// The standard variable naming this service (`plugin.echo`).
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
/// The standard variable giving the sampler's ratio (with `OTEL_TRACES_SAMPLER =
/// parentbased_traceidratio`, which is the only sampler mesh installs).
pub const OTEL_TRACES_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
/// `text` (the default) or `json`: the log format of a process that [`init`]s from the
/// environment; the manager hands its own to plugins.
pub const MESH_LOG_FORMAT: &str = "MESH_LOG_FORMAT";

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// For people: `LEVEL message` with the span's fields.
    #[default]
    Text,
    /// For log shippers: one JSON object per line, with `trace_id` and `span_id` inside a
    /// traced call.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?}: write \"text\" or \"json\""
            )),
        }
    }
}

/// What [`init`] installs.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// The OTLP/gRPC collector (`http://127.0.0.1:4317`); `None`: no tracer, nothing exported.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` resource (`plugin.echo`, `mesh-router`).
    pub service_name: String,
    /// The `service.instance.id` resource (`echo-0`).
    pub instance_id: Option<String>,
    /// The share of new traces recorded, 0 to 1; a call whose caller's trace is sampled is
    /// recorded whatever this says (parent-based sampling).
    pub sample_ratio: f64,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// Text lines without timestamps or colours (for a process whose stderr the manager
    /// captures and stamps itself).
    pub captured: bool,
}

impl TelemetryConfig {
    /// Nothing exported, text logs: the default.
    pub fn new(service_name: impl Into<String>) -> Self {
        Self {
            otlp_endpoint: None,
            service_name: service_name.into(),
            instance_id: None,
            sample_ratio: 1.0,
            log_format: LogFormat::Text,
            captured: false,
        }
    }

    /// [`TelemetryConfig::new`] with what the standard variables say:
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME` (else `service_name`),
    /// `OTEL_TRACES_SAMPLER_ARG`, and [`MESH_LOG_FORMAT`]. Values that do not parse are
    /// ignored with a line on stderr.
    pub fn from_env(service_name: impl Into<String>) -> Self {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        let mut config = Self::new(var(OTEL_SERVICE_NAME).unwrap_or_else(|| service_name.into()));
        config.otlp_endpoint = var(OTEL_EXPORTER_OTLP_ENDPOINT);
        if let Some(ratio) = var(OTEL_TRACES_SAMPLER_ARG) {
            match parse_ratio(&ratio) {
                Some(ratio) => config.sample_ratio = ratio,
                None => eprintln!(
                    "{OTEL_TRACES_SAMPLER_ARG}={ratio:?} ignored: give a ratio from 0 to 1"
                ),
            }
        }
        if let Some(format) = var(MESH_LOG_FORMAT) {
            match format.parse() {
                Ok(format) => config.log_format = format,
                Err(error) => eprintln!("{MESH_LOG_FORMAT} ignored: {error}"),
            }
        }
        config
    }
}

/// A sampling ratio from text: a number from 0 to 1.
pub fn parse_ratio(text: &str) -> Option<f64> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|r| (0.0..=1.0).contains(r))
}

/// Why telemetry could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (a malformed endpoint).
    #[error(
        "OTLP endpoint {endpoint:?}: {message}; give an address such as http://127.0.0.1:4317 or unix:/path/to/socket"
    )]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// A global subscriber was already installed.
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// The installed tracer: dropping it sends the spans still buffered (waiting up to a few
/// seconds for the collector) and stops the exporter.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the buffered spans now.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }

    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            super::set_active(false);
            let _ = provider.shutdown();
        }
    }
}

/// Targets whose own spans never reach the exporter: the HTTP/2 and gRPC stack the exporter
/// itself sends with (unfiltered, each export would make spans to export) and the SDK.
const UNEXPORTED: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
];

/// What reaches the exporter: INFO and above, outside [`UNEXPORTED`]. A static filter, so that
/// the callsites it leaves out (h2's and hyper's trace events, the router's per-connection
/// debug span, polled on every wake-up) cost nothing, as they do with telemetry off.
fn export_filter() -> Targets {
    UNEXPORTED.iter().fold(
        Targets::new().with_default(LevelFilter::INFO),
        |targets, target| targets.with_target(*target, LevelFilter::OFF),
    )
}

/// Installs the global subscriber: logs on stderr as `config.log_format` says (filtered by
/// `RUST_LOG`, default `info`) and, with an OTLP endpoint, spans exported to it. Needs a
/// Tokio runtime when exporting (the exporter's connection lives on it).
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let provider = config
        .otlp_endpoint
        .as_deref()
        .map(|e| provider(config, e))
        .transpose()?;
    let logs = log_layer(config);
    let traces = provider.as_ref().map(layer);
    let subscriber = tracing_subscriber::registry().with(logs).with(traces);
    tracing::subscriber::set_global_default(subscriber)
        .map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    if provider.is_some() {
        super::set_sample_ratio(Some(config.sample_ratio));
        super::set_active(true);
    }
    Ok(Telemetry { provider })
}

/// The layer that turns `tracing` spans into OpenTelemetry spans of `provider`, for a program
/// that builds its own subscriber: spans of the HTTP/2 and gRPC stack (`h2`, `hyper`,
/// `tonic`, `tower`) and of the SDK itself are left out, since the exporter sends with that
/// very stack and each export would make more spans to export. Call [`super::set_active`]
/// once it is installed.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("mesh"))
        // Source location, thread and busy/idle times on every span: a dozen allocations and
        // two clock reads per call, for attributes that name mesh's code, not the caller's.
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(export_filter())
}

/// The SDK's parent-based ratio sampler, except for a new trace that
/// [`sample`](super::sample) already decided to record (marked in its parent context): the
/// ratio is applied to it once, not twice.
#[derive(Debug, Clone)]
struct MeshSampler(Sampler);

impl ShouldSample for MeshSampler {
    fn should_sample(
        &self,
        parent_context: Option<&opentelemetry::Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let decided = parent_context.is_some_and(|context| {
            !context.has_active_span() && context.get::<RootSampled>().is_some()
        });
        if decided {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            };
        }
        self.0
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

fn log_layer(config: &TelemetryConfig) -> BoxedLayer {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            // Span fields are formatted by the layer: no colour codes inside JSON strings.
            .with_ansi(false)
            .event_format(super::json::JsonLines)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text if config.captured => tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .without_time()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => {
            use std::io::IsTerminal;
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .with_writer(std::io::stderr)
                .with_filter(filter)
                .boxed()
        }
    }
}

/// The tracer provider: OTLP/gRPC in batches, parent-based ratio sampling, the resource.
pub fn provider(
    config: &TelemetryConfig,
    endpoint: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    const TIMEOUT: Duration = Duration::from_secs(5);
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    let exporter = match unix_endpoint(endpoint) {
        Some(path) => exporter
            .with_channel(unix_channel(endpoint, path, TIMEOUT)?)
            .with_timeout(TIMEOUT),
        None => exporter.with_endpoint(endpoint).with_timeout(TIMEOUT),
    };
    let exporter = exporter.build().map_err(|e| TelemetryError::Exporter {
        endpoint: endpoint.to_owned(),
        message: e.to_string(),
    })?;
    let mut resource = Resource::builder().with_service_name(config.service_name.clone());
    if let Some(id) = &config.instance_id {
        resource = resource.with_attribute(KeyValue::new("service.instance.id", id.clone()));
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(MeshSampler(Sampler::ParentBased(Box::new(
            Sampler::TraceIdRatioBased(config.sample_ratio),
        ))))
        .with_resource(resource.build())
        .build())
}

/// The socket path of a [`UNIX_ENDPOINT`] endpoint; `None` for any other.
fn unix_endpoint(endpoint: &str) -> Option<&str> {
    let path = endpoint.strip_prefix(UNIX_ENDPOINT)?;
    Some(path.strip_prefix("//").unwrap_or(path))
}

/// A channel to the OTLP/gRPC server on the Unix socket `path`, dialled when the first batch
/// is sent (and again after the server goes away). The authority is `localhost`: a mesh
/// router serves the relay itself and routes `localhost` to its own services.
fn unix_channel(
    endpoint: &str,
    path: &str,
    timeout: Duration,
) -> Result<tonic::transport::Channel, TelemetryError> {
    if !path.starts_with('/') {
        return Err(TelemetryError::Exporter {
            endpoint: endpoint.to_owned(),
            message: "a Unix socket endpoint needs an absolute path, such as \
                      unix:/run/mesh/mesh.sock"
                .to_owned(),
        });
    }
    let path = std::path::PathBuf::from(path);
    Ok(tonic::transport::Endpoint::from_static("http://localhost")
        .timeout(timeout)
        .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exporters_own_stack_is_not_exported() {
        use tracing::Level;
        let filter = export_filter();
        for own in [
            "h2",
            "h2::proto",
            "tonic::transport",
            "hyper_util::client",
            "tower::buffer",
        ] {
            assert!(!filter.would_enable(own, &Level::ERROR), "{own}");
        }
        for ours in ["mesh::rpc", "mesh_router", "echo_plugin"] {
            assert!(filter.would_enable(ours, &Level::INFO), "{ours}");
            // Debug spans (the router's per connection) stay out.
            assert!(!filter.would_enable(ours, &Level::DEBUG), "{ours}");
        }
    }

    #[test]
    fn unix_endpoints_are_told_from_network_ones() {
        assert_eq!(unix_endpoint("unix:/run/mesh.sock"), Some("/run/mesh.sock"));
        assert_eq!(
            unix_endpoint("unix:///run/mesh.sock"),
            Some("/run/mesh.sock")
        );
        assert_eq!(unix_endpoint("http://127.0.0.1:4317"), None);
        let relative = unix_channel("unix:mesh.sock", "mesh.sock", Duration::from_secs(1));
        assert!(
            relative.unwrap_err().to_string().contains("absolute path"),
            "relative socket paths are refused"
        );
    }

    #[test]
    fn ratios_and_formats_are_checked() {
        assert_eq!(parse_ratio("0.01"), Some(0.01));
        assert_eq!(parse_ratio("1"), Some(1.0));
        for bad in ["-0.1", "1.5", "half", "NaN", ""] {
            assert_eq!(parse_ratio(bad), None, "{bad}");
        }
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().unwrap_err().contains("\"json\""));
    }

    #[test]
    fn a_new_trace_decided_by_sample_is_recorded_once_and_others_follow_the_ratio() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags};
        let never = MeshSampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            0.0,
        ))));
        let decide = |parent: &opentelemetry::Context| {
            never
                .should_sample(
                    Some(parent),
                    TraceId::from(1u128),
                    "echo.v1.Echo/Echo",
                    &SpanKind::Server,
                    &[],
                    &[],
                )
                .decision
        };
        let marked = opentelemetry::Context::new().with_value(RootSampled);
        assert_eq!(decide(&marked), SamplingDecision::RecordAndSample);
        // Unmarked new traces follow the ratio (0 here).
        assert_eq!(
            decide(&opentelemetry::Context::new()),
            SamplingDecision::Drop
        );
        // A parent's decision wins over a marker the context inherited.
        let unsampled = SpanContext::new(
            TraceId::from(2u128),
            SpanId::from(3u64),
            TraceFlags::NOT_SAMPLED,
            true,
            TraceState::NONE,
        );
        assert_eq!(
            decide(&marked.with_remote_span_context(unsampled)),
            SamplingDecision::Drop
        );
    }
}
