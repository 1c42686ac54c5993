//! What telemetry costs a call: the same echo call, routed (router socket) and direct
//! (`mesh::connect`), against `mesh up`s side by side in one run — telemetry off (the
//! default), and tracing at 100 % and 1 % sampling, exporting by OTLP to a sink in this
//! process on loopback (it counts spans and drops them), so the figures are the tracing's
//! cost, not a collector's or a network's.
//!
//! The client makes no spans of its own: the router and the plugin sample new traces at the
//! ratio, as they would for a caller that does not trace.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use anyhow::{Context, bail};
use mesh::{Address, Channel, Connector};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use serde::Serialize;

use crate::{
    Bins, Settings,
    calls::{self, Client},
    mesh_up::{MeshSpec, MeshUp},
    progress,
    report::Report,
    stats::{self, Summary},
};

/// How long one client's sequential calls of one round may take.
const LATENCY_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);
/// How long the first call may take to succeed (the router learning of the instance).
const FIRST_CALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);
/// The throughput point the comparison is made at.
const IN_FLIGHT: usize = 64;

/// One row: a telemetry setting and a way of calling.
#[derive(Debug, Serialize)]
pub(crate) struct TelemetryRow {
    /// `off`, `tracing 100 %`, `tracing 1 %`.
    pub(crate) setting: String,
    /// `routed` or `direct`.
    pub(crate) path: &'static str,
    /// Sequential calls, microseconds.
    pub(crate) us: Summary,
    /// Calls per second at [`IN_FLIGHT`] in flight (median of the rounds).
    pub(crate) calls_per_s: f64,
    /// Calls that failed.
    pub(crate) errors: u64,
}

/// Counts the spans it receives and drops them.
struct Sink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Serves the sink on 127.0.0.1:0; returns its endpoint and its count of spans.
async fn sink() -> anyhow::Result<(String, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let spans = Arc::new(AtomicU64::new(0));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Sink {
                spans: spans.clone(),
            }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok((endpoint, spans))
}

/// Runs the comparison and adds its rows (and the spans the sink received) to `report`.
pub(crate) async fn run(bins: &Bins, s: &Settings, report: &mut Report) -> anyhow::Result<()> {
    let (endpoint, spans) = sink().await?;
    let settings: [(&str, Option<f64>); 3] = [
        ("off", None),
        ("tracing 100 %", Some(1.0)),
        ("tracing 1 %", Some(0.01)),
    ];
    let mut meshes = Vec::new();
    let mut clients: Vec<(String, &'static str, Client)> = Vec::new();
    for (setting, ratio) in settings {
        progress(format!("telemetry: starting mesh up, {setting}"));
        let spec = MeshSpec {
            instances: 1,
            backoff_base: None,
            tcp: false,
            policy_plugin: false,
            telemetry: ratio.map(|ratio| (endpoint.clone(), ratio)),
            node: None,
            tls: None,
            metrics: false,
        };
        let mesh = MeshUp::start(bins, &spec).await?;
        mesh.wait_registry(FIRST_CALL_LIMIT, |found| found.len() == 1)
            .await?;
        let routed = Client::mesh(
            Channel::to_address(Address::Unix(mesh.socket.clone()), crate::mesh_up::SERVICE)
                .context("a channel through the router")?,
        );
        let direct = Client::mesh(
            Connector::local(&mesh.socket)
                .connect(crate::mesh_up::SERVICE)
                .await
                .context("mesh::connect")?,
        );
        for (path, client) in [("routed", routed), ("direct", direct)] {
            calls::first_success(&client, FIRST_CALL_LIMIT)
                .await
                .with_context(|| format!("first call, {setting}, {path}"))?;
            clients.push((setting.to_owned(), path, client));
        }
        meshes.push(mesh);
    }
    for (_, _, client) in &clients {
        calls::sequential(client, s.warm_calls, LATENCY_LIMIT).await?;
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); clients.len()];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); clients.len()];
    let mut errors = vec![0u64; clients.len()];
    for round in 1..=s.rounds {
        progress(format!(
            "telemetry round {round}/{}: {} sequential calls and {IN_FLIGHT} in flight per row",
            s.rounds, s.calls
        ));
        // Interleaved, so that the machine's drift spreads over every row alike.
        for (k, (_, _, client)) in clients.iter().enumerate() {
            let run = calls::sequential(client, s.calls, LATENCY_LIMIT).await?;
            samples[k].extend(run.samples_us);
            errors[k] += run.errors;
            calls::load(client, IN_FLIGHT, s.warmup, s.max_calls).await?;
            let load = calls::load(client, IN_FLIGHT, s.duration, s.max_calls).await?;
            errors[k] += load.errors;
            rates[k].push(load.rate());
        }
    }
    for (k, (setting, path, _)) in clients.iter().enumerate() {
        let Some(us) = Summary::of(&mut samples[k]) else {
            bail!("no sequential call succeeded ({setting}, {path})");
        };
        report.telemetry.push(TelemetryRow {
            setting: setting.clone(),
            path,
            us,
            calls_per_s: stats::median(&rates[k]).unwrap_or(0.0),
            errors: errors[k],
        });
    }
    drop(clients);
    for mesh in meshes {
        mesh.stop().await?;
    }
    report.notes.push(format!(
        "telemetry: the OTLP sink received {} spans",
        spans.load(Ordering::Relaxed)
    ));
    Ok(())
}
