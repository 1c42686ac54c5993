//! `mesh-bench`: the benchmark harness of issue 5.
//!
//! In one run, side by side, it measures 64-byte unary `echo.v1.Echo/Echo` calls over five ways
//! of reaching one echo-plugin instance run by the real `mesh up` — (a) a stock tonic `Channel`
//! on the plugin's socket, (b) `mesh::connect`, (c) the router on its Unix socket, (d) the
//! router on TCP, (e) nginx `grpc_pass` — for sequential latency and for throughput at fixed
//! numbers of calls in flight; then spawn-to-ready, crash-to-routed-again, and the registry at
//! 100 000 instances. It prints tables, writes JSON and `docs/performance.md`, and evaluates the
//! issue's targets as ratios from the same run.
//!
//! Build first: `cargo build --release --workspace`; then `target/release/mesh-bench`
//! (`--quick` for a smoke run, `--help` for the parts and knobs). `just bench` does both.

mod calls;
mod etcd;
mod lifecycle;
mod mesh_up;
mod nginx;
mod procstat;
mod registry;
mod report;
mod side_by_side;
mod stats;
mod telemetry;

use std::{
    fmt,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use mesh_manager::supervisor::MAX_INSTANCES;
use serde::{Serialize, Serializer};
use tokio::signal::unix::{SignalKind, signal};

use calls::Variant;
use registry::Layout;
use report::{CrashRow, Report, SpawnRow};
use stats::Summary;

/// Where a full run writes its results unless told otherwise.
const DEFAULT_JSON: &str = "docs/performance.json";
const DEFAULT_MARKDOWN: &str = "docs/performance.md";

#[derive(Parser, Debug)]
#[command(
    name = "mesh-bench",
    about = "Benchmarks mesh side by side with stock tonic and nginx (issue 5)",
    after_help = "Build first with `cargo build --release --workspace` (or run `just bench`). \
                  A full run writes docs/performance.json and docs/performance.md; a partial or \
                  quick run writes only what --json and --markdown name."
)]
struct Cli {
    /// Smoke run: short durations, one round, fewer repeats.
    #[arg(long)]
    quick: bool,
    /// Parts to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "latency,throughput,spawn,crash,registry,telemetry"
    )]
    parts: Vec<Part>,
    /// Ways of calling to measure, comma-separated: a stock tonic, b mesh::connect (default:
    /// no spinning), c router Unix, d router TCP, e nginx, f mesh::connect opted in to
    /// spinning (100 µs), g mesh::connect to an echo service in this process, h router Unix to a
    /// plugin with rate limits in force, i router a → router b (two nodes and an etcd), j router
    /// Unix and k mesh::connect on a second mesh up with call metrics on, l router TCP with
    /// mTLS (a second mesh up with [tls]), m router a → router b over mTLS (two more nodes with
    /// [tls] and their etcd).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "a,b,c,d,e,f,g,h,j,k"
    )]
    variants: Vec<Variant>,
    /// Rounds of latency and throughput measurements, interleaved across the variants
    /// [default: 3; quick: 1].
    #[arg(long)]
    rounds: Option<u32>,
    /// Sequential calls per variant per round [default: 2000; quick: 300].
    #[arg(long)]
    calls: Option<usize>,
    /// Time per throughput point per round, e.g. 1s or 500ms [default: 1s; quick: 200ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Warm-up before each throughput point [default: 200ms; quick: 50ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Most calls started per throughput point.
    #[arg(long, default_value_t = 1_000_000)]
    max_calls: u64,
    /// Calls in flight for throughput, comma-separated [default: 1,16,64,256].
    #[arg(long, value_delimiter = ',')]
    in_flight: Option<Vec<usize>>,
    /// Instance counts for spawn-to-ready, comma-separated [default: 1,10,50,100; quick: 1,10].
    #[arg(long, value_delimiter = ',')]
    spawn: Option<Vec<u32>>,
    /// Repeats of each spawn-to-ready count and kills per crash setting [default: 3; quick: 1].
    #[arg(long)]
    repeats: Option<u32>,
    /// The client's Tokio runtime.
    #[arg(long, value_enum, default_value = "multi-thread")]
    runtime: RuntimeKind,
    /// Directory holding the release `mesh` and `echo-plugin` [default: this program's].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the Markdown page here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Internal: measure one registry layout in this process and print JSON.
    #[arg(long = "registry-worker", hide = true, value_enum)]
    registry_worker: Option<Layout>,
}

