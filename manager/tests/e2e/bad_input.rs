//! Bad input gets one clear message naming the thing and the fix, and never takes down what
//! already runs.

use std::{path::Path, process::Command};

use mesh_proto::echo::v1::{EchoRequest, echo_client::EchoClient};

use crate::support::{Mesh, echo_plugin, mesh_bin, script, short_tempdir};

/// Runs `mesh up` on `config`; returns (exit code, stderr).
fn up(config: &Path) -> (Option<i32>, String) {
    let out = Command::new(mesh_bin())
        .args(["up", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn config_errors_exit_64_with_one_line_naming_the_place_and_the_fix() {
    let dir = short_tempdir();
    let echo = echo_plugin().display().to_string();
    let long_dir = format!("/tmp/{}", "d".repeat(100));
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown field",
            format!("[[plugin]]\nname = \"echo\"\ncomand = \"{echo}\"\n"),
            vec![
                ":3:",
                "unknown field `comand`",
                "remove it or correct its spelling",
            ],
        ),
        (
            "missing command",
            "[[plugin]]\nname = \"echo\"\n".into(),
            vec![
                ":1:",
                "missing field `command`",
                "add command = \"/path/to/plugin\"",
            ],
        ),
        (
            "binary not found",
            "[[plugin]]\nname = \"echo\"\ncommand = \"./no-such-plugin\"\n".into(),
            vec![
                ":3:",
                "command \"./no-such-plugin\" not found",
                "set command to an absolute path",
            ],
        ),
        (
            "duplicate name",
            format!(
                "[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\n\n[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\n"
            ),
            vec![
                ":6:",
                "plugin \"echo\" is defined twice (first at line 1)",
                "unique name",
            ],
        ),
        (
            "invalid service name",
            format!("[[plugin]]\nname = \"Echo_1\"\ncommand = \"{echo}\"\n"),
            vec![
                ":2:",
                "invalid service name \"plugin.Echo_1\"",
                "'E' is not allowed",
                "such as echo",
            ],
        ),
        (
            "socket path too long",
            format!(
                "[mesh]\nruntime_dir = \"{long_dir}\"\n\n[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\n"
            ),
            vec![":2:", "107-byte limit", "shorter runtime directory"],
        ),
        (
            "admin listener beyond loopback",
            "[admin]\nlisten = \"0.0.0.0:9900\"\n".into(),
            vec![":2:", "not a loopback address", "allow_non_loopback = true"],
        ),
    ];
    for (case, text, expected) in cases {
        let config = dir.path().join("mesh.toml");
        std::fs::write(&config, text).unwrap();
        let (code, stderr) = up(&config);
        assert_eq!(code, Some(64), "{case}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{case}: one line: {stderr}"
        );
        assert!(
            stderr.starts_with(&format!("mesh: {}", config.display())),
            "{case}: names the file: {stderr}"
        );
        for needle in expected {
            assert!(stderr.contains(needle), "{case}: {needle:?} in {stderr}");
        }
    }
    let (code, stderr) = up(&dir.path().join("missing.toml"));
    assert_eq!(code, Some(64));
    assert!(
        stderr.contains("cannot read the config file") && stderr.contains("--config"),
        "{stderr}"
    );
}

async fn echo_answers(mesh: &Mesh) {
    let mut client = EchoClient::new(mesh.connect("plugin.echo").await);
    let reply = client
        .echo(EchoRequest {
            message: "still here".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().message, "still here");
}

#[tokio::test]
async fn a_plugin_that_exits_at_once_fails_with_its_stderr_and_others_keep_serving() {
    let dir = short_tempdir();
    let bad = script(
        dir.path(),
        "bad",
        "echo 'boom: setting FOO is missing' >&2\nexit 3",
    );
    let mut mesh = Mesh::start(&format!(
        "[[plugin]]\nname = \"echo\"\ncommand = \"{{echo}}\"\n\n\
         [[plugin]]\nname = \"bad\"\ncommand = \"{}\"\nrestart = \"never\"\n",
        bad.display()
    ))
    .await;
    let failed = mesh.wait_state("bad", "bad-0", "failed").await;
    assert!(
        failed
            .detail
            .contains("instance bad-0 exited with status 3 before it was ready"),
        "{failed:?}"
    );
    assert!(
        failed
            .detail
            .contains("last stderr: boom: setting FOO is missing"),
        "{failed:?}"
    );
    mesh.wait_instances("plugin.echo", 1).await;
    echo_answers(&mesh).await;
    assert!(mesh.is_running());
}

#[tokio::test]
async fn a_plugin_that_never_serves_times_out_and_is_stopped() {
    let dir = short_tempdir();
    let pidfile = dir.path().join("pid");
    let silent = script(
        dir.path(),
        "silent",
        // Its pid as the host sees it (`$$` is its pid inside the instance's PID namespace).
        &format!(
            "read -r pid rest < /proc/self/stat\necho $pid > {}\nexec sleep 60",
            pidfile.display()
        ),
    );
    let mut mesh = Mesh::start(&format!(
        "[[plugin]]\nname = \"echo\"\ncommand = \"{{echo}}\"\n\n\
         [[plugin]]\nname = \"silent\"\ncommand = \"{}\"\nready_timeout = \"300ms\"\nstop_grace = \"100ms\"\nrestart = \"never\"\n",
        silent.display()
    ))
    .await;
    let failed = mesh.wait_state("silent", "silent-0", "failed").await;
    let detail = &failed.detail;
    assert!(
        detail.contains("instance silent-0 did not report SERVING on"),
        "{detail}"
    );
    assert!(detail.contains("within 300ms (ready_timeout)"), "{detail}");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    crate::support::wait_gone(&[pid], std::time::Duration::from_secs(5)).await;
    echo_answers(&mesh).await;
    assert!(mesh.is_running());
}

#[tokio::test]
async fn a_second_mesh_on_a_busy_socket_is_refused_and_the_first_keeps_running() {
    let mut first = Mesh::start("[[plugin]]\nname = \"echo\"\ncommand = \"{echo}\"\n").await;
    first.wait_instances("plugin.echo", 1).await;
    let (code, stderr) = up(&first.config);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("is in use by a running process"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&first.socket.display().to_string()),
        "{stderr}"
    );
    echo_answers(&first).await;
    assert!(first.is_running());
}

#[test]
fn a_plugin_run_by_hand_without_its_environment_says_how() {
    let out = Command::new(echo_plugin())
        .env_remove("PLUGIN_SOCKET")
        .env_remove("PLUGIN_NAME")
        .env_remove("PLUGIN_INSTANCE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("PLUGIN_SOCKET, PLUGIN_NAME, PLUGIN_INSTANCE not set"),
        "{stderr}"
    );
    assert!(
        stderr.contains("PLUGIN_SOCKET=/tmp/echo.sock PLUGIN_NAME=echo"),
        "{stderr}"
    );
}
