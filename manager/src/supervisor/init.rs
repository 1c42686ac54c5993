//! A PID namespace per instance, so that no descendant of a plugin outlives the manager.
//!
//! A parent-death signal reaches only the direct child, and a process group only those that
//! stay in it: `sh -c 'sleep 300 & exec plugin'` left `sleep` running under pid 1 after
//! `kill -9` of `mesh up`. A subreaper does not help either: when the manager itself is
//! SIGKILLed, its orphans go to the system's init. The kernel does have one guarantee that
//! holds however the manager dies: when the init process of a PID namespace dies, every process
//! in that namespace is killed. So each instance runs as
//!
//! ```text
//! mesh up ─ mesh __init (host side) ─ init (pid 1 of a new namespace) ─ the plugin (pid 2)
//! ```
//!
//! - the host side (`mesh __init -- COMMAND ARGS`), started with the parent-death signal like
//!   any instance, creates the namespace and reports the plugin's exit as its own;
//! - the namespace's init dies with the host side (parent-death signal), reaps orphans, and
//!   exits as soon as the plugin does — taking everything left in the namespace with it;
//! - the plugin keeps ordinary signal semantics (it is not pid 1), its process group (the
//!   manager's SIGTERM/SIGKILL to the group still reach it and its children) and the host's
//!   `/proc`; `mesh status` shows its pid as the host sees it.
//!
//! Creating a PID namespace needs CAP_SYS_ADMIN; without it, the host side first creates a user
//! namespace that maps only its own uid and gid, which Linux allows unprivileged users where
//! `kernel.unprivileged_userns_clone` (or the distribution's equivalent) permits. Where neither
//! works, [`probe`] says why once and plugins run as before, without the guarantee.

use std::{
    ffi::{CString, OsString},
    os::unix::ffi::OsStrExt,
    path::Path,
};

use super::sandbox;
use nix::{
    sched::{CloneFlags, unshare},
    sys::{
        signal::{SigHandler, SigSet, SigmaskHow, Signal, sigprocmask},
        wait::{WaitStatus, waitpid},
    },
    unistd::{ForkResult, Pid, execvp, fork, pipe},
};

/// The `mesh` argument that runs the host side of an instance.
pub const INIT_ARG: &str = "__init";
const PROBE_ARG: &str = "--probe";
/// `mesh __init --probe-sandbox`: what the kernel offers the sandbox ([`super::sandbox`]).
pub(crate) const PROBE_SANDBOX_ARG: &str = "--probe-sandbox";
/// `mesh __init --sandbox JSON -- COMMAND...`: run the plugin in that sandbox.
pub(crate) const SANDBOX_ARG: &str = "--sandbox";

/// Signals the manager sends to an instance's whole group. The host side and the namespace's
/// init ignore them: they live until the plugin has gone, and report how it went.
const GROUP_SIGNALS: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGPIPE,
];

