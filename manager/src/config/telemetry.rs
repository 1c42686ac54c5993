//! `[telemetry]`: router metrics (`metrics`, read in `config.rs`), traces and metrics exported
//! by OTLP/gRPC (off unless an endpoint is given, in the file or by
//! `OTEL_EXPORTER_OTLP_ENDPOINT`), the traces' sampling, the metrics' export interval, the
//! router's service name, and the log format; and what the manager hands each plugin so the SDK
//! exports without code.

use std::{collections::BTreeMap, time::Duration};

use mesh::telemetry::{
    LogFormat, MESH_LOG_FORMAT, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME,
    OTEL_TRACES_SAMPLER_ARG,
};
use serde::Deserialize;
use toml::Spanned;

/// How often metrics are exported by OTLP unless `metrics_interval` (or
/// `OTEL_METRIC_EXPORT_INTERVAL`) says otherwise.
pub(super) const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(10);
/// The shortest and longest export interval accepted.
const METRICS_INTERVALS: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(24 * 3600);
/// The standard variable for the metrics' export interval, in milliseconds.
pub(super) const OTEL_METRIC_EXPORT_INTERVAL: &str = "OTEL_METRIC_EXPORT_INTERVAL";

/// The router's `service.name` unless `service_name` (or `OTEL_SERVICE_NAME`) says otherwise.
pub const DEFAULT_SERVICE_NAME: &str = "mesh-router";

/// The validated `[telemetry]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    /// The OTLP/gRPC collector (`http://127.0.0.1:4317`): `otlp_endpoint`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` exports nothing (the default).
    pub otlp_endpoint: Option<String>,
    /// The share of new traces recorded (`sample_ratio`, else `OTEL_TRACES_SAMPLER_ARG`,
    /// else 1): parent-based, so a call whose caller's trace is sampled is always recorded.
    pub sample_ratio: f64,
    /// How often the manager's metrics are exported by OTLP, when `metrics = true` and an
    /// endpoint is set (`metrics_interval`, else `OTEL_METRIC_EXPORT_INTERVAL` in
    /// milliseconds, else 10 s).
    pub metrics_interval: Duration,
    /// The router's `service.name` (`service_name`, else `OTEL_SERVICE_NAME`, else
    /// `mesh-router`); plugins are `plugin.<name>`.
    pub service_name: String,
    /// `log_format`: `text` (the default) or `json`; `mesh up --log-format` overrides it.
    pub log_format: LogFormat,
    /// Whether `log_format` came from the command line (`mesh up --log-format`); a reload
    /// keeps it.
    pub log_format_overridden: bool,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            metrics_interval: DEFAULT_METRICS_INTERVAL,
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            log_format: LogFormat::Text,
            log_format_overridden: false,
        }
    }
}

/// `[telemetry]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    /// Whether the router records call metrics (read by `metrics_enabled`, kept on
    /// [`super::Config::metrics`]); the rest of the section is traces and logs.
    pub(super) metrics: Option<Spanned<bool>>,
    otlp_endpoint: Option<Spanned<String>>,
    sample_ratio: Option<Spanned<RawRatio>>,
    metrics_interval: Option<Spanned<String>>,
    service_name: Option<Spanned<String>>,
    log_format: Option<Spanned<String>>,
}

/// `1` or `0.25`: TOML tells integers from floats.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawRatio {
    Float(f64),
    Integer(i64),
}

/// What an error points at, and says.
type At<'a> = &'a dyn Fn(Option<std::ops::Range<usize>>, String) -> super::ConfigError;

