//! `mesh up` under a service manager: what it says on `NOTIFY_SOCKET` (systemd's sd_notify),
//! read from a datagram socket of our own as systemd would.

use nix::sys::signal::Signal;
use tokio::net::UnixDatagram;

use crate::support::{DEADLINE, Mesh, short_tempdir, write_config};

/// The notification socket, as systemd's end of it.
struct Notifications(UnixDatagram);

impl Notifications {
    /// The next datagram's lines, failing the test after [`DEADLINE`].
    async fn next(&self) -> Vec<String> {
        let mut buf = vec![0; 4096];
        let n = tokio::time::timeout(DEADLINE, self.0.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no notification within {DEADLINE:?}"))
            .expect("recv on the notification socket");
        String::from_utf8(buf[..n].to_vec())
            .expect("UTF-8")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Skips watchdog pings until a datagram that is not one arrives; returns it and the
    /// number of pings skipped.
    async fn next_beyond_watchdog(&self) -> (Vec<String>, usize) {
        let mut pings = 0;
        loop {
            let lines = self.next().await;
            if lines == ["WATCHDOG=1"] {
                pings += 1;
            } else {
                return (lines, pings);
            }
        }
    }
}

#[tokio::test]
async fn mesh_up_notifies_ready_reloading_stopping_and_pings_the_watchdog() {
    let dir = short_tempdir();
    let plugins = r#"
[[plugin]]
name = "echo"
command = "{echo}"
instances = 2
"#;
    write_config(&dir, "", plugins);
    let notify = dir.path().join("notify");
    let notifications = Notifications(UnixDatagram::bind(&notify).unwrap());
    let config = dir.path().join("mesh.toml");
    let socket = dir.path().join("run/mesh.sock");
    let mut mesh = Mesh::launch_with(dir, config, socket, move |command| {
        command
            .env("NOTIFY_SOCKET", &notify)
            // 200 ms: a ping every 100 ms. No WATCHDOG_PID: the watchdog is meant for the
            // process that reads the variable (sd-notify's semantics, as sd_watchdog_enabled).
            .env("WATCHDOG_USEC", "200000")
            .env_remove("WATCHDOG_PID");
    })
    .await;

    // READY=1 only once both instances had their chance: by then both are ready.
    let (ready, _) = notifications.next_beyond_watchdog().await;
    assert_eq!(ready, ["READY=1"], "{}", mesh.output());
    let status = mesh.status().await;
    let states: Vec<&serde_json::Value> = status["plugins"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["state"])
        .collect();
    assert_eq!(states, ["ready", "ready"], "{status}");
    let instances = mesh.wait_instances("plugin.echo", 2).await;
    mesh.wait_line("plugin echo: 2/2 instances ready").await;

    // The watchdog keeps being pinged.
    for _ in 0..3 {
        assert_eq!(notifications.next().await, ["WATCHDOG=1"]);
    }

    // The plugins never see the service manager's variables.
    for instance in &instances {
        let environ = std::fs::read(format!("/proc/{}/environ", instance.pid)).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        for variable in ["NOTIFY_SOCKET=", "WATCHDOG_USEC="] {
            assert!(
                !environ.split('\0').any(|v| v.starts_with(variable)),
                "{} inherited {variable}",
                instance.id
            );
        }
    }

    mesh.cli_ok(&["reload"]).await;
    let (reloading, _) = notifications.next_beyond_watchdog().await;
    assert_eq!(reloading[0], "RELOADING=1", "{reloading:?}");
    assert!(
        reloading.iter().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "Type=notify-reload wants MONOTONIC_USEC with RELOADING=1: {reloading:?}"
    );
    let (ready, _) = notifications.next_beyond_watchdog().await;
    assert_eq!(ready, ["READY=1"]);

    // The datagrams wait in our socket's queue: read them once mesh up has exited.
    let status = mesh.stop_with(Signal::SIGTERM).await;
    assert!(status.success(), "{status:?}\n{}", mesh.output());
    let (stopping, _) = notifications.next_beyond_watchdog().await;
    assert_eq!(stopping, ["STOPPING=1"]);
    // mesh up has exited: what is left in the queue is all it sent after STOPPING=1.
    let mut buf = [0; 4096];
    while let Ok(n) = notifications.0.try_recv(&mut buf) {
        let after = String::from_utf8_lossy(&buf[..n]);
        assert_eq!(after, "WATCHDOG=1\n", "sent after STOPPING=1");
    }
}