/// Whether `program` (the `mesh` binary) can run instances in their own PID namespace here;
/// the error says why not.
pub fn probe(program: &Path) -> Result<(), String> {
    let out = std::process::Command::new(program)
        .args([INIT_ARG, PROBE_ARG])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// `mesh __init -- COMMAND ARGS...` (and `mesh __init --probe`): the host side of an instance.
/// Never returns.
pub fn main(args: &[OsString]) -> ! {
    if args.first().is_some_and(|a| a == PROBE_ARG) {
        match isolate().and_then(|()| spawn_and_wait(|| std::process::exit(0))) {
            Ok(WaitStatus::Exited(_, 0)) => std::process::exit(0),
            Ok(other) => fail(&format!(
                "a process in a new PID namespace ended as {other:?}"
            )),
            Err(error) => fail(&error),
        }
    }
    if args.first().is_some_and(|a| a == PROBE_SANDBOX_ARG) {
        match isolate() {
            Ok(()) => sandbox::probe_here(),
            Err(error) => {
                let support = sandbox::Support::none(error);
                println!("{}", serde_json::to_string(&support).unwrap_or_default());
                std::process::exit(0)
            }
        }
    }
    let (spec, args) = match args {
        [flag, spec, rest @ ..] if flag == SANDBOX_ARG => {
            match serde_json::from_str::<sandbox::Spec>(&spec.to_string_lossy()) {
                Ok(spec) => (Some(spec), rest),
                Err(e) => fail(&format!("{SANDBOX_ARG}: {e}")),
            }
        }
        _ => (None, args),
    };
    let command = match args.first().map(|a| a == "--") {
        Some(true) => &args[1..],
        _ => args,
    };
    let Some(argv) = command
        .iter()
        .map(|a| CString::new(a.as_bytes()).ok())
        .collect::<Option<Vec<_>>>()
        .filter(|argv| !argv.is_empty())
    else {
        fail("usage: mesh __init -- COMMAND [ARGS...] (run by mesh up for each instance)");
    };
    if let Err(error) = isolate() {
        // mesh up probed this already and does not use __init where it fails.
        fail(&error);
    }
    // Other plugins' sockets hidden in a mount namespace, before anything of the plugin runs.
    let sandbox = spec.map(|spec| {
        let hidden = sandbox::hide(&spec);
        if let Err(why) = &hidden
            && spec.strict
        {
            fail(&format!(
                "sandbox = true, but other plugins' sockets cannot be hidden: {why}; \
                 set sandbox = \"best-effort\" to run it anyway"
            ));
        }
        (spec, hidden)
    });
    ignore(&GROUP_SIGNALS);
    let (status_r, status_w) = match pipe() {
        Ok(pipe) => pipe,
        Err(e) => fail(&format!("pipe: {e}")),
    };
    // SAFETY: this process is single-threaded (a fresh exec of mesh that started no runtime),
    // so the child may do anything after fork.
    #[allow(unsafe_code)]
    let forked = unsafe { fork() };
    match forked {
        Err(e) => fail(&format!("fork: {e}")),
        Ok(ForkResult::Child) => {
            drop(status_r);
            namespace_init(&argv, sandbox.as_ref(), status_w)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(status_w);
            let _ = waitpid(child, None);
            // How the plugin ended, as the namespace's init saw it; nothing if init was killed.
            let mut report = [0u8; 2];
            let read = nix::unistd::read(&status_r, &mut report).unwrap_or(0);
            match (read, report[0]) {
                (2, 0) => std::process::exit(i32::from(report[1])),
                (2, _) => die_by(i32::from(report[1])),
                _ => die_by(Signal::SIGKILL as i32),
            }
        }
    }
}

/// Pid 1 of the new namespace: starts the plugin, reaps every orphan, and exits when the
/// plugin does, which ends the namespace.
fn namespace_init(
    argv: &[CString],
    sandbox: Option<&(sandbox::Spec, Result<(), String>)>,
    report: std::os::fd::OwnedFd,
) -> ! {
    // Die with the host side; then the kernel kills everything in the namespace.
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() {
        std::process::exit(111);
    }
    // SAFETY: single-threaded, as above.
    #[allow(unsafe_code)]
    let forked = unsafe { fork() };
    let plugin = match forked {
        Err(_) => std::process::exit(111),
        Ok(ForkResult::Child) => {
            drop(report);
            // The plugin gets ordinary signal handling back.
            default(&GROUP_SIGNALS);
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            // Last: from here on this process opens only what the sandbox allows.
            if let Some((spec, hidden)) = sandbox
                && let Err(why) = sandbox::enter(spec, hidden)
            {
                eprintln!("mesh: {why}");
                std::process::exit(111);
            }
            let error = execvp(&argv[0], argv).unwrap_err();
            eprintln!("mesh: cannot run {}: {error}", argv[0].to_string_lossy());
            std::process::exit(127);
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == plugin => send(&report, 0, code),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == plugin => {
                send(&report, 1, signal as i32)
            }
            Err(nix::errno::Errno::ECHILD) => std::process::exit(111),
            _ => {}
        }
    }
}

fn send(report: &std::os::fd::OwnedFd, kind: u8, value: i32) -> ! {
    let _ = nix::unistd::write(report, &[kind, value as u8]);
    std::process::exit(0);
}

/// A new PID namespace for this process's children: directly with CAP_SYS_ADMIN, else inside
/// a user namespace that maps only our own uid and gid.
fn isolate() -> Result<(), String> {
    if unshare(CloneFlags::CLONE_NEWPID).is_ok() {
        return Ok(());
    }
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWPID).map_err(|e| {
        format!("cannot create a PID namespace, directly or in a user namespace: {e}")
    })?;
    let write = |file: &str, text: String| {
        std::fs::write(format!("/proc/self/{file}"), text)
            .map_err(|e| format!("cannot write /proc/self/{file} in a new user namespace: {e}"))
    };
    write("setgroups", "deny".into())?;
    write("uid_map", format!("{uid} {uid} 1"))?;
    write("gid_map", format!("{gid} {gid} 1"))
}

/// Forks a child that runs `child`, and waits for it.
fn spawn_and_wait(child: impl FnOnce()) -> Result<WaitStatus, String> {
    // SAFETY: single-threaded, as above.
    #[allow(unsafe_code)]
    let forked = unsafe { fork() };
    match forked.map_err(|e| format!("fork into a new PID namespace: {e}"))? {
        ForkResult::Child => {
            child();
            std::process::exit(0)
        }
        ForkResult::Parent { child } => waitpid(child, None).map_err(|e| format!("wait: {e}")),
    }
}

fn ignore(signals: &[Signal]) {
    for &signal in signals {
        // SAFETY: setting a disposition to SIG_IGN installs no handler code.
        #[allow(unsafe_code)]
        let _ = unsafe { nix::sys::signal::signal(signal, SigHandler::SigIgn) };
    }
}

fn default(signals: &[Signal]) {
    for &signal in signals {
        // SAFETY: restoring SIG_DFL installs no handler code.
        #[allow(unsafe_code)]
        let _ = unsafe { nix::sys::signal::signal(signal, SigHandler::SigDfl) };
    }
}

/// Ends this process the way the plugin ended: by `signal` (so the manager sees
/// "killed by SIGTERM"), or with 128 + its number for a signal whose default is not to die.
fn die_by(signal: i32) -> ! {
    if let Ok(signal) = Signal::try_from(signal) {
        default(&[signal]);
        let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
        let _ = nix::sys::signal::raise(signal);
    }
    std::process::exit(128 + signal)
}

fn fail(message: &str) -> ! {
    eprintln!("mesh: {message}");
    std::process::exit(111)
}

/// The plugin's pid as the host sees it, given the host side's pid: the child of the
/// namespace's init whose pid inside the namespace is 2 (the first it started). `None` where
/// `/proc` does not tell (no isolation, or not yet started).
pub(crate) fn plugin_pid(host_side: u32) -> Option<u32> {
    let children = |pid: u32| -> Vec<u32> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let init = *children(host_side).first()?;
    children(init).into_iter().find(|&pid| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("NSpid:"))
                    .map(|ids| ids.split_whitespace().last() == Some("2"))
            })
            .unwrap_or(false)
    })
}
