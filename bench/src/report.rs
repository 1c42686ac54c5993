//! The results of one run: tables for the terminal, JSON for scripts, and the Markdown page
//! (`docs/performance.md`) with the command, the machine, the date and the issue's targets.

use std::{
    fmt::Write as _,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{
    Settings,
    calls::{MESSAGE_BYTES, Variant},
    lifecycle::{CrashRun, SpawnRun},
    procstat::{Costs, Usage},
    registry::RegistryResult,
    stats::Summary,
};

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// Bumped when the JSON's shape changes.
    pub(crate) schema: u32,
    /// When the run started (UTC, ISO 8601).
    pub(crate) date: String,
    /// The command line, as run.
    pub(crate) command: String,
    /// How long the whole run took.
    pub(crate) wall_s: f64,
    pub(crate) machine: Machine,
    pub(crate) settings: Settings,
    pub(crate) latency: Vec<LatencyRow>,
    /// CPU time and context switches by process during the sequential calls.
    pub(crate) costs: Vec<CostRow>,
    pub(crate) throughput: Vec<ThroughputRow>,
    pub(crate) spawn: Vec<SpawnRow>,
    pub(crate) crash: Vec<CrashRow>,
    pub(crate) registry: Vec<RegistryResult>,
    /// Telemetry off and on, routed and direct (`--parts telemetry`).
    pub(crate) telemetry: Vec<crate::telemetry::TelemetryRow>,
    pub(crate) targets: Vec<Target>,
    /// Skipped parts, failed calls, anything a reader must know.
    pub(crate) notes: Vec<String>,
}

/// The machine the run was on.
#[derive(Debug, Serialize)]
pub(crate) struct Machine {
    pub(crate) nproc: usize,
    pub(crate) cpu: String,
    pub(crate) kernel: String,
    /// The cpuidle driver (`haltpoll` on KVM guests): how idle CPUs wait decides what a
    /// wake-up costs.
    pub(crate) cpuidle: String,
    /// `/proc/loadavg` (1, 5, 15 minutes) when the run started and when it ended: other work
    /// on the machine shows here.
    pub(crate) load_before: String,
    pub(crate) load_after: String,
    /// `nginx -v`, when nginx ran.
    pub(crate) nginx: Option<String>,
}

impl Machine {
    /// Reads what `/proc` says about this machine now.
    pub(crate) fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let cpuidle = std::fs::read_to_string("/sys/devices/system/cpu/cpuidle/current_driver")
            .map(|d| d.trim().to_owned())
            .unwrap_or_else(|_| "none".into());
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            kernel,
            cpuidle,
            load_before: loadavg(),
            load_after: String::new(),
            nginx: None,
        }
    }
}

/// The 1, 5 and 15 minute load averages.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Sequential calls over one variant, every round pooled.
#[derive(Debug, Serialize)]
pub(crate) struct LatencyRow {
    pub(crate) variant: Variant,
    pub(crate) label: &'static str,
    /// Latency of each successful call, µs.
    pub(crate) us: Summary,
    /// The median of each round, µs: their spread shows how noisy the machine was.
    pub(crate) round_medians_us: Vec<f64>,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
}

/// What each process spent on one variant's sequential calls (totals over every round).
#[derive(Debug, Serialize)]
pub(crate) struct CostRow {
    pub(crate) variant: Variant,
    pub(crate) label: &'static str,
    /// Calls made, failed ones included.
    pub(crate) calls: u64,
    pub(crate) costs: Costs,
}

/// Throughput of one variant at one number of calls in flight.
#[derive(Debug, Serialize)]
pub(crate) struct ThroughputRow {
    pub(crate) variant: Variant,
    pub(crate) label: &'static str,
    pub(crate) in_flight: usize,
    /// Median over rounds of successful calls per second.
    pub(crate) calls_per_s: f64,
    /// Each round's calls per second.
    pub(crate) rounds: Vec<f64>,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    /// Calls made in every round, failed ones included.
    pub(crate) calls: u64,
    /// What each process spent on them.
    pub(crate) costs: Costs,
}

/// Spawn-to-ready for one number of instances.
#[derive(Debug, Serialize)]
pub(crate) struct SpawnRow {
    pub(crate) instances: u32,
    pub(crate) runs: Vec<SpawnRun>,
    pub(crate) ready_ms: Summary,
    pub(crate) router_ms: Summary,
}

