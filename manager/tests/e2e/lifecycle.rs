//! `mesh up` starts plugins, registers them once SERVING, and leaves nothing behind when it stops.

use std::time::Duration;

use mesh::{Address, Channel};
use mesh_proto::mesh::v1::{ListRequest, registry_client::RegistryClient};
use nix::sys::signal::Signal;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{Mesh, alive, wait_gone};

pub const TWO_ECHOES: &str = r#"
[[plugin]]
name = "echo"
command = "{echo}"
instances = 2
"#;

#[tokio::test]
async fn starts_two_instances_that_serve_and_are_registered() {
    let mesh = Mesh::start(TWO_ECHOES).await;
    let instances = mesh.wait_instances("plugin.echo", 2).await;
    let ids: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["echo-0", "echo-1"]);

    for instance in &instances {
        assert!(
            alive(instance.pid),
            "{} runs as pid {}",
            instance.id,
            instance.pid
        );
        let channel = Channel::to_server(Address::Unix(instance.socket()));
        let mut health = HealthClient::new(channel);
        for service in ["", "echo.v1.Echo"] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status();
            assert_eq!(
                status,
                ServingStatus::Serving,
                "{} {service:?}",
                instance.id
            );
        }
    }

    let list = RegistryClient::new(mesh.router())
        .list(ListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.services.len(), 1);
    assert_eq!(list.services[0].name, "plugin.echo");
    assert_eq!(list.services[0].instances.len(), 2);
    mesh.wait_line("plugin echo: 2/2 instances ready as plugin.echo")
        .await;
}

#[tokio::test]
async fn sigterm_stops_every_plugin_and_cleans_up() {
    let mut mesh = Mesh::start(TWO_ECHOES).await;
    let instances = mesh.wait_instances("plugin.echo", 2).await;
    let pids: Vec<u32> = instances.iter().map(|i| i.pid).collect();
    // A connected client (its registry watch stays open) must not hold the shutdown up.
    let client = mesh.connect("plugin.echo").await;

    let asked = std::time::Instant::now();
    let status = mesh.stop_with(Signal::SIGTERM).await;
    assert!(
        status.success(),
        "mesh up exits 0 after SIGTERM: {status:?}"
    );
    // Well under the router's 10 s drain limit: the watch ended rather than being cut off.
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "took {:?}",
        asked.elapsed()
    );
    drop(client);
    wait_gone(&pids, Duration::from_secs(5)).await;
    for instance in &instances {
        assert!(
            !instance.socket().exists(),
            "{} removed",
            instance.socket().display()
        );
    }
    assert!(!mesh.socket.exists(), "the router socket is removed");
    let output = mesh.output();
    assert!(output.contains("instance=echo-0}: stopping"), "{output}");
    assert!(output.contains("instance=echo-0}: stopped"), "{output}");
}

#[tokio::test]
async fn sigkill_of_the_manager_leaves_no_plugin_behind_and_a_new_one_starts_clean() {
    let mut mesh = Mesh::start(TWO_ECHOES).await;
    let instances = mesh.wait_instances("plugin.echo", 2).await;
    let pids: Vec<u32> = instances.iter().map(|i| i.pid).collect();

    mesh.stop_with(Signal::SIGKILL).await;
    // The parent-death signal kills them; nothing else could.
    wait_gone(&pids, Duration::from_secs(1)).await;
    // The dead manager left its sockets behind: a new one cleans them up and starts.
    assert!(mesh.socket.exists());
    assert!(instances[0].socket().exists());
    let mesh = mesh.relaunch().await;
    let again = mesh.wait_instances("plugin.echo", 2).await;
    assert!(again.iter().all(|i| !pids.contains(&i.pid)));
}
