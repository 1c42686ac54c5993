//! What the hardening review found (issue 10): each test performs the attack or feeds the bad
//! input, and checks the documented outcome and that what already ran keeps running.

use std::{path::Path, process::Command};

use mesh_proto::echo::v1::{EchoRequest, echo_client::EchoClient};

use crate::support::{Mesh, echo_plugin, mesh_bin, script, short_tempdir, write_config};

const ECHO: &str = "[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\n";

async fn echo_answers(mesh: &Mesh) {
    let mut client = EchoClient::new(mesh.connect("plugin.echo").await);
    let reply = client
        .echo(EchoRequest {
            message: "still here".into(),
        })
        .await
        .expect("plugin.echo answers");
    assert_eq!(reply.into_inner().message, "still here");
}

/// Runs `mesh` with `args` and `env`; returns (exit code, stdout, stderr).
fn mesh(args: &[&str], env: &[(&str, &Path)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(mesh_bin());
    command.args(args).env_remove("MESH_SOCKET");
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn mesh_up_listens_on_mesh_socket_and_socket_over_the_config() {
    for by_flag in [false, true] {
        let dir = short_tempdir();
        write_config(&dir, "", ECHO);
        let config = dir.path().join("mesh.toml");
        let socket = dir.path().join("elsewhere/mesh.sock");
        let given = socket.clone();
        let mesh = Mesh::launch_with(dir, config, socket.clone(), move |command| {
            if by_flag {
                command.arg("--socket").arg(&given);
            } else {
                command.env("MESH_SOCKET", &given);
            }
        })
        .await;
        mesh.wait_instances("plugin.echo", 1).await;
        // The commands find it through the same variable, and so do the plugins.
        let (code, stdout, stderr) = self::mesh(&["status"], &[("MESH_SOCKET", &socket)]);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(
            stdout.contains("echo-0") && stdout.contains("ready"),
            "{stdout}"
        );
        let file_socket = mesh.config.parent().unwrap().join("run/mesh.sock");
        assert!(!file_socket.exists(), "the config's socket is not used");
        echo_answers(&mesh).await;
        // A reload keeps the socket it was given: nothing to ignore.
        let reload = mesh.cli_ok(&["reload"]).await;
        assert!(!reload.contains("ignored"), "{reload}");
    }
}

#[tokio::test]
async fn a_command_that_is_a_symlink_runs_by_the_path_given() {
    // A virtualenv's bin/python is a symlink that finds its environment from the path it was
    // started by: this plugin serves only when started as venv/bin/plugin.
    let dir = short_tempdir();
    std::fs::create_dir_all(dir.path().join("real")).unwrap();
    std::fs::create_dir_all(dir.path().join("venv/bin")).unwrap();
    script(
        &dir.path().join("real"),
        "plugin.sh",
        &format!(
            "case \"$0\" in\n  */venv/bin/plugin) exec {} ;;\n  *) echo \"started as $0, not through the venv\" >&2; exit 1 ;;\nesac",
            echo_plugin().display()
        ),
    );
    let link = dir.path().join("venv/bin/plugin");
    std::os::unix::fs::symlink("../../real/plugin.sh", &link).unwrap();
    let mesh = Mesh::start(&format!(
        "[[plugin]]\nname = \"echo\"\ncommand = \"{}\"\nrestart = \"never\"\n",
        link.display()
    ))
    .await;
    mesh.wait_instances("plugin.echo", 1).await;
    echo_answers(&mesh).await;
}

#[test]
fn mesh_up_refuses_a_planted_runtime_dir_with_one_line() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = short_tempdir();
    let run = dir.path().join("run");
    let config = dir.path().join("mesh.toml");
    let plant = |how: &str| {
        let _ = std::fs::remove_file(&run);
        let _ = std::fs::remove_dir_all(&run);
        match how {
            "writable by others" => {
                std::fs::create_dir(&run).unwrap();
                std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
            }
            "a symlink" => {
                let target = dir.path().join("target");
                std::fs::create_dir_all(&target).unwrap();
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
                std::os::unix::fs::symlink(&target, &run).unwrap();
            }
            "owned by another user" => {
                std::fs::create_dir(&run).unwrap();
                std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
                std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
            }
            _ => unreachable!(),
        }
    };
    let mut cases = vec![
        (
            "writable by others",
            "is writable by group or others (mode 0777)",
        ),
        ("a symlink", "is a symlink (to "),
    ];
    if nix::unistd::geteuid().is_root() {
        cases.push(("owned by another user", "is owned by uid 65534"));
    }
    for (how, problem) in cases {
        write_config(&dir, "", ECHO);
        plant(how);
        let (code, _, stderr) = mesh(&["up", "--config", config.to_str().unwrap()], &[]);
        assert!(
            code.is_some_and(|c| c != 0),
            "{how}: exit {code:?}: {stderr}"
        );
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{how}: one line: {stderr}"
        );
        assert!(
            stderr.contains(&format!("runtime directory {} {problem}", run.display())),
            "{how}: {stderr}"
        );
        assert!(
            stderr.contains("remove it"),
            "{how}: says the fix: {stderr}"
        );
        // Nothing was created in it or changed about it.
        let target = std::fs::canonicalize(&run).unwrap();
        assert!(!target.join("mesh.sock").exists(), "{how}");
        assert!(!target.join("echo").exists(), "{how}");
        let meta = std::fs::metadata(&run).unwrap();
        if how == "a symlink" {
            assert_eq!(meta.mode() & 0o777, 0o755, "the target is not chmodded");
        }
    }
}