impl Telemetry {
    /// Validates `raw`; `env` reads a process variable (the standard ones fill in what the
    /// file leaves unset).
    pub(super) fn parse(
        raw: RawTelemetry,
        env: &dyn Fn(&str) -> Option<String>,
        at: At<'_>,
    ) -> Result<Self, super::ConfigError> {
        let mut telemetry = Self::default();
        telemetry.otlp_endpoint = match &raw.otlp_endpoint {
            Some(endpoint) => {
                let text = endpoint.get_ref().trim();
                if !valid_endpoint(text) {
                    return Err(at(
                        Some(endpoint.span()),
                        format!(
                            "otlp_endpoint = {:?} is not an OTLP/gRPC address; write \"http://host:port\", such as \"http://127.0.0.1:4317\"",
                            endpoint.get_ref()
                        ),
                    ));
                }
                Some(text.to_owned())
            }
            // From the environment: a bad value is the environment's, named as such.
            None => match env(OTEL_EXPORTER_OTLP_ENDPOINT) {
                Some(text) if !valid_endpoint(&text) => {
                    return Err(at(
                        None,
                        format!(
                            "{OTEL_EXPORTER_OTLP_ENDPOINT}={text:?} is not an OTLP/gRPC address; set it to \"http://host:port\" or unset it"
                        ),
                    ));
                }
                other => other,
            },
        };
        telemetry.sample_ratio = match &raw.sample_ratio {
            Some(ratio) => {
                let value = match ratio.get_ref() {
                    RawRatio::Float(f) => *f,
                    RawRatio::Integer(i) => *i as f64,
                };
                if !(0.0..=1.0).contains(&value) {
                    return Err(at(
                        Some(ratio.span()),
                        "sample_ratio must be from 0 to 1 (0.01 records one new trace in a hundred)"
                            .to_owned(),
                    ));
                }
                value
            }
            None => match env(OTEL_TRACES_SAMPLER_ARG) {
                Some(text) => mesh::telemetry::parse_ratio(&text).ok_or_else(|| {
                    at(
                        None,
                        format!(
                            "{OTEL_TRACES_SAMPLER_ARG}={text:?}: give a ratio from 0 to 1, or unset it"
                        ),
                    )
                })?,
                None => 1.0,
            },
        };
        telemetry.metrics_interval = metrics_interval(raw.metrics_interval.as_ref(), env, at)?;
        telemetry.service_name = match &raw.service_name {
            Some(name) => {
                let text = name.get_ref();
                if text.is_empty() || text.len() > 255 || text.chars().any(char::is_control) {
                    return Err(at(
                        Some(name.span()),
                        "service_name must be 1 to 255 printable characters, such as \"mesh-router\""
                            .to_owned(),
                    ));
                }
                text.clone()
            }
            None => env(OTEL_SERVICE_NAME)
                .filter(|n| !n.chars().any(char::is_control))
                .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned()),
        };
        if let Some(format) = &raw.log_format {
            telemetry.log_format = format
                .get_ref()
                .parse()
                .map_err(|message| at(Some(format.span()), format!("log_format: {message}")))?;
        }
        Ok(telemetry)
    }

    /// Adds what an SDK plugin needs to export as `plugin.<name>` and to log in the same
    /// format to a plugin's environment; what the plugin's own `env` table sets wins. Plugins
    /// export to the router's trace relay on `socket` ([`relay_endpoint`]), never to the
    /// collector itself: a sandboxed plugin may not open TCP, and no plugin needs the
    /// collector's address.
    pub(super) fn plugin_env(
        &self,
        plugin: &str,
        socket: &std::path::Path,
        env: &mut BTreeMap<String, String>,
    ) {
        if self.log_format == LogFormat::Json {
            env.entry(MESH_LOG_FORMAT.to_owned())
                .or_insert_with(|| "json".to_owned());
        }
        if self.otlp_endpoint.is_none() {
            return;
        }
        for (key, value) in [
            (OTEL_EXPORTER_OTLP_ENDPOINT, relay_endpoint(socket)),
            (OTEL_SERVICE_NAME, format!("plugin.{plugin}")),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".to_owned()),
            (OTEL_TRACES_SAMPLER_ARG, self.sample_ratio.to_string()),
        ] {
            env.entry(key.to_owned()).or_insert(value);
        }
    }
}

/// The OTLP endpoint of the trace relay on the router's socket: `unix:<socket>`.
pub(crate) fn relay_endpoint(socket: &std::path::Path) -> String {
    format!("{}{}", mesh::telemetry::UNIX_ENDPOINT, socket.display())
}

