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