/// Crash-to-routed-again for one backoff setting.
#[derive(Debug, Serialize)]
pub(crate) struct CrashRow {
    /// The `backoff_base` setting.
    pub(crate) backoff_base: String,
    pub(crate) runs: Vec<CrashRun>,
    pub(crate) registry_ms: Summary,
    pub(crate) router_call_ms: Summary,
    pub(crate) connect_call_ms: Summary,
}

/// One of the issue's targets, evaluated on this run.
#[derive(Debug, Serialize)]
pub(crate) struct Target {
    pub(crate) target: &'static str,
    /// The numbers it is computed from.
    pub(crate) measured: String,
    /// The ratio (or value) compared with the limit.
    pub(crate) value: Option<f64>,
    pub(crate) limit: &'static str,
    /// `met`, `missed` or `not measured`.
    pub(crate) status: &'static str,
}

impl Target {
    fn new(
        target: &'static str,
        limit: &'static str,
        measured: Option<(String, f64, bool)>,
    ) -> Self {
        match measured {
            Some((measured, value, met)) => Self {
                target,
                measured,
                value: Some(value),
                limit,
                status: if met { "met" } else { "missed" },
            },
            None => Self {
                target,
                measured: "not measured in this run".into(),
                value: None,
                limit,
                status: "not measured",
            },
        }
    }
}