/// `metrics_interval` (`"10s"`), else `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds), else
/// [`DEFAULT_METRICS_INTERVAL`]; either must lie in [`METRICS_INTERVALS`].
fn metrics_interval(
    raw: Option<&Spanned<String>>,
    env: &dyn Fn(&str) -> Option<String>,
    at: At<'_>,
) -> Result<Duration, super::ConfigError> {
    let bounds = || {
        format!(
            "from {} to {}",
            humantime::format_duration(*METRICS_INTERVALS.start()),
            humantime::format_duration(*METRICS_INTERVALS.end())
        )
    };
    if let Some(text) = raw {
        let interval = humantime::parse_duration(text.get_ref().trim())
            .ok()
            .filter(|i| METRICS_INTERVALS.contains(i));
        return interval.ok_or_else(|| {
            at(
                Some(text.span()),
                format!(
                    "metrics_interval = {:?}: write a duration {}, such as \"10s\" (the default)",
                    text.get_ref(),
                    bounds()
                ),
            )
        });
    }
    let Some(text) = env(OTEL_METRIC_EXPORT_INTERVAL) else {
        return Ok(DEFAULT_METRICS_INTERVAL);
    };
    text.trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_millis)
        .filter(|i| METRICS_INTERVALS.contains(i))
        .ok_or_else(|| {
            at(
                None,
                format!(
                    "{OTEL_METRIC_EXPORT_INTERVAL}={text:?}: give milliseconds {} (10000 is 10 s), or unset it",
                    bounds()
                ),
            )
        })
}

