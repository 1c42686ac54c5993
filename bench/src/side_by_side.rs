//! The side-by-side part: one `mesh up` with one echo instance, nginx in front of the same
//! instance, a client for each way of calling, then sequential latency and throughput with the
//! ways interleaved round by round.

use std::{path::Path, time::Duration};

use anyhow::{Context, bail};
use mesh::{Address, Channel, Connector};
use mesh_proto::echo::v1::{
    EchoReply, EchoRequest,
    echo_server::{Echo, EchoServer},
};

use crate::{
    Bins, Settings,
    calls::{self, Client, Load, Sequential, Variant},
    mesh_up::{MeshSpec, MeshUp, SERVICE, pid_of, socket_of},
    nginx,
    procstat::{Costs, Processes},
    progress,
    report::{CostRow, LatencyRow, Report, ThroughputRow},
    stats::{self, Summary},
};

/// How long one variant's sequential calls of one round may take.
const LATENCY_LIMIT: Duration = Duration::from_secs(60);
/// How long the first call over each way may take.
const FIRST_CALL_LIMIT: Duration = Duration::from_secs(5);
/// How long `mesh up` may take to register its instance.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// One variant's sequential calls, every round pooled.
#[derive(Default)]
struct Pooled {
    samples: Vec<f64>,
    round_medians: Vec<f64>,
    errors: u64,
    first_error: Option<String>,
    /// What each process spent meanwhile.
    costs: Costs,
}

impl Pooled {
    fn add(&mut self, run: Sequential, costs: Costs) {
        self.costs += costs;
        if let Some(median) = stats::median(&run.samples_us) {
            self.round_medians.push(median);
        }
        self.samples.extend(run.samples_us);
        self.errors += run.errors;
        if self.first_error.is_none() {
            self.first_error = run.first_error;
        }
    }
}

