//! Process life measured through a real `mesh up`: how long instances take to become ready
//! (spawn-to-ready), and how long a killed instance takes to be routed to again.

use std::time::{Duration, Instant};

use anyhow::Context;
use mesh::{Address, Channel, Connector};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde::Serialize;

use crate::{
    Bins,
    calls::{Client, first_success},
    mesh_up::{MeshSpec, MeshUp, SERVICE, pid_of},
};

/// How long instances may take to become ready before the run fails.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long a killed instance may take to be back before the run fails.
const BACK_DEADLINE: Duration = Duration::from_secs(30);

/// One start of `mesh up` with N instances.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct SpawnRun {
    /// From starting `mesh up` until it printed that its router listens.
    pub(crate) router_ms: f64,
    /// From starting `mesh up` until `Registry.Watch` showed every instance.
    pub(crate) ready_ms: f64,
}

/// Starts `mesh up` with `instances` echo instances and times it until all are registered.
pub(crate) async fn spawn_to_ready(bins: &Bins, instances: u32) -> anyhow::Result<SpawnRun> {
    let spec = MeshSpec {
        policy_plugin: false,
        instances,
        backoff_base: None,
        tcp: false,
        metrics: false,
        telemetry: None,
        node: None,
        tls: None,
    };
    let mesh = MeshUp::start(bins, &spec).await?;
    let router_ms = ms(mesh.spawned_at.elapsed());
    let (ready_at, _) = mesh
        .wait_registry(READY_DEADLINE, |found| found.len() >= instances as usize)
        .await
        .with_context(|| format!("waiting for {instances} instances"))?;
    let ready_ms = ms(ready_at - mesh.spawned_at);
    mesh.stop().await?;
    Ok(SpawnRun {
        router_ms,
        ready_ms,
    })
}

/// One kill -9 of the instance and its return.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct CrashRun {
    /// From the kill until `Registry.Watch` showed the instance again with a new pid.
    pub(crate) registry_ms: f64,
    /// From the kill until a call through the router (Unix socket) succeeded, after the above.
    pub(crate) router_call_ms: f64,
    /// From the kill until a call on a `mesh::connect` channel opened before the kill
    /// succeeded, after the registry showed the instance.
    pub(crate) connect_call_ms: f64,
}

/// Runs one echo instance with `backoff_base` and kills it `repeats` times with SIGKILL.
pub(crate) async fn crash_to_routed(
    bins: &Bins,
    backoff_base: Option<&str>,
    repeats: u32,
) -> anyhow::Result<Vec<CrashRun>> {
    let spec = MeshSpec {
        policy_plugin: false,
        instances: 1,
        backoff_base: backoff_base.map(str::to_owned),
        tcp: false,
        metrics: false,
        telemetry: None,
        node: None,
        tls: None,
    };
    let mesh = MeshUp::start(bins, &spec).await?;
    mesh.wait_registry(READY_DEADLINE, |found| found.len() == 1)
        .await?;
    let routed = Client::mesh(
        Channel::to_address(Address::Unix(mesh.socket.clone()), SERVICE)
            .context("a channel through the router")?,
    );
    let direct = Client::mesh(
        Connector::local(&mesh.socket)
            .connect(SERVICE)
            .await
            .context("mesh::connect")?,
    );
    // Both channels hold a connection to the instance before it is killed.
    first_success(&routed, BACK_DEADLINE).await?;
    first_success(&direct, BACK_DEADLINE).await?;

    let mut runs = Vec::new();
    for _ in 0..repeats {
        let mut updates = mesh.watch().await?;
        let (_, now) = mesh
            .wait_on(&mut updates, READY_DEADLINE, |found| {
                found.len() == 1 && pid_of(&found[0]).is_some()
            })
            .await?;
        let old = pid_of(&now[0]).context("instance without a pid label")?;
        let killed_at = Instant::now();
        kill(Pid::from_raw(old as i32), Signal::SIGKILL)
            .with_context(|| format!("kill -9 {old}"))?;
        let (back_at, _) = mesh
            .wait_on(&mut updates, BACK_DEADLINE, |found| {
                found
                    .iter()
                    .any(|i| pid_of(i).is_some_and(|pid| pid != old))
            })
            .await
            .context("waiting for the killed instance to be registered again")?;
        let (router_at, direct_at) = tokio::join!(
            first_success(&routed, BACK_DEADLINE),
            first_success(&direct, BACK_DEADLINE)
        );
        runs.push(CrashRun {
            registry_ms: ms(back_at - killed_at),
            router_call_ms: ms(router_at.context("call through the router")? - killed_at),
            connect_call_ms: ms(direct_at.context("call on the mesh::connect channel")? - killed_at),
        });
    }
    // A live mesh::connect channel holds a Registry.Watch open, and `mesh up` waits for open
    // calls before it exits: close the channels first.
    drop((routed, direct));
    mesh.stop().await?;
    Ok(runs)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