impl Report {
    /// An empty report of a run starting now.
    pub(crate) fn new(command: String, settings: Settings) -> Self {
        Self {
            schema: 1,
            date: utc_now(),
            command,
            wall_s: 0.0,
            machine: Machine::probe(),
            settings,
            latency: Vec::new(),
            costs: Vec::new(),
            throughput: Vec::new(),
            spawn: Vec::new(),
            crash: Vec::new(),
            registry: Vec::new(),
            telemetry: Vec::new(),
            targets: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn median_us(&self, variant: Variant) -> Option<f64> {
        self.latency
            .iter()
            .find(|r| r.variant == variant)
            .map(|r| r.us.median)
    }

    fn rate(&self, variant: Variant, in_flight: usize) -> Option<f64> {
        self.throughput
            .iter()
            .find(|r| r.variant == variant && r.in_flight == in_flight)
            .map(|r| r.calls_per_s)
    }

    /// Evaluates the issue's targets as ratios of this run's numbers.
    pub(crate) fn evaluate_targets(&mut self) {
        use Variant::*;
        let (a, b, c, e) = (
            self.median_us(A),
            self.median_us(B),
            self.median_us(C),
            self.median_us(E),
        );
        let direct = a.zip(b).map(|(a, b)| {
            let ratio = b / a;
            (
                format!("(b) {b:.1} µs / (a) {a:.1} µs"),
                ratio,
                ratio <= 0.6,
            )
        });
        let spinning = a.zip(self.median_us(F)).map(|(a, f)| {
            let ratio = f / a;
            (
                format!("(f) {f:.1} µs / (a) {a:.1} µs"),
                ratio,
                ratio <= 0.6,
            )
        });
        let added = match (a, b, c, e) {
            (Some(a), Some(b), Some(c), Some(e)) => {
                let (router, nginx) = (c - b, e - a);
                let ratio = router / nginx;
                Some((
                    format!("router adds (c − b) {router:.1} µs; nginx adds (e − a) {nginx:.1} µs"),
                    ratio,
                    nginx > 0.0 && ratio <= 0.35,
                ))
            }
            _ => None,
        };
        let rates = self.rate(D, 64).zip(self.rate(E, 64)).map(|(d, e)| {
            let ratio = d / e;
            let unix = self
                .rate(C, 64)
                .map(|c| format!("; (c) Unix socket {c:.0}/s = {:.2}×", c / e))
                .unwrap_or_default();
            (
                format!("(d) router TCP {d:.0}/s / (e) nginx {e:.0}/s{unix}"),
                ratio,
                ratio >= 1.5,
            )
        });
        let policy = c.zip(self.median_us(H)).map(|(c, h)| {
            let added = h - c;
            (
                format!("(h) {h:.1} µs − (c) {c:.1} µs"),
                added,
                added <= 2.0,
            )
        });
        let spawn = self.spawn.iter().find(|s| s.instances == 100).map(|s| {
            let ms = s.ready_ms.median;
            (
                format!(
                    "median {ms:.0} ms, worst {:.0} ms of {} runs",
                    s.ready_ms.max, s.ready_ms.count
                ),
                ms,
                ms <= 1000.0,
            )
        });
        let metrics = self.median_us(C).zip(self.median_us(J)).map(|(c, j)| {
            let added = j - c;
            (
                format!("(j) {j:.1} µs − (c) {c:.1} µs"),
                added,
                added <= 3.0,
            )
        });
        self.targets = vec![
            Target::new(
                "direct call: (b) median ≤ 0.6 × (a) median",
                "≤ 0.6",
                direct,
            ),
            Target::new(
                "direct call, spin opted in: (f) median ≤ 0.6 × (a) median",
                "≤ 0.6",
                spinning,
            ),
            Target::new(
                "router's added median (c − b) ≤ 0.35 × nginx's (e − a)",
                "≤ 0.35",
                added,
            ),
            Target::new(
                "router throughput at 64 in flight ≥ 1.5 × nginx's",
                "≥ 1.5",
                rates,
            ),
            Target::new(
                "routed call with a policy in force: (h) − (c) median ≤ 2 µs (issue 11)",
                "≤ 2 µs",
                policy,
            ),
            Target::new("100 instances ready within 1 s", "≤ 1000 ms", spawn),
            Target::new(
                "call metrics on add at most 3 µs per routed call: (j) − (c) median",
                "≤ 3 µs",
                metrics,
            ),
        ];
    }

    /// Every measured section as Markdown tables under `###` headings.
    pub(crate) fn tables(&self) -> String {
        let mut out = String::new();
        let s = &self.settings;
        if !self.targets.is_empty() {
            let _ = writeln!(out, "### Targets (issue 5), from this run\n");
            let rows = self
                .targets
                .iter()
                .map(|t| {
                    vec![
                        t.target.to_owned(),
                        t.measured.clone(),
                        t.value.map_or("–".into(), |v| format!("{v:.2}")),
                        t.limit.to_owned(),
                        t.status.to_owned(),
                    ]
                })
                .collect::<Vec<_>>();
            out.push_str(&table(
                &["target", "measured", "value", "limit", "status"],
                &rows,
            ));
        }
        if !self.latency.is_empty() {
            let _ = writeln!(
                out,
                "\n### Sequential latency, {MESSAGE_BYTES}-byte unary Echo (µs)\n\n\
                 {} calls per variant in each of {} rounds, the variants interleaved; \
                 percentiles over every call.\n",
                s.calls, s.rounds
            );
            if let Some((mean, most)) = others_cpus(self.costs.iter().map(|r| &r.costs)) {
                let _ = writeln!(
                    out,
                    "Everything else on the machine took {mean:.2} CPUs on average meanwhile \
                     (at most {most:.2} during one run).\n"
                );
            }
            let a = self.median_us(Variant::A);
            let rows = self
                .latency
                .iter()
                .map(|r| {
                    let spread = spread(&r.round_medians_us);
                    vec![
                        format!("({})", r.variant.letter()),
                        r.label.to_owned(),
                        format!("{:.1}", r.us.median),
                        format!("{:.1}", r.us.p99),
                        format!("{:.1}", r.us.mean),
                        a.map_or("–".into(), |a| format!("{:+.1}", r.us.median - a)),
                        spread,
                        r.us.count.to_string(),
                        r.errors.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            out.push_str(&table(
                &[
                    "",
                    "way to the plugin",
                    "median",
                    "p99",
                    "mean",
                    "median − (a)",
                    "round medians",
                    "calls",
                    "errors",
                ],
                &rows,
            ));
        }
        if !self.costs.is_empty() {
            let _ = writeln!(
                out,
                "\n### Where a sequential call's time goes\n\n\
                 CPU time (µs) · context switches, per call, by process, over the sequential \
                 calls above (`/proc/PID/task/*/schedstat` and `*_ctxt_switches`). Each switch \
                 is a thread going to sleep and being woken: a hop.\n"
            );
            let rows = self
                .costs
                .iter()
                .map(|r| cost_cells(r.variant, r.label, r.calls, &r.costs))
                .collect::<Vec<_>>();
            out.push_str(&table(&COST_HEADER, &rows));
        }
        if !self.throughput.is_empty() {
            let _ = writeln!(
                out,
                "\n### Throughput (calls/s)\n\n\
                 {} per point in each of {} rounds (after {} of warm-up), at most {} calls \
                 per point; the median of the rounds, ± half their spread.\n",
                humantime::format_duration(s.duration),
                s.rounds,
                humantime::format_duration(s.warmup),
                s.max_calls
            );
            if let Some((mean, most)) = others_cpus(self.throughput.iter().map(|r| &r.costs)) {
                let _ = writeln!(
                    out,
                    "Everything else on the machine took {mean:.2} CPUs on average meanwhile \
                     (at most {most:.2} during one point, all rounds).\n"
                );
            }
            let mut header = vec!["".to_owned(), "way to the plugin".to_owned()];
            header.extend(s.in_flight.iter().map(|n| format!("{n} in flight")));
            header.push("errors".into());
            let mut rows = Vec::new();
            for variant in Variant::ALL {
                let points: Vec<&ThroughputRow> = self
                    .throughput
                    .iter()
                    .filter(|r| r.variant == variant)
                    .collect();
                let Some(first) = points.first() else {
                    continue;
                };
                let mut row = vec![format!("({})", variant.letter()), first.label.to_owned()];
                for n in &s.in_flight {
                    row.push(
                        points
                            .iter()
                            .find(|p| p.in_flight == *n)
                            .map_or("–".into(), |p| with_spread(p.calls_per_s, &p.rounds)),
                    );
                }
                row.push(points.iter().map(|p| p.errors).sum::<u64>().to_string());
                rows.push(row);
            }
            let header: Vec<&str> = header.iter().map(String::as_str).collect();
            out.push_str(&table(&header, &rows));
            // The cost of a call under load, at the target's level (or the highest measured).
            let level = if s.in_flight.contains(&64) {
                Some(64)
            } else {
                s.in_flight.iter().copied().max()
            };
            if let Some(level) = level {
                let _ = writeln!(
                    out,
                    "\nCPU time (µs) · context switches per call at {level} in flight, by \
                     process, over every round:\n"
                );
                let rows = self
                    .throughput
                    .iter()
                    .filter(|r| r.in_flight == level)
                    .map(|r| cost_cells(r.variant, r.label, r.calls, &r.costs))
                    .collect::<Vec<_>>();
                out.push_str(&table(&COST_HEADER, &rows));
            }
        }
        if !self.telemetry.is_empty() {
            let _ = writeln!(
                out,
                "\n### Telemetry (µs per call; calls/s at 64 in flight)\n\n\
                 One `mesh up` per setting, side by side in this run; traces export by OTLP to \
                 a sink in the benchmark's process on loopback.\n"
            );
            let rows = self
                .telemetry
                .iter()
                .map(|r| {
                    vec![
                        r.setting.clone(),
                        r.path.to_owned(),
                        format!("{:.1}", r.us.median),
                        format!("{:.1}", r.us.p99),
                        format!("{:.0}", r.calls_per_s),
                        r.errors.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            out.push_str(&table(
                &[
                    "telemetry",
                    "path",
                    "median",
                    "p99",
                    "calls/s @64",
                    "errors",
                ],
                &rows,
            ));
        }
        if !self.spawn.is_empty() {
            let _ = writeln!(
                out,
                "\n### Spawn-to-ready (ms)\n\n\
                 From starting `mesh up` until `mesh.v1.Registry/Watch` shows every instance.\n"
            );
            let rows = self
                .spawn
                .iter()
                .map(|r| {
                    vec![
                        r.instances.to_string(),
                        format!("{:.0}", r.ready_ms.median),
                        format!("{:.0}–{:.0}", r.ready_ms.min, r.ready_ms.max),
                        format!("{:.0}", r.router_ms.median),
                        r.ready_ms.count.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            out.push_str(&table(
                &[
                    "instances",
                    "ready, median",
                    "ready, min–max",
                    "router listening, median",
                    "runs",
                ],
                &rows,
            ));
        }
        if !self.crash.is_empty() {
            let _ = writeln!(
                out,
                "\n### Crash-to-routed-again after kill -9 (ms)\n\n\
                 From the kill until the registry shows the restarted instance, and until a \
                 call to it succeeds (through the router; on a `mesh::connect` channel opened \
                 before the kill). Median (min–max).\n"
            );
            let rows = self
                .crash
                .iter()
                .map(|r| {
                    vec![
                        r.backoff_base.clone(),
                        median_range(&r.registry_ms),
                        median_range(&r.router_call_ms),
                        median_range(&r.connect_call_ms),
                        r.registry_ms.count.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            out.push_str(&table(
                &[
                    "backoff_base",
                    "in the registry again",
                    "call via router ok",
                    "call via mesh::connect ok",
                    "kills",
                ],
                &rows,
            ));
        }
        if !self.registry.is_empty() {
            let _ = writeln!(
                out,
                "\n### Registry with 100 000 instances (in process, `mesh_router::registry::Registry`)\n\n\
                 Each layout in a fresh process; memory is the growth of VmRSS.\n"
            );
            let mut header = vec!["".to_owned()];
            header.extend(self.registry.iter().map(|r| r.layout.label()));
            let metric = |name: &str, f: &dyn Fn(&RegistryResult) -> String| {
                let mut row = vec![name.to_owned()];
                row.extend(self.registry.iter().map(f));
                row
            };
            let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
            let rows = vec![
                metric("register all (no TTL)", &|r| {
                    format!(
                        "{:.0} ms ({:.2} µs each)",
                        r.register_ms,
                        r.register_ms * 1000.0 / r.instances as f64
                    )
                }),
                metric("memory, registered", &|r| {
                    format!(
                        "{} ({:.0} B/instance)",
                        mib(r.rss_registered_kib.saturating_sub(r.rss_before_kib)),
                        r.bytes_per_instance()
                    )
                }),
                metric("memory, with every snapshot built", &|r| {
                    mib(r.rss_snapshots_kib.saturating_sub(r.rss_before_kib))
                }),
                metric(
                    "first resolve per service (builds snapshot), median / max",
                    &|r| {
                        format!(
                            "{:.1} / {:.1} µs",
                            r.resolve_cold_us.median, r.resolve_cold_us.max
                        )
                    },
                ),
                metric("resolve, median / p99 (timed singly)", &|r| {
                    format!(
                        "{:.0} / {:.0} ns",
                        r.resolve_warm_ns.median, r.resolve_warm_ns.p99
                    )
                }),
                metric("resolves/s, 1 thread", &|r| {
                    format!("{:.2} M", r.resolves_per_s_1_thread / 1e6)
                }),
                metric("resolves/s, 2 threads together", &|r| {
                    format!("{:.2} M", r.resolves_per_s_2_threads / 1e6)
                }),
            ];
            let header: Vec<&str> = header.iter().map(String::as_str).collect();
            out.push_str(&table(&header, &rows));
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\n### Notes\n");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }

    /// The page `docs/performance.md`.
    pub(crate) fn markdown(&self) -> String {
        let m = &self.machine;
        let s = &self.settings;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Performance\n\n\
             Measured by `mesh-bench` (`bench/`), which writes this page. Every number below comes \
             from one run, so ratios compare like with like.\n\n\
             ## Run\n\n\
             - Command: `{}` (`just bench` builds the workspace in release mode and runs the \
               full default run)\n\
             - Date: {} (UTC); the run took {:.0} s\n\
             - Machine: {} CPUs (`nproc`), {}, Linux {}, cpuidle driver {}\n\
             - Load average (1/5/15 min): {} before, {} after (which counts the run's own \
               processes)\n\
             - Client: Tokio {} runtime{}; {MESSAGE_BYTES}-byte messages; plugins run by the release \
               `mesh up`, one echo instance serving every way of calling\n\
             - Spin (`MESH_SPIN_US`, for the client and `mesh up`): {}\n\
             - nginx: {}\n",
            self.command,
            self.date,
            self.wall_s,
            m.nproc,
            m.cpu,
            m.kernel,
            m.cpuidle,
            m.load_before,
            m.load_after,
            s.runtime,
            if s.busy_poll {
                ", busy-polling (MESH_BUSY_POLL=1: client, router workers and plugin never sleep)"
            } else {
                ""
            },
            match s.spin {
                None => format!(
                    "unset: the client's channels do not spin except (f), which opts in to {} µs \
                     (`Connector::spin`: a call alone in the process polls its connection that \
                     long before sleeping); router workers linger their default 100 µs after a call",
                    crate::calls::OPT_IN_SPIN.as_micros()
                ),
                Some(spin) if spin.is_zero() => {
                    "0: nothing lingers, and only (f) spins (it opts in)".to_owned()
                }
                Some(spin) => format!(
                    "{} µs: every `mesh` channel of the client spins that long on a lone call's \
                     answer ((f) {} µs), and router workers keep polling that long after a call",
                    spin.as_micros(),
                    crate::calls::OPT_IN_SPIN.as_micros()
                ),
            },
            m.nginx.as_deref().unwrap_or("not run")
        );
        let _ = writeln!(out, "## Results\n");
        out.push_str(&self.tables());
        out.push_str(METHOD);
        out.push_str(PROFILING);
        out
    }
}

/// How the numbers are taken, for the page.
const METHOD: &str = r#"
## Method

- **(a)** is what a Rust user writes without this project: tonic's `Channel`
  (`Endpoint::connect_with_connector` over `UnixStream`) on the instance's socket. **(b)** is
  `mesh::connect("plugin.echo")`: it resolves through the router's `Registry.Watch` and then calls
  the instance's socket itself, with the library's defaults (no spinning). **(f)** is the same
  with spinning opted in (`Connector::spin(100 µs)`). **(c)** and **(d)** send every call
  through the router, on its Unix socket and on TCP (`listen = "127.0.0.1:0"`). **(e)** is Debian's nginx with `grpc_pass`
  to the same instance socket over an upstream `keepalive` pool (1024 idle connections, as
  nginx opens one upstream connection per call in flight; `http2_max_concurrent_streams 1024`),
  reached by tonic's `Channel` on TCP. nginx recycles the client's connection every 10 000
  calls (`keepalive_requests`; its default is 1000): without a limit its per-connection memory
  grows with every call and its throughput falls to a quarter within seconds, while each
  GOAWAY fails the calls the client had already started on the old connection. Those failures
  are counted in the errors column and not in calls/s. Every way but (h), (i), (l) and (m) hits the same single
  echo-plugin instance. **(h)** is (c) to a second echo plugin with `rate_limit` and
  `caller_rate_limit` set (10⁹/s, never reached): the client is the owner, so its calls are
  held to rate limits only, without a plugin caller's `call:` check and audit line. The
  policy's own cost per decision, for plugin callers too, is far below what this page can
  resolve and is measured directly: `cargo test --release -p mesh-manager --lib -- --ignored
  --nocapture cost_per` (figures in `docs/security.md`, "What a check costs"). **(l)** is (d) as a remote client with mTLS: `mesh::Connector::remote`
  with `ClientTls` (a `mesh certs` client certificate) to a second `mesh up` whose listener
  has `[tls]` (its own echo instance, the same binaries and settings); (l) − (d) is what TLS
  adds. TLS connections are read only as Tokio wakes them (no direct socket reads while
  spinning: the socket carries ciphertext). **(i)** goes through node a's router (Unix socket,
  no plugin) which forwards over TCP to node b's router and its echo instance, the two nodes
  sharing a local etcd; **(m)** is (i) with `[tls]` on both nodes, so the hop is mTLS (both nodes
  hold the same node certificate); (m) − (i) is what TLS adds to the hop.
- Sequential calls run in a Tokio task (as a server's handler would), one at a time, with the
  variants interleaved round by round so that drifting background load hits them alike.
- Throughput keeps N calls in flight (N tasks sharing one channel, each calling again as soon as
  its call ends) for a fixed time per point, with a cap on calls; every call checks its reply.
- Spawn-to-ready starts `mesh up` with `instances = N` and reads `Registry.Watch` until N
  instances show. Crash-to-routed-again kills the instance with SIGKILL and reads the registry
  and retries calls every millisecond (so those figures are good to about 1 ms);
  `backoff_reset = "1ms"` makes every kill a first restart.
- The machine is shared: each table says how many CPUs' worth of time everything else took
  while it was measured; read the round-to-round spread before trusting a difference smaller
  than it. On a virtual machine whose idle CPUs halt, a wake-up of a halted CPU goes through
  the hypervisor: the same run on a machine kept busy by other work gives every way lower
  latencies (fewer halted CPUs to wake) and different absolute numbers, while the ratios
  between the ways move much less. Compare ratios from one run; timing thresholds live here,
  never in `cargo test`.
"#;

/// How to profile the hot path, for the page.
const PROFILING: &str = r#"
## Profiling the hot path

The cheapest profile is above: the harness samples each process's CPU time and context
switches around every measurement (`/proc/PID/task/*/schedstat` and `*_ctxt_switches`), so
the cost tables show what the client, the router, the plugin and nginx each spend per call,
and how many times their threads slept and were woken.

For where inside a process, let the harness be the load and profile one way at a time. The
release profile keeps line tables (`debug = "line-tables-only"`) but no frame pointers, so
perf must unwind with DWARF; `perf` is Debian's `linux-perf`, and `libc6-dbg` names libc's
internals (without it perf attributes libc samples to the nearest exported symbol).

```sh
cargo build --release --workspace

# Sampled CPU profile of every process taking part (mesh-bench = client, mesh = router,
# echo-plugin = plugin), here the router on its Unix socket at 64 calls in flight:
perf record -e cpu-clock -F 499 -a --call-graph dwarf,16384 -o perf.data -- \
  target/release/mesh-bench --parts throughput --variants c --in-flight 64 --duration 3s --rounds 1
perf report -i perf.data --no-children --sort pid,dso      # which process, which library
perf report -i perf.data --no-children --tid TID,TID --sort sym   # one process's threads

# Exact instruction counts, and who calls what how often (slow: one way, a few thousand calls):
valgrind --tool=callgrind --trace-children=yes --callgrind-out-file=callgrind.%p \
  target/release/mesh-bench --parts latency --variants c --calls 2000 --rounds 1
callgrind_annotate callgrind.PID                  # PID of `mesh up`: the router's side
callgrind_annotate --tree=caller callgrind.PID    # callers of tokio::task::spawn, malloc, memcpy
```

Divide callgrind's counts by the calls made (the run's calls plus 500 warm-up calls and one
first call) to get instructions, spawned tasks and allocations per call.
"#;

/// Columns of the tables of what each process spends per call.
const COST_HEADER: [&str; 7] = [
    "",
    "way to the plugin",
    "client (harness)",
    "mesh up (router)",
    "echo plugin",
    "nginx",
    "all",
];

/// CPUs' worth of time taken by everything but the benchmark during the call measurements:
/// the mean over them, and the most during one.
fn others_cpus<'a>(costs: impl Iterator<Item = &'a Costs>) -> Option<(f64, f64)> {
    let mut all = Costs::default();
    let mut most: f64 = 0.0;
    let mut any = false;
    for cost in costs {
        all += *cost;
        most = most.max(cost.others_cpus());
        any = true;
    }
    any.then(|| (all.others_cpus(), most))
}

/// One row of a cost table: CPU µs · context switches per call, by process.
fn cost_cells(variant: Variant, label: &str, calls: u64, costs: &Costs) -> Vec<String> {
    let per_call = |usage: Usage| {
        let calls = calls.max(1) as f64;
        format!(
            "{:.1} · {:.1}",
            usage.cpu_ns as f64 / 1000.0 / calls,
            usage.switches as f64 / calls
        )
    };
    vec![
        format!("({})", variant.letter()),
        label.to_owned(),
        per_call(costs.client),
        per_call(costs.router),
        per_call(costs.plugin),
        per_call(costs.nginx),
        per_call(costs.total()),
    ]
}

/// `12345 ±3%`: the median and half the spread of the rounds.
fn with_spread(median: f64, rounds: &[f64]) -> String {
    if rounds.len() < 2 || median <= 0.0 {
        return format!("{median:.0}");
    }
    let (min, max) = min_max(rounds);
    format!("{median:.0} ±{:.0}%", (max - min) / 2.0 / median * 100.0)
}

/// `121.0–125.3` of a set of values.
fn spread(values: &[f64]) -> String {
    if values.is_empty() {
        return "–".into();
    }
    let (min, max) = min_max(values);
    format!("{min:.1}–{max:.1}")
}

fn median_range(summary: &Summary) -> String {
    format!(
        "{:.1} ({:.1}–{:.1})",
        summary.median, summary.min, summary.max
    )
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// A Markdown table, its columns padded so that it also reads well in a terminal.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let width = |s: &str| s.chars().count();
    let mut widths: Vec<usize> = header.iter().map(|h| width(h).max(3)).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(width(cell));
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::from("|");
        for (cell, w) in cells.zip(&widths) {
            let _ = write!(out, " {cell}{} |", " ".repeat(w - width(cell)));
        }
        out.push('\n');
        out
    };
    let mut out = line(&mut header.iter().copied());
    out.push_str(&line(
        &mut widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    ));
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// Now, as `2026-11-22T17:45:03Z`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// The proleptic Gregorian date of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_from_days_since_the_epoch() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_414), (2025, 11, 22));
    }

    #[test]
    fn tables_pad_their_columns() {
        let text = table(&["a", "bé"], &[vec!["1".into(), "22222".into()]]);
        assert_eq!(text, "| a   | bé    |\n| --- | ----- |\n| 1   | 22222 |\n");
    }
}
