//! The in-process registry (`mesh_router::registry::Registry`) at scale: 100 000 registered instances,
//! how long registering takes, how much memory they hold, and how fast `resolve` answers.
//!
//! Each layout is measured in a fresh process (the harness runs itself with a hidden flag), so
//! that the resident-set size starts clean and no allocator reuse from another run blurs it.

use std::{
    collections::HashMap,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use mesh_router::registry::{Instance, Registry};
use serde::{Deserialize, Serialize};

use crate::stats::Summary;

/// Hidden flag that makes the harness measure one layout and print the result as JSON.
pub(crate) const WORKER_FLAG: &str = "--registry-worker";
/// Resolves timed one by one.
const TIMED_RESOLVES: usize = 200_000;
/// Resolves per thread for the throughput figures.
const RESOLVES_PER_THREAD: usize = 2_000_000;
/// How long one layout may take.
const WORKER_DEADLINE: Duration = Duration::from_secs(300);

/// How 100 000 instances are spread over services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Layout {
    /// 1000 services × 100 instances.
    Spread,
    /// One service × 100 000 instances.
    Single,
}

impl Layout {
    /// (services, instances per service).
    pub(crate) fn shape(self) -> (usize, usize) {
        match self {
            Self::Spread => (1000, 100),
            Self::Single => (1, 100_000),
        }
    }

    /// `1000 services × 100`, for tables.
    pub(crate) fn label(self) -> String {
        let (services, each) = self.shape();
        format!(
            "{services} service{} × {each} instances",
            if services == 1 { "" } else { "s" }
        )
    }

    fn flag(self) -> &'static str {
        match self {
            Self::Spread => "spread",
            Self::Single => "single",
        }
    }
}

/// What one layout measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RegistryResult {
    pub(crate) layout: Layout,
    pub(crate) services: usize,
    pub(crate) instances: usize,
    /// Registering every instance (no TTL, as the manager registers), values built beforehand.
    pub(crate) register_ms: f64,
    /// Resident set before registering, in KiB (`VmRSS` of `/proc/self/status`).
    pub(crate) rss_before_kib: u64,
    /// Resident set once everything is registered.
    pub(crate) rss_registered_kib: u64,
    /// Resident set once every service's snapshot was built by a first resolve.
    pub(crate) rss_snapshots_kib: u64,
    /// First `resolve` of each service after registering: builds its snapshot (µs).
    pub(crate) resolve_cold_us: Summary,
    /// Later `resolve`s, timed one by one, timer overhead included (ns).
    pub(crate) resolve_warm_ns: Summary,
    /// Warm resolves per second, one thread.
    pub(crate) resolves_per_s_1_thread: f64,
    /// Warm resolves per second, two threads resolving at once (shows lock contention).
    pub(crate) resolves_per_s_2_threads: f64,
}

impl RegistryResult {
    /// Resident-set growth per registered instance, in bytes.
    pub(crate) fn bytes_per_instance(&self) -> f64 {
        (self.rss_registered_kib.saturating_sub(self.rss_before_kib) * 1024) as f64
            / self.instances as f64
    }
}

/// Measures `layout` in a fresh process.
pub(crate) async fn measure(layout: Layout) -> anyhow::Result<RegistryResult> {
    let exe = std::env::current_exe().context("the harness's own path")?;
    let child = tokio::process::Command::new(exe)
        .arg(WORKER_FLAG)
        .arg(layout.flag())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the registry worker")?;
    let output = tokio::time::timeout(WORKER_DEADLINE, child.wait_with_output())
        .await
        .with_context(|| format!("the registry worker ran past {WORKER_DEADLINE:?}"))??;
    if !output.status.success() {
        bail!(
            "the registry worker ({}) failed with {}: {}",
            layout.label(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).context("the registry worker's answer")
}

/// The worker: measures `layout` in this process and prints the result as JSON.
pub(crate) fn run_worker(layout: Layout) -> anyhow::Result<()> {
    let result = measure_here(layout)?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

fn measure_here(layout: Layout) -> anyhow::Result<RegistryResult> {
    let (services, each) = layout.shape();
    let names: Vec<String> = (0..services)
        .map(|s| match layout {
            Layout::Spread => format!("svc-{s:04}"),
            Layout::Single => "echo".to_owned(),
        })
        .collect();
    let rss_before_kib = rss_kib()?;
    // Built beforehand so that registering is timed alone; they move into the registry.
    let instances: Vec<Instance> = names
        .iter()
        .flat_map(|name| (0..each).map(move |i| instance(name, i)))
        .collect();
    let registry = Registry::new();
    let started = Instant::now();
    for instance in instances {
        registry.register(instance, None)?;
    }
    let register_ms = started.elapsed().as_secs_f64() * 1000.0;
    let rss_registered_kib = rss_kib()?;

    let services: Vec<String> = names.iter().map(|n| format!("plugin.{n}")).collect();
    let mut cold = Vec::with_capacity(services.len());
    for service in &services {
        let started = Instant::now();
        let found = registry.resolve(service);
        cold.push(started.elapsed().as_secs_f64() * 1_000_000.0);
        if found.len() != each {
            bail!(
                "{service} resolved to {} instances, not {each}",
                found.len()
            );
        }
    }
    let rss_snapshots_kib = rss_kib()?;

    let mut warm = Vec::with_capacity(TIMED_RESOLVES);
    for k in 0..TIMED_RESOLVES {
        let service = &services[spread(k, services.len())];
        let started = Instant::now();
        let found = registry.resolve(service);
        warm.push(started.elapsed().as_nanos() as f64);
        std::hint::black_box(found);
    }
    let resolves_per_s_1_thread = resolve_rate(&registry, &services, 1);
    let resolves_per_s_2_threads = resolve_rate(&registry, &services, 2);

    Ok(RegistryResult {
        layout,
        services: services.len(),
        instances: services.len() * each,
        register_ms,
        rss_before_kib,
        rss_registered_kib,
        rss_snapshots_kib,
        resolve_cold_us: Summary::of(&mut cold).context("no services")?,
        resolve_warm_ns: Summary::of(&mut warm).context("no resolves")?,
        resolves_per_s_1_thread,
        resolves_per_s_2_threads,
    })
}

/// An instance as the manager registers one: id, socket endpoint and a pid label.
fn instance(name: &str, index: usize) -> Instance {
    let id = format!("{name}-{index}");
    Instance {
        service: format!("plugin.{name}"),
        endpoint: format!("unix:/run/user/1000/mesh/{name}/{id}.sock"),
        labels: HashMap::from([("pid".to_owned(), (100_000 + index).to_string())]),
        id,
    }
}

/// The `k`th service to resolve: a fixed stride through all of them, so every one is read.
fn spread(k: usize, services: usize) -> usize {
    (k * 7919) % services
}

/// Resolves per second with `threads` threads each resolving `RESOLVES_PER_THREAD` times.
fn resolve_rate(registry: &Registry, services: &[String], threads: usize) -> f64 {
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                for k in 0..RESOLVES_PER_THREAD {
                    let service = &services[spread(k + t, services.len())];
                    std::hint::black_box(registry.resolve(service));
                }
            });
        }
    });
    (threads * RESOLVES_PER_THREAD) as f64 / started.elapsed().as_secs_f64()
}

/// This process's resident set in KiB.
fn rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .context("no VmRSS in /proc/self/status")
}
