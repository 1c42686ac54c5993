//! What `mesh up` tells the service manager that started it (systemd's `sd_notify`): `READY=1`
//! once every plugin has had its first chance to become ready, `RELOADING=1` … `READY=1` around
//! a reload, `STOPPING=1` on shutdown, and `WATCHDOG=1` while the unit asks for it.
//!
//! Without `NOTIFY_SOCKET` (not under systemd) every call here does nothing. The variables are
//! `mesh up`'s own: plugins are started without them ([`hide`]).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use sd_notify::NotifyState;

/// The variables through which the service manager speaks to `mesh up` alone.
const VARIABLES: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Whether `READY=1` was sent once: a reload before that must not announce readiness early.
static READY: AtomicBool = AtomicBool::new(false);
/// Whether `STOPPING=1` was sent: nothing announces readiness after it.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Whether a failed notification was logged: the watchdog would repeat it every period.
static WARNED: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states)
        && !WARNED.swap(true, Ordering::SeqCst)
    {
        let socket = std::env::var_os("NOTIFY_SOCKET").unwrap_or_default();
        tracing::warn!(
            "cannot notify the service manager at NOTIFY_SOCKET={} (said once): {error}",
            socket.to_string_lossy()
        );
    }
}

/// Startup is over: every plugin had its first chance to become ready.
pub(crate) fn ready() {
    if !STOPPING.load(Ordering::SeqCst) {
        READY.store(true, Ordering::SeqCst);
        send(&[NotifyState::Ready]);
    }
}

/// Shutdown has begun.
pub(crate) fn stopping() {
    STOPPING.store(true, Ordering::SeqCst);
    send(&[NotifyState::Stopping]);
}

/// A reload in progress: `RELOADING=1` (with `MONOTONIC_USEC`, which `Type=notify-reload`
/// needs on systemd ≥ 253) now, `READY=1` when dropped, whatever the reload's outcome.
pub(crate) struct Reloading(());

impl Reloading {
    /// Announces the reload.
    pub(crate) fn start() -> Self {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(_) => send(&[NotifyState::Reloading]),
        }
        Self(())
    }
}

impl Drop for Reloading {
    fn drop(&mut self) {
        if READY.load(Ordering::SeqCst) {
            ready();
        }
    }
}

/// When the unit sets `WatchdogSec=` (systemd passes `WATCHDOG_USEC`, and `WATCHDOG_PID` if it
/// is meant for another process), pings it every half of that period from a task of the
/// runtime that serves the router: a wedged runtime stops the pings and systemd restarts us.
pub(crate) fn watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled()?;
    let every = (period / 2).max(Duration::from_millis(1));
    tracing::debug!("systemd watchdog: pinging every {every:?}");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}

/// Keeps the service manager's variables from a plugin: a plugin that speaks `sd_notify`
/// itself must not answer for `mesh up`.
pub(crate) fn hide(command: &mut tokio::process::Command) {
    for variable in VARIABLES {
        command.env_remove(variable);
    }
}