#[tokio::test]
async fn a_second_mesh_up_on_a_busy_socket_says_so_once() {
    let first = Mesh::start(ECHO).await;
    first.wait_instances("plugin.echo", 1).await;
    let (code, _, stderr) = mesh(&["up", "--config", first.config.to_str().unwrap()], &[]);
    assert!(code.is_some_and(|c| c != 0), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("in use")).collect();
    assert_eq!(errors.len(), 1, "one line: {stderr}");
    assert_eq!(
        errors[0].matches("in use").count(),
        1,
        "said once: {stderr}"
    );
    assert!(
        errors[0].contains(&first.socket.display().to_string()),
        "{stderr}"
    );
    echo_answers(&first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_task_that_panics_leaves_the_instance_failed_and_out_of_the_registry() {
    use mesh_manager::{Config, Supervisor, supervisor::State};
    // The config refuses health_interval = "0s" now (it made each instance task panic); a
    // value handed in directly stands for any bug that makes the task panic once ready.
    let dir = short_tempdir();
    write_config(&dir, "", ECHO);
    let path = dir.path().join("mesh.toml");
    let mut config = Config::parse(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut plugin = config.plugins.remove(0);
    plugin.health_interval = std::time::Duration::ZERO;
    let socket = plugin.socket(&plugin.instance_id(0));
    let registry = mesh_router::registry::Registry::new();
    let supervisor = Supervisor::new(registry.clone(), dir.path().join("mesh.sock"));
    supervisor.add(plugin).unwrap();
    // The task panics at its first health tick, once ready: `settled` may see either state.
    supervisor.settled("echo").await.unwrap();
    crate::support::eventually("the instance is failed", crate::support::DEADLINE, || {
        supervisor.get("echo").unwrap().instances[0].state.name() == "failed"
    })
    .await;
    let status = supervisor.get("echo").unwrap();
    let State::Failed { reason } = &status.instances[0].state else {
        panic!("not failed: {status:?}");
    };
    assert!(reason.contains("panicked"), "{reason}");
    assert!(registry.resolve("plugin.echo").is_empty(), "deregistered");
    // Its process is known by the socket it was told to serve on.
    let told = format!("PLUGIN_SOCKET={}", socket.display());
    crate::support::eventually(
        "no process serves the failed instance",
        crate::support::DEADLINE,
        || !serving_processes(&told),
    )
    .await;
    // Its process is gone too, and stop and start work on it.
    let last = supervisor.stop("echo").await.unwrap();
    assert_eq!(last.instances[0].state.name(), "failed");
    assert!(last.instances[0].state.pid().is_none());
    supervisor.shutdown().await;
}

#[test]
fn config_values_that_used_to_panic_the_supervisor_are_refused_at_load() {
    let dir = short_tempdir();
    let config = dir.path().join("mesh.toml");
    for (line, needle) in [
        (
            "health_interval = \"0s\"",
            "health_interval = \"0s\" is out of range; use 10ms to 1h",
        ),
        (
            "drain_delay = \"1000000h\"",
            "drain_delay = \"1000000h\" is out of range",
        ),
        (
            "ready_timeout = \"0s\"",
            "ready_timeout = \"0s\" is out of range",
        ),
        ("env = { A = \"a\\u0000b\" }", "NUL"),
    ] {
        write_config(&dir, "", &format!("{ECHO}{line}\n"));
        let (code, _, stderr) = mesh(&["up", "--config", config.to_str().unwrap()], &[]);
        assert_eq!(code, Some(64), "{line}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{line}: {stderr}");
        let written = std::fs::read_to_string(&config).unwrap();
        let at = 1 + written
            .lines()
            .position(|l| l == line)
            .expect("the line is written");
        assert!(
            stderr.contains(&format!(":{at}: plugin \"echo\": ")),
            "{line}: {stderr}"
        );
        assert!(stderr.contains(needle), "{line}: {stderr}");
    }
}

/// Whether a live process has `variable` (`NAME=value`) in its environment.
fn serving_processes(variable: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            return false;
        };
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        crate::support::alive(pid)
            && environ
                .split(|b| *b == 0)
                .any(|entry| entry == variable.as_bytes())
    })
}

