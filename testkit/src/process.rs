//! Child processes a test or the benchmark starts (`mesh up`, nginx), each in its own process
//! group, and stopped with its whole group however the caller ends: explicitly, on error, on
//! panic, on Ctrl-C (dropped), or when the caller itself is killed (parent-death signal).

use std::{
    io,
    process::ExitStatus,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

/// How long a dropped child may take to exit after SIGTERM before its group gets SIGKILL,
/// unless [`Supervised::drop_grace`] says otherwise.
const DROP_GRACE: Duration = Duration::from_secs(5);

/// A running child; its process group is stopped when this is dropped.
#[derive(Debug)]
pub struct Supervised {
    child: Child,
    /// The child's pid, which is also its process group id.
    pid: i32,
    name: &'static str,
    drop_grace: Duration,
}

impl Supervised {
    /// Starts `command` as the leader of a new process group that dies with its caller.
    pub fn spawn(mut command: Command, name: &'static str) -> io::Result<Self> {
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
            drop_grace: DROP_GRACE,
        })
    }

    /// How long a drop waits after SIGTERM before SIGKILL; zero sends SIGKILL at once (what a
    /// test wants: nothing to drain, and no test waits on another's cleanup).
    pub fn drop_grace(mut self, grace: Duration) -> Self {
        self.drop_grace = grace;
        self
    }

    /// The child's pid (and its process group's id).
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Its stdout, if it was piped and not taken yet.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Its stderr, if it was piped and not taken yet.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    /// How it exited, if it has.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` to the child alone (not its group).
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        kill(Pid::from_raw(self.pid), signal).map_err(io::Error::from)
    }

    /// Waits for the child to exit, at most `within`.
    pub async fn wait(&mut self, within: Duration) -> io::Result<ExitStatus> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} (pid {}) did not exit within {within:?}",
                    self.name, self.pid
                ),
            )),
        }
    }

    /// SIGKILL to the group at once; returns how the leader exited.
    pub async fn kill(&mut self) -> io::Result<ExitStatus> {
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        self.child.wait().await
    }

    /// SIGTERM to the group, SIGKILL after `grace`; returns how the leader exited.
    pub async fn stop(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGTERM);
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                eprintln!(
                    "{} (pid {}) did not exit within {grace:?} of SIGTERM; killing its group",
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
        if self.drop_grace.is_zero() || matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
            let _ = self.child.try_wait();
            return;
        }
        // Blocking here is fine: it only happens while the caller is unwinding or interrupted.
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGTERM);
        let deadline = Instant::now() + self.drop_grace;
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

/// Whether a process with `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the ")" that closes the command name.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Asks the kernel to SIGTERM the child when its caller dies, so that `mesh up` (whose plugins
/// die with it) and nginx (whose master stops its workers) never outlive a killed caller.
///
/// The signal follows the thread that forked: children are spawned from runtime worker threads,
/// a test's own thread or the main thread, which live as long as the child is wanted.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe system calls (prctl, getppid, kill).
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(io::Error::from)?;
            // The caller may have died between fork and prctl; then nobody would signal us.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                nix::sys::signal::raise(Signal::SIGTERM).map_err(io::Error::from)?;
            }
            Ok(())
        });
    }
}