/// Latency and throughput of every selected variant against one echo instance.
pub(crate) async fn run(
    bins: &Bins,
    s: &Settings,
    latency: bool,
    throughput: bool,
    report: &mut Report,
) -> anyhow::Result<()> {
    progress("starting mesh up with one echo instance (router on a Unix socket and TCP)");
    let spec = MeshSpec {
        instances: 1,
        backoff_base: None,
        tcp: true,
        policy_plugin: s.variants.contains(&Variant::H),
        telemetry: None,
        node: None,
        tls: None,
        metrics: false,
    };
    let mesh = MeshUp::start(bins, &spec).await?;
    let (_, instances) = mesh
        .wait_registry(READY_DEADLINE, |found| found.len() == 1)
        .await?;
    let plugin = socket_of(&instances[0])?;
    // (j) and (k): the same calls to a second mesh up with the router's call metrics on.
    let metered = match s.variants.iter().any(|v| v.metered()) {
        true => {
            progress("starting a second mesh up with call metrics on");
            let spec = MeshSpec {
                instances: 1,
                backoff_base: None,
                tcp: false,
                policy_plugin: false,
                telemetry: None,
                node: None,
                tls: None,
                metrics: true,
            };
            let metered = MeshUp::start(bins, &spec).await?;
            let (_, instances) = metered
                .wait_registry(READY_DEADLINE, |found| found.len() == 1)
                .await?;
            Some((metered, instances))
        }
        false => None,
    };
    let metered_socket = metered.as_ref().map(|(m, _)| m.socket.clone());

    // (l): a second mesh up whose TCP listener speaks mTLS, with certificates made here.
    let mut tls_mesh = None;
    let mut tls_plugin = None;
    let certs = tempfile::tempdir()?;
    let mut nginx = None;
    // Held for the whole run: dropping it takes the name away.
    let mut _in_process = None;
    // Two more nodes and their etcd, for (i), and two more with [tls], for (m): held for the
    // whole run.
    let mut _hop = None;
    let mut _tls_hop = None;
    // Their routers (a, b) and b's echo instance.
    let mut hop_pids: Vec<(u32, u32, Option<u32>)> = Vec::new();
    let mut clients = Vec::new();
    for &variant in &s.variants {
        let client = match variant {
            Variant::A => Client::tonic_unix(&plugin).await?,
            Variant::B => Client::mesh(
                Connector::local(&mesh.socket)
                    .connect(SERVICE)
                    .await
                    .context("mesh::connect")?,
            ),
            Variant::C => Client::mesh(
                Channel::to_address(Address::Unix(mesh.socket.clone()), SERVICE)
                    .context("a channel through the router")?,
            ),
            Variant::H => Client::mesh(
                Channel::to_address(Address::Unix(mesh.socket.clone()), calls::POLICY_SERVICE)
                    .context("a channel through the router")?,
            ),
            Variant::D => {
                let addr = mesh
                    .tcp
                    .clone()
                    .context("mesh up did not print its TCP address")?;
                Client::mesh(
                    Channel::to_address(Address::Tcp(addr), SERVICE)
                        .context("a channel through the router")?,
                )
            }
            Variant::F => Client::mesh(
                Connector::local(&mesh.socket)
                    .spin(calls::OPT_IN_SPIN)
                    .connect(SERVICE)
                    .await
                    .context("mesh::connect with spinning")?,
            ),
            Variant::G => {
                let served = mesh::inprocess::serve(IN_PROCESS, EchoServer::new(InProcessEcho))
                    .context("serving echo in process")?;
                _in_process = Some(served);
                Client::mesh(
                    mesh::connect(IN_PROCESS)
                        .await
                        .context("mesh::connect in process")?,
                )
            }
            Variant::J => Client::mesh(
                Channel::to_address(
                    Address::Unix(metered_socket.clone().context("no metered mesh up")?),
                    SERVICE,
                )
                .context("a channel through the metered router")?,
            ),
            Variant::K => Client::mesh(
                Connector::local(&metered_socket.clone().context("no metered mesh up")?)
                    .connect(SERVICE)
                    .await
                    .context("mesh::connect on the metered mesh")?,
            ),
            Variant::I => match start_hop(bins, report, Variant::I, None).await {
                Some((nodes, client)) => {
                    hop_pids.push(nodes.pids());
                    _hop = Some(nodes);
                    client
                }
                None => continue,
            },
            Variant::M => {
                let dir = certs.path().join("hop-certs");
                crate::mesh_up::make_certs(&dir)?;
                match start_hop(bins, report, Variant::M, Some(dir)).await {
                    Some((nodes, client)) => {
                        hop_pids.push(nodes.pids());
                        _tls_hop = Some(nodes);
                        client
                    }
                    None => continue,
                }
            }
            Variant::L => {
                let dir = certs.path().join("certs");
                crate::mesh_up::make_certs(&dir)?;
                progress("starting a second mesh up with [tls] for (l)");
                let spec = MeshSpec {
                    instances: 1,
                    backoff_base: None,
                    tcp: true,
                    policy_plugin: false,
                    telemetry: None,
                    node: None,
                    tls: Some(dir.clone()),
                    metrics: false,
                };
                let started = MeshUp::start(bins, &spec).await?;
                let (_, found) = started
                    .wait_registry(READY_DEADLINE, |found| found.len() == 1)
                    .await?;
                tls_plugin = pid_of(&found[0]);
                let addr = started
                    .tcp
                    .clone()
                    .context("mesh up did not print its mTLS address")?;
                let tls = mesh::transport::ClientTls::from_files(
                    &dir.join("ca.pem"),
                    &dir.join("client-bench.pem"),
                    &dir.join("client-bench.key"),
                )?;
                tls_mesh = Some(started);
                Client::mesh(
                    Connector::remote(Address::Tcp(addr))
                        .tls(tls)
                        .connect(SERVICE)
                        .await
                        .context("a channel through the mTLS router")?,
                )
            }
            Variant::E => match start_nginx(&plugin, report).await {
                Some((started, client)) => {
                    nginx = Some(started);
                    client
                }
                None => continue,
            },
        };
        // The router learns of instances a moment after the registry shows them: retry.
        calls::first_success(&client, FIRST_CALL_LIMIT)
            .await
            .with_context(|| format!("first call over ({})", variant.letter()))?;
        clients.push((variant, client));
    }

    // Both echo plugins count as "the plugin": the one a variant does not call is idle; so do
    // the (l) mesh's router and plugin (idle while the others are measured, as theirs are
    // while (l) is).
    let mut plugin_pids: Vec<u32> = pid_of(&instances[0]).into_iter().collect();
    if spec.policy_plugin {
        let (_, policy) = mesh
            .wait_service(calls::POLICY_SERVICE, READY_DEADLINE, |found| {
                found.len() == 1
            })
            .await?;
        plugin_pids.extend(pid_of(&policy[0]));
    }
    plugin_pids.extend(tls_plugin);
    plugin_pids.extend(hop_pids.iter().filter_map(|(_, _, plugin)| *plugin));
    let processes = Processes {
        client: vec![std::process::id()],
        // Every router and plugin: the idle ones add next to nothing to a variant's costs.
        router: std::iter::once(mesh.pid())
            .chain(tls_mesh.as_ref().map(MeshUp::pid))
            .chain(metered.as_ref().map(|(m, _)| m.pid()))
            .chain(hop_pids.iter().flat_map(|(a, b, _)| [*a, *b]))
            .collect(),
        plugin: plugin_pids
            .into_iter()
            .chain(metered.iter().flat_map(|(_, i)| pid_of(&i[0])))
            .collect(),
        nginx: nginx.as_ref().map(nginx::Nginx::pids).unwrap_or_default(),
    };
    if latency {
        for (_, client) in &clients {
            calls::sequential(client, s.warm_calls, LATENCY_LIMIT).await?;
        }
        let mut pooled: Vec<Pooled> = clients.iter().map(|_| Pooled::default()).collect();
        for round in 1..=s.rounds {
            progress(format!(
                "latency round {round}/{}: {} sequential calls per variant",
                s.rounds, s.calls
            ));
            for ((_, client), pool) in clients.iter().zip(&mut pooled) {
                let before = processes.costs();
                let run = calls::sequential(client, s.calls, LATENCY_LIMIT).await?;
                pool.add(run, processes.costs() - before);
            }
        }
        for ((variant, _), pool) in clients.iter().zip(pooled) {
            let Pooled {
                mut samples,
                round_medians,
                errors,
                first_error,
                costs,
            } = pool;
            report.costs.push(CostRow {
                variant: *variant,
                label: variant.label(),
                calls: samples.len() as u64 + errors,
                costs,
            });
            let Some(us) = Summary::of(&mut samples) else {
                bail!(
                    "no sequential call over ({}) succeeded: {}",
                    variant.letter(),
                    first_error.unwrap_or_default()
                );
            };
            if errors > 0 {
                report.notes.push(format!(
                    "({}) {errors} sequential calls failed; first: {}",
                    variant.letter(),
                    first_error.clone().unwrap_or_default()
                ));
            }
            report.latency.push(LatencyRow {
                variant: *variant,
                label: variant.label(),
                us,
                round_medians_us: round_medians,
                errors,
                first_error,
            });
        }
    }

    if throughput {
        let mut points: Vec<Vec<Vec<(Load, Costs)>>> =
            vec![vec![Vec::new(); s.in_flight.len()]; clients.len()];
        for round in 1..=s.rounds {
            for (k, &in_flight) in s.in_flight.iter().enumerate() {
                progress(format!(
                    "throughput round {round}/{}: {in_flight} in flight, {} per variant",
                    s.rounds,
                    humantime::format_duration(s.duration)
                ));
                for (c, (_, client)) in clients.iter().enumerate() {
                    calls::load(client, in_flight, s.warmup, s.max_calls).await?;
                    let before = processes.costs();
                    let load = calls::load(client, in_flight, s.duration, s.max_calls).await?;
                    points[c][k].push((load, processes.costs() - before));
                }
            }
        }
        for ((variant, _), per_level) in clients.iter().zip(points) {
            for (&in_flight, loads) in s.in_flight.iter().zip(per_level) {
                let rounds: Vec<f64> = loads.iter().map(|(l, _)| l.rate()).collect();
                let errors = loads.iter().map(|(l, _)| l.errors).sum();
                let first_error = loads.iter().find_map(|(l, _)| l.first_error.clone());
                let calls = loads.iter().map(|(l, _)| l.ok + l.errors).sum();
                let mut costs = Costs::default();
                for (_, spent) in &loads {
                    costs += *spent;
                }
                if errors > 0 {
                    report.notes.push(format!(
                        "({}) {errors} calls failed at {in_flight} in flight; first: {}",
                        variant.letter(),
                        first_error.clone().unwrap_or_default()
                    ));
                }
                report.throughput.push(ThroughputRow {
                    variant: *variant,
                    label: variant.label(),
                    in_flight,
                    calls_per_s: stats::median(&rounds).unwrap_or(0.0),
                    rounds,
                    errors,
                    first_error,
                    calls,
                    costs,
                });
            }
        }
    }

    drop(clients);
    if let Some(nginx) = nginx {
        nginx.stop().await?;
    }
    if let Some(tls_mesh) = tls_mesh {
        tls_mesh.stop().await?;
    }
    if let Some((metered, _)) = metered {
        metered.stop().await?;
    }
    mesh.stop().await
}

