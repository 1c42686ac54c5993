//! The manager's metrics: one OpenTelemetry [`SdkMeterProvider`] that the router's instruments
//! ([`RouterMetrics`]) and the supervisor's observable ones live on, read by a Prometheus
//! reader for `/metrics`, and sampled every few seconds for the status page's last minute.
//!
//! Supervisor metrics cost nothing between scrapes: they are callbacks that read the
//! supervisor's state when a reader collects.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mesh_router::RouterMetrics;
use opentelemetry::{KeyValue, metrics::MeterProvider as _};
use opentelemetry_sdk::{Resource, metrics::SdkMeterProvider};
use prometheus::{Encoder as _, TextEncoder, proto::MetricFamily};

use crate::{Supervisor, supervisor::State};

/// The instrumentation scope of every instrument here.
const SCOPE: &str = "mesh";
/// How often the status page's window is sampled.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// The window the status page's rates and percentiles cover.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// The router's duration histogram, as the Prometheus reader names it.
const DURATION_FAMILY: &str = "rpc_server_duration_milliseconds";

/// Every state an instance can be in, as `mesh status` names them.
const STATES: &[&str] = &[
    "pending",
    "starting",
    "ready",
    "unhealthy",
    "stopping",
    "exited",
    "backoff",
    "failed",
    "stopped",
];

/// Why the metrics could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up metrics: {0}")]
pub struct MetricsError(String);

/// The manager's meter provider, its Prometheus registry and the status page's samples.
pub struct Metrics {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    router: RouterMetrics,
    samples: Mutex<VecDeque<Sample>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// A provider with a Prometheus reader, the supervisor's instruments, and the router's
    /// when `router_calls` (`[telemetry] metrics = true`).
    ///
    /// `configure` may add to the provider before it is built: `mesh up` adds the OTLP
    /// periodic reader and the router's resource there (see
    /// [`crate::telemetry::metrics_export`]); without it, the resource is `service.name=mesh`.
    pub fn new(
        supervisor: Arc<Supervisor>,
        router_calls: bool,
        configure: impl FnOnce(
            opentelemetry_sdk::metrics::MeterProviderBuilder,
        ) -> opentelemetry_sdk::metrics::MeterProviderBuilder,
    ) -> Result<Arc<Self>, MetricsError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .map_err(|e| MetricsError(e.to_string()))?;
        let resource = Resource::builder().with_service_name("mesh").build();
        let builder = SdkMeterProvider::builder()
            .with_reader(exporter)
            .with_resource(resource);
        let provider = configure(builder).build();
        let meter = provider.meter(SCOPE);
        let router = if router_calls {
            RouterMetrics::new(&meter)
        } else {
            RouterMetrics::off()
        };
        supervisor_instruments(&meter, supervisor);
        Ok(Arc::new(Self {
            provider,
            registry,
            router,
            samples: Mutex::new(VecDeque::new()),
        }))
    }

    /// The router's instruments (off unless asked for).
    pub fn router(&self) -> RouterMetrics {
        self.router.clone()
    }

    /// Adds the cluster's state (`mesh.registry.*`, see [`mesh_router::observe_cluster`]):
    /// nothing for a single machine.
    pub fn observe_cluster(&self, cluster: &mesh_router::cluster::Cluster) {
        mesh_router::observe_cluster(&self.provider.meter(SCOPE), cluster);
    }

    /// The meter provider every instrument is on.
    pub fn provider(&self) -> &SdkMeterProvider {
        &self.provider
    }

    /// Shuts the provider down: a push reader (OTLP) makes its last export. Waits at most
    /// `within`, on a thread of its own (the SDK blocks, and the exporter needs the runtime's
    /// threads free); past that the exit goes on without it.
    pub async fn shutdown(&self, within: Duration) {
        let provider = self.provider.clone();
        let (done, finished) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("metrics-shutdown".into())
            .spawn(move || {
                let _ = done.send(provider.shutdown());
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot flush the metrics");
            return;
        }
        match tokio::time::timeout(within, finished).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "flushing the metrics"),
            Ok(Err(_)) => tracing::warn!("flushing the metrics: the exporter stopped"),
            Err(_) => tracing::warn!("flushing the metrics: no answer within {within:?}, exiting"),
        }
    }

    /// Everything, as Prometheus text (format 0.0.4).
    pub fn prometheus_text(&self) -> Vec<u8> {
        let families = self.registry.gather();
        let mut text = Vec::with_capacity(16 << 10);
        // Encoding into a Vec cannot fail but for a malformed family, which the reader
        // never makes: an empty page then, not a panic.
        if let Err(error) = TextEncoder::new().encode(&families, &mut text) {
            tracing::warn!(%error, "encoding metrics");
        }
        text
    }

    /// Takes a sample for the status page's window (the admin listener does every
    /// [`SAMPLE_EVERY`]), dropping those older than the window.
    pub(crate) fn sample(&self) {
        let sample = Sample::take(&self.registry.gather());
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        while samples
            .front()
            .is_some_and(|s| sample.at.duration_since(s.at) > WINDOW + SAMPLE_EVERY)
        {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Calls per second and p50/p99 (ms) over the last minute, per service and instance,
    /// from the newest sample against the oldest in the window.
    pub(crate) fn window(&self) -> BTreeMap<(String, String), CallStats> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let (Some(newest), Some(oldest)) = (samples.back(), samples.front()) else {
            return BTreeMap::new();
        };
        let seconds = newest.at.duration_since(oldest.at).as_secs_f64();
        newest
            .series
            .iter()
            .map(|(key, now)| {
                let empty = Series::default();
                let then = oldest.series.get(key).unwrap_or(&empty);
                let delta = now.since(then);
                let stats = CallStats {
                    calls_per_s: (seconds > 0.0).then(|| delta.count as f64 / seconds),
                    p50_ms: delta.quantile(0.5),
                    p99_ms: delta.quantile(0.99),
                    total: now.count,
                };
                (key.clone(), stats)
            })
            .collect()
    }
}