/// `http://host:port` or `https://host:port`, no user info, no spaces.
fn valid_endpoint(text: &str) -> bool {
    let Some(rest) = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
    else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or("");
    !authority.is_empty()
        && !authority.contains('@')
        && !text.chars().any(|c| c.is_whitespace() || c.is_control())
        && text.parse::<tonic::codegen::http::Uri>().is_ok()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::Config;

    fn parse(text: &str) -> Result<Config, crate::ConfigError> {
        Config::parse(Path::new("/etc/mesh.toml"), text)
    }

    #[test]
    fn off_by_default_and_handed_to_plugins_when_on() {
        let plugin = "[[plugin]]\nname = \"echo\"\ncommand = \"/bin/echo\"\n";
        let config = parse(plugin).unwrap();
        assert_eq!(config.telemetry.otlp_endpoint, None);
        assert!(!config.plugins[0].env.contains_key(OTEL_SERVICE_NAME));
        assert!(!config.plugins[0].env.contains_key(MESH_LOG_FORMAT));

        let config = parse(&format!(
            "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\nsample_ratio = 0.25\n\
             service_name = \"edge\"\nlog_format = \"json\"\n{plugin}\
             env = {{ OTEL_TRACES_SAMPLER_ARG = \"1\" }}\n"
        ))
        .unwrap();
        let t = &config.telemetry;
        assert_eq!(t.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!((t.sample_ratio, t.service_name.as_str()), (0.25, "edge"));
        assert_eq!(t.log_format, LogFormat::Json);
        let env = &config.plugins[0].env;
        // Plugins export to the trace relay on the router's socket, which follows --socket.
        assert_eq!(
            env[OTEL_EXPORTER_OTLP_ENDPOINT],
            format!("unix:{}", config.socket.display())
        );
        let mut moved = config.clone();
        moved
            .override_socket("/tmp/elsewhere/mesh.sock".into())
            .unwrap();
        assert_eq!(
            moved.plugins[0].env[OTEL_EXPORTER_OTLP_ENDPOINT],
            "unix:/tmp/elsewhere/mesh.sock"
        );
        assert_eq!(env[OTEL_SERVICE_NAME], "plugin.echo");
        assert_eq!(env[MESH_LOG_FORMAT], "json");
        // The plugin's own env wins.
        assert_eq!(env[OTEL_TRACES_SAMPLER_ARG], "1");
        // An integer ratio is a ratio.
        let config = parse("[telemetry]\nsample_ratio = 0\n").unwrap();
        assert_eq!(config.telemetry.sample_ratio, 0.0);
        // The metrics' export interval: 10 s unless said.
        assert_eq!(config.telemetry.metrics_interval, DEFAULT_METRICS_INTERVAL);
        let config = parse("[telemetry]\nmetrics_interval = \"1500ms\"\n").unwrap();
        assert_eq!(
            config.telemetry.metrics_interval,
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn bad_values_name_the_line_and_the_fix() {
        for (text, line, fix) in [
            (
                "[telemetry]\notlp_endpoint = \"127.0.0.1:4317\"\n",
                2,
                "http://host:port",
            ),
            (
                "[telemetry]\notlp_endpoint = \"http://user@h:1\"\n",
                2,
                "http://host:port",
            ),
            ("[telemetry]\n\nsample_ratio = 1.5\n", 3, "from 0 to 1"),
            ("[telemetry]\nsample_ratio = \"all\"\n", 2, ""),
            ("[telemetry]\nservice_name = \"\"\n", 2, "printable"),
            (
                "[telemetry]\nmetrics_interval = \"often\"\n",
                2,
                "such as \"10s\"",
            ),
            (
                "[telemetry]\n\nmetrics_interval = \"1ms\"\n",
                3,
                "from 100ms to 1day",
            ),
            ("[telemetry]\nmetrics_interval = 10\n", 2, ""),
            ("[telemetry]\nlog_format = \"xml\"\n", 2, "\"json\""),
            ("[telemetry]\nendpoint = \"http://h:1\"\n", 2, "remove it"),
        ] {
            let error = parse(text).unwrap_err();
            assert_eq!(error.line, Some(line), "{text}: {error}");
            assert!(error.to_string().contains(fix), "{text}: {error}");
        }
    }

    #[test]
    fn the_environment_fills_in_what_the_file_leaves_unset() {
        let at = |_: Option<std::ops::Range<usize>>, message: String| crate::ConfigError {
            path: "/etc/mesh.toml".into(),
            line: None,
            message,
        };
        let env = |name: &str| match name {
            OTEL_EXPORTER_OTLP_ENDPOINT => Some("http://collector:4317".to_owned()),
            OTEL_SERVICE_NAME => Some("router-a".to_owned()),
            OTEL_TRACES_SAMPLER_ARG => Some("0.5".to_owned()),
            OTEL_METRIC_EXPORT_INTERVAL => Some("2500".to_owned()),
            _ => None,
        };
        let t = Telemetry::parse(RawTelemetry::default(), &env, &at).unwrap();
        assert_eq!(t.otlp_endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!((t.service_name.as_str(), t.sample_ratio), ("router-a", 0.5));
        assert_eq!(t.metrics_interval, Duration::from_millis(2500));
        for text in ["10s", "0", "-1"] {
            let bad = |name: &str| (name == OTEL_METRIC_EXPORT_INTERVAL).then(|| text.to_owned());
            let error = Telemetry::parse(RawTelemetry::default(), &bad, &at).unwrap_err();
            assert!(
                error
                    .message
                    .contains(&format!("OTEL_METRIC_EXPORT_INTERVAL={text:?}")),
                "{error}"
            );
        }
        let bad = |name: &str| (name == OTEL_EXPORTER_OTLP_ENDPOINT).then(|| "nope".to_owned());
        let error = Telemetry::parse(RawTelemetry::default(), &bad, &at).unwrap_err();
        assert!(
            error
                .message
                .contains("OTEL_EXPORTER_OTLP_ENDPOINT=\"nope\""),
            "{error}"
        );
    }

    #[test]
    fn the_log_format_flag_reaches_plugins() {
        let mut config = parse("[[plugin]]\nname = \"echo\"\ncommand = \"/bin/echo\"\n").unwrap();
        config.override_log_format(LogFormat::Json);
        assert_eq!(config.plugins[0].env[MESH_LOG_FORMAT], "json");
        assert!(config.telemetry.log_format_overridden);
        config.override_log_format(LogFormat::Text);
        assert!(!config.plugins[0].env.contains_key(MESH_LOG_FORMAT));
    }
}