/// Every process descending from `root`, from `/proc` (parent links).
fn descendants(root: u32) -> Vec<(u32, String)> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid: u32 = rest.split_whitespace().nth(1).unwrap().parse().unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        parents.push((pid, ppid, cmdline));
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parents.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    parents
        .into_iter()
        .filter(|p| found[1..].contains(&p.0))
        .map(|(pid, _, cmdline)| (pid, cmdline))
        .collect()
}

#[tokio::test]
async fn nothing_a_plugin_starts_outlives_a_sigkilled_manager_and_the_next_mesh_up_starts_clean() {
    let plugin = "[[plugin]]\nname = \"echo\"\ncommand = \"/bin/sh\"\n\
                  args = [\"-c\", \"sleep 300 & exec {echo}\"]\n";
    let mut mesh = Mesh::start(plugin).await;
    let registered = mesh.wait_instances("plugin.echo", 1).await;
    let tree = descendants(mesh.pid());
    assert!(
        tree.iter().any(|(_, cmd)| cmd.starts_with("sleep 300")),
        "the grandchild runs: {tree:?}"
    );
    assert!(
        tree.iter().any(|(pid, _)| *pid == registered[0].pid),
        "{tree:?}"
    );

    mesh.stop_with(nix::sys::signal::Signal::SIGKILL).await;
    let pids: Vec<u32> = tree.iter().map(|(pid, _)| *pid).collect();
    crate::support::wait_gone(&pids, crate::support::DEADLINE).await;

    // The dead manager's sockets are left behind; the next mesh up replaces them.
    assert!(registered[0].socket().exists());
    let mesh = mesh.relaunch().await;
    let again = mesh.wait_instances("plugin.echo", 1).await;
    assert_ne!(again[0].pid, registered[0].pid);
    echo_answers(&mesh).await;
}

