//! The supervisor keeps plugins alive (restart, backoff, health), scales them, reloads its
//! config and shows all of it through the `mesh` command.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_proto::{
    echo::v1::{EchoRequest, echo_client::EchoClient},
    mesh::v1::{ScaleRequest, manager_client::ManagerClient},
};
use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;

use crate::support::{Mesh, Registered, alive, wait_gone};

fn kill(pid: u32, signal: Signal) {
    nix::sys::signal::kill(Pid::from_raw(pid as i32), signal).unwrap();
}

/// Waits until `service` has `n` instances, `id` among them with a pid other than `old_pid`:
/// the final state itself, whatever the watch showed (or coalesced away) on the way.
async fn wait_replaced(mesh: &Mesh, service: &str, n: usize, id: &str, old_pid: u32) -> Registered {
    let replaced = |i: &Registered| i.id == id && i.pid != old_pid;
    let instances = mesh
        .wait_registry(service, |found| {
            found.len() == n && found.iter().any(replaced)
        })
        .await;
    instances.into_iter().find(replaced).unwrap()
}

fn instance<'a>(status: &'a Value, plugin: &str, id: &str) -> &'a Value {
    status["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == plugin)
        .and_then(|p| {
            p["instances"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["id"] == id)
        })
        .unwrap_or_else(|| panic!("{plugin}/{id} in {status}"))
}

#[tokio::test]
async fn a_killed_instance_restarts_with_a_new_pid_and_is_routed_again() {
    let mesh = Mesh::start("[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\ninstances = 2\nbackoff_base = \"10ms\"\n").await;
    let before = mesh.wait_instances("plugin.echo", 2).await;
    let victim = before.iter().find(|i| i.id == "echo-0").unwrap().clone();
    kill(victim.pid, Signal::SIGKILL);

    let after = wait_replaced(&mesh, "plugin.echo", 2, "echo-0", victim.pid).await;
    assert!(alive(after.pid));
    let mut client = EchoClient::new(mesh.connect("plugin.echo").await);
    let mut seen = BTreeMap::<String, u32>::new();
    for _ in 0..100 {
        let reply = client
            .echo(EchoRequest {
                message: "again".into(),
            })
            .await
            .unwrap()
            .into_inner();
        *seen.entry(reply.instance).or_default() += 1;
    }
    assert!(
        seen.contains_key("echo-0"),
        "echo-0 is routed again: {seen:?}"
    );

    let status = mesh.status().await;
    let echo0 = instance(&status, "echo", "echo-0");
    assert_eq!(echo0["state"], "ready");
    assert_eq!(echo0["pid"], after.pid);
    assert_eq!(echo0["restarts"], 1);
    assert_eq!(echo0["last_exit"], "killed by SIGKILL");
    assert_eq!(instance(&status, "echo", "echo-1")["restarts"], 0);
    let table = mesh.cli_ok(&["status"]).await;
    assert!(table.contains("killed by SIGKILL"), "{table}");
}

/// The restart delays the manager logged for `id`, in order.
fn delays(output: &str, id: &str) -> Vec<u64> {
    let needle = format!("instance={id}}}: backoff: restarting in ");
    output
        .lines()
        .filter_map(|l| l.split_once(&needle))
        .map(|(_, rest)| rest.trim_end_matches(" ms").parse().unwrap())
        .collect()
}

#[tokio::test]
async fn backoff_grows_across_crashes_and_resets_after_a_healthy_period() {
    let mesh = Mesh::start(
        "[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\nrestart = \"always\"\n\
         backoff_base = \"100ms\"\nbackoff_max = \"10s\"\nbackoff_reset = \"1500ms\"\nmax_failures = 100\n",
    )
    .await;
    let mut pid = mesh.wait_instances("plugin.echo", 1).await[0].pid;
    // Three crashes in a row, each as soon as the instance is back.
    for _ in 0..3 {
        kill(pid, Signal::SIGKILL);
        pid = wait_replaced(&mesh, "plugin.echo", 1, "echo-0", pid)
            .await
            .pid;
    }
    let grown = delays(&mesh.output(), "echo-0");
    assert_eq!(grown.len(), 3, "{grown:?}");
    // Equal jitter: attempt k waits between half and all of 100 ms × 2^k.
    for (k, delay) in grown.iter().enumerate() {
        let ceiling = 100 << k;
        assert!(
            (ceiling / 2..=ceiling).contains(delay),
            "attempt {k}: {delay} ms, expected up to {ceiling}"
        );
    }

    // Healthy for longer than backoff_reset: the next delay starts over. Time passing is
    // the thing under test here.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    kill(pid, Signal::SIGKILL);
    wait_replaced(&mesh, "plugin.echo", 1, "echo-0", pid).await;
    let all = delays(&mesh.output(), "echo-0");
    assert!(
        (50..=100).contains(&all[3]),
        "after a healthy period: {all:?}"
    );
}

