//! Measuring what one check costs (test builds only): the `cost_per_call` benchmarks beside
//! the gate ([`super::calls`]) and the direct path ([`super::direct`]) time many calls in a
//! few batches and print the median batch, in nanoseconds per call on the CPU (the thread's
//! own run time, from `/proc/thread-self/schedstat`: the machine may be busy with other work)
//! and on the wall clock. They print and assert nothing: speed is not asserted by tests.

use std::time::Instant;

/// Batches per case; the median batch is printed.
const BATCHES: usize = 5;

/// This thread's time on the CPU, in nanoseconds.
fn on_cpu_ns() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Runs `call` `calls` times in each of [`BATCHES`] batches (after one unmeasured batch of a
/// tenth as many, to warm caches and fill maps) and prints the median batch as `what`;
/// returns its CPU nanoseconds per call.
pub(super) fn per_call(what: &str, calls: u32, mut call: impl FnMut(u32)) -> f64 {
    for i in 0..calls / 10 {
        call(i);
    }
    let mut batches: Vec<(f64, f64)> = (0..BATCHES)
        .map(|_| {
            let (started, cpu) = (Instant::now(), on_cpu_ns());
            for i in 0..calls {
                call(i);
            }
            let n = f64::from(calls);
            (
                (on_cpu_ns() - cpu) / n,
                started.elapsed().as_nanos() as f64 / n,
            )
        })
        .collect();
    batches.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (cpu, wall) = batches[BATCHES / 2];
    let (low, high) = (batches[0].0, batches[BATCHES - 1].0);
    println!(
        "{what:<64} {cpu:>7.0} ns CPU ({wall:.0} ns wall; batches {low:.0}–{high:.0} ns) × {calls}"
    );
    cpu
}
