//! The manager's logging and tracer, as `[telemetry]` says: installed once by `mesh up`
//! before anything logs. The router's spans (one per forwarded call) are exported as
//! `service_name` (`mesh-router`), instance `<hostname>-<pid>`; so are its metrics, by OTLP,
//! when `metrics = true` (see [`metrics_export`]).

pub mod relay;

use mesh::telemetry::{Telemetry, TelemetryConfig, TelemetryError};

use crate::Config;

/// Installs logging and, with an OTLP endpoint, the tracer; call it inside a Tokio runtime.
/// Keep the value until the process exits: dropping it sends the spans still buffered.
pub fn init(config: &Config) -> Result<Telemetry, TelemetryError> {
    mesh::telemetry::init(&telemetry_config(config))
}

/// What [`init`] installs for `config`.
pub fn telemetry_config(config: &Config) -> TelemetryConfig {
    let telemetry = &config.telemetry;
    let mut installed = TelemetryConfig::new(telemetry.service_name.clone());
    installed.otlp_endpoint = telemetry.otlp_endpoint.clone();
    installed.sample_ratio = telemetry.sample_ratio;
    installed.log_format = telemetry.log_format;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    installed.instance_id = Some(format!("{host}-{}", std::process::id()));
    installed
}

/// How long one OTLP metrics export may take before it is given up.
const METRICS_EXPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The OTLP side of the manager's metrics: a periodic reader exporting every
/// `[telemetry] metrics_interval`, and the resource the router's traces carry.
pub struct MetricsExport {
    reader: opentelemetry_sdk::metrics::PeriodicReader<opentelemetry_otlp::MetricExporter>,
    resource: opentelemetry_sdk::Resource,
}

impl std::fmt::Debug for MetricsExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsExport").finish_non_exhaustive()
    }
}

impl MetricsExport {
    /// Adds the reader and the resource (`service.name`, `service.instance.id`) to the
    /// manager's meter provider, before it is built.
    pub fn install(
        self,
        builder: opentelemetry_sdk::metrics::MeterProviderBuilder,
    ) -> opentelemetry_sdk::metrics::MeterProviderBuilder {
        builder
            .with_reader(self.reader)
            .with_resource(self.resource)
    }
}

/// The OTLP metrics export `config` asks for: `Some` when `[telemetry] metrics = true` and an
/// endpoint is set (in the file or by `OTEL_EXPORTER_OTLP_ENDPOINT`). Call it inside a Tokio
/// runtime (the exporter's connection lives on it).
pub fn metrics_export(config: &Config) -> Result<Option<MetricsExport>, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let telemetry = &config.telemetry;
    let (true, Some(endpoint)) = (config.metrics, telemetry.otlp_endpoint.as_deref()) else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(METRICS_EXPORT_TIMEOUT)
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: endpoint.to_owned(),
            message: e.to_string(),
        })?;
    let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
        .with_interval(telemetry.metrics_interval)
        .build();
    let traces = telemetry_config(config);
    let mut resource =
        opentelemetry_sdk::Resource::builder().with_service_name(traces.service_name.clone());
    if let Some(id) = traces.instance_id {
        resource = resource.with_attribute(opentelemetry::KeyValue::new("service.instance.id", id));
    }
    Ok(Some(MetricsExport {
        reader,
        resource: resource.build(),
    }))
}
