//! Where a call's time goes, per process: CPU time (`/proc/PID/task/*/schedstat`, in ns) and
//! context switches (`voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches` of each thread).
//! Sampled around a run of calls, they show which process spends what, and how many times
//! threads went to sleep and were woken (the thread hops that dominate latency on few cores).

use std::ops::{AddAssign, Sub};

use serde::Serialize;

/// CPU time and context switches of a set of processes, summed over their threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Usage {
    /// Time on a CPU, ns.
    pub(crate) cpu_ns: u64,
    /// Context switches, voluntary and not.
    pub(crate) switches: u64,
}

impl Usage {
    /// The usage so far of `pids` (threads that already ended are not counted).
    pub(crate) fn of(pids: &[u32]) -> Self {
        let mut usage = Self::default();
        for pid in pids {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let path = task.path();
                if let Ok(schedstat) = std::fs::read_to_string(path.join("schedstat")) {
                    usage.cpu_ns += schedstat
                        .split_whitespace()
                        .next()
                        .and_then(|ns| ns.parse::<u64>().ok())
                        .unwrap_or(0);
                }
                if let Ok(status) = std::fs::read_to_string(path.join("status")) {
                    usage.switches += switches(&status);
                }
            }
        }
        usage
    }
}

impl Sub for Usage {
    type Output = Self;
    fn sub(self, earlier: Self) -> Self {
        Self {
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            switches: self.switches.saturating_sub(earlier.switches),
        }
    }
}

impl AddAssign for Usage {
    fn add_assign(&mut self, other: Self) {
        self.cpu_ns += other.cpu_ns;
        self.switches += other.switches;
    }
}

/// The processes taking part in a call.
pub(crate) struct Processes {
    /// This harness.
    pub(crate) client: Vec<u32>,
    /// `mesh up`, where the router runs.
    pub(crate) router: Vec<u32>,
    /// The echo-plugin instance.
    pub(crate) plugin: Vec<u32>,
    /// nginx's master and workers.
    pub(crate) nginx: Vec<u32>,
}

impl Processes {
    /// Their usage so far, with the machine's.
    pub(crate) fn costs(&self) -> Costs {
        Costs {
            client: Usage::of(&self.client),
            router: Usage::of(&self.router),
            plugin: Usage::of(&self.plugin),
            nginx: Usage::of(&self.nginx),
            machine_ns: machine_busy_ns(),
            wall_ns: wall_ns(),
        }
    }
}

/// Usage of each of the [`Processes`], and of the whole machine; a difference of two samples
/// is what was spent between them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Costs {
    pub(crate) client: Usage,
    pub(crate) router: Usage,
    pub(crate) plugin: Usage,
    pub(crate) nginx: Usage,
    /// CPU time every CPU spent busy (`/proc/stat`: user, nice, system, irq, softirq, steal).
    pub(crate) machine_ns: u64,
    /// Wall-clock time.
    pub(crate) wall_ns: u64,
}

impl Costs {
    /// The benchmark's processes together.
    pub(crate) fn total(&self) -> Usage {
        let mut total = self.client;
        total += self.router;
        total += self.plugin;
        total += self.nginx;
        total
    }

    /// CPU time taken by everything else (other processes, kernel threads, the hypervisor's
    /// steal), in CPUs' worth: the noise the measurement ran under. `/proc/stat` counts in
    /// 10 ms ticks, so short spans read coarsely.
    pub(crate) fn others_cpus(&self) -> f64 {
        let others = self.machine_ns.saturating_sub(self.total().cpu_ns);
        others as f64 / self.wall_ns.max(1) as f64
    }
}

impl Sub for Costs {
    type Output = Self;
    fn sub(self, earlier: Self) -> Self {
        Self {
            client: self.client - earlier.client,
            router: self.router - earlier.router,
            plugin: self.plugin - earlier.plugin,
            nginx: self.nginx - earlier.nginx,
            machine_ns: self.machine_ns.saturating_sub(earlier.machine_ns),
            wall_ns: self.wall_ns.saturating_sub(earlier.wall_ns),
        }
    }
}

impl AddAssign for Costs {
    fn add_assign(&mut self, other: Self) {
        self.client += other.client;
        self.router += other.router;
        self.plugin += other.plugin;
        self.nginx += other.nginx;
        self.machine_ns += other.machine_ns;
        self.wall_ns += other.wall_ns;
    }
}

/// Busy time of every CPU so far, ns, from the first line of `/proc/stat` (in USER_HZ ticks,
/// 100 per second on Linux whatever the kernel's own tick).
fn machine_busy_ns() -> u64 {
    const NS_PER_TICK: u64 = 10_000_000;
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(cpu) = stat.lines().find(|line| line.starts_with("cpu ")) else {
        return 0;
    };
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    // in user.
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| ticks.get(i))
        .sum();
    busy * NS_PER_TICK
}

/// Nanoseconds since the first call: a clock that subtracts.
fn wall_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// Context switches in a thread's `status` file.
fn switches(status: &str) -> u64 {
    status
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            matches!(
                key,
                "voluntary_ctxt_switches" | "nonvoluntary_ctxt_switches"
            )
            .then(|| value.trim().parse::<u64>().ok())?
        })
        .sum()
}

/// The children of `parent` (nginx's workers), from `/proc/*/stat`.
pub(crate) fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // The fields after the ")" that closes the command: state, ppid, ...
                    let rest = stat.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_both_kinds_of_switches() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(switches(status), 15);
    }

    #[test]
    fn this_process_uses_cpu() {
        let before = Usage::of(&[std::process::id()]);
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        let after = Usage::of(&[std::process::id()]);
        assert!(after.cpu_ns > 0 && after.cpu_ns >= before.cpu_ns);
    }
}
