//! A plugin in another language: `examples/python-plugin` (grpcio, no mesh code) from its
//! virtualenv under `mesh up`, called through `mesh::connect` and by name with grpcurl.

use std::path::{Path, PathBuf};

use mesh_proto::echo::v1::{EchoRequest, ExpandRequest, echo_client::EchoClient};

use crate::support::{Mesh, grpcurl_ok};

/// The virtualenv `scripts/test` makes (`examples/python-plugin/setup.sh target/python-plugin-venv`).
fn venv_python() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let python = repo.join("target/python-plugin-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `examples/python-plugin/setup.sh target/python-plugin-venv` \
         (scripts/test does)",
        python.display()
    );
    python
}

#[tokio::test]
async fn python_plugin_serves_by_name_and_drains_on_stop() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let script = repo.join("examples/python-plugin/plugin.py");
    // The venv's bin/python is a symlink: the manager runs it by this path, so that Python
    // finds its venv (run by its target, it would not).
    let plugins = format!(
        r#"
[[plugin]]
name = "pyecho"
command = "{}"
args = ["{}"]
stop_grace = "5s"
"#,
        venv_python().display(),
        script.display()
    );
    let mesh = Mesh::start(&plugins).await;
    let instances = mesh.wait_instances("plugin.pyecho", 1).await;
    assert_eq!(instances[0].id, "pyecho-0");

    // mesh::connect: straight to the instance's socket.
    let mut client = EchoClient::new(mesh.connect("plugin.pyecho").await);
    let reply = client
        .echo(EchoRequest {
            message: "hi".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.message.as_str(), reply.instance.as_str()),
        ("hi", "pyecho-0")
    );
    let mut stream = client
        .expand(ExpandRequest {
            message: "py".into(),
            count: 3,
        })
        .await
        .unwrap()
        .into_inner();
    let mut replies = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        replies.push(reply.message);
    }
    assert_eq!(replies, ["py"; 3]);

    // grpcurl by name through the router: reflection (v1alpha, what grpcurl 1.8.6 speaks).
    let socket = mesh.socket.display().to_string();
    let grpcurl = |args: &[&str]| {
        let mut all = vec!["-unix", "-authority", "plugin.pyecho"];
        all.extend_from_slice(args);
        grpcurl_ok(&all)
    };
    let list = grpcurl(&[&socket, "list"]);
    for service in ["echo.v1.Echo", "grpc.health.v1.Health"] {
        assert!(
            list.lines().any(|l| l == service),
            "list shows {service}: {list}"
        );
    }
    let reply = grpcurl(&[
        "-d",
        r#"{"message":"by name"}"#,
        &socket,
        "echo.v1.Echo/Echo",
    ]);
    assert!(reply.contains(r#""instance": "pyecho-0""#), "{reply}");

    // Reflection v1 too (newer tools), asked with the venv's own grpcio on the instance socket.
    let ask_v1 = r#"
import sys, grpc
from grpc_reflection.v1alpha import reflection_pb2 as r
call = grpc.insecure_channel("unix:" + sys.argv[1]).stream_stream(
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    request_serializer=r.ServerReflectionRequest.SerializeToString,
    response_deserializer=r.ServerReflectionResponse.FromString)
for reply in call(iter([r.ServerReflectionRequest(list_services="")]), timeout=10):
    for service in reply.list_services_response.service:
        print(service.name)
"#;
    let out = std::process::Command::new(venv_python())
        .args(["-c", ask_v1])
        .arg(instances[0].socket())
        .output()
        .unwrap();
    let v1 = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && v1.lines().any(|l| l == "echo.v1.Echo"),
        "reflection v1 lists echo.v1.Echo: {v1}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Stopped gracefully: SIGTERM, the plugin drains and exits by itself, no SIGKILL.
    let pid = instances[0].pid;
    mesh.cli_ok(&["stop", "pyecho"]).await;
    crate::support::wait_gone(&[pid], crate::support::DEADLINE).await;
    let logs = mesh.cli_ok(&["logs", "pyecho"]).await;
    assert!(logs.contains("pyecho-0: drained, exiting"), "{logs}");
    let status = mesh.status().await;
    assert_eq!(
        status["plugins"][0]["instances"][0]["last_exit"], "exited with status 0",
        "{status}"
    );
}

/// The same plugin under the kernel sandbox: the interpreter (through the venv's symlinks),
/// its libraries and the venv are found from `command`; the script's directory is named in
/// `sandbox_paths`. It serves, by name through the router.
#[tokio::test]
async fn python_plugin_runs_in_the_kernel_sandbox() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = repo.join("examples/python-plugin");
    let plugins = format!(
        r#"
[[plugin]]
name = "pyecho"
command = "{}"
args = ["{}"]
sandbox = true
sandbox_paths = ["{}"]
"#,
        venv_python().display(),
        dir.join("plugin.py").display(),
        dir.display(),
    );
    let mesh = Mesh::start(&plugins).await;
    let line = mesh.wait_line("plugin pyecho: sandboxed").await;
    assert!(line.contains("fully enforced"), "{line}");
    mesh.wait_instances("plugin.pyecho", 1).await;
    let socket = mesh.socket.display().to_string();
    let reply = grpcurl_ok(&[
        "-unix",
        "-authority",
        "plugin.pyecho",
        "-d",
        r#"{"message":"confined"}"#,
        &socket,
        "echo.v1.Echo/Echo",
    ]);
    assert!(reply.contains("confined"), "{reply}");
    let logs = mesh.cli_ok(&["logs", "pyecho"]).await;
    assert!(logs.contains("mesh: sandboxed:"), "{logs}");
}