#[tokio::test]
async fn a_plugin_that_exits_at_once_is_failed_after_n_tries_and_others_are_untouched() {
    let dir = crate::support::short_tempdir();
    let bad = crate::support::script(dir.path(), "bad", "echo 'cannot open database' >&2\nexit 1");
    let mesh = Mesh::start(&format!(
        "[[plugin]]\nname = \"echo\"\ncommand = \"{{echo}}\"\n\n\
         [[plugin]]\nname = \"bad\"\ncommand = \"{}\"\nbackoff_base = \"10ms\"\nmax_failures = 3\n",
        bad.display()
    ))
    .await;
    let echo = mesh.wait_instances("plugin.echo", 1).await;
    let failed = mesh.wait_state("bad", "bad-0", "failed").await;
    assert!(
        failed.detail.contains("3 failures within 60s, giving up"),
        "{failed:?}"
    );
    assert!(
        failed.detail.contains("last stderr: cannot open database"),
        "{failed:?}"
    );

    let status = mesh.status().await;
    let bad0 = instance(&status, "bad", "bad-0");
    assert_eq!(bad0["state"], "failed");
    assert_eq!(
        bad0["restarts"], 2,
        "three tries: the first and two restarts"
    );
    assert_eq!(
        bad0["last_exit"]
            .as_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap(),
        "instance bad-0 exited with status 1 before it was ready"
    );
    let echo0 = instance(&status, "echo", "echo-0");
    assert_eq!(echo0["state"], "ready");
    assert_eq!(echo0["pid"], echo[0].pid);
    assert_eq!(echo0["restarts"], 0);

    // An operator can try again once the cause is fixed.
    std::fs::write(
        &bad,
        format!(
            "#!/bin/sh\nexec {} \"$@\"\n",
            crate::support::echo_plugin().display()
        ),
    )
    .unwrap();
    mesh.cli_ok(&["start", "bad"]).await;
    mesh.wait_instances("plugin.bad", 1).await;
}

#[tokio::test]
async fn an_instance_that_turns_not_serving_leaves_routing_and_is_restarted() {
    let mesh = Mesh::start(
        "[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\ninstances = 2\n\
         health_interval = \"100ms\"\nhealth_failures = 5\nbackoff_base = \"10ms\"\n",
    )
    .await;
    let before = mesh.wait_instances("plugin.echo", 2).await;
    let echo0 = before.iter().find(|i| i.id == "echo-0").unwrap().clone();

    // SIGUSR1: the plugin SDK reports NOT_SERVING without exiting.
    kill(echo0.pid, Signal::SIGUSR1);
    let left = mesh.wait_instances("plugin.echo", 1).await;
    assert_eq!(left[0].id, "echo-1", "out of routing at once");
    mesh.wait_line("instance=echo-0}: unhealthy").await;
    let back = wait_replaced(&mesh, "plugin.echo", 2, "echo-0", echo0.pid).await;
    mesh.wait_line("instance echo-0 failed 5 health checks in a row")
        .await;
    wait_gone(&[echo0.pid], Duration::from_secs(5)).await;

    // Recovering before the limit puts the same process back in routing.
    kill(back.pid, Signal::SIGUSR1);
    mesh.wait_instances("plugin.echo", 1).await;
    kill(back.pid, Signal::SIGUSR2);
    let again = mesh.wait_instances("plugin.echo", 2).await;
    let echo0 = again.iter().find(|i| i.id == "echo-0").unwrap();
    // health_failures = 5 at 100 ms: the recovery lands well before a restart would.
    assert_eq!(echo0.pid, back.pid, "same process, back in routing");
}