/// A part of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// Sequential calls: median and p99.
    Latency,
    /// Calls per second at each number of calls in flight.
    Throughput,
    /// Starting `mesh up` until N instances are registered.
    Spawn,
    /// kill -9 of an instance until calls reach it again.
    Crash,
    /// The in-process registry with 100 000 instances.
    Registry,
    /// Telemetry off, tracing at 100 % and 1 %: routed and direct, side by side.
    Telemetry,
}

/// Which Tokio runtime the client side runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum RuntimeKind {
    /// `#[tokio::main]`'s default: one worker per CPU.
    MultiThread,
    /// One thread: no hops between threads on the client side.
    CurrentThread,
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MultiThread => "multi-thread",
            Self::CurrentThread => "current-thread",
        })
    }
}

/// The settings a run used, after defaults and quick mode.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Settings {
    quick: bool,
    runtime: RuntimeKind,
    /// `MESH_BUSY_POLL=1`: the client, the router's workers and the plugin poll instead of
    /// sleeping (the variable reaches `mesh up` and its plugins through the environment).
    pub(crate) busy_poll: bool,
    /// `MESH_SPIN_US`, if set: the spin window of the client's channels other than (f), which
    /// spin only when it is set, and the router's linger window (it reaches `mesh up` too;
    /// unset, the router lingers its default 100 µs). 0: nothing spins or lingers.
    #[serde(rename = "spin_us", serialize_with = "as_opt_us")]
    pub(crate) spin: Option<Duration>,
    variants: Vec<Variant>,
    rounds: u32,
    calls: usize,
    warm_calls: usize,
    #[serde(rename = "duration_ms", serialize_with = "as_ms")]
    duration: Duration,
    #[serde(rename = "warmup_ms", serialize_with = "as_ms")]
    warmup: Duration,
    max_calls: u64,
    in_flight: Vec<usize>,
    spawn: Vec<u32>,
    repeats: u32,
    message_bytes: usize,
}

/// `full`, or `smoke` in quick mode.
fn choose<T>(quick: bool, full: T, smoke: T) -> T {
    if quick { smoke } else { full }
}

fn as_us<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64() * 1e6)
}

fn as_opt_us<S: Serializer>(duration: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => as_us(duration, serializer),
        None => serializer.serialize_none(),
    }
}

fn as_ms<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64() * 1000.0)
}

impl Settings {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        let quick = cli.quick;
        let mut variants = cli.variants.clone();
        variants.sort();
        variants.dedup();
        let settings = Self {
            quick,
            runtime: cli.runtime,
            busy_poll: mesh::tuning::busy_poll_from_env(),
            spin: mesh::tuning::spin_from_env(),
            variants,
            rounds: cli.rounds.unwrap_or(choose(quick, 3, 1)),
            calls: cli.calls.unwrap_or(choose(quick, 2000, 300)),
            warm_calls: choose(quick, 500, 50),
            duration: cli.duration.unwrap_or(choose(
                quick,
                Duration::from_secs(1),
                Duration::from_millis(200),
            )),
            warmup: cli.warmup.unwrap_or(choose(
                quick,
                Duration::from_millis(200),
                Duration::from_millis(50),
            )),
            max_calls: cli.max_calls,
            in_flight: cli.in_flight.clone().unwrap_or(vec![1, 16, 64, 256]),
            spawn: cli
                .spawn
                .clone()
                .unwrap_or(choose(quick, vec![1, 10, 50, 100], vec![1, 10])),
            repeats: cli.repeats.unwrap_or(choose(quick, 3, 1)),
            message_bytes: calls::MESSAGE_BYTES,
        };
        // Every loop is bounded in count and in time.
        let limit = Duration::from_secs(600);
        if !(1..=100).contains(&settings.rounds) {
            bail!("--rounds must be 1 to 100");
        }
        if !(1..=1_000_000).contains(&settings.calls) {
            bail!("--calls must be 1 to 1000000");
        }
        if settings.duration.is_zero() || settings.duration > limit || settings.warmup > limit {
            bail!("--duration must be above zero and --duration and --warmup at most 10 min");
        }
        if settings.max_calls == 0 {
            bail!("--max-calls must be at least 1");
        }
        if settings.in_flight.iter().any(|n| !(1..=4096).contains(n)) {
            bail!("--in-flight values must be 1 to 4096");
        }
        if settings
            .spawn
            .iter()
            .any(|n| !(1..=MAX_INSTANCES).contains(n))
        {
            bail!("--spawn values must be 1 to {MAX_INSTANCES} (the manager's limit)");
        }
        if !(1..=100).contains(&settings.repeats) {
            bail!("--repeats must be 1 to 100");
        }
        Ok(settings)
    }
}