/// The two nodes of (i) or (m) and their etcd, stopped when dropped.
struct Hop {
    a: MeshUp,
    b: MeshUp,
    /// Node b's echo instance.
    plugin: Option<u32>,
    _etcd: crate::etcd::LocalEtcd,
}

impl Hop {
    /// Node a's router, node b's, node b's echo instance.
    fn pids(&self) -> (u32, u32, Option<u32>) {
        (self.a.pid(), self.b.pid(), self.plugin)
    }
}

/// etcd, node b (one echo instance, its router on TCP) and node a (no plugin): a client on
/// node a's socket reaches node b's instance through both routers. With `tls` (the directory
/// [`crate::mesh_up::make_certs`] wrote), both nodes have `[tls]` with the same node
/// certificate, so the hop is mTLS (variant m); without, plaintext (variant i). Skipped (with
/// a note naming `variant`) where etcd is not installed.
async fn start_hop(
    bins: &Bins,
    report: &mut Report,
    variant: Variant,
    tls: Option<std::path::PathBuf>,
) -> Option<(Hop, Client)> {
    let letter = variant.letter();
    if !crate::etcd::installed() {
        report.notes.push(format!(
            "({letter}) skipped: etcd is not installed (on Debian: apt-get install -y etcd-server)"
        ));
        return None;
    }
    progress(format!("starting etcd and two nodes for ({letter})"));
    let started = async {
        let etcd = crate::etcd::start().await?;
        let node = |name: &str| -> anyhow::Result<(String, String)> {
            let port = crate::etcd::free_port()?;
            Ok((
                format!("listen = \"127.0.0.1:{port}\"\nnode = \"{name}\"\n"),
                format!("[registry]\netcd = [\"http://{}\"]\n", etcd.endpoint),
            ))
        };
        let spec = |instances, node| MeshSpec {
            instances,
            backoff_base: None,
            tcp: true,
            policy_plugin: false,
            telemetry: None,
            node: Some(node),
            tls: tls.clone(),
            metrics: false,
        };
        let b = MeshUp::start(bins, &spec(1, node("b")?)).await?;
        let (_, found) = b
            .wait_registry(READY_DEADLINE, |found| found.len() == 1)
            .await?;
        let plugin = pid_of(&found[0]);
        let a = MeshUp::start(bins, &spec(0, node("a")?)).await?;
        // Node a shows b's service once it learned it from etcd.
        a.wait_registry(READY_DEADLINE, |found| found.len() == 1)
            .await?;
        let client = Client::mesh(
            Channel::to_address(Address::Unix(a.socket.clone()), SERVICE)
                .context("a channel through node a's router")?,
        );
        calls::first_success(&client, FIRST_CALL_LIMIT)
            .await
            .context("first call through two routers")?;
        anyhow::Ok((
            Hop {
                a,
                b,
                plugin,
                _etcd: etcd,
            },
            client,
        ))
    };
    match started.await {
        Ok(started) => Some(started),
        Err(error) => {
            report.notes.push(format!(
                "({letter}) skipped: two nodes did not start: {error:#}"
            ));
            None
        }
    }
}