/// One service × instance over the window.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct CallStats {
    /// `None` until two samples span some time.
    pub(crate) calls_per_s: Option<f64>,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    /// Calls since the start.
    pub(crate) total: u64,
}

/// Cumulative duration histograms per (service, instance), summed over methods and statuses.
struct Sample {
    at: Instant,
    series: BTreeMap<(String, String), Series>,
}

#[derive(Default, Clone, Debug, PartialEq)]
struct Series {
    count: u64,
    /// (upper bound, cumulative count), ascending.
    buckets: Vec<(f64, u64)>,
}

impl Sample {
    fn take(families: &[MetricFamily]) -> Self {
        let mut series: BTreeMap<(String, String), Series> = BTreeMap::new();
        for family in families.iter().filter(|f| f.name() == DURATION_FAMILY) {
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default()
                };
                let service = label("mesh_service");
                let histogram = metric.get_histogram();
                // Each instance's, and the service's in all under `*`.
                for key in [
                    (service.clone(), label("mesh_instance")),
                    (service, "*".to_owned()),
                ] {
                    let entry = series.entry(key).or_default();
                    entry.count += histogram.get_sample_count();
                    let buckets = histogram
                        .get_bucket()
                        .iter()
                        .map(|b| (b.upper_bound(), b.cumulative_count()));
                    if entry.buckets.is_empty() {
                        entry.buckets = buckets.collect();
                    } else {
                        for (sum, (_, count)) in entry.buckets.iter_mut().zip(buckets) {
                            sum.1 += count;
                        }
                    }
                }
            }
        }
        Self {
            at: Instant::now(),
            series,
        }
    }
}