/// Unary calls through a `mesh::connect` handle until `stop`, counting successes and failures
/// (bounded: at most 60 s).
fn load(
    channel: mesh::Channel,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64, BTreeMap<String, u64>)> {
    tokio::spawn(async move {
        let ok = AtomicU64::new(0);
        let failed = AtomicU64::new(0);
        let mut by_instance = BTreeMap::new();
        let mut client = EchoClient::new(channel);
        let until = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < until {
            match client
                .echo(EchoRequest {
                    message: "load".into(),
                })
                .await
            {
                Ok(reply) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                    *by_instance.entry(reply.into_inner().instance).or_insert(0) += 1;
                }
                Err(status) => {
                    eprintln!("call failed: {status}");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        (ok.into_inner(), failed.into_inner(), by_instance)
    })
}

#[tokio::test]
async fn scaling_up_and_down_through_the_cli_and_the_api_keeps_calls_succeeding() {
    let mesh = Mesh::start("[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\n").await;
    mesh.wait_instances("plugin.echo", 1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(mesh.connect("plugin.echo").await, stop.clone());

    let table = mesh.cli_ok(&["scale", "echo", "4"]).await;
    assert_eq!(table.matches(" ready ").count(), 4, "{table}");
    let four = mesh.wait_instances("plugin.echo", 4).await;

    let mut manager = ManagerClient::new(mesh.router());
    let plugin = manager
        .scale(ScaleRequest {
            name: "echo".into(),
            instances: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plugin.desired, 2);
    let ids: Vec<&str> = plugin.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["echo-0", "echo-1"], "the newest are stopped first");
    let two = mesh.wait_instances("plugin.echo", 2).await;
    let dropped: Vec<u32> = four
        .iter()
        .filter(|i| i.id == "echo-2" || i.id == "echo-3")
        .map(|i| i.pid)
        .collect();
    wait_gone(&dropped, Duration::from_secs(5)).await;

    stop.store(true, Ordering::Relaxed);
    let (ok, failed, by_instance) = running.await.unwrap();
    assert_eq!(failed, 0, "no call fails while scaling ({ok} succeeded)");
    assert!(
        by_instance.len() >= 2,
        "calls reached the new instances: {by_instance:?}"
    );
    assert_eq!(two.len(), 2);

    let out = mesh.cli(&["scale", "echo", "5000"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot scale to 5000 instances; use 0 to 1024")
    );
    let out = mesh.cli(&["scale", "nope", "2"]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("no plugin named \"nope\""));
}

#[tokio::test]
async fn stop_start_and_restart_through_the_cli() {
    let mesh =
        Mesh::start("[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\ninstances = 2\n").await;
    let first = mesh.wait_instances("plugin.echo", 2).await;

    let table = mesh.cli_ok(&["restart", "echo"]).await;
    assert_eq!(table.matches(" ready ").count(), 2, "{table}");
    let restarted = mesh.wait_instances("plugin.echo", 2).await;
    for (old, new) in first.iter().zip(&restarted) {
        assert_ne!(old.pid, new.pid, "{} restarted", old.id);
    }

    let table = mesh.cli_ok(&["stop", "echo"]).await;
    assert_eq!(table.matches(" stopped ").count(), 2, "{table}");
    mesh.wait_instances("plugin.echo", 0).await;
    wait_gone(
        &restarted.iter().map(|i| i.pid).collect::<Vec<_>>(),
        Duration::from_secs(5),
    )
    .await;

    mesh.cli_ok(&["start", "echo"]).await;
    mesh.wait_instances("plugin.echo", 2).await;
}

#[tokio::test]
async fn reload_adds_removes_restarts_and_rescales_and_refuses_a_bad_config() {
    let plugin = |name: &str, instances: u32, env: &str| {
        format!(
            "[[plugin]]\nname = \"{name}\"\ncommand = \"{{echo}}\"\ninstances = {instances}\nenv = {{ MODE = \"{env}\" }}\n\n"
        )
    };
    let mesh = Mesh::start(
        &[
            plugin("a", 1, "one"),
            plugin("b", 1, "one"),
            plugin("c", 2, "one"),
        ]
        .concat(),
    )
    .await;
    let a = mesh.wait_instances("plugin.a", 1).await;
    mesh.wait_instances("plugin.b", 1).await;
    let c = mesh.wait_instances("plugin.c", 2).await;

    mesh.rewrite(
        &[
            plugin("a", 1, "two"),
            plugin("c", 1, "one"),
            plugin("d", 1, "one"),
        ]
        .concat(),
    );
    let report = mesh.cli_ok(&["reload"]).await;
    assert!(report.contains("added: d"), "{report}");
    assert!(report.contains("removed: b"), "{report}");
    assert!(report.contains("restarted: a"), "{report}");
    assert!(report.contains("scaled: c"), "{report}");
    let a2 = mesh.wait_instances("plugin.a", 1).await;
    assert_ne!(a2[0].pid, a[0].pid, "a's settings changed: restarted");
    assert_eq!(
        mesh.wait_instances("plugin.c", 1).await[0].pid,
        c[0].pid,
        "c kept its first instance"
    );
    mesh.wait_instances("plugin.b", 0).await;
    mesh.wait_instances("plugin.d", 1).await;

    // An invalid config is refused with its error, and nothing changes.
    mesh.rewrite(&format!(
        "{}[[plugin]]\nname = \"e\"\ncomand = \"x\"\n",
        plugin("a", 1, "two")
    ));
    let out = mesh.cli(&["reload"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reload refused, nothing changed"),
        "{stderr}"
    );
    assert!(stderr.contains("unknown field `comand`"), "{stderr}");
    assert_eq!(mesh.wait_instances("plugin.a", 1).await[0].pid, a2[0].pid);
    mesh.wait_instances("plugin.c", 1).await;
    mesh.wait_instances("plugin.d", 1).await;

    // SIGHUP reloads too.
    mesh.rewrite(
        &[
            plugin("a", 1, "two"),
            plugin("c", 1, "one"),
            plugin("d", 1, "one"),
            plugin("e", 1, "one"),
        ]
        .concat(),
    );
    kill(mesh.pid(), Signal::SIGHUP);
    mesh.wait_instances("plugin.e", 1).await;
}

#[tokio::test]
async fn logs_follow_shows_what_plugins_write_to_stdout_and_stderr() {
    let mesh =
        Mesh::start("[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\nbackoff_base = \"10ms\"\n")
            .await;
    let first = mesh.wait_instances("plugin.echo", 1).await[0].pid;

    let kept = mesh.cli_ok(&["logs", "echo"]).await;
    assert!(
        kept.contains(&format!(
            "echo-0 stdout: echo-plugin echo-0 starting (pid {first})"
        )),
        "{kept}"
    );
    assert!(
        kept.contains("echo-0 stderr: ") && kept.contains("serving"),
        "{kept}"
    );

    let mut follow = tokio::process::Command::new(crate::support::mesh_bin())
        .args(["logs", "echo", "-f", "-n", "1"])
        .env("MESH_SOCKET", &mesh.socket)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(follow.stdout.take().unwrap()));
    // The stream subscribes to new lines before it sends the kept ones: once the kept line is
    // here, whatever comes next will be followed.
    let kept = tokio::time::timeout(crate::support::DEADLINE, lines.next_line())
        .await
        .expect("the kept line arrives")
        .unwrap()
        .expect("mesh logs -f ended early");
    assert!(kept.starts_with("echo-0 "), "{kept}");
    // New lines arrive as a restarted instance writes them.
    kill(first, Signal::SIGKILL);
    let second = wait_replaced(&mesh, "plugin.echo", 1, "echo-0", first)
        .await
        .pid;
    let wanted_stdout = format!("echo-0 stdout: echo-plugin echo-0 starting (pid {second})");
    let (mut saw_stdout, mut saw_stderr) = (false, false);
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            saw_stdout |= line == wanted_stdout;
            saw_stderr |= line.starts_with("echo-0 stderr: ") && line.contains("serving");
            if saw_stdout && saw_stderr {
                return;
            }
        }
    };
    tokio::time::timeout(crate::support::DEADLINE, read)
        .await
        .expect("followed lines arrive");
}

#[tokio::test]
async fn status_json_agrees_with_what_runs() {
    let dir = crate::support::short_tempdir();
    // The plugin user must be able to pass through to its working directory.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let root = nix::unistd::Uid::effective().is_root();
    // Dropping privileges needs root; CI runs as root, a developer may not.
    let user = if root { "user = \"nobody\"\n" } else { "" };
    let mesh = Mesh::start(&format!(
        "[[plugin]]\nname = \"echo\"\ncommand = \"{{echo}}\"\ninstances = 3\nworking_dir = \"{}\"\n{user}\
         limits = {{ open_files = 256, cpu_seconds = 3600 }}\n",
        work.display()
    ))
    .await;
    let registered = mesh.wait_instances("plugin.echo", 3).await;
    let status = mesh.status().await;
    let plugin = &status["plugins"][0];
    assert_eq!(plugin["name"], "echo");
    assert_eq!(plugin["service"], "plugin.echo");
    assert_eq!(plugin["desired"], 3);
    for r in &registered {
        let i = instance(&status, "echo", &r.id);
        assert_eq!(i["state"], "ready");
        assert_eq!(i["pid"], r.pid);
        assert!(alive(r.pid));
        assert!(i["uptime_ms"].as_u64().is_some());
        assert_eq!(i["last_exit"], Value::Null);

        let limits = std::fs::read_to_string(format!("/proc/{}/limits", r.pid)).unwrap();
        let open_files = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        assert_eq!(
            open_files.split_whitespace().collect::<Vec<_>>()[3..5],
            ["256", "256"],
            "{open_files}"
        );
        let cpu = limits
            .lines()
            .find(|l| l.starts_with("Max cpu time"))
            .unwrap();
        assert!(cpu.contains("3600"), "{cpu}");
        assert_eq!(
            std::fs::read_link(format!("/proc/{}/cwd", r.pid)).unwrap(),
            work
        );
        if root {
            let proc_status = std::fs::read_to_string(format!("/proc/{}/status", r.pid)).unwrap();
            let uid = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap();
            let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid;
            assert!(
                uid.split_whitespace()
                    .skip(1)
                    .all(|u| u == nobody.to_string()),
                "{uid}"
            );
        }
    }
}