#[tokio::test]
async fn a_process_still_serving_on_an_instance_socket_is_named_and_left_alone() {
    // Someone (here: this test) serves on the socket echo-0 would use.
    let dir = short_tempdir();
    write_config(
        &dir,
        "",
        &format!(
            "{ECHO}restart = \"never\"\n\n[[plugin]]\nname = \"other\"\ncommand = \"{{echo}}\"\n"
        ),
    );
    let socket_dir = dir.path().join("run/echo");
    std::fs::create_dir_all(&socket_dir).unwrap();
    std::fs::set_permissions(
        dir.path().join("run"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    std::fs::set_permissions(
        &socket_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let squatter = std::os::unix::net::UnixListener::bind(socket_dir.join("echo-0.sock")).unwrap();
    let config = dir.path().join("mesh.toml");
    let socket = dir.path().join("run/mesh.sock");
    let mesh = Mesh::launch_with(dir, config, socket, |_| {}).await;
    mesh.wait_instances("plugin.other", 1).await;

    let status = mesh.status().await;
    let echo = &status["plugins"][0]["instances"][0];
    assert_eq!(echo["state"], "failed", "{status}");
    let detail = echo["detail"].as_str().unwrap();
    let me = std::process::id();
    assert!(
        detail.contains(&format!(
            "echo-0.sock is in use by a running process (pid {me}, "
        )),
        "names the holder: {detail}"
    );
    // Left alone: still bound and accepting.
    drop(
        std::os::unix::net::UnixStream::connect(
            squatter.local_addr().unwrap().as_pathname().unwrap(),
        )
        .unwrap(),
    );
    squatter.accept().unwrap();
    let mut client = EchoClient::new(mesh.connect("plugin.other").await);
    client
        .echo(EchoRequest {
            message: "x".into(),
        })
        .await
        .expect("the other plugin serves");
}

#[tokio::test]
async fn a_crash_loop_is_reported_once_without_repeating_itself() {
    let dir = short_tempdir();
    let bad = script(dir.path(), "bad", "echo 'cannot open database' >&2\nexit 1");
    let mesh = Mesh::start(&format!(
        "{ECHO}\n[[plugin]]\nname = \"bad\"\ncommand = \"{}\"\nbackoff_base = \"1ms\"\nmax_failures = 5\n",
        bad.display()
    ))
    .await;
    mesh.wait_line("instance=bad-0}: failed:").await;
    let status = mesh.status().await;
    let bad0 = &status["plugins"][0]["instances"][0];
    assert_eq!(bad0["state"], "failed", "{status}");
    let detail = bad0["detail"].as_str().unwrap();
    assert_eq!(
        detail, "5 failures within 60s, giving up; last stderr: cannot open database (×5)",
        "the same line five times is said once"
    );
    let last_exit = bad0["last_exit"].as_str().unwrap();
    assert_eq!(
        last_exit,
        "instance bad-0 exited with status 1 before it was ready"
    );

    // The table: LAST EXIT and DETAIL say different things.
    let table = mesh.cli_ok(&["status"]).await;
    let row = table.lines().find(|l| l.contains("bad-0")).unwrap();
    assert_eq!(row.matches("exited with status 1").count(), 1, "{row}");
    assert_eq!(row.matches("cannot open database").count(), 1, "{row}");

    // "giving up" is logged once.
    let output = mesh.output();
    assert_eq!(output.matches("giving up").count(), 1, "{output}");
    echo_answers(&mesh).await;
}

#[tokio::test]
async fn a_reload_whose_action_fails_says_so_and_exits_non_zero() {
    let dir = short_tempdir();
    let bad = script(dir.path(), "bad", "echo 'no database' >&2\nexit 1");
    let mesh = Mesh::start(ECHO).await;
    let before = mesh.wait_instances("plugin.echo", 1).await;
    mesh.rewrite(&format!(
        "{ECHO}\n[[plugin]]\nname = \"bad\"\ncommand = \"{}\"\nrestart = \"never\"\n",
        bad.display()
    ));
    let out = mesh.cli(&["reload"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("added: bad"), "{stdout}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("reload applied, but 1 action(s) failed: bad: bad-0 failed:")
            && stderr.contains("last stderr: no database"),
        "{stderr}"
    );
    // What ran keeps running.
    assert_eq!(mesh.wait_instances("plugin.echo", 1).await, before);
    echo_answers(&mesh).await;
}
