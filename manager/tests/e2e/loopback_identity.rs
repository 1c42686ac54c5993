//! One identity per process on every listener: a process of this host that dials the
//! router's TCP listener is the caller it is on the Unix socket, named by the kernel's socket
//! table. A plugin without `call:plugin.echo` is refused there (and audited) as it is on the
//! socket, from whatever loopback source address it picks, and its per-caller rate limit is
//! one limit whatever address it dials from; the owner is the owner there; another uid is a
//! local user. Every test also shows the others served meanwhile.

use std::{path::PathBuf, time::Instant};

use mesh::{Address, Channel};
use mesh_proto::{
    echo::v1::echo_client::EchoClient,
    mesh::v1::{ListPluginsRequest, manager_client::ManagerClient},
};
use tonic::Code;

use crate::{
    routing::echo,
    security::{as_nobody, grpcurl_for_others, public_dir},
    support::{DEADLINE, Mesh, Probe, echo_plugin, host_probe, script},
};

/// A mesh with a TCP listener, plugin `files` (a probe beside echo-plugin, with
/// `capabilities`), `echo` (with `echo_settings` in its table) and `other`.
struct Setup {
    mesh: Mesh,
    tcp: String,
    audit: PathBuf,
    probe: Probe,
    dir: tempfile::TempDir,
}

async fn setup(capabilities: &str, echo_settings: &str) -> Setup {
    // Others may enter it: the "other user" runs a grpcurl copied here.
    let dir = public_dir();
    let socket = dir.path().join("probe.sock");
    let command = script(
        dir.path(),
        "files.sh",
        &format!(
            "{} {} &\nexec {}",
            host_probe().display(),
            socket.display(),
            echo_plugin().display()
        ),
    );
    let audit = dir.path().join("audit.log");
    let echo = echo_plugin().display().to_string();
    let plugins = format!(
        "[[plugin]]\nname = \"files\"\ncommand = {command:?}\ncapabilities = [{capabilities}]\n\
         [[plugin]]\nname = \"echo\"\ncommand = {echo:?}\n{echo_settings}\
         [[plugin]]\nname = \"other\"\ncommand = {echo:?}\n",
        command = command.display().to_string(),
    );
    let mesh = Mesh::start_with(
        &format!("listen = \"127.0.0.1:0\"\naudit_log = {audit:?}\n"),
        &plugins,
    )
    .await;
    mesh.wait_line("host-probe: listening").await;
    mesh.wait_instances("plugin.echo", 1).await;
    mesh.wait_instances("plugin.other", 1).await;
    let tcp = mesh.tcp_address().await;
    let probe = Probe::connect(&socket).await;
    Setup {
        mesh,
        tcp,
        audit,
        probe,
        dir,
    }
}

/// The audit log's `call` lines: (plugin, resource, allowed, via).
fn calls(audit: &std::path::Path) -> Vec<(String, String, bool, String)> {
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["action"] == "call")
        .map(|l| {
            (
                l["plugin"].as_str().unwrap_or_default().to_owned(),
                l["resource"].as_str().unwrap_or_default().to_owned(),
                l["allowed"].as_bool().unwrap_or_default(),
                l["via"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The owner's client of `service` over the TCP listener.
fn owner_over_tcp(tcp: &str, service: &str) -> EchoClient<Channel> {
    let address: Address = tcp.parse().unwrap();
    EchoClient::new(Channel::to_address(address, service).unwrap())
}

/// One echo call of the owner's over TCP, answered within the tests' deadline.
async fn owner_is_served(tcp: &str, service: &str) {
    let started = Instant::now();
    let reply = tokio::time::timeout(
        DEADLINE,
        owner_over_tcp(tcp, service).echo(echo("owner over tcp")),
    )
    .await
    .expect("the owner is answered in time")
    .unwrap_or_else(|status| panic!("the owner's call to {service} over TCP: {status:?}"));
    assert_eq!(reply.into_inner().message, "owner over tcp");
    assert!(started.elapsed() < DEADLINE);
}

/// Prints what `mesh up` said when the test fails.
struct Dump<'a>(&'a Mesh);

impl Drop for Dump<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("mesh up said:\n{}", self.0.output());
        }
    }
}

const ECHO: &str = "plugin.echo/echo.v1.Echo/Echo";

