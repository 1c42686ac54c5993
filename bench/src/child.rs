//! Child processes the harness starts (`mesh up`, nginx), each in its own process group, and
//! stopped with its whole group however the harness ends: explicitly, on error, on panic, on
//! Ctrl-C (dropped), or when the harness itself is killed (parent-death signal).

use std::{
    io,
    process::ExitStatus,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use tokio::process::{Child, Command};

/// How long a dropped child may take to exit after SIGTERM before its group gets SIGKILL.
const DROP_GRACE: Duration = Duration::from_secs(5);

/// A running child; its process group is stopped when this is dropped.
pub(crate) struct Supervised {
    child: Child,
    /// The child's pid, which is also its process group id.
    pid: i32,
    name: &'static str,
}

impl Supervised {
    /// Starts `command` as the leader of a new process group that dies with the harness.
    pub(crate) fn spawn(mut command: Command, name: &'static str) -> io::Result<Self> {
        command.process_group(0).kill_on_drop(true);
        die_with_parent(&mut command);
        let child = command.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other(format!("{name} exited at once")))?;
        Ok(Self {
            child,
            pid: pid as i32,
            name,
        })
    }

    /// The child's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Its stdout, if it was piped and not taken yet.
    pub(crate) fn take_stdout(&mut self) -> Option<tokio::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// How it exited, if it has.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM to the group, SIGKILL after `grace`; returns how the leader exited.
    pub(crate) async fn stop(mut self, grace: Duration) -> io::Result<ExitStatus> {
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGTERM);
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                eprintln!(
                    "mesh-bench: {} (pid {}) did not exit within {grace:?} of SIGTERM; killing its group",
                    self.name, self.pid
                );
                let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
                self.child.wait().await
            }
        };
        // Stragglers (nginx workers) still hold the group id; nothing else can have it.
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        status
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
            return;
        }
        // Blocking here is fine: it only happens while the harness is unwinding or interrupted.
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGTERM);
        let deadline = Instant::now() + DROP_GRACE;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        let _ = self.child.try_wait();
    }
}

/// Asks the kernel to SIGTERM the child when the harness dies, so that `mesh up` (whose plugins
/// die with it) and nginx (whose master stops its workers) never outlive a killed harness.
///
/// The signal follows the thread that forked: children are spawned from runtime worker threads
/// or the main thread, which live as long as the harness.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe system calls (prctl, getppid, kill).
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(io::Error::from)?;
            // The harness may have died between fork and prctl; then nobody would signal us.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                nix::sys::signal::raise(Signal::SIGTERM).map_err(io::Error::from)?;
            }
            Ok(())
        });
    }
}