impl Series {
    /// What came between `earlier` and `self` (same boundaries: one histogram).
    fn since(&self, earlier: &Series) -> Series {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, &(bound, count))| {
                let before = earlier.buckets.get(i).map_or(0, |b| b.1);
                (bound, count.saturating_sub(before))
            })
            .collect();
        Series {
            count: self.count.saturating_sub(earlier.count),
            buckets,
        }
    }

    /// The `q` quantile, interpolated linearly within its bucket as Prometheus'
    /// `histogram_quantile` does; past the last finite bound, that bound.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q * self.count as f64;
        let mut lower = (0.0, 0u64);
        for &(bound, cumulative) in &self.buckets {
            if cumulative as f64 >= rank {
                let in_bucket = (cumulative - lower.1) as f64;
                let fraction = if in_bucket > 0.0 {
                    (rank - lower.1 as f64) / in_bucket
                } else {
                    1.0
                };
                return Some(lower.0 + (bound - lower.0) * fraction);
            }
            lower = (bound, cumulative);
        }
        Some(lower.0)
    }
}

/// `mesh.supervisor.restarts` (counter), `mesh.supervisor.instance.state` (gauge, 1 for the
/// state each instance is in), `mesh.supervisor.ready_instances` and
/// `mesh.supervisor.desired_instances` (gauges per plugin).
fn supervisor_instruments(meter: &opentelemetry::metrics::Meter, supervisor: Arc<Supervisor>) {
    let restarts = supervisor.clone();
    meter
        .u64_observable_counter("mesh.supervisor.restarts")
        .with_description("Times an instance was started again after it ended")
        .with_callback(move |observer| {
            for plugin in restarts.status() {
                for instance in &plugin.instances {
                    observer.observe(
                        u64::from(instance.restarts),
                        &[
                            KeyValue::new("plugin", plugin.config.name.clone()),
                            KeyValue::new("mesh.instance", instance.id.clone()),
                        ],
                    );
                }
            }
        })
        .build();
    let states = supervisor.clone();
    meter
        .u64_observable_gauge("mesh.supervisor.instance.state")
        .with_description("1 for the state each instance is in, 0 for the others")
        .with_callback(move |observer| {
            for plugin in states.status() {
                for instance in &plugin.instances {
                    let now = instance.state.name();
                    for state in STATES {
                        observer.observe(
                            u64::from(*state == now),
                            &[
                                KeyValue::new("plugin", plugin.config.name.clone()),
                                KeyValue::new("mesh.instance", instance.id.clone()),
                                KeyValue::new("state", *state),
                            ],
                        );
                    }
                }
            }
        })
        .build();
    let ready = supervisor.clone();
    meter
        .u64_observable_gauge("mesh.supervisor.ready_instances")
        .with_description("Instances ready (serving and registered), per plugin")
        .with_callback(move |observer| {
            for plugin in ready.status() {
                let count = plugin
                    .instances
                    .iter()
                    .filter(|i| matches!(i.state, State::Ready { .. }))
                    .count();
                observer.observe(
                    count as u64,
                    &[KeyValue::new("plugin", plugin.config.name.clone())],
                );
            }
        })
        .build();
    meter
        .u64_observable_gauge("mesh.supervisor.desired_instances")
        .with_description("Instances each plugin should have")
        .with_callback(move |observer| {
            for plugin in supervisor.status() {
                observer.observe(
                    u64::from(plugin.desired),
                    &[KeyValue::new("plugin", plugin.config.name.clone())],
                );
            }
        })
        .build();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let series = Series {
            count: 100,
            buckets: vec![(1.0, 50), (2.0, 90), (4.0, 100), (f64::INFINITY, 100)],
        };
        assert_eq!(series.quantile(0.5), Some(1.0));
        assert_eq!(series.quantile(0.7), Some(1.5));
        assert_eq!(series.quantile(0.99), Some(3.8));
        assert_eq!(Series::default().quantile(0.5), None);
        let earlier = Series {
            count: 50,
            buckets: vec![(1.0, 50), (2.0, 50), (4.0, 50), (f64::INFINITY, 50)],
        };
        let delta = series.since(&earlier);
        assert_eq!(delta.count, 50);
        assert_eq!(delta.quantile(0.5), Some(1.625));
    }

    #[test]
    fn every_state_is_listed() {
        for state in [
            State::Pending,
            State::Stopped,
            State::Failed {
                reason: String::new(),
            },
        ] {
            assert!(STATES.contains(&state.name()), "{}", state.name());
        }
    }
}