/// Starts nginx in front of the plugin socket and checks one call through it; on any trouble
/// notes why (e) is skipped and returns `None`, so a machine without nginx still gets a report.
async fn start_nginx(plugin: &Path, report: &mut Report) -> Option<(nginx::Nginx, Client)> {
    let Some(binary) = nginx::find() else {
        report.notes.push(
            "(e) skipped: nginx is not installed (on Debian: apt-get install -y nginx)".into(),
        );
        return None;
    };
    progress(format!("starting {}", binary.display()));
    let started = match nginx::Nginx::start(&binary, plugin).await {
        Ok(started) => started,
        Err(error) => {
            report
                .notes
                .push(format!("(e) skipped: nginx did not start: {error:#}"));
            return None;
        }
    };
    let checked = async {
        let client = Client::tonic_tcp(started.addr).await?;
        calls::first_success(&client, FIRST_CALL_LIMIT)
            .await
            .context("first call through nginx")?;
        anyhow::Ok(client)
    };
    match checked.await {
        Ok(client) => {
            report.machine.nginx = Some(started.version.clone());
            Some((started, client))
        }
        Err(error) => {
            report
                .notes
                .push(format!("(e) skipped: nginx does not pass calls: {error:#}"));
            None
        }
    }
}

/// The name variant (g) serves its echo under, in this process only (never `plugin.echo`,
/// which would take variant (b)'s calls).
const IN_PROCESS: &str = "plugin.bench-inprocess";

/// Echo for variant (g): the unary call every benchmark makes, as echo-plugin answers it.
#[derive(Clone, Copy)]
struct InProcessEcho;

#[tonic::async_trait]
impl Echo for InProcessEcho {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        Ok(tonic::Response::new(EchoReply {
            message: request.into_inner().message,
            instance: "in-process".into(),
        }))
    }

    type ExpandStream = tonic::codegen::BoxStream<EchoReply>;

    async fn expand(
        &self,
        _: tonic::Request<mesh_proto::echo::v1::ExpandRequest>,
    ) -> Result<tonic::Response<Self::ExpandStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the benchmark calls Echo only",
        ))
    }

    async fn collect(
        &self,
        _: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the benchmark calls Echo only",
        ))
    }

    type ChatStream = tonic::codegen::BoxStream<EchoReply>;

    async fn chat(
        &self,
        _: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<Self::ChatStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the benchmark calls Echo only",
        ))
    }
}