#[tokio::test]
async fn a_plugin_without_call_is_refused_on_the_tcp_listener_and_audited_then_allowed_by_a_grant()
{
    let Setup {
        mesh,
        tcp,
        audit,
        mut probe,
        dir: _dir,
    } = setup("\"read:.\"", "").await;
    let _dump = Dump(&mesh);
    let p = &mut probe;
    let refusal = "plugin \"files\" lacks call:plugin.echo";
    // The attack of the issue: the TCP door, with authority plugin.echo, from the default
    // source address and from others of 127/8. Refused as on the router's socket.
    for path in [
        "router".to_owned(),
        format!("tcp {tcp}"),
        format!("tcp {tcp} 127.0.0.2"),
        format!("tcp {tcp} 127.0.0.3"),
    ] {
        let message = p.denied(&format!("call plugin.echo echo {path}")).await;
        assert!(message.contains(refusal), "{path}: {message}");
        // The owner, on the same listener, is served meanwhile; so is another plugin's
        // service.
        owner_is_served(&tcp, "plugin.echo").await;
        owner_is_served(&tcp, "plugin.other").await;
    }
    // Each refusal is one audit line of plugin files, by the router.
    let refused: Vec<_> = calls(&audit)
        .into_iter()
        .filter(|(_, resource, allowed, _)| resource == ECHO && !allowed)
        .collect();
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert!(
        refused
            .iter()
            .all(|(plugin, _, _, via)| plugin == "files" && via == "router"),
        "{refused:?}"
    );

    // Granted at run time: allowed on the TCP listener too, and audited as allowed.
    mesh.cli_ok(&["grant", "files", "call:plugin.echo"]).await;
    assert_eq!(
        p.call(&format!("call plugin.echo echo tcp {tcp} 127.0.0.4"))
            .await,
        Ok("probe".to_owned())
    );
    assert!(
        calls(&audit).contains(&("files".into(), ECHO.into(), true, "router".into())),
        "{:?}",
        calls(&audit)
    );
    // The grant is for plugin.echo only: plugin.other is still refused over TCP.
    let message = p.denied(&format!("call plugin.other echo tcp {tcp}")).await;
    assert!(message.contains("lacks call:plugin.other"), "{message}");
    owner_is_served(&tcp, "plugin.other").await;
}

#[tokio::test]
async fn the_owner_over_tcp_is_the_owner_and_another_uid_is_a_local_user() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs another uid (65534): run it as root"
    );
    let Setup { mesh, tcp, dir, .. } = setup("\"read:.\"", "").await;
    // The owner's process on the TCP listener: the Manager API answers it, as on the socket.
    let address: Address = tcp.parse().unwrap();
    let listed = ManagerClient::new(Channel::to_server(address))
        .list(ListPluginsRequest {})
        .await
        .expect("the owner over TCP may use the Manager API")
        .into_inner();
    assert_eq!(listed.plugins.len(), 3);

    // Uid 65534 on the TCP listener: a local user, who calls plugins and is refused the
    // Manager API by uid (not taken for an anonymous TCP client).
    let grpcurl = grpcurl_for_others(dir.path());
    let called = as_nobody(
        &grpcurl,
        &[
            "-plaintext",
            "-authority",
            "plugin.echo",
            "-d",
            r#"{"message": "nobody over tcp"}"#,
            &tcp,
            "echo.v1.Echo/Echo",
        ],
        &[],
    );
    assert!(
        called.status.success(),
        "{}",
        String::from_utf8_lossy(&called.stderr)
    );
    assert!(String::from_utf8_lossy(&called.stdout).contains("nobody over tcp"));
    let refused = as_nobody(
        &grpcurl,
        &[
            "-plaintext",
            "-authority",
            "localhost",
            &tcp,
            "mesh.v1.Manager/List",
        ],
        &[],
    );
    assert!(
        !refused.status.success(),
        "Manager.List as uid 65534 over TCP"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("PermissionDenied") && err.contains("local uid 65534"),
        "{err}"
    );
    // The owner is still served, by TCP and on the socket.
    owner_is_served(&tcp, "plugin.echo").await;
    assert!(mesh.cli_ok(&["status"]).await.contains("echo-0"));
}

#[tokio::test]
async fn a_plugin_dialing_from_many_loopback_addresses_is_one_caller_to_its_rate_limit() {
    let Setup {
        mesh,
        mut probe,
        tcp,
        ..
    } = setup("\"call:plugin.echo\"", "caller_rate_limit = \"3/h\"\n").await;
    let _dump = Dump(&mesh);
    let p = &mut probe;
    // The attack of the issue: a new source address per call, 127.0.0.2 to 127.0.0.19.
    let mut passed = 0;
    for i in 2..20 {
        match p
            .call(&format!("call plugin.echo echo tcp {tcp} 127.0.0.{i}"))
            .await
        {
            Ok(text) => {
                assert_eq!(text, "probe");
                passed += 1;
            }
            Err((code, message)) => {
                assert_eq!(code, Code::ResourceExhausted as i32, "{message}");
                assert!(
                    message.contains(
                        "plugin \"files\" is over plugin.echo's caller_rate_limit of 3/h"
                    ),
                    "{message}"
                );
            }
        }
    }
    assert_eq!(passed, 3, "one caller, one limit, whatever its address");
    // The owner is another caller, with its own 3; another plugin's service is not limited.
    owner_is_served(&tcp, "plugin.echo").await;
    for _ in 0..5 {
        owner_is_served(&tcp, "plugin.other").await;
    }
}