/// The release binaries the harness runs.
pub(crate) struct Bins {
    pub(crate) mesh: PathBuf,
    pub(crate) echo_plugin: PathBuf,
}

impl Bins {
    fn locate(dir: Option<&Path>) -> anyhow::Result<Self> {
        let dir = match dir {
            Some(dir) => dir.to_owned(),
            None => std::env::current_exe()
                .context("the harness's own path")?
                .parent()
                .context("the harness's directory")?
                .to_owned(),
        };
        let bins = Self {
            mesh: dir.join("mesh"),
            echo_plugin: dir.join("echo-plugin"),
        };
        for bin in [&bins.mesh, &bins.echo_plugin] {
            if !bin.is_file() {
                bail!(
                    "{} is missing; build it with `cargo build --release --workspace` \
                     (or pass --bin-dir)",
                    bin.display()
                );
            }
        }
        // The config that names echo-plugin lives in a temporary directory: a relative
        // --bin-dir would be resolved from there.
        Ok(Self {
            mesh: bins.mesh.canonicalize()?,
            echo_plugin: bins.echo_plugin.canonicalize()?,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(layout) = cli.registry_worker {
        return match registry::run_worker(layout) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("mesh-bench registry worker: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let settings = match Settings::new(&cli) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("mesh-bench: {error}");
            return ExitCode::from(64);
        }
    };
    let runtime = match cli.runtime {
        RuntimeKind::MultiThread => tokio::runtime::Builder::new_multi_thread(),
        RuntimeKind::CurrentThread => tokio::runtime::Builder::new_current_thread(),
    }
    .enable_all()
    .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("mesh-bench: cannot start the Tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Dropping `run` on a signal stops every child process it started (their guards' Drop).
    let outcome = runtime.block_on(async {
        let polling = settings.busy_poll.then(mesh::tuning::busy_poll);
        let _stop_polling = abort_on_drop(polling);
        tokio::select! {
            result = run(&cli, settings) => Some(result),
            () = interrupted() => None,
        }
    });
    drop(runtime);
    let report = match outcome {
        Some(Ok(report)) => report,
        Some(Err(error)) => {
            eprintln!("mesh-bench: {error:#}");
            return ExitCode::FAILURE;
        }
        None => {
            eprintln!("mesh-bench: interrupted; child processes stopped");
            return ExitCode::from(130);
        }
    };
    println!("{}", report.tables());
    match write_outputs(&cli, &report) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mesh-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn interrupted() {
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without signal handlers the default action (exit) still applies.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

fn write_outputs(cli: &Cli, report: &Report) -> anyhow::Result<()> {
    // Every part and every variant: what the published pages are made of.
    let full = !cli.quick
        && cli.parts.len() == Part::value_variants().len()
        && report.settings.variants.len() == Variant::value_variants().len();
    let pick = |given: &Option<PathBuf>, default: &str| match given {
        Some(path) => Some(path.clone()),
        None if full => Some(PathBuf::from(default)),
        None => None,
    };
    let outputs = [
        (
            pick(&cli.json, DEFAULT_JSON),
            serde_json::to_string_pretty(report)? + "\n",
        ),
        (pick(&cli.markdown, DEFAULT_MARKDOWN), report.markdown()),
    ];
    for (path, text) in outputs {
        let Some(path) = path else { continue };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("mesh-bench: wrote {}", path.display());
    }
    if !full && cli.json.is_none() && cli.markdown.is_none() {
        eprintln!("mesh-bench: partial or quick run; no files written (pass --json or --markdown)");
    }
    Ok(())
}

fn progress(message: impl fmt::Display) {
    eprintln!("mesh-bench: {message}");
}

/// The command line as run, the program relative to the working directory when inside it.
fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let (Some(program), Ok(cwd)) = (args.first_mut(), std::env::current_dir())
        && let Ok(relative) = Path::new(program.as_str()).strip_prefix(&cwd)
    {
        *program = relative.display().to_string();
    }
    args.iter()
        .map(|arg| {
            if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("'{}'", arg.replace('\'', r"'\''"))
            } else {
                arg.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run(cli: &Cli, settings: Settings) -> anyhow::Result<Report> {
    let started = Instant::now();
    let bins = Bins::locate(cli.bin_dir.as_deref())?;
    let mut report = Report::new(command_line(), settings.clone());
    progress(format!(
        "load average before: {} (nproc {})",
        report.machine.load_before, report.machine.nproc
    ));
    let has = |part| cli.parts.contains(&part);
    if has(Part::Latency) || has(Part::Throughput) {
        side_by_side::run(
            &bins,
            &settings,
            has(Part::Latency),
            has(Part::Throughput),
            &mut report,
        )
        .await?;
    }
    if has(Part::Spawn) {
        for &instances in &settings.spawn {
            let mut runs = Vec::new();
            for repeat in 1..=settings.repeats {
                progress(format!(
                    "spawn-to-ready, {instances} instances, run {repeat}/{}",
                    settings.repeats
                ));
                runs.push(lifecycle::spawn_to_ready(&bins, instances).await?);
            }
            report.spawn.push(SpawnRow {
                instances,
                ready_ms: summary(runs.iter().map(|r| r.ready_ms))?,
                router_ms: summary(runs.iter().map(|r| r.router_ms))?,
                runs,
            });
        }
    }
    if has(Part::Crash) {
        let default = mesh_manager::config::Backoff::default().base;
        for base in [None, Some("1ms")] {
            progress(format!(
                "crash-to-routed-again, backoff_base {}, {} kills",
                base.unwrap_or("default"),
                settings.repeats
            ));
            let runs = lifecycle::crash_to_routed(&bins, base, settings.repeats).await?;
            report.crash.push(CrashRow {
                backoff_base: match base {
                    Some(base) => base.to_owned(),
                    None => format!("{} (default)", humantime::format_duration(default)),
                },
                registry_ms: summary(runs.iter().map(|r| r.registry_ms))?,
                router_call_ms: summary(runs.iter().map(|r| r.router_call_ms))?,
                connect_call_ms: summary(runs.iter().map(|r| r.connect_call_ms))?,
                runs,
            });
        }
    }
    if has(Part::Telemetry) {
        telemetry::run(&bins, &settings, &mut report).await?;
    }
    if has(Part::Registry) {
        for layout in [Layout::Spread, Layout::Single] {
            progress(format!("registry, {}", layout.label()));
            report.registry.push(registry::measure(layout).await?);
        }
    }
    report.evaluate_targets();
    report.machine.load_after = report::loadavg();
    report.wall_s = started.elapsed().as_secs_f64();
    progress(format!(
        "load average after: {}; {:.0} s in all",
        report.machine.load_after, report.wall_s
    ));
    Ok(report)
}

fn summary(values: impl Iterator<Item = f64>) -> anyhow::Result<Summary> {
    let mut values: Vec<f64> = values.collect();
    Summary::of(&mut values).context("nothing was measured")
}

/// Aborts the busy-polling task (if any) when the run ends.
fn abort_on_drop(task: Option<tokio::task::JoinHandle<()>>) -> impl Drop {
    struct Abort(Option<tokio::task::JoinHandle<()>>);
    impl Drop for Abort {
        fn drop(&mut self) {
            if let Some(task) = &self.0 {
                task.abort();
            }
        }
    }
    Abort(task)
}
