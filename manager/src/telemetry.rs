//! The manager's logging and tracer, as `[telemetry]` says: installed once by `mesh up`
//! before anything logs. The router's spans (one per forwarded call) are exported as
//! `service_name` (`mesh-router`), instance `<hostname>-<pid>`.

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
